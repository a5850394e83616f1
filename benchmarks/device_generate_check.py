"""On the GPU machine: ``qonnx generate``'s shared KV buffer on the CUDA provider gives the tokens of separate buffers.

A tiny random Llama (the test suite's config) is exported in fp16, lowered for CUDA with GroupQueryAttention, and
generated from with ``Generator(device="cuda")`` both ways (greedy and seeded top-k); the fp32 export on the CPU
gives the reference greedy tokens. Prints one JSON line; exits 1 when the two CUDA runs disagree.

    python benchmarks/device_generate_check.py --work /tmp/gencheck
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/gencheck")
    args = p.parse_args()
    from test_export import tiny_model, tiny_tokenizer

    from qonnx.lowering import lower
    from qonnx.models.export import export_causal_lm
    from qonnx.runtime.generate import Generator

    work = Path(args.work)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    export_causal_lm(model, work / "fp16", tokenizer=tok, dtype="fp16", quiet=True, verify=False)
    summary = lower(work / "fp16", work / "gqa", target="cuda", attention=True, verify=False)
    prompt, new = "the quick brown fox", 16
    shared = Generator(work / "gqa", device="cuda")
    separate = Generator(work / "gqa", device="cuda", shared_kv=False)
    out = {
        "fused": summary.fused,
        "providers": shared.session.get_providers()[:1],
        "shared_path": shared.shared_kv,
        "greedy_shared": shared.generate(prompt, max_new_tokens=new, chat=False).tokens,
        "greedy_separate": separate.generate(prompt, max_new_tokens=new, chat=False).tokens,
    }
    try:
        topk = {"top_k": 5, "seed": 3}
        out["topk_shared"] = shared.generate(prompt, max_new_tokens=new, chat=False, **topk).tokens
        out["topk_separate"] = separate.generate(prompt, max_new_tokens=new, chat=False, **topk).tokens
    except TypeError as e:  # another sampling signature: greedy is what matters here
        out["topk"] = f"skipped: {e}"
    ok = out["greedy_shared"] == out["greedy_separate"] and out.get("topk_shared") == out.get("topk_separate")
    out["agree"] = ok
    print(json.dumps(out))
    return 0 if ok and out["shared_path"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""On the GPU machine: `qonnx generate` decodes the same tokens with a CUDA graph, a shared KV buffer, separate buffers.

A tiny random Llama (the test suite's config) is exported in fp16, lowered for CUDA with GroupQueryAttention, and
generated from with ``Generator(device="cuda")`` three ways (greedy and seeded top-k, twice each for the graph:
the second call replays the graph captured in the first): fixed shapes replayed as a CUDA graph (the default on
CUDA), a shared KV buffer without the graph, separate past/present buffers. Prints one JSON line with the tokens and
decode tokens/s of each; exits 1 when the CUDA runs disagree.

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

    from qonnx.models.export import export_causal_lm
    from qonnx.pipeline.lowering import lower
    from qonnx.runtime.generate import Generator

    work = Path(args.work)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    export_causal_lm(model, work / "fp16", tokenizer=tok, dtype="fp16", quiet=True, verify=False)
    summary = lower(work / "fp16", work / "gqa", target="cuda", attention=True, verify=False)
    prompt, new = "the quick brown fox", 16
    graph = Generator(work / "gqa", device="cuda")
    shared = Generator(work / "gqa", device="cuda", fixed_shapes=False)
    separate = Generator(work / "gqa", device="cuda", shared_kv=False)
    out: dict = {
        "fused": summary.fused,
        "providers": shared.session.get_providers()[:1],
        "graph_path": graph.fixed_shapes,
        "shared_path": shared.shared_kv and not shared.fixed_shapes,
    }
    runs = {"graph": graph, "shared": shared, "separate": separate}
    for label, kwargs in (("greedy", {}), ("topk", {"top_k": 5, "seed": 3})):
        for name, gen in runs.items():
            result = gen.generate(prompt, max_new_tokens=new, chat=False, **kwargs)
            out[f"{label}_{name}"] = result.tokens
            out[f"{label}_{name}_tokens_per_s"] = round(result.decode_tokens_per_second, 1)
        again = graph.generate("a different, longer prompt than before", max_new_tokens=new, chat=False, **kwargs)
        ref = separate.generate("a different, longer prompt than before", max_new_tokens=new, chat=False, **kwargs)
        out[f"{label}_graph_second_call_agrees"] = again.tokens == ref.tokens
    ok = all(
        out[f"{label}_{name}"] == out[f"{label}_separate"]
        for label in ("greedy", "topk")
        for name in ("graph", "shared")
    ) and all(out[f"{label}_graph_second_call_agrees"] for label in ("greedy", "topk"))
    out["agree"] = ok
    print(json.dumps(out))
    return 0 if ok and out["shared_path"] and out["graph_path"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The best fp16 form against W4A16 forms on the CUDA provider, 7B Llama shape: decode at batches 1..64 and
prefill at 128/512/2048 tokens, one model in memory at a time.

Models come from ``bench_gpu.py --prepare-only`` in ``--work`` (fp16 and W4A16, lowered with attention fused).
Decode: fused model, one KV buffer per layer, each step a replayed CUDA graph (bench_gpu's ``GraphRunner``);
prefill: fused model with a shared KV buffer (``Runner``), one sequence of N tokens, median of 5.
W4A16 forms: ``sym-b32`` with the session option ``ep.cuda.fpa_intb_gemm=1`` (set through the environment
variable ``ORT_FPA_INTB_GEMM=1`` here, read by ONNX Runtime when it builds the kernel) and the default
asymmetric block 128 (quantized and lowered here when missing).

Run on the GPU machine after ``bench_gpu.py --sizes 7b --fuse --share-kv --cuda-graph --symmetric --block-size 32
--work W --prepare-only``::

    ORT_FPA_INTB_GEMM=1 python benchmarks/device_best_forms.py --work W --out $OUT/best_forms.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

from bench_gpu import SIZES, GraphRunner, Runner, lower, quantize


def measure(folder: Path, batches: list[int], prompts: list[int], new_tokens: int) -> dict[str, Any]:
    vocab = SIZES["7b"]["vocab_size"]
    out: dict[str, Any] = {"decode": {}, "prefill": {}}
    graph = GraphRunner(folder, "cuda", 128 + new_tokens + 16)
    for b in batches:
        try:
            out["decode"][b] = graph.measure(b, 128, new_tokens, vocab)
        except Exception as e:  # out of memory at a large batch: record and stop
            out["decode"][b] = {"error": str(e).splitlines()[0][-200:]}
            break
        print(folder.name, "decode", b, json.dumps(out["decode"][b]), flush=True)
    del graph
    gc.collect()
    runner = Runner(folder, "cuda", share_kv=True, max_len=max(prompts) + 8)
    for n in prompts:
        out["prefill"][n] = runner.measure(1, n, 2, vocab)["prefill_ms"]
        print(folder.name, "prefill", n, out["prefill"][n], flush=True)
    del runner
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompts", default="128,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--forms", default="fp16,sym-b32,asym-b128")
    args = ap.parse_args(argv)
    work = Path(args.work)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [int(p) for p in args.prompts.split(",")]
    folders = {"fp16": work / "7b-fp16", "sym-b32": work / "7b-w4a16-sym-b32", "asym-b128": work / "7b-w4a16"}
    results: dict[str, Any] = {}
    for form in args.forms.split(","):
        src = folders[form]
        if not (src / "model.onnx").exists():
            src, _ = quantize(folders["fp16"], work, "7b", symmetric=False, block=128)
        fused, _ = lower(src, "cuda", attention=True)
        results[form] = measure(fused, batches, prompts, args.new_tokens)
        Path(args.out).write_text(json.dumps(results, indent=1))
    base = results.get("fp16")
    if base:
        for form, r in results.items():
            dec = " ".join(
                f"b{b}:{base['decode'][b]['step_ms'] / v['step_ms']:.2f}x"
                for b, v in r["decode"].items()
                if "step_ms" in v and "step_ms" in base["decode"].get(b, {})
            )
            pre = " ".join(f"p{n}:{base['prefill'][n] / v:.2f}x" for n, v in r["prefill"].items())
            print(f"{form}: decode {dec}; prefill {pre}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""NF4 / FP4 (MatMulBnb4) against W4A16 (MatMulNBits) at the same block size on the reference model.

usage: python benchmarks/bench_nf4.py EXPORT_DIR OUT_DIR [--block-size 64] [--algos rtn,gptq]
Quantizes EXPORT_DIR (``qonnx export smollm2 -o DIR``) with each scheme and algorithm through ``qonnx.quantize``,
then measures perplexity with the standard protocol (pydoc, first 24 x 512 tokens, ONNX Runtime CPU) and
prints a Markdown table with file sizes and wall times.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import qonnx
from qonnx.core.schemes import scheme_from_name
from qonnx.runtime.evaluate import perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--algos", default="rtn,gptq")
    ap.add_argument("--schemes", default="w4a16,nf4,fp4")
    args = ap.parse_args()
    rows = []
    for algo in args.algos.split(","):
        for scheme in args.schemes.split(","):
            out = args.out / f"{scheme}-{algo}-b{args.block_size}"
            start = time.perf_counter()
            cfg = scheme_from_name(scheme, block_size=args.block_size, algo=algo)
            summary = qonnx.quantize(str(args.export), cfg, output=str(out), verify=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(out, progress=False)["perplexity"]
            size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
            rows.append((scheme, algo, len(summary.quantized), len(summary.skipped), size, ppl, seconds))
            print(f"{scheme} {algo}: ppl {ppl:.3f}, {size / 1e6:.1f} MB, {seconds:.0f} s", flush=True)
    print(f"\nblock size {args.block_size}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end")
    print("| scheme | algo | layers quantized / skipped | model file | perplexity (24 x 512) | quantize s |")
    print("|---|---|---|---|---|---|")
    for scheme, algo, q, s, size, ppl, sec in rows:
        print(f"| {scheme} | {algo} | {q} / {s} | {size / 1e6:.1f} MB | {ppl:.3f} | {sec:.0f} |")


if __name__ == "__main__":
    main()

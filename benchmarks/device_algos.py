"""On the GPU machine: time the calibrated weight-only algorithms (GPTQ, AWQ, AWQ+GPTQ) on the reference model.

The reference model (SmolLM2-135M-Instruct) is exported there from its GGUF file (carried in chunks); then
``qonnx quantize --algo ALGO`` runs once per algorithm in its own process (wall time and peak RSS from
``wait4``): Hessians are captured through ONNX Runtime's CUDA provider and the solves run in torch on the GPU.
Each output is evaluated with the standard perplexity protocol (24 x 512 tokens, CUDA provider) so that the
numbers can be checked against the CPU runs in benchmarks/RESULTS.md. An algorithm this checkout does not
know is recorded with its error and skipped.

Usage (device)::

    python benchmarks/device_algos.py --gguf /tmp/smol.gguf --work /tmp/dg --out $OUT/algos.json --algos gptq,awq
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from device_activations import timed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--work", default="/tmp/dg")
    p.add_argument("--out", required=True)
    p.add_argument("--algos", default="gptq,awq,awq+gptq")
    p.add_argument("--extra", default="", help="more quantize options, space-separated (e.g. '--symmetric')")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    qonnx = [sys.executable, "-m", "qonnx.cli"]
    res: dict = {"torch_cuda": None}
    try:
        import torch

        res["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:
        res["torch_cuda"] = f"unavailable: {e}"
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    fp32 = work / "fp32"
    if not (fp32 / "model.onnx").exists():
        res["export"] = timed([*qonnx, "export", args.gguf, "-o", str(fp32)], work / "export.log")
        save()
    extra = args.extra.split()
    for algo in args.algos.split(","):
        dst = work / algo.replace("+", "_")
        run = timed(
            [*qonnx, "quantize", str(fp32), "-o", str(dst), "--algo", algo, "--no-verify", *extra],
            work / f"q-{algo}.log",
        )
        res[algo] = {"quantize": run}
        save()
        if run["rc"] == 0 and not args.no_eval:
            ev = timed(
                [*qonnx, "eval", str(dst), "--task", "perplexity", "--device", "cuda", "--json"],
                work / f"e-{algo}.log",
            )
            text = (work / f"e-{algo}.log").read_text()
            try:
                ev["perplexity"] = json.loads(text[text.index("{") :])["perplexity"]
            except (ValueError, KeyError):
                ev["perplexity"] = None
            res[algo]["eval"] = ev
            save()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

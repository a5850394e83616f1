"""On the GPU machine's 16-core CPU: prepare SmolLM2 fp32 / W8A8 models, lowered, then run bench_cpu_decode.py.

Steps (each skipped when its output folder exists): export the GGUF to fp32 ONNX; W8A8 (`--scheme w8a8`, CPU
calibration, the README's defaults); W8A8 with the tied lm_head as dynamic int8 (API); `qonnx lower` of fp32 and
both W8A8 models; then ``bench_cpu_decode.py`` on the five folders, its section written to ``--section-out``.

    python benchmarks/device_cpu_decode.py --gguf /tmp/smol.gguf --work /tmp/cd --section-out $OUT/cpu_decode.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def step(label: str, out: Path, fn) -> None:  # type: ignore[no-untyped-def]
    if (out / "model.onnx").exists():
        print(f"{label}: reused {out}", flush=True)
        return
    t = time.perf_counter()
    fn()
    print(f"{label}: {time.perf_counter() - t:.1f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--work", default="/tmp/cpu-decode")
    p.add_argument("--section-out", default="")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prepare-only", action="store_true", help="make the models, measure nothing")
    args = p.parse_args()
    import qonnx
    from qonnx.pipeline.lowering import lower

    work = Path(args.work)
    fp32, w8, lmh = work / "fp32", work / "w8a8", work / "w8a8-lmh"
    cli = [sys.executable, "-m", "qonnx.cli"]
    step("export", fp32, lambda: subprocess.check_call([*cli, "export", args.gguf, "-o", str(fp32)]))
    cal = qonnx.Calibration(device="cpu")
    step("w8a8", w8, lambda: qonnx.quantize(fp32, qonnx.W8A8(calibration=cal), output=w8, verify=False))
    step(
        "w8a8-lmh",
        lmh,
        lambda: qonnx.quantize(
            fp32, qonnx.W8A8(calibration=cal), output=lmh, targets={"re:lm_head": qonnx.Dynamic()}, verify=False
        ),
    )
    for src in (fp32, w8, lmh):
        low = src.with_name(src.name + "-low")
        step(f"lower {src.name}", low, lambda src=src, low=low: lower(src, low))
    if args.prepare_only:
        return 0
    cmd = [
        sys.executable,
        str(HERE / "bench_cpu_decode.py"),
        f"fp32={fp32}",
        f"fp32-low={work / 'fp32-low'}",
        f"w8a8={w8}",
        f"w8a8-low={work / 'w8a8-low'}",
        f"w8a8-lmh-low={work / 'w8a8-lmh-low'}",
        "--rounds",
        str(args.rounds),
        "--section-out",
        args.section_out,
    ]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

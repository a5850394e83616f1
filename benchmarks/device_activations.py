"""On the GPU machine: W8A8 calibration on CUDA vs CPU, and W8A8 / dynamic speed vs fp32 on its 16-core CPU.

The reference model (SmolLM2-135M-Instruct) is exported there from its GGUF file (carried in chunks), then
``qonnx quantize --scheme w8a8`` runs once with calibration on the CUDA provider and once on the CPU, each in
its own process (wall time and peak RSS from ``wait4``); the CPU-calibrated model and a ``dynamic`` one are then
timed against fp32 with bench_activations.py's probe (prefill 16 x 128 tokens, decode at batch 16 and 1).

Usage (device)::

    python benchmarks/device_activations.py --gguf /tmp/smol.gguf --work /tmp/da --out $OUT/da.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (bytes) and exit code."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {
        "cmd": " ".join(cmd),
        "seconds": round(time.perf_counter() - t, 2),
        "peak_rss": usage.ru_maxrss * 1024,
        "rc": os.waitstatus_to_exitcode(status),
        "log_tail": log.read_text()[-600:],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--work", default="/tmp/da")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=100.0, help="seconds per speed comparison")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    qonnx = [sys.executable, "-m", "qonnx.cli"]
    res: dict = {}
    fp32 = work / "fp32"
    if not (fp32 / "model.onnx").exists():
        res["export"] = timed([*qonnx, "export", args.gguf, "-o", str(fp32)], work / "export.log")
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    save()
    calib = ["--calib-samples", "8", "--calib-seq-len", "512", "--no-verify", "--json"]
    for device in ("cuda", "cpu"):
        dst = work / f"w8a8-{device}"
        res[f"w8a8_calibrated_on_{device}"] = timed(
            [*qonnx, "quantize", str(fp32), "-o", str(dst), "--scheme", "w8a8", "--device", device, *calib],
            work / f"q-{device}.log",
        )
        save()
    res["dynamic"] = timed(
        [*qonnx, "quantize", str(fp32), "-o", str(work / "dynamic"), "--scheme", "dynamic", "--no-verify"],
        work / "q-dynamic.log",
    )
    save()
    import bench_activations as ba

    for name in ("w8a8-cpu", "dynamic"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            ba.speed_child(str(fp32), str(work / name), args.rounds, (8, 16), args.budget)
        figures = json.loads(buf.getvalue().strip().splitlines()[-1])
        res[f"speed_{name}"] = {
            kind: {
                "fp32": max(v["fp32"]),
                "model": max(v["model"]),
                "ratio": round(max(v["model"]) / max(v["fp32"]), 3),
            }
            for kind, v in figures.items()
            if isinstance(v, dict)
        }
        save()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

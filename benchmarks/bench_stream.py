"""Layer-streamed GPTQ vs whole-model GPTQ: wall time, peak host RSS and peak GPU memory of ``qonnx quantize``.

A random Llama of a bench_gpu.py shape (``--size 7b``; ``--layers`` overrides the depth) is built and exported
with the KV cache (bench_gpu.py's ``build_and_export``: fp16 on CUDA, fp32 on the CPU), calibration feeds are
written as a .npz file (random tokens, ``--samples`` x ``--seq-len``, an empty KV cache), then each mode runs
``qonnx quantize --algo gptq`` in its own process:

- ``gptq``: whole-model calibration (one ONNX Runtime session of the whole model), then the solves;
- ``gptq-seq``: ``--sequential`` (one pruned whole-model session per stage);
- ``stream``: ``--stream-layers`` (one session per decoder layer; a layer's Hessians from one run);
- ``stream-seq``: ``--stream-layers --sequential`` (q/k/v, o, gate/up, down solved in turn in each layer).

Per mode: wall seconds and peak RSS of the child (``wait4``), the peak GPU memory in use on the device while
it ran minus that before it (``nvidia-smi``, sampled every 0.2 s; null without a GPU), the phases qonnx
reports, and the logits SQNR of the quantized model against the float one on a held-out feed.

Usage (GPU machine)::

    python benchmarks/bench_stream.py --size 7b --work /tmp/bs --out $OUT/stream.json
    python benchmarks/bench_stream.py --size 7b --layers 8 --modes gptq,stream-seq ...   # a quicker look

CPU smoke test: ``python benchmarks/bench_stream.py --size tiny --device cpu --work /tmp/bs --out /tmp/bs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gpu import SIZES, build_and_export  # noqa: E402

MODES = {
    "gptq": [],
    "gptq-seq": ["--sequential"],
    "stream": ["--stream-layers"],
    "stream-seq": ["--stream-layers", "--sequential"],
}


class GpuPeak:
    """The most GPU memory (MiB) in use on device 0 while the block runs, less that before it (None: no GPU)."""

    def __init__(self) -> None:
        self.base = self._used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return int(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            used = self._used()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __enter__(self) -> GpuPeak:
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mib(self) -> int | None:
        return None if self.base is None or self.peak is None else self.peak - self.base


def feeds_npz(model: Path, out: Path, samples: int, seq_len: int, vocab: int) -> Path:
    """Random-token calibration feeds for the exported model (empty KV cache), one array per input."""
    from qonnx.runtime.calibration import GraphIO

    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for inp in GraphIO(model / "model.onnx").get_inputs():
        if inp.name == "input_ids":
            arrays[inp.name] = rng.integers(3, vocab, (samples, 1, seq_len))
        elif inp.name == "attention_mask":
            arrays[inp.name] = np.ones((samples, 1, seq_len), np.int64)
        elif inp.name == "position_ids":
            arrays[inp.name] = np.tile(np.arange(seq_len), (samples, 1, 1))
        else:  # past key/value [batch, kv heads, 0, head dim]
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            arrays[inp.name] = np.zeros((samples, 1, inp.shape[1], 0, inp.shape[3]), dtype)
    np.savez(out, **arrays)
    return out


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``: wall seconds, peak RSS (bytes), peak GPU memory (MiB), exit code, its --json summary."""
    with GpuPeak() as gpu:
        t = time.perf_counter()
        with open(log, "w") as f, open(log.with_suffix(".json"), "w") as js:
            proc = subprocess.Popen(cmd, stdout=js, stderr=f)
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
    res = {
        "cmd": " ".join(cmd),
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "gpu_peak_mib": gpu.mib,
        "rc": os.waitstatus_to_exitcode(status),
    }
    try:
        summary = json.loads(log.with_suffix(".json").read_text())
        res["phases"] = summary.get("phases")
    except (OSError, ValueError):
        res["log_tail"] = log.read_text()[-600:]
    return res


def sqnr(float_model: Path, quantized: Path, feeds: Path, device: str) -> float:
    """Logits SQNR (dB) of ``quantized`` against ``float_model`` on the last calibration feed."""
    from qonnx.runtime.session import make_session

    data = np.load(feeds)
    feed = {k: data[k][-1] for k in data.files}
    ref = make_session(float_model / "model.onnx", device).run(["logits"], feed)[0].astype(np.float64)
    out = make_session(quantized / "model.onnx", device).run(["logits"], feed)[0].astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="7b", choices=sorted(SIZES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--modes", default="gptq,stream-seq,stream", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--work", default="/tmp/bench-stream")
    p.add_argument("--out", required=True)
    p.add_argument("--no-sqnr", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = args.size
    if args.layers is not None:
        size = f"{args.size}-l{args.layers}"
        SIZES[size] = {**SIZES[args.size], "num_hidden_layers": args.layers}
    res: dict = {"size": size, "shape": SIZES[size], "samples": args.samples, "seq_len": args.seq_len, "modes": {}}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    src, seconds, params = build_and_export(size, work, args.device)
    res.update(export_seconds=round(seconds, 1), params=params)
    npz = feeds_npz(src, work / f"{size}-feeds.npz", args.samples, args.seq_len, SIZES[size]["vocab_size"])
    save()
    qonnx = [sys.executable, "-m", "qonnx.cli", "quantize", str(src), "--algo", "gptq", "--no-verify", "--json"]
    calib = ["--calib-data", str(npz), "--calib-samples", str(args.samples)]
    for mode in args.modes.split(","):
        dst = work / f"{size}-{mode}"
        r = timed([*qonnx, "-o", str(dst), *calib, *MODES[mode]], work / f"{size}-{mode}.log")
        if r["rc"] == 0 and not args.no_sqnr:
            r["logits_sqnr_db"] = round(sqnr(src, dst, npz, args.device), 2)
        res["modes"][mode] = r
        save()
        gpu = "-" if r["gpu_peak_mib"] is None else f"{r['gpu_peak_mib']} MiB"
        print(f"{mode}: rc {r['rc']}, {r['seconds']} s, host RSS {r['peak_rss_gb']} GB, GPU {gpu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``qonnx demo``: quantize an embedded default model offline and show what it gained and lost.

Until the reference LLM export lands, the default is a decoder-shaped model built in code (hidden 576,
like SmolLM2-135M, so the last block of 128 is ragged).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from qonnx.api import quantize
from qonnx.config import W4A16
from qonnx.models.synthetic import build_decoder_stack
from qonnx.runtime.session import make_session

__all__ = ["run_demo"]


def _latency_ms(session: Any, feeds: dict[str, np.ndarray], repeat: int) -> float:
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_demo(work_dir: str | Path = "qonnx-demo", *, repeat: int = 10, seed: int = 0) -> dict[str, Any]:
    """Build, quantize (W4A16, block 128) and compare; returns the figures the table shows."""
    work = Path(work_dir)
    src = build_decoder_stack(
        work / "fp32" / "model.onnx", hidden=576, intermediate=1536, layers=4, vocab=4096, seed=seed
    )
    summary = quantize(src, W4A16(block_size=128), output=work / "w4a16" / "model.onnx")
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((1, 128, 576)).astype(np.float32)}
    rows = []
    ref = None
    for name, path in (("fp32", src), ("w4a16", summary.outputs[0])):
        sess = make_session(path, "cpu")
        y = sess.run(None, feeds)[0]
        if ref is None:
            ref = y
        err = float(((ref.astype(np.float64) - y) ** 2).sum())
        sqnr = float("inf") if err == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / err)
        rows.append(
            {
                "model": name,
                "bytes": sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file()),
                "sqnr_db": sqnr,
                "top1_agreement": float((y.argmax(-1) == ref.argmax(-1)).mean()),
                "latency_ms": _latency_ms(sess, feeds, repeat),
            }
        )
    return {"rows": rows, "quantized_layers": len(summary.quantized), "seconds": summary.seconds, "work_dir": str(work)}


def format_table(result: dict[str, Any]) -> str:
    """The demo's table as text."""
    lines = [f"{'model':<8} {'size':>10} {'SQNR dB':>8} {'top-1 agree':>11} {'latency ms':>11}"]
    for r in result["rows"]:
        sqnr = "ref" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"
        lines.append(
            f"{r['model']:<8} {r['bytes'] / 2**20:>7.1f} MiB {sqnr:>8} {r['top1_agreement']:>11.1%} "
            f"{r['latency_ms']:>11.2f}"
        )
    lines.append(
        f"quantized {result['quantized_layers']} layers in {result['seconds']:.1f} s; "
        f"models in {result['work_dir']}/ (batch 1, 128 tokens, CPU)"
    )
    return "\n".join(lines)

"""Measured speed of each scheme against floating point, per target: what ``warn_if_slow`` consults.

Every figure comes from a benchmark script in ``benchmarks/`` and is recorded in ``benchmarks/RESULTS.md``;
``ratio`` is the scheme's throughput divided by floating point's on the same shapes (above 1: faster).
Targets without a measured row get no warning.
"""

from __future__ import annotations

import sys
from typing import Any

from qonnx.core.errors import ConfigError

__all__ = ["MEASURED", "warn_if_slow"]

#: (scheme name, target) -> (ratio vs float, what was measured, where)
MEASURED: dict[tuple[str, str], tuple[float, str, str]] = {
    # benchmarks/bench_targets.py (RESULTS.md sections bench_targets_cpu16 / bench_targets_cuda): one 4096x4096
    # layer, the smaller ratio of M=16 (batched decode) and M=256 (prefill); CPU: the 16-core host, fp32;
    # CUDA: an H100, fp16, per layer of 8 chained; ONNX Runtime 1.31.1.
    ("w8a8", "cpu"): (2.43, "W8A8 QDQ layer (MatMulIntegerToFloat) vs fp32, CPU provider, 16 cores", "bench_targets"),
    # W4A8 for the CPU is emitted as MatMulNBits with accuracy_level 4 (as QDQ it ran 0.03x: bench_targets);
    # that kernel ran 0.93x fp32 at M=64 and 1.08x at M=1 on a 4096 layer (16 cores, ../shared/device/README.md).
    ("w4a8", "cpu"): (0.93, "W4A8 as MatMulNBits accuracy_level 4 vs fp32 at M=64, CPU provider", "device README"),
    ("fp8", "cpu"): (0.5, "FP8 QDQ layer vs fp32, CPU provider: no float8 kernel, Q/DQ simulated", "bench_targets"),
    ("w8a8", "cuda"): (0.26, "W8A8 QDQ layer vs fp16, CUDA provider, H100", "bench_targets"),
    ("w4a8", "cuda"): (0.2, "W4A8 QDQ layer vs fp16, CUDA provider, H100", "bench_targets"),
    ("fp8", "cuda"): (0.63, "FP8 QDQ layer vs fp16, CUDA provider, H100 (GemmFloat8: 0.07-0.22x)", "bench_targets"),
}


def warn_if_slow(scheme: Any, config: Any) -> None:
    """Warn (or raise with ``strict``) when the scheme measured slower than floating point on its target."""
    target = getattr(scheme, "target", "generic")
    row = MEASURED.get((getattr(config, "name", ""), target))
    if row is None or row[0] >= 1.0:
        return
    ratio, what, where = row
    message = (
        f"{config.name} on target {target} measured {ratio:.2f}x the speed of floating point ({what}; {where}): "
        "the model gets smaller but slower there"
    )
    if getattr(scheme, "strict", False):
        raise ConfigError(f"{message}; refusing (strict)")
    print(f"qonnx: WARNING: {message}", file=sys.stderr)

"""Measured speed of each scheme against floating point, per target: what ``warn_if_slow`` consults.

Every figure comes from a benchmark script in ``benchmarks/`` and is recorded in ``benchmarks/RESULTS.md``;
``ratio`` is the scheme's throughput divided by floating point's on the same shapes (above 1: faster).
Targets without a measured row get no warning.
"""

from __future__ import annotations

import sys
from typing import Any

from qonnx.errors import ConfigError

__all__ = ["MEASURED", "warn_if_slow"]

#: (scheme name, target) -> (ratio vs float, what was measured, where)
MEASURED: dict[tuple[str, str], tuple[float, str, str]] = {
    # ../shared/device/README.md (H100, ORT 1.31.1 CUDA provider, 4096x4096 MatMul, batch 64): QDQ int8 99 us,
    # fp16 33 us.
    ("w8a8", "cuda"): (0.33, "QDQ int8 MatMul 4096x4096 at batch 64 vs fp16, CUDA provider, H100", "device README"),
    ("w4a8", "cuda"): (
        0.33,
        "QDQ int8 activations run as float MatMul after dequantization, CUDA provider",
        "device README",
    ),
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

"""Grids: the one home of the rounding rule. Pure functions on numpy arrays or torch tensors, no graphs.

A grid turns a value already divided by its scale (and shifted by its zero point) into a code, and says how a
block's range picks its scale. Round-to-nearest (:mod:`qonnx.core.quant`), GPTQ, AWQ, HQQ, the activation
observers and the fake quantization of SmoothQuant's search all round through a grid from here, so that they
agree bit for bit.

Conventions match ONNX Runtime's MLAS quantizer so results are comparable:

* integer codes are ``clamp(roundf(x * (1 / scale) + zero_point))`` in float32 in the unsigned domain
  (symmetric codes use the zero point 2^(bits-1) there), ties away from zero (:func:`round_half_up`);
* asymmetric ranges are widened to include 0, ``scale = (max - min) / (qmax - qmin)``,
  ``zero_point = round(qmin - min / scale)`` clamped to the integer range;
* symmetric: the value of largest magnitude maps to the most negative code (``scale = v / qmin``), so the
  full signed range is used; the zero point is 0;
* float8 E4M3 (FN): ``code = e4m3(clip(x / scale, -448, 448))``, round to nearest even, ``scale = max|x| / 448``;
* lookup grids (NF4, FP4: bitsandbytes' 4-bit value tables in [-1, 1]): ``scale = max|x|`` per block and the
  code of the nearest table value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

__all__ = [
    "FP8_MAX",
    "FLOAT8",
    "FP4",
    "NF4",
    "Float8Grid",
    "IntGrid",
    "LookupGrid",
    "activation_qparams",
    "inverse",
    "qrange",
    "round_half_up",
]

#: Largest finite float8 E4M3 (FN) value.
FP8_MAX = 448.0
_FMAX = float(np.finfo(np.float32).max)


def _is_numpy(v: Any) -> bool:
    return isinstance(v, (np.ndarray, np.generic, float, int))


def round_half_up(v: Any) -> Any:
    """Round to nearest, ties up: C's ``roundf`` (ties away from zero) for v >= 0. Overwrites ``v``.

    Works on numpy arrays and torch tensors alike (the fraction ``v - floor(v)`` is exact in float32).
    """
    f = np.floor(v) if _is_numpy(v) else v.floor()
    v -= f
    f += v >= 0.5
    return f


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Return the integer range (qmin, qmax): signed when symmetric, unsigned otherwise."""
    if bits not in (2, 3, 4, 7, 8):
        raise ValueError(f"bits must be 2, 3, 4, 7 or 8, got {bits}")
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def inverse(scale: np.ndarray) -> np.ndarray:
    """``1 / scale`` in float32, 0 for a zero scale, clipped so that ``0 * inv`` stays finite (subnormal scales)."""
    s = scale.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    return np.clip(inv, -_FMAX, _FMAX, out=inv)


@dataclasses.dataclass(frozen=True)
class IntGrid:
    """Integer codes of ``bits`` bits, signed (symmetric, zero point 0) or unsigned with a zero point."""

    kind: ClassVar[str] = "int"
    bits: int
    symmetric: bool

    def __post_init__(self) -> None:
        qrange(self.bits, self.symmetric)  # validates bits

    @property
    def qmin(self) -> int:
        """Smallest code (signed when symmetric)."""
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest code."""
        return qrange(self.bits, self.symmetric)[1]

    @property
    def offset(self) -> int:
        """What moves a code into the unsigned domain codes are rounded in: 2^(bits-1) when symmetric."""
        return -self.qmin if self.symmetric else 0

    def qparams(
        self, mn: np.ndarray, mx: np.ndarray, scale_dtype: np.dtype | type = np.float32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scale (in ``scale_dtype``) and int32 zero point from per-block minima and maxima.

        The scale is rounded to ``scale_dtype`` before the zero point is chosen, so dequantization in that
        dtype reproduces the codes exactly.
        """
        qmin, qmax = self.qmin, self.qmax
        mn = mn.astype(np.float32, copy=False)
        mx = mx.astype(np.float32, copy=False)
        if self.symmetric:
            v = np.where(np.abs(mn) >= np.abs(mx), mn, mx)  # the value of largest magnitude, with its sign, -> qmin
            scale = (v / np.float32(qmin)).astype(scale_dtype).astype(np.float32)
            zp = np.zeros(scale.shape, dtype=np.int32)
        else:
            mn = np.minimum(mn, 0.0)
            mx = np.maximum(mx, 0.0)
            scale = ((mx - mn) / np.float32(qmax - qmin)).astype(scale_dtype).astype(np.float32)
            safe = np.where(scale == 0, np.float32(1), scale)
            zp = np.clip(round_half_up(np.float32(qmin) - mn / safe), qmin, qmax).astype(np.int32)
        return scale.astype(scale_dtype), zp

    def round(self, v: Any) -> Any:
        """Codes in the unsigned domain for ``v = x * (1 / scale) + zero_point + offset`` (overwritten), as floats."""
        q = round_half_up(v)
        lo, hi = self.qmin + self.offset, self.qmax + self.offset
        return np.clip(q, lo, hi, out=q) if _is_numpy(q) else q.clamp_(lo, hi)

    def codes(self, v: np.ndarray) -> np.ndarray:
        """Stored codes (int8 when symmetric, else uint8) for ``v`` as in :meth:`round` (overwritten)."""
        codes = self.round(v).astype(np.uint8)
        return (codes.astype(np.int16) - self.offset).astype(np.int8) if self.symmetric else codes


@dataclasses.dataclass(frozen=True)
class Float8Grid:
    """float8 E4M3 (FN) codes with one scale per block: ``x ~ e4m3(x / scale) * scale``."""

    kind: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8
    symmetric: ClassVar[bool] = True

    def qparams(self, mn: np.ndarray, mx: np.ndarray, scale_dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Scale per block: its largest magnitude maps to 448 (1 for an all-zero block), in ``scale_dtype``.

        A block holding NaN gets a NaN scale (as integer grids give it), so that it shows.
        """
        amax = np.maximum(np.abs(mn), np.abs(mx)).astype(np.float32)
        scale = (amax / np.float32(FP8_MAX)).astype(scale_dtype).astype(np.float32)
        return np.where(scale == 0, np.float32(1.0), scale).astype(scale_dtype)

    def round(self, v: Any) -> Any:
        """The E4M3 value nearest ``v = x / scale`` (clipped to +-448), as float32."""
        if _is_numpy(v):
            return np.clip(v, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        import torch  # heavy: only the torch solvers (GPTQ) pass tensors, and they imported it already

        return v.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)

    def codes(self, v: np.ndarray) -> np.ndarray:
        """Stored float8 codes for ``v = x / scale``."""
        return np.clip(v, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class LookupGrid:
    """A 4-bit grid of 16 values in [-1, 1] with one absmax scale per block (bitsandbytes' NF4 and FP4).

    ``values`` are in code order (code i stands for ``values[i] * scale``); a value rounds to the nearest
    table entry (ties to the smaller value, as bitsandbytes' thresholds do).
    """

    kind: str
    values: tuple[float, ...]
    sign_bit: bool = False  # code 8 | c stands for -values[c]: the sign is kept, the magnitude rounded
    bits: ClassVar[int] = 4
    symmetric: ClassVar[bool] = True

    def qparams(self, mn: np.ndarray, mx: np.ndarray, scale_dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Scale per block: its largest magnitude (so that values land in [-1, 1]), 1 for an all-zero block.

        A block holding NaN gets a NaN scale (as integer grids give it), so that it shows.
        """
        amax = np.maximum(np.abs(mn), np.abs(mx)).astype(np.float32).astype(scale_dtype).astype(np.float32)
        return np.where(amax == 0, np.float32(1.0), amax).astype(scale_dtype)

    def index(self, v: Any) -> Any:
        """Codes (int) of the table values nearest ``v = x / scale``."""
        half = len(self.values) // 2 if self.sign_bit else len(self.values)
        order = np.argsort(np.asarray(self.values[:half], np.float32), kind="stable")
        table = np.asarray(self.values[:half], np.float32)[order]
        mids = (table[1:] + table[:-1]) / 2
        if _is_numpy(v):
            x = np.abs(v) if self.sign_bit else v
            codes = order[np.searchsorted(mids, x, side="left")]
            return codes + half * (v < 0) if self.sign_bit else codes
        import torch  # heavy: only the torch solvers (GPTQ) pass tensors, and they imported it already

        x = (v.abs() if self.sign_bit else v).contiguous()
        codes = torch.from_numpy(order).to(v.device)[torch.searchsorted(torch.from_numpy(mids).to(v.device), x)]
        return codes + half * (v < 0) if self.sign_bit else codes

    def round(self, v: Any) -> Any:
        """The table value nearest ``v = x / scale``, as float32."""
        codes = self.index(v)
        table = np.asarray(self.values, np.float32)
        if _is_numpy(v):
            return table[codes]
        import torch  # heavy: only the torch solvers (GPTQ) pass tensors

        return torch.from_numpy(table).to(v.device)[codes]

    def codes(self, v: np.ndarray) -> np.ndarray:
        """Stored codes (uint8, 0..15) for ``v = x / scale``."""
        return self.index(v).astype(np.uint8)


#: E4M3 (FN) float8.
FLOAT8 = Float8Grid()


#: bitsandbytes' NormalFloat4: quantiles of a standard normal, scaled to [-1, 1] (code 7 is 0).
NF4 = LookupGrid(
    "nf4",
    (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ),
)  # fmt: skip
#: bitsandbytes' FP4 (E2M1 with its own exponent bias): sign bit 3, values scaled so that the largest is 1.
FP4 = LookupGrid(
    "fp4",
    (
        0.0, 0.005208333333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
        -0.0, -0.005208333333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25,
    ),
    sign_bit=True,
)  # fmt: skip


def activation_qparams(lo: float, hi: float, kind: str, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) for one activation tensor whose values are clipped to [lo, hi].

    ``kind`` "int8": symmetric gives int8 codes with zero point 0 (``scale = max|.| / 127``, so that -128
    is never needed and the range stays symmetric); asymmetric gives uint8 codes with the range widened
    to hold 0 exactly. "fp8": float8 E4M3, ``scale = max|.| / 448``, zero point 0.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    amax = max(-lo, hi)
    tiny = float(np.finfo(np.float32).tiny)
    if kind == "fp8":
        return max(amax / FP8_MAX, tiny), 0
    if kind != "int8":
        raise ValueError(f"kind must be 'int8' or 'fp8', got {kind!r}")
    if symmetric:
        return max(amax / 127.0, tiny), 0
    scale = max((hi - lo) / 255.0, tiny)
    zp = int(np.clip(round_half_up(np.float64(-lo / scale)), 0, 255))
    return scale, zp

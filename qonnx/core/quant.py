"""Weights quantized in blocks: pure, graph-free functions on numpy arrays.

Weights are quantized in blocks along one axis (the reduction axis K of a MatMul). A block size of
``None`` means one block per channel (the whole axis). When the axis length is not a multiple of the
block size the last block is ragged: it holds the remaining elements and gets its own scale. The rounding
rule and the choice of scale and zero point belong to the grid (:mod:`qonnx.core.numerics`);
``dequantize(q, scale, zp) = (q - zp) * scale``. The MatMulNBits byte layout is in :mod:`qonnx.core.packing`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qonnx.core.numerics import FLOAT8, Float8Grid, IntGrid, LookupGrid, inverse

__all__ = [
    "QuantizedBlocks",
    "QuantizedMatrix",
    "ScaledMatrix",
    "choose_qparams",
    "dequantize",
    "num_blocks",
    "quantize",
    "quantize_blocked",
    "quantize_fp8_kn",
    "quantize_kn",
    "quantize_scaled_kn",
]


def num_blocks(length: int, block_size: int | None) -> int:
    """Number of blocks along an axis of ``length`` elements (the last one may be ragged)."""
    if block_size is None:
        return 1
    return -(-length // block_size)


def _to_blocks(w: np.ndarray, block_size: int | None) -> np.ndarray:
    """View a [C, K] array as [C, nblocks, block] with the ragged tail padded by repeating nothing.

    The padding uses the block's own first element so that it never widens a block's range.
    """
    c, k = w.shape
    bs = k if block_size is None else block_size
    nb = num_blocks(k, block_size)
    pad = nb * bs - k
    if pad:
        # Pad with the first element of the last block: keeps min/max/argmax-abs of that block unchanged.
        fill = np.repeat(w[:, (nb - 1) * bs : (nb - 1) * bs + 1], pad, axis=1)
        w = np.concatenate([w, fill], axis=1)
    return w.reshape(c, nb, bs)


def choose_qparams(
    blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block along the last axis of ``blocks`` [..., block] (see IntGrid.qparams)."""
    x = blocks.astype(np.float32, copy=False)
    return IntGrid(bits, symmetric).qparams(x.min(axis=-1), x.max(axis=-1), scale_dtype)


def quantize(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Quantize blocks [..., block] with per-block scale/zero point [...] to int codes (int8 / uint8).

    Codes are computed in the unsigned domain as ONNX Runtime's MLAS does, ``roundf(w / scale + zp)`` with
    ``zp = 2^(bits-1)`` when symmetric, so both tools agree even at rounding ties.
    """
    grid = IntGrid(bits, symmetric)
    # One strided read of the (possibly transposed) weight, then contiguous in-place work.
    v = np.multiply(blocks.astype(np.float32, copy=False), inverse(scale)[..., None], order="C")
    v += (zero_point[..., None] + grid.offset).astype(np.float32)
    return grid.codes(v)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Dequantize codes [..., block] with per-block scale/zero point [...] to float32."""
    return (q.astype(np.float32) - zero_point[..., None].astype(np.float32)) * scale.astype(np.float32)[..., None]


@dataclasses.dataclass(frozen=True)
class QuantizedBlocks:
    """A [C, K] float matrix quantized in blocks along K.

    Attributes:
        q: codes [C, nblocks, block] (int8 when symmetric, uint8 otherwise); the ragged tail of the last
            block holds padding codes that stand for no weight.
        scale: [C, nblocks] in the storage dtype.
        zero_point: [C, nblocks] int32 (zeros when symmetric).
        k: the unpadded length of the blocked axis.
        block_size: elements per block (K itself for one block per channel).
        bits: code width.
        symmetric: whether codes are signed with zero point 0.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    k: int
    block_size: int
    bits: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """Return the float32 [C, K] matrix the codes stand for."""
        w = dequantize(self.q, self.scale, self.zero_point)
        return w.reshape(w.shape[0], -1)[:, : self.k]

    def unsigned_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Codes and zero points shifted to the unsigned range (what MatMulNBits stores)."""
        if not self.symmetric:
            return self.q.astype(np.uint8), self.zero_point.astype(np.uint8)
        off = 1 << (self.bits - 1)
        return (self.q.astype(np.int16) + off).astype(np.uint8), (self.zero_point + off).astype(np.uint8)


def quantize_blocked(
    w: np.ndarray,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    scale_dtype: np.dtype | type = np.float32,
) -> QuantizedBlocks:
    """Quantize a [C, K] matrix in blocks of ``block_size`` along K (None: one block per row)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    k = w.shape[1]
    blocks = _to_blocks(w, block_size)
    scale, zp = choose_qparams(blocks, bits, symmetric, scale_dtype)
    q = quantize(blocks, scale, zp, bits, symmetric)
    return QuantizedBlocks(q, scale, zp, k, blocks.shape[2], bits, symmetric)


@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A [K, N] MatMul weight quantized in blocks along K, kept in the weight's own layout.

    Quantizing in place of the [K, N] layout (blocks run down the rows, so every reduction and
    element-wise step is contiguous and vectorised across N) avoids transposing the float weight;
    only the packed bytes are transposed for MatMulNBits, at 1/8 (4 bits) of the float size.

    Attributes:
        q: codes [K, N] (int8 when symmetric, uint8 otherwise).
        scale: [nblocks, N] in the storage dtype.
        zero_point: [nblocks, N] int32 (zeros when symmetric), or float32 for fractional zero points
            (HQQ: values exact in the scales' dtype, which MatMulNBits stores them in).
        block_size: rows per block (K itself for one block per channel); the last block may be ragged.
        bits: code width.
        symmetric: whether codes are signed with zero point 0.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    block_size: int
    bits: int
    symmetric: bool

    @property
    def fractional_zero_point(self) -> bool:
        """Whether the zero points are floats (MatMulNBits only; DequantizeLinear needs integers)."""
        return bool(np.issubdtype(self.zero_point.dtype, np.floating))

    def in_container(self, bits: int) -> QuantizedMatrix:
        """The same codes stored ``bits`` wide (3-bit codes in 4-bit MatMulNBits / int4 containers).

        Signed and unsigned code ranges nest, so codes and zero points keep their values: only the
        unsigned form of symmetric codes moves (its zero point becomes 2^(bits-1)).
        """
        if bits < self.bits:
            raise ValueError(f"a {bits}-bit container cannot hold {self.bits}-bit codes")
        return dataclasses.replace(self, bits=bits)

    @property
    def k(self) -> int:
        """Rows of the weight."""
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        """Columns of the weight (output features)."""
        return int(self.q.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float32 [K, N] matrix the codes stand for."""
        rows = np.arange(self.k) // self.block_size
        return (self.q.astype(np.float32) - self.zero_point[rows].astype(np.float32)) * self.scale[rows].astype(
            np.float32
        )

    def unsigned(self) -> tuple[np.ndarray, np.ndarray]:
        """Codes [K, N] and zero points [nblocks, N] in the unsigned range MatMulNBits stores.

        Fractional zero points are returned as they are (float32).
        """
        if self.fractional_zero_point:
            return self.q.astype(np.uint8, copy=False), self.zero_point
        if not self.symmetric:
            return self.q.astype(np.uint8, copy=False), self.zero_point.astype(np.uint8)
        off = 1 << (self.bits - 1)
        return (self.q.astype(np.int16) + off).astype(np.uint8), (self.zero_point + off).astype(np.uint8)


def quantize_kn(
    w: np.ndarray,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    scale_dtype: np.dtype | type = np.float32,
    shrink: np.ndarray | None = None,
) -> QuantizedMatrix:
    """Quantize a [K, N] weight in blocks of ``block_size`` rows along K (None: one block per column).

    Same numbers as ``quantize_blocked(w.T, ...)``, computed without transposing ``w``. ``shrink``
    ([nblocks, N], from a clip search) scales each block's range (min and max) before its scale and zero
    point are chosen; values outside the shrunk range clamp to the end codes.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    k, n = w.shape
    bs = k if block_size is None else block_size
    full = (k // bs) * bs
    if shrink is not None and shrink.shape != (num_blocks(k, bs), n):
        raise ValueError(f"shrink must have shape {(num_blocks(k, bs), n)}, got {shrink.shape}")
    parts = []  # (rows, [nb, rows per block, N] view, blocks)
    if full:
        parts.append((slice(0, full), w[:full].reshape(full // bs, bs, n), slice(0, full // bs)))
    if full < k:
        parts.append((slice(full, k), w[full:].reshape(1, k - full, n), slice(full // bs, full // bs + 1)))
    grid = IntGrid(bits, symmetric)
    scales, zps, codes = [], [], np.empty((k, n), np.int8 if symmetric else np.uint8)
    for rows, blocks, index in parts:
        x = blocks.astype(np.float32, copy=False)
        mn, mx = x.min(axis=1), x.max(axis=1)
        if shrink is not None:
            f = shrink[index].astype(np.float32, copy=False)
            mn, mx = mn * f, mx * f
        scale, zp = grid.qparams(mn, mx, scale_dtype)
        v = x * inverse(scale)[:, None, :]
        v += (zp + grid.offset).astype(np.float32)[:, None, :]
        codes[rows] = grid.codes(v).reshape(-1, n)
        scales.append(scale)
        zps.append(zp)
    return QuantizedMatrix(codes, np.concatenate(scales), np.concatenate(zps), bs, bits, symmetric)


@dataclasses.dataclass(frozen=True)
class ScaledMatrix:
    """A [K, N] weight on a scale-only grid (float8 E4M3, NF4, FP4): ``w ~ grid value of code * scale``.

    Attributes:
        codes: [K, N] as the grid stores them (float8_e4m3fn values, or uint8 table indices).
        scale: [nblocks, N] in the storage dtype; one block per column when ``block_size`` is K.
        block_size: rows per block along K (the last block may be ragged).
        grid: the :class:`~qonnx.core.numerics.Float8Grid` or :class:`~qonnx.core.numerics.LookupGrid`.
    """

    codes: np.ndarray
    scale: np.ndarray
    block_size: int
    grid: Float8Grid | LookupGrid

    @property
    def k(self) -> int:
        """Rows of the weight."""
        return int(self.codes.shape[0])

    @property
    def n(self) -> int:
        """Columns of the weight (output features)."""
        return int(self.codes.shape[1])

    def values(self) -> np.ndarray:
        """The grid values [K, N] the codes stand for, before scaling (float32)."""
        if isinstance(self.grid, LookupGrid):
            return np.asarray(self.grid.values, np.float32)[self.codes]
        return self.codes.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 [K, N] matrix the codes stand for."""
        rows = np.arange(self.k) // self.block_size
        return self.values() * self.scale[rows].astype(np.float32)


def quantize_scaled_kn(
    w: np.ndarray,
    grid: Float8Grid | LookupGrid,
    block_size: int | None = None,
    scale_dtype: np.dtype | type = np.float32,
) -> ScaledMatrix:
    """Round a [K, N] weight to nearest on a scale-only grid, one scale per block of ``block_size`` rows along K.

    ``None``: one scale per column. The scale is chosen by the grid from the block's range and rounded to
    ``scale_dtype`` before the codes are computed.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    k, n = w.shape
    bs = k if block_size is None else block_size
    x = w.astype(np.float32, copy=False)
    nb = num_blocks(k, bs)
    scales = np.empty((nb, n), dtype=scale_dtype)
    codes = np.empty((k, n), dtype=np.asarray(grid.codes(np.zeros(1, np.float32))).dtype)
    for b in range(nb):
        block = x[b * bs : (b + 1) * bs]
        scale = grid.qparams(block.min(axis=0), block.max(axis=0), scale_dtype)
        scales[b] = scale
        codes[b * bs : (b + 1) * bs] = grid.codes(block / scale.astype(np.float32))
    return ScaledMatrix(codes, scales, bs, grid)


def quantize_fp8_kn(w: np.ndarray, scale_dtype: np.dtype | type = np.float32) -> ScaledMatrix:
    """A [K, N] weight as float8 E4M3 codes [K, N] with one scale per column: ``w ~ codes * scale``.

    The column's largest magnitude maps to 448 (E4M3's largest finite value); codes round to nearest even.
    """
    return quantize_scaled_kn(w, FLOAT8, None, scale_dtype)

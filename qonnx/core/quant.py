"""Quantization math: pure, graph-free functions on numpy arrays.

Weights are quantized in blocks along one axis (the reduction axis K of a MatMul). A block size of
``None`` means one block per channel (the whole axis). When the axis length is not a multiple of the
block size the last block is ragged: it holds the remaining elements and gets its own scale.

Conventions match ONNX Runtime's MLAS quantizer so results are comparable:

* asymmetric: the range is widened to include 0, ``scale = (max - min) / (qmax - qmin)`` and
  ``zero_point = round(qmin - min / scale)`` clamped to the integer range; stored codes are unsigned.
* codes are ``clamp(roundf(w * (1 / scale) + zero_point))`` in float32 in the unsigned domain (symmetric
  codes use the zero point 2^(bits-1) there and are returned signed), ties away from zero.
* symmetric: the value of largest magnitude maps to the most negative code (``scale = v / qmin``), so
  the full signed range is used; codes are signed and the zero point is 0.

``dequantize(q, scale, zp) = (q - zp) * scale``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "QuantizedBlocks",
    "QuantizedMatrix",
    "quantize_kn",
    "pack_matmulnbits",
    "pack_matmulnbits_zero_points",
    "qparams_from_range",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_blocked",
    "num_blocks",
    "pack_nbits_matmulnbits",
    "unpack_nbits_matmulnbits",
    "pack_zero_points",
    "unpack_zero_points",
    "unpack_matmulnbits",
    "qrange",
    "round_half_up",
    "FP8_MAX",
    "quantize_fp8_kn",
    "activation_qparams",
]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Return the integer range (qmin, qmax): signed when symmetric, unsigned otherwise."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


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
    """Choose scale and zero point for each block along the last axis.

    Args:
        blocks: float array [..., block]; the last axis is reduced.
        bits: code width.
        symmetric: signed codes with zero point 0, or unsigned codes with a zero point.
        scale_dtype: dtype the scales are stored in (float16 for fp16 models). Codes are computed with
            the rounded scale, so dequantization in that dtype reproduces them exactly.

    Returns:
        (scale, zero_point) of shape [...]; zero_point is int32 (0 when symmetric).
    """
    x = blocks.astype(np.float32, copy=False)
    return qparams_from_range(x.min(axis=-1), x.max(axis=-1), bits, symmetric, scale_dtype)


def qparams_from_range(
    mn: np.ndarray, mx: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point from per-block minima and maxima (see :func:`choose_qparams`)."""
    qmin, qmax = qrange(bits, symmetric)
    mn = mn.astype(np.float32, copy=False)
    mx = mx.astype(np.float32, copy=False)
    if symmetric:
        # The value of largest magnitude, with its sign, maps to qmin.
        v = np.where(np.abs(mn) >= np.abs(mx), mn, mx)
        scale = (v / np.float32(qmin)).astype(scale_dtype).astype(np.float32)
        zp = np.zeros(scale.shape, dtype=np.int32)
    else:
        mn = np.minimum(mn, 0.0)
        mx = np.maximum(mx, 0.0)
        scale = ((mx - mn) / np.float32(qmax - qmin)).astype(scale_dtype).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        zp = np.clip(round_half_up(np.float32(qmin) - mn / safe), qmin, qmax).astype(np.int32)
    return scale.astype(scale_dtype), zp


def _inverse(scale: np.ndarray) -> np.ndarray:
    s = scale.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    fmax = np.finfo(np.float32).max
    return np.clip(inv, -fmax, fmax, out=inv)  # a subnormal scale: keep 0 * inv finite


def _codes(v: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Round and clamp ``w / scale + zp + offset`` (float32, overwritten) to int8/uint8 codes."""
    qmin, qmax = qrange(bits, symmetric)
    offset = -qmin if symmetric else 0
    q = round_half_up(v)
    np.clip(q, qmin + offset, qmax + offset, out=q)
    codes = q.astype(np.uint8)
    return (codes.astype(np.int16) - offset).astype(np.int8) if symmetric else codes


def quantize(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Quantize blocks [..., block] with per-block scale/zero point [...] to int codes (int8 / uint8).

    Codes are computed in the unsigned domain as ONNX Runtime's MLAS does, ``roundf(w / scale + zp)`` with
    ``zp = 2^(bits-1)`` when symmetric, so both tools agree even at rounding ties.
    """
    offset = (1 << (bits - 1)) if symmetric else 0
    # One strided read of the (possibly transposed) weight, then contiguous in-place work.
    v = np.multiply(blocks.astype(np.float32, copy=False), _inverse(scale)[..., None], order="C")
    v += (zero_point[..., None] + offset).astype(np.float32)
    return _codes(v, bits, symmetric)


def round_half_up(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties up; equals C's ``roundf`` (ties away from zero) for v >= 0. Overwrites ``v``."""
    f = np.floor(v)
    v -= f  # the fraction, exact in float32
    f += v >= 0.5
    return f


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


def _pack_rows(codes: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack unsigned codes [R, L] of ``bits`` each into bytes along L, low bits first.

    Unused bits of the last byte hold ``fill``.
    """
    if bits == 8:
        return codes.astype(np.uint8)
    r, length = codes.shape
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte:
        nbytes = -(-length // per_byte)
        padded = np.full((r, nbytes * per_byte), fill, dtype=np.uint8)
        padded[:, :length] = codes
        padded = padded.reshape(r, nbytes, per_byte)
        out = np.zeros((r, nbytes), dtype=np.uint8)
        for i in range(per_byte):
            out |= padded[:, :, i] << np.uint8(i * bits)
        return out
    # 3 bits: a continuous little-endian bit stream.
    nbits = length * bits
    bitpos = np.arange(length) * bits
    out = np.zeros((r, -(-nbits // 8) + 1), dtype=np.uint16)
    c16 = codes.astype(np.uint16)
    for j in range(length):
        byte, shift = divmod(int(bitpos[j]), 8)
        v = c16[:, j] << shift
        out[:, byte] |= v & 0xFF
        out[:, byte + 1] |= v >> 8
    return out[:, : -(-nbits // 8)].astype(np.uint8)


def _unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`_pack_rows`."""
    if bits == 8:
        return packed[:, :length].astype(np.uint8)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        parts = [(packed >> np.uint8(i * bits)) & np.uint8(mask) for i in range(per_byte)]
        return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)[:, :length]
    p16 = np.concatenate([packed, np.zeros((packed.shape[0], 1), np.uint8)], axis=1).astype(np.uint16)
    out = np.zeros((packed.shape[0], length), dtype=np.uint8)
    for j in range(length):
        byte, shift = divmod(j * bits, 8)
        v = (p16[:, byte] | (p16[:, byte + 1] << 8)) >> shift
        out[:, j] = v & mask
    return out


def pack_nbits_matmulnbits(qb: QuantizedBlocks) -> np.ndarray:
    """MatMulNBits' B input: uint8 [N, nblocks, block_size * bits / 8], codes packed low bits first.

    The ragged tail of the last block (beyond K) is zero, as ONNX Runtime's quantizer writes it.
    """
    codes, _ = qb.unsigned_codes()
    n, nb, bs = codes.shape
    if nb * bs > qb.k:
        codes = codes.copy()
        codes.reshape(n, nb * bs)[:, qb.k :] = 0
    if (bs * qb.bits) % 8:
        raise ValueError(f"block_size {bs} with {qb.bits} bits does not fill whole bytes")
    packed = _pack_rows(codes.reshape(n * nb, bs), qb.bits)
    return packed.reshape(n, nb, bs * qb.bits // 8)


def unpack_nbits_matmulnbits(b: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes [N, nblocks, block_size] from MatMulNBits' packed B input."""
    n, nb, blob = b.shape
    return _unpack_rows(b.reshape(n * nb, blob), bits, block_size).reshape(n, nb, block_size)


def unpack_matmulnbits(
    b: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' packed inputs as unsigned codes [N, K] and zero points [N, nblocks].

    ``zero_points`` are the packed uint8 ones, or None for the default 2^(bits-1).
    """
    nb = num_blocks(k, block_size)
    codes = unpack_nbits_matmulnbits(b.reshape(n, nb, -1), bits, block_size).reshape(n, nb * block_size)[:, :k]
    if zero_points is None:
        return codes, np.full((n, nb), 1 << (bits - 1), np.uint8)
    return codes, unpack_zero_points(zero_points, bits, n, nb)


def pack_zero_points(zero_point: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed uint8 zero points [N, ceil(nblocks * bits / 8)].

    Unused bits of a row's last byte hold the default zero point 2^(bits-1), as ONNX Runtime writes them.
    """
    return _pack_rows(zero_point.astype(np.uint8), bits, fill=1 << (bits - 1))


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, nblocks: int) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`: uint8 [N, nblocks]."""
    return _unpack_rows(packed.reshape(n, -1), bits, nblocks)


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
    scales, zps, codes = [], [], np.empty((k, n), np.int8 if symmetric else np.uint8)
    offset = (1 << (bits - 1)) if symmetric else 0
    for rows, blocks, index in parts:
        x = blocks.astype(np.float32, copy=False)
        mn, mx = x.min(axis=1), x.max(axis=1)
        if shrink is not None:
            f = shrink[index].astype(np.float32, copy=False)
            mn, mx = mn * f, mx * f
        scale, zp = qparams_from_range(mn, mx, bits, symmetric, scale_dtype)
        v = x * _inverse(scale)[:, None, :]
        v += (zp + offset).astype(np.float32)[:, None, :]
        codes[rows] = _codes(v, bits, symmetric).reshape(-1, n)
        scales.append(scale)
        zps.append(zp)
    return QuantizedMatrix(codes, np.concatenate(scales), np.concatenate(zps), bs, bits, symmetric)


def pack_matmulnbits(qm: QuantizedMatrix) -> np.ndarray:
    """MatMulNBits' B input for a [K, N] weight: uint8 [N, nblocks, block_size * bits / 8].

    Codes are packed low bits first along K; the ragged tail of the last block is zero, as ONNX Runtime's
    quantizer writes it.
    """
    codes, _ = qm.unsigned()
    k, n = codes.shape
    bs, bits = qm.block_size, qm.bits
    if (bs * bits) % 8:
        raise ValueError(f"block_size {bs} with {bits} bits does not fill whole bytes")
    nb = num_blocks(k, bs)
    if nb * bs > k:
        codes = np.concatenate([codes, np.zeros((nb * bs - k, n), np.uint8)])
    if bits == 8:
        packed = codes
    elif 8 % bits == 0:
        per_byte = 8 // bits
        packed = codes[0::per_byte].copy()
        for i in range(1, per_byte):
            packed |= codes[i::per_byte] << np.uint8(i * bits)
    else:  # 3 bits: a bit stream; the rare path packs along rows of the transposed codes
        return _pack_rows(np.ascontiguousarray(codes.T).reshape(n * nb, bs), bits).reshape(n, nb, -1)
    return np.ascontiguousarray(packed.T).reshape(n, nb, bs * bits // 8)


def pack_matmulnbits_zero_points(qm: QuantizedMatrix) -> np.ndarray:
    """MatMulNBits' packed uint8 zero points [N, ceil(nblocks * bits / 8)] for a [K, N] weight."""
    if qm.fractional_zero_point:
        raise ValueError("fractional zero points are stored as floats, not packed")
    _, zp = qm.unsigned()
    return pack_zero_points(np.ascontiguousarray(zp.T), qm.bits)


#: Largest finite float8 E4M3 (FN) value.
FP8_MAX = 448.0


def quantize_fp8_kn(w: np.ndarray, scale_dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] weight as float8 E4M3 codes [K, N] with one scale per column [N]: ``w ~ codes * scale``.

    The column's largest magnitude maps to 448 (E4M3's largest finite value); codes round to nearest even.
    """
    import ml_dtypes

    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    x = w.astype(np.float32, copy=False)
    amax = np.abs(x).max(axis=0)
    scale = (amax / np.float32(FP8_MAX)).astype(scale_dtype).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(x / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale.astype(scale_dtype)


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
    zp = int(np.clip(np.floor(-lo / scale + 0.5), 0, 255))
    return scale, zp

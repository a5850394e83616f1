"""Quantization math: pure, graph-free functions on numpy arrays.

Weights are quantized in blocks along one axis (the reduction axis K of a MatMul). A block size of
``None`` means one block per channel (the whole axis). When the axis length is not a multiple of the
block size the last block is ragged: it holds the remaining elements and gets its own scale.

Conventions match ONNX Runtime's MLAS quantizer so results are comparable:

* asymmetric: the range is widened to include 0, ``scale = (max - min) / (qmax - qmin)`` and
  ``zero_point = round(qmin - min / scale)`` clamped to the integer range; stored codes are unsigned.
* codes are ``clamp(roundf(w * (1 / scale) + zero_point))`` in float32, ties away from zero.
* symmetric: the value of largest magnitude maps to the most negative code (``scale = v / qmin``), so
  the full signed range is used; codes are signed and the zero point is 0.

``dequantize(q, scale, zp) = (q - zp) * scale``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "QuantizedBlocks",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_blocked",
    "dequantize_blocked",
    "num_blocks",
    "pack_nbits_matmulnbits",
    "unpack_nbits_matmulnbits",
    "pack_zero_points",
    "unpack_zero_points",
    "qrange",
    "round_half_away",
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
    qmin, qmax = qrange(bits, symmetric)
    x = blocks.astype(np.float32, copy=False)
    if symmetric:
        mx = x.max(axis=-1)
        mn = x.min(axis=-1)
        # The value of largest magnitude, with its sign, maps to qmin.
        v = np.where(np.abs(mn) >= np.abs(mx), mn, mx)
        scale = (v / np.float32(qmin)).astype(scale_dtype).astype(np.float32)
        zp = np.zeros(scale.shape, dtype=np.int32)
    else:
        mn = np.minimum(x.min(axis=-1), 0.0)
        mx = np.maximum(x.max(axis=-1), 0.0)
        scale = ((mx - mn) / np.float32(qmax - qmin)).astype(scale_dtype).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        zp = np.clip(np.round(np.float32(qmin) - mn / safe), qmin, qmax).astype(np.int32)
    return scale.astype(scale_dtype), zp


def quantize(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Quantize blocks [..., block] with per-block scale/zero point [...] to int codes (int8 / uint8)."""
    qmin, qmax = qrange(bits, symmetric)
    s = scale.astype(np.float32)[..., None]
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    fmax = np.finfo(np.float32).max
    np.clip(inv, -fmax, fmax, out=inv)  # a subnormal scale: keep 0 * inv finite
    v = blocks.astype(np.float32, copy=False) * inv
    v += zero_point[..., None].astype(np.float32)
    q = round_half_away(v)
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int8 if symmetric else np.uint8)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's roundf, as ONNX Runtime's quantizer rounds)."""
    q = np.round(v)  # ties to even: differs only at exact halves, which are rare
    ties = np.nonzero(np.abs(v - q) == 0.5)
    if ties[0].size:
        q[ties] = np.trunc(v[ties]) + np.sign(v[ties])
    return q


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


def dequantize_blocked(qb: QuantizedBlocks) -> np.ndarray:
    """Float32 [C, K] matrix that ``qb`` stands for."""
    return qb.dequantize()


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


def pack_zero_points(zero_point: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed uint8 zero points [N, ceil(nblocks * bits / 8)].

    Unused bits of a row's last byte hold the default zero point 2^(bits-1), as ONNX Runtime writes them.
    """
    return _pack_rows(zero_point.astype(np.uint8), bits, fill=1 << (bits - 1))


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, nblocks: int) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`: uint8 [N, nblocks]."""
    return _unpack_rows(packed.reshape(n, -1), bits, nblocks)

"""The byte layout of ONNX Runtime's MatMulNBits: codes packed along K, zero points packed per row.

``B`` is uint8 [N, nblocks, block_size * bits / 8], codes low bits first; the ragged tail of the last block is
zero; ``zero_points`` are packed per row [N, ceil(nblocks * bits / 8)] with unused bits holding the default
2^(bits-1), as ONNX Runtime's own quantizer writes them. 3-bit codes are a continuous little-endian bit stream.
"""

from __future__ import annotations

import numpy as np

from qonnx.core.quant import QuantizedBlocks, QuantizedMatrix, num_blocks

__all__ = [
    "pack_matmulnbits",
    "pack_matmulnbits_zero_points",
    "pack_nbits_matmulnbits",
    "pack_zero_points",
    "unpack_matmulnbits",
    "unpack_nbits_matmulnbits",
    "unpack_zero_points",
]


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

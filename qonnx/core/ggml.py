"""GGML's quantized blocks (the weights of a GGUF file) as MatMulNBits codes: pure numpy, no float round trip.

Three block types map onto ONNX Runtime's MatMulNBits (block 32 along K, codes packed low nibble first):

* ``Q8_0``: fp16 ``d``, 32 int8 ``q``; ``w = d * q``: 8-bit symmetric codes (default zero point 128).
* ``Q4_0``: fp16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``: 4-bit symmetric codes (zero point 8).
* ``Q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes; ``w = d * q + m``. Its per-block minimum is no integer zero
  point; it is kept as the symmetric codes ``d * (q - 8)`` plus a per-block offset ``m + 8 d``, which the
  graph adds as ``sum(x over the block) * offset`` (see :mod:`qonnx.passes.keep_quantization`).

In a block of 32, byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one
(gguf's ``dequantize`` reads them so); MatMulNBits packs weights ``2j`` and ``2j + 1`` in byte ``j``: the
codes are unpacked and packed again, never rounded. Other types (K-quants, Q5, IQ) are not kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qonnx.core.quant import QuantizedMatrix

__all__ = ["BLOCK", "KEPT_TYPES", "KeptMatrix", "decode_blocks"]

#: Weights per block of every kept type.
BLOCK = 32
#: Kept type -> (bytes per block, code bits).
KEPT_TYPES: dict[str, tuple[int, int]] = {"Q8_0": (34, 8), "Q4_0": (18, 4), "Q4_1": (20, 4)}


@dataclasses.dataclass(frozen=True)
class KeptMatrix:
    """A GGUF weight [N, K] (rows: output features) as its own codes.

    Attributes:
        type: the GGML type name (a key of :data:`KEPT_TYPES`).
        codes: unsigned codes [N, K] as stored (Q8_0: ``q + 128``; 4-bit types: the nibble).
        scale: fp16 ``d`` [N, K / 32].
        minimum: fp16 ``m`` [N, K / 32] (Q4_1), else None.
    """

    type: str
    codes: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray | None = None

    @property
    def bits(self) -> int:
        """Code width."""
        return KEPT_TYPES[self.type][1]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) as GGUF stores the weight."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, float16 scales and minimums: the GGUF tensor's own size."""
        extra = 0 if self.minimum is None else self.minimum.nbytes
        return self.codes.size * self.bits // 8 + self.scale.nbytes + extra

    def rows(self, order: np.ndarray) -> KeptMatrix:
        """The same weight with its rows (output features) in ``order``: whole blocks move, nothing is rounded."""
        m = None if self.minimum is None else self.minimum[order]
        return dataclasses.replace(self, codes=self.codes[order], scale=self.scale[order], minimum=m)

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight, computed as gguf's ``dequantize`` computes it."""
        n, k = self.shape
        d = self.scale.astype(np.float32)[..., None]
        q = self.codes.reshape(n, k // BLOCK, BLOCK).astype(np.float32) - (1 << (self.bits - 1))
        if self.minimum is None:
            return (d * q).reshape(n, k)
        return (d * (q + 8) + self.minimum.astype(np.float32)[..., None]).reshape(n, k)

    def symmetric(self) -> QuantizedMatrix:
        """The codes as a symmetric [K, N] matrix on the scales ``d`` (block 32; float32 scales, exact).

        For Q4_1 it stands for ``d * (q - 8)``: :meth:`offset` is what the weight adds on top.
        """
        half = 1 << (self.bits - 1)
        q = np.ascontiguousarray((self.codes.astype(np.int16) - half).astype(np.int8).T)
        scale = np.ascontiguousarray(self.scale.T).astype(np.float32)
        return QuantizedMatrix(q, scale, np.zeros(scale.shape, np.int32), BLOCK, self.bits, True)

    def offset(self) -> np.ndarray | None:
        """Q4_1's per-block offset ``m + 8 d`` [K / 32, N] in float32 (exact for all but extreme ranges), else None."""
        if self.minimum is None:
            return None
        return np.ascontiguousarray((self.minimum.astype(np.float32) + 8 * self.scale.astype(np.float32)).T)


def decode_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> KeptMatrix:
    """Decode a GGUF tensor's raw blocks (uint8, ``shape`` = (N, K) rows of K weights) into codes and scales.

    Raises:
        ValueError: a type that is not kept, K not a multiple of 32, or a byte count that does not match.
    """
    if type_name not in KEPT_TYPES:
        raise ValueError(f"GGML type {type_name} is not kept (kept: {', '.join(KEPT_TYPES)})")
    n, k = shape
    size = KEPT_TYPES[type_name][0]
    if k % BLOCK:
        raise ValueError(f"{type_name} rows of {k} weights are not whole blocks of {BLOCK}")
    if raw.size != n * (k // BLOCK) * size:
        raise ValueError(f"{type_name} [{n}, {k}] needs {n * (k // BLOCK) * size} bytes, got {raw.size}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    minimum = None
    if type_name == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 2
        if type_name == "Q4_1":
            minimum, start = blocks[..., 2:4].copy().view(np.float16)[..., 0], 4
        nibbles = blocks[..., start:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return KeptMatrix(type_name, codes.reshape(n, k), d, minimum)

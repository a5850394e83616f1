"""Format emitters: the arrays that stand for a quantized weight, registered per (grid, format).

A *format* is how a model stores a quantized MatMul weight: ``matmulnbits`` (ONNX Runtime's MatMulNBits, a
fused op in place of the MatMul), ``qdq`` (a DequantizeLinear feeding the MatMul). An *emitter* turns a
solved weight on a grid (:class:`~qonnx.core.quant.QuantizedMatrix` for integer grids,
:class:`~qonnx.core.quant.ScaledMatrix` for float8 and lookup grids) into that format's arrays; it is
registered for one (grid kind, format) pair with :func:`emitter`, and :func:`emit` finds it. A *reader*
(:func:`reader`) turns a format's arrays back into the float weight they stand for. Adding a format is one
:class:`Format` entry, its emitter and its reader, here.

Everything here is numpy: array preparation runs in worker threads while the graph is edited in one
thread, by :mod:`qonnx.passes.nodes`, which builds the nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from qonnx.core import numerics, packing, quant

MS_DOMAIN = "com.microsoft"

__all__ = [
    "MS_DOMAIN",
    "QuantizedWeight",
    "storage_bits",
    "matmulnbits_arrays",
    "dequantize_arrays",
    "channel_dequantize_arrays",
    "estimated_nbytes",
    "float_nbytes",
    "FORMATS",
    "Format",
    "emit",
    "emits",
    "emitter",
    "gather_block_quantized",
    "GatherLayout",
    "grid_kind",
    "reader",
]


@dataclasses.dataclass(frozen=True)
class Format:
    """How a model stores a quantized MatMul weight.

    Attributes:
        name: the ``format`` of scheme configs and the CLI.
        op_type: the fused op that replaces the MatMul (its inputs: the activation, then the weight arrays in
            order), or None for a DequantizeLinear whose output the MatMul reads in place of the weight.
        domain: the op's domain.
        bias_slot: input index of the fused op's bias, or None (a Gemm's bias then becomes an Add).
        min_k: the smallest K the op takes.
        block_sizes: the block sizes along K it takes (None: any >= 2, or one block per channel).
        per_channel: scale-only grids take one scale per output channel only (no blocks).
        whole_blocks: blocks run over the flattened transposed weight, so K must be a multiple of the block size.
    """

    name: str
    op_type: str | None
    domain: str = ""
    bias_slot: int | None = None
    min_k: int = 1
    block_sizes: tuple[int, ...] | None = None
    per_channel: bool = False
    whole_blocks: bool = False

    def refuses(self, grid: str, bits: int, block_size: int | None, symmetric: bool) -> str | None:
        """Why this format cannot hold such weights, or None."""
        if not emits(grid, self.name):  # the grids it stores are those with an emitter for it
            held = sorted(g for g, f in _EMITTERS if f == self.name)
            return f"format {self.name!r} stores {', '.join(held)} codes, not {grid}"
        if self.block_sizes is not None and block_size not in self.block_sizes:
            if block_size is None and emits(grid, "qdq"):
                return f"per-channel weights (block_size=None) need format='qdq'; {self.op_type} is blocked"
            if block_size is None:
                return f"{self.op_type} is blocked: block_size in {self.block_sizes}, not one per channel"
            return f"{self.op_type} needs block_size in {self.block_sizes}, got {block_size}"
        if grid != "int" and self.per_channel and block_size is not None:
            return f"{grid} weights in format {self.name!r} take one scale per output channel (block_size=None)"
        return None

    @property
    def fused(self) -> bool:
        """Whether the format replaces the MatMul by an op of its own."""
        return self.op_type is not None


#: Every format, by name.
FORMATS: dict[str, Format] = {
    "matmulnbits": Format(
        "matmulnbits", "MatMulNBits", MS_DOMAIN, bias_slot=5, min_k=16, block_sizes=(16, 32, 64, 128, 256)
    ),
    "qdq": Format("qdq", None, per_channel=True),
    "bnb4": Format("bnb4", "MatMulBnb4", MS_DOMAIN, block_sizes=(16, 32, 64, 128, 256), whole_blocks=True),
}


@dataclasses.dataclass
class QuantizedWeight:
    """The arrays of one quantized weight in the layout of the op that will hold them."""

    format: str  # a key of FORMATS
    arrays: dict[str, np.ndarray]
    attrs: dict[str, int]
    k: int
    n: int
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes the quantized weight takes in the model."""
        return sum(-(-a.size // 2) if a.dtype in _SUB_BYTE else a.nbytes for a in self.arrays.values())

    def dequantize(self) -> np.ndarray:
        """The float32 weight the arrays stand for, as the node reads it ([K, N] for MatMul/Gemm)."""
        return _READERS[self.format](self)


Solved = Any  # quant.QuantizedMatrix | quant.ScaledMatrix
_EMITTERS: dict[tuple[str, str], Callable[[Solved, np.dtype], QuantizedWeight]] = {}
_READERS: dict[str, Callable[[QuantizedWeight], np.ndarray]] = {}


def emitter(grid: str, fmt: str) -> Callable:
    """Register the function that lays out a weight solved on grids of kind ``grid`` in format ``fmt``."""

    def register(fn: Callable[[Solved, np.dtype], QuantizedWeight]) -> Callable:
        _EMITTERS[(grid, fmt)] = fn
        return fn

    return register


def reader(fmt: str) -> Callable:
    """Register the function that turns format ``fmt``'s arrays back into the float weight."""

    def register(fn: Callable[[QuantizedWeight], np.ndarray]) -> Callable:
        _READERS[fmt] = fn
        return fn

    return register


def grid_kind(solved: Solved) -> str:
    """``int`` for integer codes, else the scale-only grid's kind (``fp8``, ``nf4``, ...)."""
    return "int" if isinstance(solved, quant.QuantizedMatrix) else solved.grid.kind


def emits(grid: str, fmt: str) -> bool:
    """Whether a weight on grids of kind ``grid`` can be stored in format ``fmt``."""
    return (grid, fmt) in _EMITTERS


def emit(solved: Solved, fmt: str, dtype: np.dtype) -> QuantizedWeight:
    """The arrays of ``solved`` in format ``fmt``, scales in the activation ``dtype``."""
    fn = _EMITTERS.get((grid_kind(solved), fmt))
    if fn is None:
        raise ValueError(f"no {fmt} form for {grid_kind(solved)} codes")
    return fn(solved, dtype)


_SUB_BYTE = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))
#: Protobuf bytes a new initializer costs beyond its data and name (dims, type, field tags): an estimate.
_INITIALIZER_OVERHEAD = 16
#: Protobuf bytes a MatMulNBits or DequantizeLinear node costs beyond its names: an estimate.
_NODE_OVERHEAD = 96


def storage_bits(bits: int, fmt: str) -> int:
    """Bits each code takes in ``fmt``: 3-bit codes (and 2-bit ones in DequantizeLinear) go in 4-bit containers.

    No ONNX Runtime kernel reads 3-bit codes (MatMulNBits runs 2, 4 and 8 bits on the CPU), and
    DequantizeLinear has int2/uint2 only from opset 25: such a model is the size of a 4-bit one.
    """
    if bits == 3 or (bits == 2 and fmt != "matmulnbits"):
        return 4
    if bits == 7:  # int8 weights kept to [-64, 63] (ActivationConfig.weight_range)
        return 8
    return bits


def _code_dtype(bits: int, symmetric: bool) -> np.dtype:
    if storage_bits(bits, "qdq") == 4:
        return np.dtype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4)
    return np.dtype(np.int8 if symmetric else np.uint8)


def float_nbytes(nbytes: int, name: str) -> int:
    """Bytes a float initializer of ``nbytes`` named ``name`` takes in the model file (an estimate)."""
    return nbytes + _INITIALIZER_OVERHEAD + len(name)


def estimated_nbytes(
    fmt: str,
    k: int,
    n: int,
    *,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    scale_bytes: int,
    name: str,
    float_zero_points: bool = False,
) -> int:
    """Bytes a quantized [K, N] weight will add to the model file: arrays, initializers and its node.

    Used before quantizing to tell whether the quantized form is smaller than the float weight.
    ``float_zero_points``: MatMulNBits zero points in the scales' type (HQQ) instead of packed codes.
    """
    nb = quant.num_blocks(k, block_size)
    bits = storage_bits(bits, fmt)
    if fmt == "matmulnbits":
        assert block_size is not None
        codes, zero_points = n * nb * block_size * bits // 8, n * -(-nb * bits // 8)
        if float_zero_points:
            zero_points = n * nb * scale_bytes
    else:
        codes, zero_points = -(-k * n * bits // 8), -(-nb * n * bits // 8)
    arrays = codes + n * nb * scale_bytes + (0 if symmetric else zero_points)
    names = 2 if symmetric else 3
    proto = names * (_INITIALIZER_OVERHEAD + len(name) + len("_zero_points")) + _NODE_OVERHEAD + 2 * len(name)
    return arrays + proto


@emitter("int", "matmulnbits")
def matmulnbits_arrays(qm: quant.QuantizedMatrix, dtype: np.dtype) -> QuantizedWeight:
    """MatMulNBits inputs for ``qm`` ([K, N] blocked along K), scales in the activation ``dtype``.

    3-bit codes are stored in 4-bit containers (``bits=4``); fractional zero points (HQQ) as
    [N, nblocks] in ``dtype``, which MatMulNBits accepts in place of packed ones.
    """
    qm = qm.in_container(storage_bits(qm.bits, "matmulnbits"))
    arrays = {"B": packing.pack_matmulnbits(qm), "scales": np.ascontiguousarray(qm.scale.T).astype(dtype)}
    if qm.fractional_zero_point:
        arrays["zero_points"] = np.ascontiguousarray(qm.zero_point.T).astype(dtype)
    elif not qm.symmetric:
        arrays["zero_points"] = packing.pack_matmulnbits_zero_points(qm)
    attrs = {"K": qm.k, "N": qm.n, "bits": qm.bits, "block_size": qm.block_size}
    return QuantizedWeight("matmulnbits", arrays, attrs, qm.k, qm.n, qm.bits)


@dataclasses.dataclass(frozen=True)
class GatherLayout:
    """How ONNX Runtime's GatherBlockQuantized reads a table stored as MatMulNBits arrays (a tied lm_head's).

    GatherBlockQuantized with uint8 ``data`` takes MatMulNBits' conventions: codes packed low bits first along
    the last axis, ``scales`` [rows, nblocks], ``zero_points`` packed per row as MatMulNBits packs them (default
    2^(bits-1)). So the [V, H] table quantized as the [K=H, N=V] weight of ``logits = h @ table.T`` is read by
    both ops from the same initializers: the Gather's ``data`` is MatMulNBits' ``B`` [V, nblocks, blob]
    reshaped to ``data_shape`` [V, nblocks * blob] (the same bytes), ``scales`` and ``zero_points`` as they are.

    Attributes:
        data_shape: the 2-D shape of the Gather's data.
        attrs: the op's attributes.
        width: the row width the op returns, ``nblocks * block_size``; rows of H < width (a ragged last
            block, zero-padded in B) are sliced to H.
    """

    data_shape: tuple[int, int]
    attrs: dict[str, int]
    width: int


def gather_block_quantized(qw: QuantizedWeight) -> GatherLayout:
    """The GatherBlockQuantized view of a MatMulNBits weight [K, N] of a table [N, K] (:class:`GatherLayout`)."""
    if qw.format != "matmulnbits" or ("zero_points" in qw.arrays and qw.arrays["zero_points"].dtype != np.uint8):
        raise ValueError("GatherBlockQuantized reads MatMulNBits arrays with integer (packed) zero points only")
    bits, bs = qw.attrs["bits"], qw.attrs["block_size"]
    n, nb, blob = qw.arrays["B"].shape
    attrs = {"bits": bits, "block_size": bs, "quantize_axis": 1, "gather_axis": 0}
    return GatherLayout((n, nb * blob), attrs, nb * bs)


@emitter("int", "qdq")
def dequantize_arrays(qm: quant.QuantizedMatrix, dtype: np.dtype) -> QuantizedWeight:
    """DequantizeLinear inputs producing the [K, N] weight that ``qm`` stands for.

    4-bit codes (and 2- and 3-bit ones, in 4-bit containers) are int4 (symmetric) or uint4; 8-bit codes int8
    or uint8. One block per channel is per-axis (axis=1, opset 13); smaller blocks are blocked along K
    (axis=0, block_size, opset 21). Zero points must be integers.
    """
    if qm.fractional_zero_point:
        raise ValueError("DequantizeLinear takes integer zero points only; round them first")
    qm = qm.in_container(storage_bits(qm.bits, "qdq"))
    code_dtype = _code_dtype(qm.bits, qm.symmetric)
    scale = qm.scale.astype(dtype)
    zp = qm.zero_point.astype(code_dtype)
    if scale.shape[0] == 1 and qm.block_size >= qm.k:
        scale, zp = scale.reshape(qm.n), zp.reshape(qm.n)
        attrs = {"axis": 1}
    else:
        attrs = {"axis": 0, "block_size": qm.block_size}
    arrays = {"x": qm.q.astype(code_dtype), "scale": scale}
    if not qm.symmetric:
        arrays["zero_point"] = zp
    return QuantizedWeight("qdq", arrays, attrs, qm.k, qm.n, qm.bits)


@emitter("fp8", "qdq")
def fp8_arrays(sm: quant.ScaledMatrix, dtype: np.dtype) -> QuantizedWeight:
    """DequantizeLinear inputs for float8 E4M3 codes [K, N] with one scale per column (axis=1)."""
    if sm.block_size < sm.k:
        raise ValueError("float8 DequantizeLinear weights take one scale per output channel")
    arrays = {"x": sm.codes, "scale": sm.scale.reshape(sm.n), "zero_point": np.zeros(sm.n, ml_dtypes.float8_e4m3fn)}
    return QuantizedWeight("qdq", arrays, {"axis": 1}, sm.k, sm.n, 8)


@reader("matmulnbits")
def _read_matmulnbits(qw: QuantizedWeight) -> np.ndarray:
    a, bs = qw.arrays, qw.attrs["block_size"]
    codes, zps = packing.unpack_matmulnbits(
        a["B"], a.get("zero_points"), k=qw.k, n=qw.n, bits=qw.attrs["bits"], block_size=bs
    )
    rows = np.arange(qw.k) // bs
    scales = a["scales"].reshape(qw.n, -1).astype(np.float32)
    return ((codes.astype(np.float32) - zps[:, rows].astype(np.float32)) * scales[:, rows]).T


@reader("qdq")
def _read_qdq(qw: QuantizedWeight) -> np.ndarray:
    a = qw.arrays
    x, s = a["x"].astype(np.float32), a["scale"].astype(np.float32)
    z = a["zero_point"].astype(np.float32) if "zero_point" in a else np.zeros_like(s)
    axis = qw.attrs.get("axis", 1) % x.ndim
    block = qw.attrs.get("block_size", 0)
    if block:
        idx = np.arange(x.shape[axis]) // block
        return (x - np.take(z, idx, axis=axis)) * np.take(s, idx, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - z.reshape(shape)) * s.reshape(shape)


#: MatMulBnb4's quant_type for each grid (ONNX Runtime's Bnb_DataType_t).
_BNB4_TYPES = {"fp4": 0, "nf4": 1}


@emitter("nf4", "bnb4")
@emitter("fp4", "bnb4")
def bnb4_arrays(sm: quant.ScaledMatrix, dtype: np.dtype) -> QuantizedWeight:
    """MatMulBnb4 inputs, as ONNX Runtime's MatMulBnb4Quantizer writes them.

    The transposed weight's codes, flattened, two a byte (high nibble first), and one absmax per block of that
    order (K a multiple of the block size, so that each block is part of one column).
    """
    if sm.k % sm.block_size:
        raise ValueError(f"MatMulBnb4 blocks run across rows: K={sm.k} must be a multiple of {sm.block_size}")
    codes = np.ascontiguousarray(sm.codes.T).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    arrays = {
        "B": (codes[0::2] << 4) | codes[1::2],
        "absmax": np.ascontiguousarray(sm.scale.T).reshape(-1).astype(dtype),
    }
    attrs = {"K": sm.k, "N": sm.n, "block_size": sm.block_size, "quant_type": _BNB4_TYPES[sm.grid.kind]}
    return QuantizedWeight("bnb4", arrays, attrs, sm.k, sm.n, 4)


@reader("bnb4")
def _read_bnb4(qw: QuantizedWeight) -> np.ndarray:
    packed, k, n, bs = qw.arrays["B"], qw.k, qw.n, qw.attrs["block_size"]
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[: k * n]
    grid = numerics.NF4 if qw.attrs["quant_type"] == _BNB4_TYPES["nf4"] else numerics.FP4
    values = np.asarray(grid.values, np.float32)[codes] * np.repeat(qw.arrays["absmax"].astype(np.float32), bs)[: k * n]
    return values.reshape(n, k).T


def channel_dequantize_arrays(
    qb: quant.QuantizedBlocks, dtype: np.dtype, shape: tuple[int, ...], axis: int
) -> QuantizedWeight:
    """DequantizeLinear inputs for a convolution weight of ``shape`` quantized per channel along ``axis``.

    ``qb`` holds one row (one block) per channel, the other axes flattened in order; the codes are laid
    back out in ``shape``, with one scale (and zero point) per channel: per-axis DequantizeLinear.
    """
    n = shape[axis]
    moved = (n, *shape[:axis], *shape[axis + 1 :])
    codes = np.moveaxis(qb.q.reshape(n, -1)[:, : qb.k].reshape(moved), 0, axis)
    code_dtype = _code_dtype(qb.bits, qb.symmetric)
    arrays = {
        "x": np.ascontiguousarray(codes).astype(code_dtype),
        "scale": qb.scale.reshape(n).astype(dtype),
    }
    if not qb.symmetric:
        arrays["zero_point"] = qb.zero_point.reshape(n).astype(code_dtype)
    return QuantizedWeight("qdq", arrays, {"axis": axis}, qb.k, n, storage_bits(qb.bits, "qdq"))

"""Build the nodes that stand for a quantized weight: MatMulNBits, or blocked DequantizeLinear.

Array preparation (packing, layout) is separate from node building so that it can run in worker
threads while the graph is edited in one thread.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qonnx.core import quant

MS_DOMAIN = "com.microsoft"

__all__ = [
    "MS_DOMAIN",
    "QuantizedWeight",
    "storage_bits",
    "matmulnbits_arrays",
    "dequantize_arrays",
    "channel_dequantize_arrays",
    "fp8_dequantize_arrays",
    "estimated_nbytes",
    "float_nbytes",
    "initializer",
    "matmulnbits_node",
    "dequantize_node",
    "bias_vector",
]


@dataclasses.dataclass
class QuantizedWeight:
    """The arrays of one quantized weight in the layout of the op that will hold them."""

    format: str  # "matmulnbits" or "qdq"
    arrays: dict[str, np.ndarray]
    attrs: dict[str, int]
    k: int
    n: int
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes the quantized weight takes in the model."""
        return sum(-(-a.size // 2) if a.dtype in _SUB_BYTE else a.nbytes for a in self.arrays.values())


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


def matmulnbits_arrays(qm: quant.QuantizedMatrix, dtype: ir.DataType) -> QuantizedWeight:
    """MatMulNBits inputs for ``qm`` ([K, N] blocked along K), scales in the activation ``dtype``.

    3-bit codes are stored in 4-bit containers (``bits=4``); fractional zero points (HQQ) as
    [N, nblocks] in ``dtype``, which MatMulNBits accepts in place of packed ones.
    """
    qm = qm.in_container(storage_bits(qm.bits, "matmulnbits"))
    arrays = {"B": quant.pack_matmulnbits(qm), "scales": np.ascontiguousarray(qm.scale.T).astype(dtype.numpy())}
    if qm.fractional_zero_point:
        arrays["zero_points"] = np.ascontiguousarray(qm.zero_point.T).astype(dtype.numpy())
    elif not qm.symmetric:
        arrays["zero_points"] = quant.pack_matmulnbits_zero_points(qm)
    attrs = {"K": qm.k, "N": qm.n, "bits": qm.bits, "block_size": qm.block_size}
    return QuantizedWeight("matmulnbits", arrays, attrs, qm.k, qm.n, qm.bits)


def dequantize_arrays(qm: quant.QuantizedMatrix, dtype: ir.DataType) -> QuantizedWeight:
    """DequantizeLinear inputs producing the [K, N] weight that ``qm`` stands for.

    4-bit codes (and 2- and 3-bit ones, in 4-bit containers) are int4 (symmetric) or uint4; 8-bit codes int8
    or uint8. One block per channel is per-axis (axis=1, opset 13); smaller blocks are blocked along K
    (axis=0, block_size, opset 21). Zero points must be integers.
    """
    if qm.fractional_zero_point:
        raise ValueError("DequantizeLinear takes integer zero points only; round them first")
    qm = qm.in_container(storage_bits(qm.bits, "qdq"))
    code_dtype = _code_dtype(qm.bits, qm.symmetric)
    scale = qm.scale.astype(dtype.numpy())
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


def fp8_dequantize_arrays(w: np.ndarray, dtype: ir.DataType) -> QuantizedWeight:
    """DequantizeLinear inputs (float8 E4M3 codes, one scale per output column, axis=1) for a [K, N] weight."""
    return fp8_arrays(*quant.quantize_fp8_kn(w, scale_dtype=dtype.numpy()))


def fp8_arrays(codes: np.ndarray, scale: np.ndarray) -> QuantizedWeight:
    """DequantizeLinear inputs for float8 E4M3 codes [K, N] and their scales [N] (in the activations' dtype)."""
    k, n = codes.shape
    arrays = {"x": codes, "scale": scale, "zero_point": np.zeros(n, dtype=ml_dtypes.float8_e4m3fn)}
    return QuantizedWeight("qdq", arrays, {"axis": 1}, k, n, 8)


def channel_dequantize_arrays(
    qb: quant.QuantizedBlocks, dtype: ir.DataType, shape: tuple[int, ...], axis: int
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
        "scale": qb.scale.reshape(n).astype(dtype.numpy()),
    }
    if not qb.symmetric:
        arrays["zero_point"] = qb.zero_point.reshape(n).astype(code_dtype)
    return QuantizedWeight("qdq", arrays, {"axis": axis}, qb.k, n, storage_bits(qb.bits, "qdq"))


def _unique_name(graph: ir.Graph, base: str, taken: set[str] | None) -> str:
    name, i = base, 1
    while name in graph.initializers or (taken is not None and name in taken):
        name = f"{base}_{i}"
        i += 1
    if taken is not None:
        taken.add(name)
    return name


def initializer(graph: ir.Graph, name: str, array: np.ndarray, taken: set[str] | None = None) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` (name made unique) and return its value.

    ``taken``: names used anywhere in the model (subgraphs included); the new name is added to it.
    """
    tensor = ir.tensor(array, name=_unique_name(graph, name, taken))
    value = ir.Value(
        name=tensor.name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def bias_vector(node: ir.Node, n: int) -> tuple[np.ndarray | None, bool]:
    """Gemm's ``beta * C`` as an [N] vector when C is a constant that broadcasts as one.

    Returns (vector or None, whether C exists at all).
    """
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None, False
    c = ir.convenience.get_const_tensor(node.inputs[2])
    if c is None or node.inputs[2].is_graph_input():  # an initializer that is also an input can be overridden
        return None, True
    arr = c.numpy().astype(np.float32)
    beta = np.float32(node.attributes.get_float("beta", 1.0))
    if arr.size == n and (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1)):
        return arr.reshape(n) * beta, True
    if arr.size == 1:
        return np.full(n, arr.reshape(()) * beta, np.float32), True
    return None, True


def matmulnbits_node(
    a: ir.Value,
    weight_inputs: list[ir.Value | None],
    attrs: dict[str, int],
    *,
    name: str,
    bias: ir.Value | None = None,
    accuracy_level: int | None = None,
) -> ir.Node:
    """A MatMulNBits node; ``weight_inputs`` are the [B, scales, zero_points-or-None] initializers."""
    inputs: list[ir.Value | None] = [a, *weight_inputs]
    if bias is not None:
        inputs += [None, bias]  # g_idx unused
    while inputs and inputs[-1] is None:
        inputs.pop()
    all_attrs = dict(attrs)
    if accuracy_level is not None:
        all_attrs["accuracy_level"] = accuracy_level
    return ir.node("MatMulNBits", inputs, attributes=all_attrs, domain=MS_DOMAIN, name=name)


def dequantize_node(weight_inputs: list[ir.Value], attrs: dict[str, int], *, name: str) -> ir.Node:
    """A DequantizeLinear node over the [x, scale, zero_point?] initializers."""
    return ir.node("DequantizeLinear", weight_inputs, attributes=attrs, name=name)

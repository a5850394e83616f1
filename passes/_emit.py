"""Build the nodes that stand for a quantized weight: MatMulNBits, or blocked DequantizeLinear.

Array preparation (packing, layout) is separate from node building so that it can run in worker
threads while the graph is edited in one thread.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qonnx import quant

MS_DOMAIN = "com.microsoft"

__all__ = [
    "MS_DOMAIN",
    "QuantizedWeight",
    "matmulnbits_arrays",
    "dequantize_arrays",
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


def matmulnbits_arrays(qb: quant.QuantizedBlocks, dtype: ir.DataType) -> QuantizedWeight:
    """MatMulNBits inputs for ``qb`` ([N, K] blocked along K), scales in the activation ``dtype``."""
    arrays = {"B": quant.pack_nbits_matmulnbits(qb), "scales": qb.scale.astype(dtype.numpy())}
    if not qb.symmetric:
        arrays["zero_points"] = quant.pack_zero_points(qb.zero_point, qb.bits)
    n = qb.q.shape[0]
    attrs = {"K": qb.k, "N": n, "bits": qb.bits, "block_size": qb.block_size}
    return QuantizedWeight("matmulnbits", arrays, attrs, qb.k, n, qb.bits)


def dequantize_arrays(qb: quant.QuantizedBlocks, dtype: ir.DataType) -> QuantizedWeight:
    """DequantizeLinear inputs producing the [K, N] weight that ``qb`` ([N, K] blocked) stands for.

    4-bit codes are int4 (symmetric) or uint4; 8-bit codes int8 or uint8. One block per channel is
    per-axis (axis=1, opset 13); smaller blocks are blocked along K (axis=0, block_size, opset 21).
    """
    n, nb, bs = qb.q.shape
    codes = qb.q.reshape(n, nb * bs)[:, : qb.k].T  # [K, N]
    if qb.bits == 4:
        code_dtype = ml_dtypes.int4 if qb.symmetric else ml_dtypes.uint4
    else:
        code_dtype = np.int8 if qb.symmetric else np.uint8
    scale = qb.scale.astype(dtype.numpy())
    zp = qb.zero_point.astype(code_dtype)
    if nb == 1 and bs >= qb.k:
        scale, zp = scale.reshape(n), zp.reshape(n)
        attrs = {"axis": 1}
    else:
        scale, zp = np.ascontiguousarray(scale.T), np.ascontiguousarray(zp.T)
        attrs = {"axis": 0, "block_size": bs}
    arrays = {"x": np.ascontiguousarray(codes).astype(code_dtype), "scale": scale}
    if not qb.symmetric:
        arrays["zero_point"] = zp
    return QuantizedWeight("qdq", arrays, attrs, qb.k, n, qb.bits)


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name = f"{base}_{i}"
        i += 1
    return name


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` (name made unique) and return its value."""
    tensor = ir.tensor(array, name=_unique_name(graph, name))
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
    if c is None:
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

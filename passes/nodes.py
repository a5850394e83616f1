"""The nodes and initializers that stand for a quantized weight in a graph (its arrays: :mod:`qonnx.core.formats`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qonnx.core.formats import FORMATS, QuantizedWeight

__all__ = ["bias_vector", "dequantize_node", "fused_node", "initializer"]


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


def fused_node(
    qw: QuantizedWeight,
    a: ir.Value,
    weight_inputs: list[ir.Value | None],
    *,
    name: str,
    bias: ir.Value | None = None,
    accuracy_level: int | None = None,
) -> ir.Node:
    """The fused op of ``qw``'s format (MatMulNBits, ...) over activation ``a`` and the weight's initializers.

    ``weight_inputs`` follow the order of ``qw.arrays`` (None for an absent optional one); ``bias`` goes to
    the format's bias slot.
    """
    fmt = FORMATS[qw.format]
    assert fmt.op_type is not None
    inputs: list[ir.Value | None] = [a, *weight_inputs]
    if bias is not None:
        assert fmt.bias_slot is not None
        inputs += [None] * (fmt.bias_slot - len(inputs)) + [bias]
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = dict(qw.attrs)
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    return ir.node(fmt.op_type, inputs, attributes=attrs, domain=fmt.domain, name=name)


def dequantize_node(weight_inputs: list[ir.Value], attrs: dict[str, int], *, name: str) -> ir.Node:
    """A DequantizeLinear node over the [x, scale, zero_point?] initializers."""
    return ir.node("DequantizeLinear", weight_inputs, attributes=attrs, name=name)

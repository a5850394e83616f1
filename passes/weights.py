"""Analysis: find MatMul and Gemm nodes whose weight is a constant, and say why others are skipped.

A weight is constant when it is an initializer (not also a graph input, which a caller may override),
a Constant node, or either of those behind a chain of Transpose, Cast and Identity nodes. The
candidate knows how to produce the effective [K, N] float matrix the node multiplies by.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["WeightCandidate", "find_weight_candidates", "FLOAT_TYPES"]

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_CHAIN_OPS = ("Transpose", "Cast", "Identity")


@dataclasses.dataclass
class WeightCandidate:
    """A MatMul/Gemm node and its constant weight, or the reason it cannot be quantized.

    Attributes:
        node: the MatMul or Gemm node.
        graph: the graph that holds the node.
        source: the initializer value or Constant output that holds the stored tensor.
        chain: Transpose/Cast/Identity nodes from ``source`` to the node, in order.
        k: reduction size; n: output features.
        reason: why the node is not quantizable, or None when it is.
    """

    node: ir.Node
    graph: ir.Graph
    source: ir.Value | None = None
    chain: tuple[ir.Node, ...] = ()
    k: int = 0
    n: int = 0
    reason: str | None = None

    @property
    def weight_name(self) -> str:
        """Name of the stored weight tensor (or the node's weight input when none)."""
        if self.source is not None and self.source.name:
            return self.source.name
        inputs = self.node.inputs
        return (inputs[1].name or "") if len(inputs) > 1 and inputs[1] is not None else ""

    @property
    def key(self) -> tuple:
        """Identifies the effective matrix: nodes with equal keys can share one quantized weight."""
        attrs: tuple = ()
        if self.node.op_type == "Gemm":
            attrs = (self.node.attributes.get_float("alpha", 1.0), self.node.attributes.get_int("transB", 0))
        chain = tuple(
            (n.op_type, tuple(sorted((k, str(a.value)) for k, a in n.attributes.items()))) for n in self.chain
        )
        return (id(self.source), chain, attrs)

    def tensor(self) -> ir.TensorProtocol:
        """The stored tensor (memory-mapped when external)."""
        assert self.source is not None
        t = ir.convenience.get_const_tensor(self.source)
        assert t is not None
        return t

    def matrix(self) -> np.ndarray:
        """The effective float32 [K, N] weight: chain applied, Gemm's transB and alpha folded."""
        w = self.tensor().numpy()
        for node in self.chain:
            if node.op_type == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                w = np.transpose(w, perm) if perm is not None else w.T
            elif node.op_type == "Cast":
                to = ir.DataType(node.attributes.get_int("to", 1))
                w = w.astype(to.numpy())
        w = np.asarray(w, dtype=np.float32)
        if self.node.op_type == "Gemm":
            if self.node.attributes.get_int("transB", 0):
                w = w.T
            alpha = self.node.attributes.get_float("alpha", 1.0)
            if alpha != 1.0:
                w = w * np.float32(alpha)
        return np.ascontiguousarray(w)

    def release(self) -> None:
        """Unmap the stored tensor's memory when it lives in an external file."""
        if self.source is not None and isinstance(self.source.const_value, ir.ExternalTensor):
            self.source.const_value.release()


def _trace_constant(value: ir.Value, graph: ir.Graph) -> tuple[ir.Value | None, list[ir.Node], str | None]:
    chain: list[ir.Node] = []
    while True:
        producer = value.producer()
        if producer is None:
            if value.const_value is None:
                return None, chain, "weight is not a constant (a graph input)"
            if value.is_graph_input():
                return None, chain, "weight initializer is also a graph input (can be overridden at run time)"
            return value, chain[::-1], None
        if producer.domain == "" and producer.op_type == "Constant":
            if "value" not in producer.attributes:
                return None, chain, "weight Constant node has no tensor 'value'"
            return value, chain[::-1], None
        if producer.domain == "" and producer.op_type in _CHAIN_OPS and producer.inputs[0] is not None:
            chain.append(producer)
            value = producer.inputs[0]
            continue
        return None, chain, f"weight is computed at run time (by {producer.op_type} '{producer.name}')"


def _shape_of(value: ir.Value, chain: list[ir.Node] | tuple[ir.Node, ...]) -> tuple[int, ...] | None:
    t = ir.convenience.get_const_tensor(value)
    if t is None:
        return None
    shape = tuple(int(d) for d in t.shape.numpy())
    for node in chain:
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            shape = tuple(shape[i] for i in perm) if perm is not None else shape[::-1]
    return shape


def _dtype_after_chain(value: ir.Value, chain: tuple[ir.Node, ...]) -> ir.DataType | None:
    t = ir.convenience.get_const_tensor(value)
    dtype = t.dtype if t is not None else None
    for node in chain:
        if node.op_type == "Cast":
            dtype = ir.DataType(node.attributes.get_int("to", 1))
    return dtype


def _candidate(node: ir.Node, graph: ir.Graph) -> WeightCandidate:
    cand = WeightCandidate(node, graph)
    inputs = node.inputs
    if len(inputs) < 2 or inputs[1] is None or inputs[0] is None:
        cand.reason = "node has no weight input"
        return cand
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
        cand.reason = "Gemm with transA=1 is not supported"
        return cand
    source, chain, reason = _trace_constant(inputs[1], graph)
    if reason is not None:
        cand.reason = reason
        return cand
    assert source is not None
    cand.source, cand.chain = source, tuple(chain)
    dtype = _dtype_after_chain(source, cand.chain)
    if dtype not in FLOAT_TYPES:
        cand.reason = f"weight type {dtype} is not floating point"
        return cand
    a_type = inputs[0].dtype
    if a_type is not None and a_type != dtype:
        cand.reason = f"activation type {a_type} differs from weight type {dtype}"
        return cand
    shape = _shape_of(source, cand.chain)
    if shape is None or len(shape) != 2:
        cand.reason = f"weight has shape {shape}; only 2-D weights are quantized"
        return cand
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0:
        shape = shape[::-1]
    a_shape = inputs[0].shape
    if a_shape is not None and len(a_shape) < 2:
        cand.reason = "activation is 1-D"
        return cand
    cand.k, cand.n = shape
    if cand.k < 2 or cand.n < 1:
        cand.reason = f"weight shape {shape} is too small to quantize"
    return cand


def find_weight_candidates(model: ir.Model) -> Iterator[WeightCandidate]:
    """Yield every MatMul and Gemm node of the model (subgraphs included) as a candidate."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
            graph = node.graph
            assert isinstance(graph, ir.Graph)
            yield _candidate(node, graph)

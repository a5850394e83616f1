"""Analysis: find the nodes whose weight is a constant, and say why others are skipped.

Quantizable: MatMul and Gemm (the weight is the [K, N] matrix multiplied by), Conv and ConvTranspose
(quantized per output channel). A weight is constant when it is an initializer (not also a graph input,
which a caller may override; IR versions before 4 had to list every initializer as an input, so there
the listing means nothing), a Constant node, or either of those behind a chain of Transpose, Cast and
Identity nodes. Nodes that hold weights in a form no weight-only scheme here quantizes (recurrent ops,
already quantized ops) are reported too, with the reason, so that a refusal can say why.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["CHAIN_OPS", "FLOAT_TYPES", "QUANTIZABLE_OPS", "WeightCandidate", "find_weight_candidates"]

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
#: Default-domain ops whose constant weight is quantized, with the weight axis that holds output channels
#: (None: a [K, N] matrix quantized in blocks along K).
QUANTIZABLE_OPS: dict[str, int | None] = {"MatMul": None, "Gemm": None, "Conv": 0, "ConvTranspose": 1}
#: Ops a constant weight may pass through on its way to the MatMul/Gemm that reads it.
CHAIN_OPS = ("Transpose", "Cast", "Identity")
_RECURRENT = ("LSTM", "GRU", "RNN")
_QUANTIZED = {
    ("", "MatMulInteger"),
    ("", "ConvInteger"),
    ("", "QLinearMatMul"),
    ("", "QLinearConv"),
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "GatherBlockQuantized"),
    ("com.microsoft", "QAttention"),
    ("com.microsoft", "DynamicQuantizeMatMul"),
}


@dataclasses.dataclass
class WeightCandidate:
    """A node and its constant weight, or the reason it cannot be quantized.

    Attributes:
        node: the MatMul, Gemm, Conv or ConvTranspose node (or another weight-holding node, with a reason).
        graph: the graph that holds the node.
        source: the initializer value or Constant output that holds the stored tensor.
        chain: Transpose/Cast/Identity nodes from ``source`` to the node, in order.
        k: reduction size; n: output features (for convolutions: elements per output channel, channels).
        axis: for convolutions, the weight axis of the output channels; None for MatMul and Gemm.
        shape: the weight's shape as the node reads it (after the chain).
        reason: why the node is not quantizable, or None when it is.
    """

    node: ir.Node
    graph: ir.Graph
    source: ir.Value | None = None
    chain: tuple[ir.Node, ...] = ()
    k: int = 0
    n: int = 0
    axis: int | None = None
    shape: tuple[int, ...] = ()
    reason: str | None = None

    @property
    def module(self) -> str:
        """The source module's path when the exporter recorded it (torch.onnx: ``layers.3.self_attn.o_proj``)."""
        return module_path(self.node)

    @property
    def weight_name(self) -> str:
        """Name of the stored weight tensor (or the node's weight input when none)."""
        if self.source is not None and self.source.name:
            return self.source.name
        inputs = self.node.inputs
        return (inputs[1].name or "") if len(inputs) > 1 and inputs[1] is not None else ""

    @property
    def key(self) -> tuple:
        """Identifies the effective weight: nodes with equal keys can share one quantized weight."""
        attrs: tuple = ()
        if self.node.op_type == "Gemm":
            attrs = (self.node.attributes.get_float("alpha", 1.0), self.node.attributes.get_int("transB", 0))
        chain = tuple(
            (n.op_type, tuple(sorted((k, str(a.value)) for k, a in n.attributes.items()))) for n in self.chain
        )
        return (id(self.source), chain, attrs, self.axis)

    @property
    def home_graph(self) -> ir.Graph:
        """The graph that holds the stored weight (an outer graph for a subgraph's outer-scope weight)."""
        assert self.source is not None
        producer = self.source.producer()
        home = producer.graph if producer is not None else self.source.graph
        return home if isinstance(home, ir.Graph) else self.graph

    def tensor(self) -> ir.TensorProtocol:
        """The stored tensor (memory-mapped when external)."""
        assert self.source is not None
        t = ir.convenience.get_const_tensor(self.source)
        assert t is not None
        return t

    def weight(self) -> np.ndarray:
        """The float32 weight as the node reads it: the Transpose/Cast chain applied."""
        w = self.tensor().numpy()
        for node in self.chain:
            if node.op_type == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                w = np.transpose(w, perm) if perm is not None else w.T
            elif node.op_type == "Cast":
                to = ir.DataType(node.attributes.get_int("to", 1))
                w = w.astype(to.numpy())
        return np.asarray(w, dtype=np.float32)

    def matrix(self) -> np.ndarray:
        """The effective float32 [K, N] weight of a MatMul/Gemm: Gemm's transB and alpha folded."""
        w = self.weight()
        if self.node.op_type == "Gemm":
            if self.node.attributes.get_int("transB", 0):
                w = w.T
            alpha = self.node.attributes.get_float("alpha", 1.0)
            if alpha != 1.0:
                w = w * np.float32(alpha)
        return np.ascontiguousarray(w)

    def channel_rows(self) -> np.ndarray:
        """A convolution weight as float32 [N, K]: one row per output channel (weight axis ``axis``)."""
        assert self.axis is not None
        w = np.moveaxis(self.weight(), self.axis, 0)
        return np.ascontiguousarray(w.reshape(self.n, self.k))

    def release(self) -> None:
        """Unmap the stored tensor's memory when it lives in an external file."""
        if self.source is not None and isinstance(self.source.const_value, ir.ExternalTensor):
            self.source.const_value.release()


def _trace_constant(value: ir.Value, inputs_are_constants: bool) -> tuple[ir.Value | None, list[ir.Node], str | None]:
    chain: list[ir.Node] = []
    while True:
        producer = value.producer()
        if producer is None:
            if value.const_value is None:
                return None, chain, "weight is not a constant (a graph input)"
            if value.is_graph_input() and not inputs_are_constants:
                return None, chain, "weight initializer is also a graph input (can be overridden at run time)"
            return value, chain[::-1], None
        if producer.domain == "" and producer.op_type == "Constant":
            if "value" not in producer.attributes:
                return None, chain, "weight Constant node has no tensor 'value'"
            return value, chain[::-1], None
        if producer.domain == "" and producer.op_type in CHAIN_OPS and producer.inputs[0] is not None:
            chain.append(producer)
            value = producer.inputs[0]
            continue
        if producer.op_type == "DequantizeLinear":
            return None, chain, f"weight is already quantized (DequantizeLinear '{producer.name}')"
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


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None and not value.is_graph_input()


def _candidate(node: ir.Node, graph: ir.Graph, inputs_are_constants: bool) -> WeightCandidate:
    cand = WeightCandidate(node, graph, axis=QUANTIZABLE_OPS[node.op_type])
    inputs = node.inputs
    if len(inputs) < 2 or inputs[1] is None or inputs[0] is None:
        cand.reason = "node has no weight input"
        return cand
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
        cand.reason = "Gemm with transA=1 is not supported"
        return cand
    if node.op_type == "MatMul" and _is_constant(inputs[0]) and not _is_constant(inputs[1]):
        cand.reason = "the constant is the left operand (W @ x); only x @ W is quantized"
        return cand
    source, chain, reason = _trace_constant(inputs[1], inputs_are_constants)
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
    cand.shape = shape or ()
    if cand.axis is not None:
        return _conv_shape(cand, shape)
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


def _conv_shape(cand: WeightCandidate, shape: tuple[int, ...] | None) -> WeightCandidate:
    assert cand.axis is not None
    if shape is None or len(shape) < 3:
        cand.reason = f"{cand.node.op_type} weight has shape {shape}; expected [channels, channels/groups, *kernel]"
        return cand
    cand.n = shape[cand.axis]
    cand.k = math.prod(shape) // max(cand.n, 1)
    if cand.k < 2 or cand.n < 1:
        cand.reason = f"weight shape {shape} is too small to quantize"
    return cand


def _other_weight_node(node: ir.Node) -> WeightCandidate | None:
    """A node that holds weights in a form not quantized here, with the reason; None for other nodes."""
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    if node.domain == "" and node.op_type in _RECURRENT:
        reason = (
            f"recurrent weights live inside the {node.op_type} op, which has no weight-only form; "
            f"only {', '.join(QUANTIZABLE_OPS)} weights are quantized"
        )
        return WeightCandidate(node, graph, reason=reason)
    if ("" if node.domain == "ai.onnx" else node.domain, node.op_type) in _QUANTIZED:
        return WeightCandidate(node, graph, reason=f"already quantized ({node.op_type})")
    return None


#: ``pkg.torch.onnx.name_scopes`` as torch.onnx writes it: the repr of a flat list of strings.
_SCOPES = re.compile(r"\[\s*(?:(?:'[^'\\]*'|\"[^\"\\]*\")\s*(?:,\s*|(?=\])))*\]")
_SCOPE = re.compile(r"'([^'\\]*)'|\"([^\"\\]*)\"")
#: Longer metadata is not a name scope list an exporter wrote (SmolLM2's longest is under 300 characters).
_MAX_SCOPES = 1 << 16


def module_path(node: ir.Node) -> str:
    """The PyTorch module path torch.onnx recorded for ``node`` (``pkg.torch.onnx.name_scopes``), or ''.

    The export wrapper's leading ``model.`` scopes are dropped: ``model.layers.3.mlp.down_proj``. Metadata
    is data from the file: it is matched as a flat list of quoted strings, never evaluated; anything else
    (nested lists that would make a parser recurse, megabytes of text) is not a name scope list and gives ''
    (the layer is then named by its node and weight, as for models from other exporters).
    """
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    if len(scopes) > _MAX_SCOPES or not _SCOPES.fullmatch(scopes):
        return ""
    names = [a or b for a, b in _SCOPE.findall(scopes)]
    if len(names) < 2:
        return ""
    path = names[-2]  # the last scope is the op itself (linear_143)
    while path.startswith("model.model."):
        path = path[len("model.") :]
    return path


def find_weight_candidates(model: ir.Model) -> Iterator[WeightCandidate]:
    """Yield every MatMul, Gemm, Conv and ConvTranspose node of the model (subgraphs included) as a candidate.

    Recurrent and already quantized nodes are yielded too, each with the reason it is not quantizable.
    """
    inputs_are_constants = (model.ir_version or 0) < 4
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in QUANTIZABLE_OPS:
            graph = node.graph
            assert isinstance(graph, ir.Graph)
            yield _candidate(node, graph, inputs_are_constants)
        else:
            other = _other_weight_node(node)
            if other is not None:
                yield other

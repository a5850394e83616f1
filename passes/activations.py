"""Static activation quantization: a QuantizeLinear -> DequantizeLinear pair on each calibrated activation.

One pair per tensor, shared by every quantized node that reads it (the q, k and v projections of an
attention block read one normalized tensor: one scale, one rounding), so there is no double rounding
and ONNX Runtime's QDQ fusions see the ``DQ(activation), DQ(weight) -> MatMul`` shape they turn into
integer kernels. Readers that are not quantized keep reading the float tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = ["ActivationQParams", "InsertActivationQDQPass", "unique_name"]


@dataclasses.dataclass(frozen=True)
class ActivationQParams:
    """The quantization of one activation tensor.

    Attributes:
        scale: float scale (stored in the activation's dtype).
        zero_point: integer zero point (0 for symmetric int8 and for fp8).
        kind: ``"uint8"``, ``"int8"`` or ``"fp8"`` (float8 E4M3).
        readers: the (node, input index) pairs that read the quantized value instead of the float one.
    """

    scale: float
    zero_point: int
    kind: str
    readers: tuple[tuple[ir.Node, int], ...] = ()


def _zero_point_array(kind: str, zp: int) -> np.ndarray:
    if kind == "uint8":
        return np.array(zp, dtype=np.uint8)
    if kind == "int8":
        return np.array(zp, dtype=np.int8)
    if kind == "fp8":
        return np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    raise ValueError(f"unknown activation code type {kind!r}")


class InsertActivationQDQPass(ir.passes.InPlacePass):
    """Insert ``QuantizeLinear -> DequantizeLinear`` after each named tensor of the main graph.

    ``params`` maps a tensor name to its :class:`ActivationQParams`; the pair is inserted once per
    tensor and the listed readers are rewired to the dequantized value. After the pass, :attr:`inserted`
    counts the pairs.
    """

    def __init__(self, params: Mapping[str, ActivationQParams]) -> None:
        super().__init__()
        self.params = dict(params)
        self.inserted = 0

    def requires(self, model: ir.Model) -> None:
        """Every named tensor exists in the main graph; float8 codes need opset 19."""
        values = _values_by_name(model.graph)
        missing = [name for name in self.params if name not in values]
        if missing:
            raise ir.passes.PreconditionError(f"no tensor named {missing[0]!r} in the main graph")
        if any(p.kind == "fp8" for p in self.params.values()) and model.opset_imports.get("", 0) < 19:
            raise ir.passes.PreconditionError("float8 QuantizeLinear needs opset 19 (run UpgradeOpsetPass first)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Insert the pairs and rewire the readers."""
        graph = model.graph
        values = _values_by_name(graph)
        taken = {v.name for v in values.values() if v.name} | set(graph.initializers)
        self.inserted = 0
        for name, p in self.params.items():
            x = values[name]
            dtype = x.dtype or _reader_dtype(p.readers)
            base = unique_name(f"{name}_act", taken)
            scale = _constant(graph, f"{base}_scale", np.array(p.scale, dtype=dtype.numpy()), taken)
            zp = _constant(graph, f"{base}_zero_point", _zero_point_array(p.kind, p.zero_point), taken)
            q = ir.node("QuantizeLinear", [x, scale, zp], name=unique_name(f"{base}_QuantizeLinear", taken))
            q.outputs[0].name = unique_name(f"{base}_quantized", taken)
            dq = ir.node(
                "DequantizeLinear", [q.outputs[0], scale, zp], name=unique_name(f"{base}_DequantizeLinear", taken)
            )
            dq.outputs[0].name = unique_name(f"{base}_dequantized", taken)
            dq.outputs[0].dtype = dtype
            dq.outputs[0].shape = x.shape
            anchor = _first_reader(graph, p.readers)
            graph.insert_before(anchor, [q, dq])
            for node, index in p.readers:
                node.replace_input_with(index, dq.outputs[0])
            self.inserted += 1
        return ir.passes.PassResult(model, modified=bool(self.inserted))


def _reader_dtype(readers: Sequence[tuple[ir.Node, int]]) -> ir.DataType:
    """A tensor's float type when shape inference left it unknown: that of its readers' other operands."""
    for node, index in readers:
        for i, v in enumerate(node.inputs):
            if i != index and v is not None and v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                return v.dtype
            if i != index and v is not None and v.dtype == ir.DataType.FLOAT:
                return v.dtype
    return ir.DataType.FLOAT


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def _first_reader(graph: ir.Graph, readers: Sequence[tuple[ir.Node, int]]) -> ir.Node:
    """The reader that comes first in the graph (the pair must precede every reader)."""
    wanted = {id(node) for node, _ in readers}
    for node in graph:
        if id(node) in wanted:
            return node
    raise ValueError("none of the readers is in the main graph")


def _constant(graph: ir.Graph, name: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first name not in ``taken``, which then holds it."""
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name

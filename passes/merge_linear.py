"""Merge the linear layers that read the same input into one: q/k/v projections, gate/up projections.

A Llama layer reads its normalized hidden state three times (query, key and value projections) and its MLP input
twice (gate and up projections). At decode (one token) each is a matrix-vector product, and small ones use the
memory system badly: on an H100, ONNX Runtime 1.31's 4-bit MatMulNBits took 21 us per call for a 4096 x 4096
weight and 29 us for a 4096 x 11008 one, 2.7x the bytes (``benchmarks/probe_matmulnbits.py``). This pass
concatenates such weights along N into one node and splits its output, as onnxruntime-genai's model builder writes
packed QKV and gate/up weights (7B W4A16 decode on an H100: +9%, benchmarks/RESULTS.md):

- ``MatMulNBits`` (com.microsoft) nodes with the same input, K, bits, block size and accuracy level, constant
  weights, scales and zero points (all with or all without zero points and bias, no ``g_idx``): B, scales, zero
  points and bias are concatenated per output column (each column's blocks are independent, so every output
  value is the one the separate node computed);
- ``MatMul`` nodes with a constant 2-D weight of the same dtype and K: the weights are concatenated along N.

When the merged outputs are exactly a GroupQueryAttention's query, key and value, it takes the packed result as its
query input with key and value left empty (GroupQueryAttention's packed-QKV form); otherwise one ``Split`` gives
the original outputs back (``split=False`` leaves such groups alone). Graph outputs and value names are kept.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["MergeParallelLinearPass"]

_MS = "com.microsoft"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _own_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant that one node alone reads.

    Merging then moves its bytes instead of copying them: a tied weight, also read by a Gather, would be stored
    twice.
    """
    return value is not None and value.const_value is not None and len(list(value.uses())) == 1


def _nbits_key(node: ir.Node) -> tuple | None:
    """What MatMulNBits nodes must share to merge; None when this node cannot be merged."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None:  # g_idx
        return None
    if any(v is not None and not _own_constant(v) for v in inputs[1:6]) or inputs[1] is None:
        return None
    attrs = node.attributes
    key = tuple(attrs[a].as_int() if a in attrs else None for a in ("K", "bits", "block_size", "accuracy_level"))
    zp = inputs[3]
    return (
        "nbits",
        *key,
        inputs[2].dtype if inputs[2] is not None else None,
        None if zp is None else zp.dtype,
        inputs[5] is not None,
    )


def _matmul_key(node: ir.Node) -> tuple | None:
    weight = node.inputs[1] if len(node.inputs) > 1 and _own_constant(node.inputs[1]) else None
    if weight is None or len(weight.const_value.shape) != 2:  # type: ignore[union-attr]  # (no data read)
        return None
    return ("matmul", weight.const_value.shape[0], weight.dtype)  # type: ignore[union-attr]


def _columns(node: ir.Node) -> int:
    if node.op_type == "MatMul":
        return int(node.inputs[1].const_value.shape[1])  # type: ignore[union-attr,arg-type]
    return node.attributes["N"].as_int()


def _concat(values: Sequence[ir.Value | None], name: str, axis: int) -> ir.Value | None:
    """A new initializer: the constants ``values`` concatenated along ``axis``."""
    if values[0] is None:
        return None
    arrays = [_const(v) for v in values]
    first = arrays[0]
    assert first is not None
    # MatMulNBits inputs are laid out per output column ([N, ...] or flat [N * per column]): axis 0; a MatMul
    # weight [K, N]: axis 1.
    merged = np.concatenate(arrays, axis=axis)  # type: ignore[arg-type,var-annotated]
    return ir.val(name, const_value=ir.tensor(np.ascontiguousarray(merged), name=name))


def _gqa_packed(outputs: Sequence[ir.Value]) -> ir.Node | None:
    """The GroupQueryAttention reading ``outputs`` (in any order) as its query, key and value.

    None when there is none, or when anything else reads them.
    """
    if len(outputs) != 3:
        return None
    users = {id(v): list(v.uses()) for v in outputs}
    if any(len(u) != 1 for u in users.values()) or any(v.is_graph_output() for v in outputs):
        return None
    nodes = {u[0][0] for u in users.values()}
    if len(nodes) != 1:
        return None
    node = nodes.pop()
    if node.op_type != "GroupQueryAttention" or node.domain != _MS:
        return None
    if sorted(u[0][1] for u in users.values()) != [0, 1, 2]:
        return None
    return node


class MergeParallelLinearPass(ir.passes.InPlacePass):
    """Concatenate parallel linear layers that read one input (see the module docstring).

    After the pass, :attr:`merged` counts the nodes removed by kind ("MatMulNBits", "MatMul") and :attr:`packed_qkv`
    the GroupQueryAttention nodes that now read a packed query/key/value.
    """

    def __init__(self, *, split: bool = True) -> None:
        """Set the option.

        Args:
            split: also merge groups whose outputs must be split apart again (gate/up); False: only those a
                GroupQueryAttention reads packed (q/k/v).
        """
        super().__init__()
        self.split = split
        self.merged: dict[str, int] = {}
        self.packed_qkv = 0
        self._names: set[str] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Group the candidates by input and kind, then merge each group of two or more."""
        self.merged = collections.Counter()
        self.packed_qkv = 0
        self._names = {v.name for v in model.graph.initializers.values() if v.name} | {
            v.name for n in model.graph for v in n.outputs if v.name
        }
        groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
        for node in model.graph:
            if node.inputs and node.inputs[0] is not None:
                if node.op_type == "MatMulNBits" and node.domain == _MS:
                    key = _nbits_key(node)
                elif node.op_type == "MatMul" and node.domain == "":
                    key = _matmul_key(node)
                else:
                    key = None
                if key is not None:
                    groups[(id(node.inputs[0]), *key)].append(node)
        for nodes in groups.values():
            if len(nodes) > 1:
                self._merge(model, nodes)
        if self.merged:
            RemoveUnusedNodesPass()(model)  # the separate weights
        return ir.passes.PassResult(model, modified=bool(self.merged))

    def _unique(self, base: str) -> str:
        """A name prefix no initializer or value of the model starts with yet."""
        name, i = base, 1
        while any(n.startswith(name) for n in self._names):
            i += 1
            name = f"{base}{i}"
        self._names.add(name)
        return name

    def _merge(self, model: ir.Model, nodes: list[ir.Node]) -> None:
        graph = model.graph
        outputs = [n.outputs[0] for n in nodes]
        gqa = _gqa_packed(outputs)
        if gqa is None and not self.split:
            return
        if gqa is not None:  # concatenate in the attention's order: query, key, value
            order = {id(v): next(i for _, i in v.uses()) for v in outputs}
            nodes = sorted(nodes, key=lambda n: order[id(n.outputs[0])])
            outputs = [n.outputs[0] for n in nodes]
        first = nodes[0]
        base = self._unique((first.name or "linear") + "_merged")
        widths = [_columns(n) for n in nodes]
        total = sum(widths)
        if first.op_type == "MatMul":
            weight = _concat([n.inputs[1] for n in nodes], f"{base}_weight", axis=1)
            assert weight is not None
            graph.register_initializer(weight)
            merged = ir.node("MatMul", [first.inputs[0], weight], name=base)
            kind = "MatMul"
        else:
            inputs: list[ir.Value | None] = [first.inputs[0]]
            for index, tag in ((1, "B"), (2, "scales"), (3, "zero_points"), (4, None), (5, "bias")):
                values = [n.inputs[index] if len(n.inputs) > index else None for n in nodes]
                value = None if tag is None else _concat(values, f"{base}_{tag}", axis=0)
                if value is not None:
                    graph.register_initializer(value)
                inputs.append(value)
            while inputs and inputs[-1] is None:
                inputs.pop()
            attributes = {k: v for k, v in first.attributes.items()}
            attributes["N"] = ir.AttrInt64("N", total)
            merged = ir.node("MatMulNBits", inputs, attributes=attributes, domain=_MS, name=base)
            kind = "MatMulNBits"
        packed = merged.outputs[0]
        packed.name = f"{base}_output"
        packed.type = outputs[0].type
        shape = outputs[0].shape
        if shape is not None and shape.rank():
            packed.shape = ir.Shape([*list(shape)[:-1], total])
        if gqa is not None:
            graph.insert_before(first, [merged])
            gqa.replace_input_with(0, packed)
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            for node in nodes:
                graph.remove(node, safe=True)
            self.packed_qkv += 1
        else:
            name = f"{base}_split"
            if model.opset_imports.get("", 13) >= 13:  # the sizes are an input from opset 13 on
                sizes = ir.val(name, const_value=ir.tensor(np.array(widths, np.int64), name=name))
                graph.register_initializer(sizes)
                split = ir.node("Split", [packed, sizes], attributes={"axis": -1}, num_outputs=len(nodes), name=name)
            else:
                split = ir.node(
                    "Split", [packed], attributes={"axis": -1, "split": widths}, num_outputs=len(nodes), name=name
                )
            for new, old in zip(split.outputs, outputs, strict=True):
                new.type, new.shape = old.type, old.shape
            ir.convenience.replace_nodes_and_values(graph, first, nodes, [merged, split], outputs, list(split.outputs))
        self.merged[kind] = self.merged.get(kind, 0) + len(nodes) - 1

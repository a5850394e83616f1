"""Keep a GGUF file's quantized weights: its codes become MatMulNBits without a float round trip.

The float export of a GGUF model holds each weight as transformers dequantized it. This pass finds, for each
MatMul/Gemm weight, the GGUF tensor whose dequantized values are *bit for bit* that weight (so nothing is
matched by name, and a weight that differs in any bit stays float), and hands its codes to
:class:`~qonnx.passes.weight_only.QuantizeWeightsPass` as presolved arrays: the weight-only emitter lays
them out, symmetric, block 32, scales ``d``.

* Q8_0 and Q4_0 are MatMulNBits' own symmetric 8- and 4-bit forms: exact.
* Q4_1 (``w = d * q + m``): MatMulNBits holds ``d * (q - 8)``; the per-block rest ``m + 8 d`` is added as
  ``ReduceSum(x over each block of 32) @ offset`` ([K/32, N], 1/32 of the layer's work). Exact up to float32
  rounding. (MatMulNBits' float zero points, ``zp = -m / d``, are as exact but measured 12x slower at decode
  on the CPU provider of ONNX Runtime 1.31: that path dequantizes the weight on every call.)

Storage is the GGUF's own: ``d`` and ``m`` stay float16 initializers, widened by a Cast (and the offset
computed) in the graph; ONNX Runtime folds these constants when it loads the model. Bits per weight are
those of the GGUF type: Q4_0 4.5, Q4_1 5.0, Q8_0 8.5.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qonnx.core import formats
from qonnx.core.config import WeightOnlyConfig
from qonnx.core.ggml import BLOCK, KeptMatrix
from qonnx.core.schemes import Targets
from qonnx.core.sizes import human_bytes
from qonnx.passes import nodes
from qonnx.passes.activations import unique_name
from qonnx.passes.weight_only import QuantizeWeightsPass, all_value_names
from qonnx.passes.weight_plan import LayerRecord, act_dtype, float_reader, share_key
from qonnx.passes.weights import WeightCandidate, find_weight_candidates

__all__ = ["KeepQuantizationPass", "KeptLayer"]


@dataclasses.dataclass
class KeptLayer:
    """A weight of the graph matched to a GGUF tensor."""

    weight: str  # the float initializer's name in the export
    tensor: str  # the GGUF tensor's name
    type: str  # its GGML type
    k: int
    n: int
    node: str = ""  # the MatMulNBits node, once emitted
    nbytes: int = 0  # bytes of its codes, float16 scales and minimums in the model (as in the GGUF)


def _fingerprint(k: int, n: int, first: np.ndarray) -> tuple:
    """Shape and the first output feature's float32 weights: what picks the GGUF tensors worth comparing."""
    return (k, n, np.ascontiguousarray(first, dtype=np.float32).tobytes())


class KeepQuantizationPass(ir.passes.InPlacePass):
    """Replace every float weight that a kept GGUF tensor dequantizes to, bit for bit, by that tensor's codes.

    After the pass :attr:`layers` lists the kept weights, :attr:`records` the weight-only pass's records,
    :attr:`tied` the matched tensors left float because another node reads the same table in float (a tied
    embedding's Gather: a kept copy would add bytes; ``keep_tied=True`` keeps it, for a faster lm_head) and
    :attr:`unmatched` the kept tensors no weight of the graph equals.
    """

    def __init__(self, kept: Mapping[str, KeptMatrix], *, keep_tied: bool = False) -> None:
        super().__init__()
        self.kept = kept
        self.keep_tied = keep_tied
        #: GGUF tensor -> why its match stays float: a tied table that another node reads in float anyway.
        self.tied: dict[str, str] = {}
        self.layers: list[KeptLayer] = []
        self.records: list[LayerRecord] = []
        self.unmatched: list[str] = []
        self.matched: dict[str, str] = {}  # weight name in the export -> GGUF tensor name

    def _match(self, model: ir.Model) -> list[tuple[WeightCandidate, KeptMatrix, KeptLayer]]:
        index: dict[tuple, list[str]] = {}
        for name, km in self.kept.items():
            n, k = km.shape
            first = km.rows(np.array([0])).dequantize()[0]
            index.setdefault(_fingerprint(k, n, first), []).append(name)
        found: list[tuple[WeightCandidate, KeptMatrix, KeptLayer]] = []
        used: set[str] = set()
        for cand in find_weight_candidates(model):
            if cand.reason is not None or cand.axis is not None or act_dtype(cand) != ir.DataType.FLOAT:
                continue
            if cand.k % BLOCK:
                continue
            w = cand.matrix()
            for name in index.get(_fingerprint(cand.k, cand.n, w[:, 0]), []):
                km = self.kept[name]
                if np.array_equal(km.dequantize().T, w):
                    found.append((cand, km, KeptLayer(cand.weight_name, name, km.type, cand.k, cand.n)))
                    used.add(name)
                    break
            del w
            cand.release()
        self.unmatched = [name for name in self.kept if name not in used]
        self.matched = {layer.weight: layer.tensor for _, _, layer in found}
        if self.keep_tied:
            return found
        chosen = {id(cand.node) for cand, _, _ in found}
        untied = []
        for cand, km, layer in found:
            assert cand.source is not None
            reader = float_reader(cand.source, chosen)
            if reader is None:
                untied.append((cand, km, layer))
                continue
            self.tied[layer.tensor] = (
                f"tied: the float table stays for {reader}, so keeping the copy the MatMul reads would add "
                f"{human_bytes(km.nbytes)} (keep_tied=True keeps it)"
            )
        return untied

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Match, emit the codes through the weight-only pass, then add Q4_1's offsets and the float16 storage."""
        found = self._match(model)
        configs = {
            layer.weight: WeightOnlyConfig(bits=km.bits, block_size=BLOCK, symmetric=True) for _, km, layer in found
        }
        weights = QuantizeWeightsPass(Targets(None, configs))
        by_weight = {layer.weight: (km, layer) for _, km, layer in found}
        # The emitted nodes are found again by their codes (a Gemm's run-time C renames the output, subgraphs...).
        by_codes: dict[bytes, KeptMatrix] = {}
        for cand, cfg, _ in weights.plan(model):
            if cfg is None or cand.weight_name not in by_weight:
                continue
            km, _ = by_weight[cand.weight_name]
            qw = formats.emit(km.symmetric(), "matmulnbits", np.dtype(np.float32))
            weights.presolved[share_key(cand, cfg)] = qw
            by_codes[_digest(qw.arrays["B"])] = km
        result = weights(model)
        self.records = weights.records
        for record in self.records:
            if record.quantized and record.weight in by_weight and record.shared_with is None:
                km, layer = by_weight[record.weight]
                layer.node, layer.nbytes = record.node, km.nbytes
                self.layers.append(layer)
        names = all_value_names(model)
        shared: dict[tuple, ir.Value] = {}
        for graph in model.graphs():
            for node in list(graph):
                b = node.inputs[1] if node.op_type == "MatMulNBits" and len(node.inputs) > 2 else None
                found_km = (
                    by_codes.get(_digest(b.const_value.numpy()))
                    if b is not None and b.const_value is not None
                    else None
                )
                if found_km is None:
                    continue
                km = found_km
                scales = _float16_storage(graph, node, names, shared)
                if km.minimum is not None:
                    _add_offset(graph, node, km, scales, names, shared)
        if self.layers:
            ir.passes.common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=result.modified)


def _digest(codes: np.ndarray) -> bytes:
    """What tells one layer's packed codes from another's."""
    return hashlib.sha256(np.ascontiguousarray(codes).tobytes()).digest() + repr(codes.shape).encode()


def _constant(
    graph: ir.Graph, name: str, array: np.ndarray, names: set[str], shared: dict[tuple, ir.Value]
) -> ir.Value:
    """A small initializer shared by every node that needs the same values."""
    key = ("const", array.dtype.str, array.shape, array.tobytes())
    if key not in shared:
        shared[key] = nodes.initializer(graph, name, array, names)
    return shared[key]


def _float16_storage(graph: ir.Graph, node: ir.Node, names: set[str], shared: dict[tuple, ir.Value]) -> ir.Value:
    """Store the node's float32 scales (exactly float16, GGUF's ``d``) as float16, widened by a Cast; its output."""
    old = node.inputs[2]
    assert old is not None and old.const_value is not None
    key = ("scales", id(old))
    if key not in shared:  # one weight read by several nodes: one float16 copy
        d16 = nodes.initializer(graph, f"{old.name}_f16", old.const_value.numpy().astype(np.float16), names)
        cast = ir.node("Cast", [d16], {"to": ir.DataType.FLOAT}, name=unique_name(f"{old.name}_Cast", names))
        cast.outputs[0].name = unique_name(f"{old.name}_f32", names)
        graph.insert_before(node, cast)
        shared[key] = cast.outputs[0]
    node.replace_input_with(2, shared[key])
    if not old.uses() and old.graph is not None and old.name and old.name in old.graph.initializers:
        old.graph.initializers.pop(old.name)
    return shared[key]


def _add_offset(
    graph: ir.Graph,
    node: ir.Node,
    km: KeptMatrix,
    scales: ir.Value,
    names: set[str],
    shared: dict[tuple, ir.Value],
) -> None:
    """Add Q4_1's ``ReduceSum(x over blocks) @ (m + 8 d)`` to the MatMulNBits output (``m`` stored float16)."""
    x, y0 = node.inputs[0], node.outputs[0]
    assert x is not None and km.minimum is not None
    nb = km.shape[1] // BLOCK
    rank = len(x.shape) if x.shape is not None else 0
    base = node.name or "kept"
    new: list[ir.Node] = []
    key = ("sum", id(x), nb)
    if key not in shared:
        if rank >= 1:
            dims = np.array([0] * (rank - 1) + [nb, BLOCK], np.int64)
            blocks = ir.node("Reshape", [x, _constant(graph, "kept_block_shape", dims, names, shared)])
        else:  # unknown rank: keep every leading dimension, split the last one
            shape = ir.node("Shape", [x], {"end": -1})
            tail = _constant(graph, "kept_block_tail", np.array([nb, BLOCK], np.int64), names, shared)
            full = ir.node("Concat", [shape.outputs[0], tail], {"axis": 0})
            blocks = ir.node("Reshape", [x, full.outputs[0]])
            new += [shape, full]
        axes = _constant(graph, "kept_last_axis", np.array([-1], np.int64), names, shared)
        total = ir.node("ReduceSum", [blocks.outputs[0], axes], {"keepdims": 0})
        new += [blocks, total]
        shared[key] = total.outputs[0]
    if ("offset", id(km)) not in shared:  # one weight read by several nodes: one offset
        m16 = nodes.initializer(graph, f"{base}_block_min_f16", np.ascontiguousarray(km.minimum.T), names)
        eight = _constant(graph, "kept_eight", np.array(8.0, np.float32), names, shared)
        m32 = ir.node("Cast", [m16], {"to": ir.DataType.FLOAT})
        d_t = ir.node("Transpose", [scales], {"perm": [1, 0]})
        d8 = ir.node("Mul", [d_t.outputs[0], eight])
        offset = ir.node("Add", [m32.outputs[0], d8.outputs[0]])
        new += [m32, d_t, d8, offset]
        shared[("offset", id(km))] = offset.outputs[0]
    correction = ir.node("MatMul", [shared[key], shared[("offset", id(km))]])
    total_out = ir.node("Add", [y0, correction.outputs[0]], name=unique_name(f"{base}_block_min", names))
    new += [correction, total_out]
    for i, n in enumerate(new):
        if not n.name:
            n.name = unique_name(f"{base}_block_min_{n.op_type}_{i}", names)
        for out in n.outputs:
            out.name = unique_name(f"{n.name}_out", names)
    y = total_out.outputs[0]
    for user, index in list(y0.uses()):
        if user is not total_out:
            user.replace_input_with(index, y)
    for i, out in enumerate(graph.outputs):
        if out is y0:
            graph.outputs[i] = y
    y.name, y0.name = y0.name, unique_name(f"{y0.name}_codes", names)
    y.shape, y.type = y0.shape, y0.type
    graph.insert_after(node, new)

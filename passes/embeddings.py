"""Embedding tables in 4 or 8 bits: GatherBlockQuantized, and a tied lm_head's MatMulNBits on the same codes.

A table is a constant 2-D float initializer [V, H] that Gather nodes (axis 0) read. It is quantized once, in
blocks along H, as the [K=H, N=V] MatMulNBits weight of ``h @ table.T``: a tied lm_head (a MatMul reading the
table through a Transpose, or a Gemm with transB=1) becomes that MatMulNBits, and each Gather becomes ONNX
Runtime's GatherBlockQuantized reading the same initializers (:class:`qonnx.core.formats.GatherLayout`: its
data is a Reshape of MatMulNBits' B, the same bytes), so the model stores one copy of the table. An untied
lm_head is a weight like any other (:class:`qonnx.passes.weight_only.QuantizeWeightsPass`).

Codes are rounded to nearest (GPTQ would fit the head's inputs at the cost of the rows the Gather returns).
An 8-bit tied head computes with int8 activations (accuracy_level 4, :data:`EIGHT_BIT_ACCURACY_LEVEL`) unless
its config sets an accuracy level. A table stays in floating point, with the reason, when another node still
reads it in floating point, when its tied head is kept in floating point, or when quantizing would not make it
smaller.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qonnx.core import formats, quant
from qonnx.core.config import WeightOnlyConfig
from qonnx.core.schemes import Targets
from qonnx.core.sizes import human_bytes
from qonnx.passes import cleanup, nodes
from qonnx.passes.activations import unique_name
from qonnx.passes.weight_only import QuantizeWeightsPass, all_value_names
from qonnx.passes.weight_plan import LayerRecord
from qonnx.passes.weights import CHAIN_OPS, FLOAT_TYPES, WeightCandidate, find_weight_candidates

__all__ = ["EmbeddingTable", "QuantizeEmbeddingsPass", "gather_table", "plan_embeddings"]

#: GatherBlockQuantized's and MatMulNBits' smallest block.
MIN_BLOCK = 16
#: The accuracy_level of an 8-bit tied head unless its config sets one: ONNX Runtime 1.31's CPU MatMulNBits runs
#: 8-bit weights with float activations about 35x slower than with int8 ones (SmolLM2's head, 576 x 49152, one
#: thread: 1.5 s vs 44 ms a token; the float MatMul ~60 ms): benchmarks/RESULTS.md, "Embeddings and tied heads".
EIGHT_BIT_ACCURACY_LEVEL = 4


@dataclasses.dataclass
class EmbeddingTable:
    """A constant table read by Gather nodes, its tied heads, and the config it gets (None: kept, ``reason``)."""

    value: ir.Value
    gathers: list[ir.Node]
    heads: list[tuple[WeightCandidate, WeightOnlyConfig | None]]
    cfg: WeightOnlyConfig | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        """The table's name."""
        return self.value.name or ""

    @property
    def shape(self) -> tuple[int, int]:
        """[V, H]."""
        t = self.value.const_value
        assert t is not None
        v, h = (int(d) for d in t.shape.numpy())
        return v, h


def gather_table(node: ir.Node) -> ir.Value | None:
    """The constant float 2-D initializer a Gather (axis 0) looks rows up in, or None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    value = node.inputs[0]
    if value is None or value.producer() is not None or value.const_value is None or value.is_graph_input():
        return None
    t = value.const_value
    if t.dtype not in FLOAT_TYPES or len(t.shape) != 2 or node.attributes.get_int("axis", 0) not in (0, -2):
        return None
    return value


def _reads_transposed(cand: WeightCandidate) -> bool:
    """Whether a MatMul/Gemm multiplies by exactly the transposed table (``h @ table.T``)."""
    if cand.reason is not None:
        return False
    if cand.node.op_type == "Gemm":
        attrs = cand.node.attributes
        return not cand.chain and attrs.get_int("transB", 0) == 1 and attrs.get_float("alpha", 1.0) == 1.0
    if len(cand.chain) != 1 or cand.chain[0].op_type != "Transpose":
        return False
    perm = cand.chain[0].attributes.get_ints("perm", None)
    return perm is None or list(perm) == [1, 0]


def _float_reader(value: ir.Value, allowed: set[int]) -> str | None:
    """A reader of ``value`` other than the ``allowed`` nodes (through Transpose/Cast/Identity), or None."""
    if value.is_graph_output():
        return "a graph output"
    for node, _ in value.uses():
        if id(node) in allowed:
            continue
        if node.domain == "" and node.op_type in CHAIN_OPS:
            reader = _float_reader(node.outputs[0], allowed)
            if reader is not None:
                return reader
            continue
        return f"{node.op_type} '{node.name}'"
    return None


def plan_embeddings(model: ir.Model, targets: Targets) -> list[EmbeddingTable]:
    """Every table of the main graph that a config asks to quantize (``embeddings`` set), with its config or reason.

    Tables whose config keeps embeddings in floating point are not listed.
    """
    tables: dict[int, EmbeddingTable] = {}
    for node in model.graph:
        value = gather_table(node)
        if value is not None:
            tables.setdefault(id(value), EmbeddingTable(value, [], [])).gathers.append(node)
    if not tables:
        return []
    for cand in find_weight_candidates(model):
        if cand.source is not None and id(cand.source) in tables and cand.graph is model.graph:
            if _reads_transposed(cand):
                names = tuple(n for n in (cand.node.name, cand.weight_name, cand.module) if n)
                scheme, _ = targets.resolve(cand.node.op_type, names)
                tables[id(cand.source)].heads.append((cand, scheme.weight_config() if scheme is not None else None))
    planned = []
    for table in tables.values():
        gather = table.gathers[0]
        scheme, rule = targets.resolve("Gather", tuple(n for n in (gather.name, table.name) if n))
        cfg = scheme.weight_config() if scheme is not None else None
        default = targets.default.weight_config() if targets.default is not None else None
        if cfg is None or cfg.embeddings is None:
            if default is not None and default.embeddings is not None:  # asked for, but not for this table
                table.reason = f"excluded by {rule}"
                planned.append(table)
            continue
        table.reason = _refusal(table, cfg) or ""
        table.cfg = None if table.reason else cfg
        planned.append(table)
    return planned


def _refusal(table: EmbeddingTable, cfg: WeightOnlyConfig) -> str | None:
    """Why ``table`` cannot be stored in ``cfg.embeddings`` bits, or None."""
    v, h = table.shape
    if h < MIN_BLOCK:
        return f"rows of {h} values are shorter than GatherBlockQuantized's smallest block ({MIN_BLOCK})"
    for cand, head_cfg in table.heads:
        if head_cfg is None:
            return (
                f"its tied {cand.node.op_type} '{cand.node.name}' is kept in floating point and reads the float "
                "table: a quantized copy would add bytes"
            )
    allowed = {id(n) for n in table.gathers} | {id(c.node) for c, _ in table.heads}
    reader = _float_reader(table.value, allowed)
    if reader is not None:
        return f"the float table stays (also read by {reader}): a quantized copy would add bytes"
    assert cfg.block_size is not None and cfg.embeddings is not None
    after = formats.estimated_nbytes(
        "matmulnbits",
        h,
        v,
        bits=cfg.embeddings,
        block_size=cfg.block_size,
        symmetric=cfg.symmetric,
        scale_bytes=int(table.value.const_value.dtype.itemsize),  # type: ignore[union-attr]
        name=table.name,
    )
    before = formats.float_nbytes(int(table.value.const_value.nbytes), table.name)  # type: ignore[union-attr]
    if after * 10 >= before * 9:
        return f"too small to gain from quantizing: ~{human_bytes(after)} quantized vs {human_bytes(before)} in float"
    return None


def quantize_table(table: np.ndarray, cfg: WeightOnlyConfig) -> formats.QuantizedWeight:
    """A [V, H] table as the MatMulNBits arrays of the [H, V] weight ``table.T`` (``cfg.embeddings`` bits)."""
    assert cfg.embeddings is not None
    dtype = table.dtype if table.dtype != np.float64 else np.dtype(np.float32)
    qm = quant.quantize_kn(table.astype(np.float32, copy=False).T, cfg.embeddings, cfg.block_size, cfg.symmetric)
    return formats.matmulnbits_arrays(qm, dtype)


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Store embedding tables (and their tied lm_heads) as GatherBlockQuantized + MatMulNBits on one copy.

    Which tables: :func:`plan_embeddings` (a config's ``embeddings`` bits). Run it after
    :class:`~qonnx.passes.weight_only.QuantizeWeightsPass`, which keeps a tied head in floating point (its
    table is also read by a Gather); :meth:`update` merges the records of both.
    """

    def __init__(self, targets: Targets) -> None:
        super().__init__()
        self.targets = targets
        #: A record per table (op type Gather), quantized or kept with the reason.
        self.records: list[LayerRecord] = []
        #: The tied heads quantized with their tables: (node name, weight name) -> their record.
        self.heads: dict[tuple[str, str], LayerRecord] = {}

    def update(self, records: list[LayerRecord]) -> list[LayerRecord]:
        """The weight pass's ``records`` with this pass's: the tables first, the tied heads marked quantized."""
        merged = list(self.records)
        for record in records:
            merged.append(self.heads.pop((record.node, record.weight), record))
        return merged + list(self.heads.values())

    def __repr__(self) -> str:
        return "QuantizeEmbeddingsPass()"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Quantize every planned table; record the ones kept in floating point with the reason."""
        names = all_value_names(model)
        self.records, self.heads = [], {}
        count = 0
        for table in plan_embeddings(model, self.targets):
            v, h = table.shape
            record = LayerRecord(table.gathers[0].name or "", "Gather", table.name, (h, v), False, table.reason)
            self.records.append(record)
            if table.cfg is None:
                continue
            self._rewrite(model, table, table.cfg, names, record)
            count += 1
        if count:
            model.opset_imports.setdefault(formats.MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(count))

    def _rewrite(
        self, model: ir.Model, table: EmbeddingTable, cfg: WeightOnlyConfig, names: set[str], record: LayerRecord
    ) -> None:
        graph, base = model.graph, table.name or "embedding"
        tensor = table.value.const_value
        assert tensor is not None
        qw = quantize_table(tensor.numpy(), cfg)
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()
        layout = formats.gather_block_quantized(qw)
        weights = [nodes.initializer(graph, f"{base}_{k}", a, names) for k, a in qw.arrays.items()]
        shape = nodes.initializer(graph, f"{base}_gather_shape", np.array(layout.data_shape, np.int64), names)
        first = table.gathers[0]
        reshape = ir.node("Reshape", [weights[0], shape], name=unique_name(f"{base}_as_gather_data", names))
        reshape.outputs[0].name = unique_name(f"{base}_gather_data", names)
        graph.insert_before(first, reshape)
        _, h = table.shape
        for gather in table.gathers:
            self._replace_gather(graph, gather, [reshape.outputs[0], gather.inputs[1], *weights[1:]], layout, h, names)
        heads = ", ".join(f"'{c.node.name}'" for c, _ in table.heads)
        record.quantized = True
        record.reason = (
            f"embedding table in {cfg.embeddings} bits (GatherBlockQuantized, block {cfg.block_size}, rounded to "
            f"nearest)" + (f"; one copy shared with the tied {heads}" if heads else "")
        )
        record.bytes_before, record.bytes_after = int(tensor.nbytes), qw.nbytes
        for cand, head_cfg in table.heads:
            assert head_cfg is not None
            if head_cfg.accuracy_level is None and cfg.embeddings == 8:
                head_cfg = dataclasses.replace(head_cfg, accuracy_level=EIGHT_BIT_ACCURACY_LEVEL)
            QuantizeWeightsPass.replace_with_fused(cand, head_cfg, list(weights), qw, names)
            self._mark_head(cand, cfg, head_cfg, record.node)
        cleanup.remove_unused_weights([table.value])

    @staticmethod
    def _replace_gather(
        graph: ir.Graph,
        gather: ir.Node,
        inputs: list[ir.Value | None],
        layout: formats.GatherLayout,
        h: int,
        names: set[str],
    ) -> None:
        new = ir.node(
            "GatherBlockQuantized",
            inputs,
            attributes=layout.attrs,
            domain=formats.MS_DOMAIN,
            name=unique_name(f"{gather.name or 'Gather'}_Q{layout.attrs['bits']}", names),
        )
        added, out = [new], new.outputs[0]
        if layout.width > h:  # a ragged last block: the op returns whole blocks
            out.name = unique_name(f"{gather.outputs[0].name}_padded", names)
            ends = nodes.initializer(graph, f"{gather.name}_row_end", np.array([h], np.int64), names)
            starts = nodes.initializer(graph, f"{gather.name}_row_start", np.array([0], np.int64), names)
            axes = nodes.initializer(graph, f"{gather.name}_row_axis", np.array([-1], np.int64), names)
            cut = ir.node("Slice", [out, starts, ends, axes], name=unique_name(f"{gather.name}_rows", names))
            added.append(cut)
            out = cut.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], added, [gather.outputs[0]], [out])

    def _mark_head(self, cand: WeightCandidate, cfg: WeightOnlyConfig, head_cfg: WeightOnlyConfig, gather: str) -> None:
        """The head's record: quantized, sharing the table's arrays."""
        reason = f"tied to the embedding table: {cfg.embeddings}-bit MatMulNBits on the Gather's codes and scales"
        if head_cfg.accuracy_level is not None:
            reason += f", accuracy_level {head_cfg.accuracy_level}"
        key = (cand.node.name or "", cand.weight_name)
        self.heads[key] = LayerRecord(key[0], cand.node.op_type, key[1], (cand.k, cand.n), True, reason, 0, 0, gather)

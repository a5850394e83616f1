"""The weight plan: which config each MatMul/Gemm/Conv weight gets, and why a layer stays float.

Size honesty: a weight is quantized only when that makes the model smaller. It is left in floating point,
with the reason, when its quantized form (codes, scales, zero points, the new node) would not be smaller than
the float tensor, or when the float tensor must stay anyway because another node that is not quantized reads
it (tied embeddings: a Gather and the lm_head share one table).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from qonnx.core import formats
from qonnx.core.algos import AWQ
from qonnx.core.config import WeightOnlyConfig
from qonnx.core.schemes import Targets
from qonnx.core.sizes import human_bytes
from qonnx.passes import nodes
from qonnx.passes.weights import CHAIN_OPS, WeightCandidate, find_weight_candidates

__all__ = [
    "QDQ_OPSET",
    "LayerRecord",
    "Plan",
    "act_dtype",
    "float_reader",
    "hessian_key",
    "hqq_zero_point",
    "needed_opset",
    "plan_weights",
    "share_key",
    "stored_nbytes",
]

QDQ_OPSET = 21

Plan = list[tuple[WeightCandidate, WeightOnlyConfig | None, str]]


@dataclasses.dataclass
class LayerRecord:
    """What happened to one weight-holding node (shape is (K, N); for a convolution N is its channels)."""

    node: str
    op_type: str
    weight: str
    shape: tuple[int, int] | None
    quantized: bool
    reason: str
    bytes_before: int = 0
    bytes_after: int = 0
    shared_with: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def hqq_zero_point(cfg: WeightOnlyConfig) -> Literal["float", "integer"]:
    """How HQQ's zero points are stored: as floats where MatMulNBits runs them (2- and 4-bit containers).

    DequantizeLinear and 8-bit MatMulNBits take integer zero points only: HQQ's are rounded there.
    """
    if cfg.format == "matmulnbits" and formats.storage_bits(cfg.bits, cfg.format) in (2, 4):
        return "float"
    return "integer"


def needed_opset(cfg: WeightOnlyConfig, dtype: ir.DataType) -> int:
    """The default-domain opset a quantized form needs (MatMulNBits, in com.microsoft: none).

    DequantizeLinear: 13 per axis, 19 with float16/bfloat16 scales, 21 blocked or with int4 codes (2-, 3- and
    4-bit codes).
    """
    if cfg.format != "qdq":
        return 1
    if cfg.grid == "fp8":
        return 19
    if cfg.block_size is not None or cfg.bits <= 4:
        return QDQ_OPSET
    return 13 if dtype == ir.DataType.FLOAT else 19


def plan_weights(model: ir.Model, targets: Targets) -> Plan:
    """Every candidate with the config chosen for it (None: skipped) and the reason."""
    planned: Plan = []
    for cand in find_weight_candidates(model):
        if cand.reason is not None:
            planned.append((cand, None, cand.reason))
            continue
        names = tuple(n for n in (cand.node.name, cand.weight_name, cand.module) if n)
        scheme, rule = targets.resolve(cand.node.op_type, names)
        cfg = scheme.weight_config() if scheme is not None else None  # how weight+activation schemes store weights
        if cfg is None:
            planned.append((cand, None, f"excluded by {rule}"))
            continue
        how = ""
        if cand.axis is not None:
            how = " per output channel" if cfg.format == "qdq" else " per output channel (no MatMulNBits form)"
            cfg = dataclasses.replace(cfg, format="qdq", block_size=None, accuracy_level=None)
        calibrated = cfg.calibrated
        label = calibrated.label if isinstance(calibrated, AWQ) else "gptq"
        if calibrated is not None and (cand.axis is not None or cand.graph is not model.graph):
            where = "a convolution" if cand.axis is not None else "in a subgraph"
            how += f" round-to-nearest ({label}: {where})"
            cfg = dataclasses.replace(cfg, algo="rtn")
        elif calibrated is not None:
            how += f" {label}"
        how += _storage_note(cfg)
        reason = _unsupported(cand, cfg)
        name = scheme.name if scheme is not None else cfg.name
        planned.append((cand, None, reason) if reason else (cand, cfg, f"{name}{how} by {rule}"))
    return _check_sizes(planned)


def _unsupported(cand: WeightCandidate, cfg: WeightOnlyConfig) -> str | None:
    node, fmt = cand.node, formats.FORMATS[cfg.format]
    if node.op_type == "Gemm" and fmt.fused:
        bias, has_c = nodes.bias_vector(node, cand.n)
        if has_c and bias is None and node.attributes.get_float("beta", 1.0) != 1.0:
            return "Gemm with a run-time C and beta != 1"
    if cand.k < fmt.min_k:
        return f"K={cand.k} is smaller than {fmt.op_type}'s smallest block ({fmt.min_k})"
    if fmt.whole_blocks and cfg.block_size and cand.k % cfg.block_size:
        return f"K={cand.k} is not a multiple of block_size {cfg.block_size} ({fmt.op_type}'s blocks run across rows)"
    return None


def _storage_note(cfg: WeightOnlyConfig) -> str:
    """What a layer record says about HQQ's zero points and codes stored wider than they are."""
    note = ""
    if cfg.hqq is not None:
        if hqq_zero_point(cfg) == "float":
            note += " hqq (float zero points)"
        else:
            where = "DequantizeLinear" if cfg.format == "qdq" else f"{cfg.bits}-bit MatMulNBits"
            note += f" hqq (zero points rounded to integers for {where})"
    stored = formats.storage_bits(cfg.bits, cfg.format)
    if stored != cfg.bits:
        note += f" ({cfg.bits}-bit codes in {stored}-bit containers: the size of {stored}-bit weights)"
    return note


def hessian_key(cand: WeightCandidate) -> str:
    """The name of the tensor whose Hessian GPTQ uses for a MatMul/Gemm: its activation input."""
    x = cand.node.inputs[0]
    return (x.name or "") if x is not None else ""


def _check_sizes(planned: Plan) -> Plan:
    """Skip the planned layers of each stored weight whose quantized form would not shrink the model."""
    chosen = {id(c.node) for c, cfg, _ in planned if cfg is not None}
    saving = 0  # bytes the planned layers save in all, and the groups that add bytes instead
    adders: list[tuple[list[int], str]] = []
    by_source: dict[int, list[int]] = {}
    for i, (cand, cfg, _) in enumerate(planned):
        if cfg is not None:
            by_source.setdefault(id(cand.source), []).append(i)
    for rows in by_source.values():
        first = planned[rows[0]][0]
        assert first.source is not None
        reader = float_reader(first.source, chosen)
        float_bytes = formats.float_nbytes(stored_nbytes(first), first.weight_name)
        costs: dict[tuple, int] = {}
        for i in rows:
            cand, cfg, _ = planned[i]
            assert cfg is not None
            costs[share_key(cand, cfg)] = formats.estimated_nbytes(
                cfg.format,
                cand.k,
                cand.n,
                bits=cfg.bits,
                block_size=cfg.block_size,
                symmetric=cfg.symmetric,
                scale_bytes=int(act_dtype(cand).itemsize),
                name=cand.weight_name,
                float_zero_points=cfg.hqq is not None and hqq_zero_point(cfg) == "float",
            )
        cost = sum(costs.values())
        if cost * 10 >= float_bytes * 9:  # not even 10% smaller (the protobuf overhead estimate is rough)
            reason = (
                f"too small to gain from quantizing: ~{human_bytes(cost)} quantized vs {human_bytes(float_bytes)} "
                "in float"
            )
            for i in rows:
                planned[i] = (planned[i][0], None, reason)
        elif reader and not all(" by name " in planned[i][2] or " by pattern " in planned[i][2] for i in rows):
            # A tied weight (lm_head sharing the embedding): the float copy stays, so quantizing adds bytes
            # and error (SmolLM2-135M: perplexity 20.1 -> 23.5), for decode speed. Only when asked by name.
            reason = (
                f"the float weight '{first.weight_name}' stays (also read by {reader}): quantizing it would add "
                f"~{human_bytes(cost)} and error"
            )
            for i in rows:
                planned[i] = (planned[i][0], None, reason)
        elif reader:
            note = f"; the float weight '{first.weight_name}' stays (also read by {reader}): adds ~{human_bytes(cost)}"
            for i in rows:
                cand, cfg, why = planned[i]
                planned[i] = (cand, cfg, why + note)
            saving -= cost
            adders.append(
                (
                    rows,
                    f"the float weight '{first.weight_name}' stays (also read by {reader}), and "
                    f"quantizing it too (~{human_bytes(cost)}) would make the model larger",
                )
            )
        else:
            saving += float_bytes - cost
    if saving <= 0:  # the model as a whole would grow: keep the shared weights in floating point
        for rows, reason in adders:
            for i in rows:
                planned[i] = (planned[i][0], None, reason)
    return planned


def float_reader(value: ir.Value, chosen: set[int]) -> str | None:
    """A node (or graph output) that will still read ``value`` in floating point once ``chosen`` are quantized."""
    if value.is_graph_output():
        return "a graph output"
    for node, idx in value.uses():
        if id(node) in chosen and idx == 1:
            continue
        if node.domain == "" and node.op_type in CHAIN_OPS:
            reader = float_reader(node.outputs[0], chosen)
            if reader is None:
                continue
            return reader
        return f"{node.op_type} '{node.name}'"
    return None


def act_dtype(cand: WeightCandidate) -> ir.DataType:
    """The float type of the layer's activations (its scales are stored in it)."""
    dtype = cand.node.inputs[0].dtype if cand.node.inputs[0] is not None else None
    if dtype is None:
        dtype = cand.tensor().dtype
        for n in cand.chain:
            if n.op_type == "Cast":
                dtype = ir.DataType(n.attributes.get_int("to", 1))
    return dtype


#: Working memory of one batched GPTQ solve (about three float32 copies of the weights and of the
#: Hessians): on the GPU a batch is launched as one set of small kernels per row of K, so its cost barely
#: grows with the batch; on the CPU batching saves little (22 s instead of 25 s on SmolLM2) and the working
#: copies, and the weights read ahead of their turn, count against the peak memory.
def share_key(cand: WeightCandidate, cfg: WeightOnlyConfig) -> tuple:
    """What makes two layers' quantized weights one: the stored weight, the config, and the graph for "qdq"."""
    return (cand.key, cfg, id(cand.graph) if cfg.format == "qdq" else None)


def stored_nbytes(cand: WeightCandidate) -> int:
    """Bytes of the stored float weight."""
    t = cand.tensor()
    return int(t.nbytes)

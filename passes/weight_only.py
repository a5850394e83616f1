"""Weight-only quantization pass: MatMul/Gemm/Conv/ConvTranspose weights in 4 or 8 bits.

MatMul and Gemm weights become MatMulNBits or blocked DequantizeLinear + MatMul; Conv and ConvTranspose
weights become per-output-channel DequantizeLinear + the same convolution.

Weights are read one at a time (memory-mapped when external) and released after they are quantized,
so peak memory stays near the size of the output rather than the input. Quantization of the next
weights runs in worker threads while the graph is edited.

Size honesty: a weight is quantized only when that makes the model smaller. It is left in floating
point, with the reason, when its quantized form (codes, scales, zero points, the new node) would not be
smaller than the float tensor, or when the float tensor must stay anyway because another node that is
not quantized reads it (tied embeddings: a Gather and the lm_head share one table).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from qonnx.core import formats, numerics, quant
from qonnx.core.config import WeightOnlyConfig
from qonnx.core.schemes import Targets
from qonnx.passes import cleanup, nodes
from qonnx.passes.activations import unique_name
from qonnx.passes.gptq import gptq_quantize_many
from qonnx.passes.hessian import torch_device
from qonnx.passes.hqq import hqq_quantize
from qonnx.passes.weight_plan import (
    QDQ_OPSET,
    LayerRecord,
    Plan,
    act_dtype,
    hessian_key,
    hqq_zero_point,
    needed_opset,
    plan_weights,
    share_key,
    stored_nbytes,
)
from qonnx.passes.weights import WeightCandidate

__all__ = ["QuantizeWeightsPass", "all_value_names", "gptq_batches", "quantize_weight"]


def quantize_weight(
    cand: WeightCandidate,
    cfg: WeightOnlyConfig,
    dtype: ir.DataType,
    hessian: np.ndarray | None = None,
    shrink: np.ndarray | None = None,
) -> formats.QuantizedWeight:
    """Quantize one candidate's weight into the arrays of the configured format (pure, thread-safe).

    ``hessian`` ([K, K], see :mod:`qonnx.passes.gptq`) is required when ``cfg.algo`` is GPTQ. ``shrink``
    ([nblocks, N], AWQ's clip search) shrinks each block's range before it is rounded to nearest (GPTQ
    chooses its own ranges). NaN and infinite weights make their blocks' scales NaN, without numpy's
    warnings (the pass counts them: :attr:`QuantizeWeightsPass.nonfinite`).
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _quantize_weight(cand, cfg, dtype, hessian, shrink)


def _quantize_weight(
    cand: WeightCandidate,
    cfg: WeightOnlyConfig,
    dtype: ir.DataType,
    hessian: np.ndarray | None,
    shrink: np.ndarray | None,
) -> formats.QuantizedWeight:
    if cand.axis is not None:  # a convolution: one scale per output channel
        rows = cand.channel_rows()
        if cfg.hqq is not None:
            qm = _hqq(rows.T, cfg, dtype)  # one block per channel
            qb = quant.QuantizedBlocks(
                qm.q.T[:, None, :], qm.scale.T, qm.zero_point.T, qm.k, qm.k, qm.bits, qm.symmetric
            )
        else:
            qb = quant.quantize_blocked(rows, cfg.bits, None, cfg.symmetric, scale_dtype=dtype.numpy())
        del rows
        return formats.channel_dequantize_arrays(qb, dtype.numpy(), cand.shape, cand.axis)
    w = cand.matrix()  # [K, N]: blocks run down the rows, no transpose of the float weight
    grid = cfg.weight_grid
    solved: quant.QuantizedMatrix | quant.ScaledMatrix
    if cfg.gptq is not None:
        if hessian is None:
            raise ValueError(f"{cand.node.op_type} '{cand.node.name}': GPTQ needs the Hessian of its input")
        (solved,) = gptq_quantize_many([w], [hessian], **_gptq_options(cfg, dtype))
    elif not isinstance(grid, numerics.IntGrid):
        solved = quant.quantize_scaled_kn(w, grid, cfg.block_size, dtype.numpy())
    elif cfg.hqq is not None:
        solved = _hqq(w, cfg, dtype)
    else:
        solved = quant.quantize_kn(w, cfg.bits, cfg.block_size, cfg.symmetric, scale_dtype=dtype.numpy(), shrink=shrink)
    del w
    return formats.emit(solved, cfg.format, dtype.numpy())


def _gptq_options(cfg: WeightOnlyConfig, dtype: ir.DataType) -> dict:
    """Keyword arguments of :func:`qonnx.passes.gptq.gptq_quantize_many` for a config and activation dtype."""
    gptq = cfg.gptq
    assert gptq is not None
    return {
        "grid": cfg.weight_grid,
        "block_size": cfg.block_size,
        "scale_dtype": dtype.numpy(),
        "damp": gptq.damp,
        "block": gptq.block,
        "act_order": gptq.act_order,
        "clip_search": gptq.clip_search,
    }


def _hqq(w: np.ndarray, cfg: WeightOnlyConfig, dtype: ir.DataType) -> quant.QuantizedMatrix:
    """HQQ on a [K, N] weight, its zero points as the format stores them."""
    hqq = cfg.hqq
    assert hqq is not None
    return hqq_quantize(
        w,
        bits=cfg.bits,
        block_size=cfg.block_size,
        scale_dtype=dtype.numpy(),
        iterations=hqq.iterations,
        lp_norm=hqq.lp_norm,
        beta=hqq.beta,
        kappa=hqq.kappa,
        zero_point=hqq_zero_point(cfg),
    )


def _all_finite(qw: formats.QuantizedWeight) -> bool:
    """Whether the floating-point arrays of a quantized weight (its scales, float zero points) are all finite."""
    return all(bool(np.isfinite(a).all()) for a in qw.arrays.values() if a is not None and a.dtype.kind == "f")


def _count_nonfinite(cand: WeightCandidate) -> int:
    """How many values of a candidate's float weight are NaN or infinite (read again: rare)."""
    w = cand.matrix() if cand.axis is None else cand.channel_rows()
    return int(np.count_nonzero(~np.isfinite(w)))


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize the constant weights of MatMul, Gemm, Conv and ConvTranspose nodes as ``targets`` says.

    Convolutions are quantized per output channel as DequantizeLinear (they have no MatMulNBits form),
    whatever the format. After the pass, :attr:`records` lists every weight-holding node, quantized or
    skipped with the reason. The float weights it replaced are removed, in subgraphs too.

    Layers whose config asks for GPTQ read the Hessian of their input from ``hessians`` (keyed by the
    input tensor's name, see :func:`qonnx.runtime.calibration.collect_hessians`); an entry is removed from
    the mapping once the last weight reading it is quantized, to free its memory. GPTQ and AWQ cover MatMul
    and Gemm nodes of the main graph; convolutions and nodes in subgraphs are rounded to nearest. ``shrinks``
    (weight name -> [nblocks, N], AWQ's clip search, see :func:`qonnx.pipeline.awq.apply_awq`) shrink the
    ranges of the named weights' blocks.
    """

    def __init__(
        self,
        targets: Targets,
        *,
        progress: Callable[[LayerRecord], None] | None = None,
        workers: int | None = None,
        hessians: dict[str, np.ndarray] | None = None,
        shrinks: dict[str, np.ndarray] | None = None,
        presolved: dict[tuple, formats.QuantizedWeight] | None = None,
    ) -> None:
        super().__init__()
        self.targets = targets
        self.progress = progress
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.hessians = hessians if hessians is not None else {}
        self.shrinks = shrinks if shrinks is not None else {}
        self.presolved = presolved if presolved is not None else {}  # arrays solved beforehand (sequential GPTQ)
        self.records: list[LayerRecord] = []
        self.planned: int = 0
        #: Weight name -> how many of its values are NaN or infinite, for the quantized weights that have any.
        self.nonfinite: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"QuantizeWeightsPass(workers={self.workers}, hessians={len(self.hessians)}, "
            f"shrinks={len(self.shrinks)}, presolved={len(self.presolved)})"
        )

    def plan(self, model: ir.Model) -> Plan:
        """Every candidate with the config chosen for it (None: skipped) and the reason (:func:`plan_weights`)."""
        return plan_weights(model, self.targets)

    def requires(self, model: ir.Model) -> None:
        """DequantizeLinear needs opset 13 per axis, 19 with float16/bfloat16 scales, 21 blocked or int4.

        GPTQ needs the Hessian of each of its layers' inputs.
        """
        opset = model.opset_imports.get("", 0)
        for cand, cfg, _ in self.plan(model):
            if (
                cfg is not None
                and cfg.gptq is not None
                and hessian_key(cand) not in self.hessians
                and share_key(cand, cfg) not in self.presolved
            ):
                raise ir.passes.PreconditionError(
                    f"{cand.node.op_type} '{cand.node.name}': GPTQ needs the Hessian of its input "
                    f"'{hessian_key(cand)}' (collect them with qonnx.runtime.calibration.collect_hessians)"
                )
            if cfg is not None and needed_opset(cfg, act_dtype(cand)) > opset:
                need = needed_opset(cfg, act_dtype(cand))
                raise ir.passes.PreconditionError(
                    f"{cand.node.op_type} '{cand.node.name}': its DequantizeLinear needs opset {need}; the model "
                    f"has opset {opset} (run UpgradeOpsetPass({QDQ_OPSET}) first)"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Quantize every planned weight; record skipped ones; remove the float weights replaced."""
        self.records = []
        self.nonfinite = {}
        plan = self.plan(model)
        todo = [(c, cfg) for c, cfg, _ in plan if cfg is not None]
        self.planned = len(todo)
        reasons = {id(c.node): r for c, _, r in plan}
        for cand, cfg, reason in plan:
            if cfg is None:
                shape = (cand.k, cand.n) if cand.k else None
                self.records.append(
                    LayerRecord(cand.node.name or "", cand.node.op_type, cand.weight_name, shape, False, reason)
                )
        names = all_value_names(model)
        emitted: dict[tuple, tuple[list[ir.Value | None], formats.QuantizedWeight, str]] = {}
        replaced: list[ir.Value | None] = []
        count = 0
        for cand, cfg, qw in self._quantized(todo):
            record = LayerRecord(
                cand.node.name or "",
                cand.node.op_type,
                cand.weight_name,
                (cand.k, cand.n),
                True,
                reasons[id(cand.node)],
            )
            replaced.extend(cand.node.inputs[1:])
            if qw is not None and not _all_finite(qw):  # its scales: small, and NaN where a block holds NaN or inf
                self.nonfinite[cand.weight_name] = _count_nonfinite(cand)
            self._rewrite(cand, cfg, qw, emitted, names, record)
            self.records.append(record)
            count += 1
            if self.progress is not None:
                self.progress(record)
        old_ir = (model.ir_version or 0) < 4
        cleanup.remove_unused_weights(replaced, drop_graph_inputs=old_ir)
        if count and old_ir:  # new initializers are not graph inputs, which IR version 3 required
            model.ir_version = 4
        for domain in {formats.FORMATS[qw.format].domain for _, qw, _ in emitted.values()} - {""}:
            model.opset_imports.setdefault(domain, 1)
        return ir.passes.PassResult(model, modified=bool(count))

    def _quantized(
        self, todo: list[tuple[WeightCandidate, WeightOnlyConfig]]
    ) -> Iterator[tuple[WeightCandidate, WeightOnlyConfig, formats.QuantizedWeight | None]]:
        """Yield (candidate, config, arrays) in graph order; arrays are None for an already-emitted weight.

        GPTQ layers are solved in batches of one shape (:func:`gptq_batches`) when the first of a batch is
        due; the others' arrays wait until their turn.
        """
        seen: set[tuple] = set()
        batches = gptq_batches([(c, cfg) for c, cfg in todo if share_key(c, cfg) not in self.presolved])
        solved: dict[tuple, formats.QuantizedWeight] = dict(self.presolved)

        def submit(pool, cand, cfg):
            key = share_key(cand, cfg)
            if key in seen:
                return None
            seen.add(key)
            if key in batches or key in solved:
                if key not in solved:
                    solved.update(self.solve(batches[key]))
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(solved.pop(key))
                return done
            hessian = self.hessians.get(hessian_key(cand)) if cfg.gptq is not None else None
            shrink = self.shrinks.get(cand.weight_name)
            return pool.submit(quantize_weight, cand, cfg, act_dtype(cand), hessian, shrink)

        # A stored tensor is unmapped after its last user is done, never while a worker may read it.
        last_use = {id(c.source): i for i, (c, _) in enumerate(todo)}
        last_hessian_use = {hessian_key(c): i for i, (c, cfg) in enumerate(todo) if cfg.gptq is not None}
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            window = 2 * self.workers
            futures = [submit(pool, c, cfg) for c, cfg in todo[:window]]
            for i, (cand, cfg) in enumerate(todo):
                if i + window < len(todo):
                    futures.append(submit(pool, *todo[i + window]))
                fut = futures[i]
                futures[i] = None  # drop the reference: arrays are freed once emitted
                result = fut.result() if fut is not None else None
                if last_use[id(cand.source)] == i:
                    cand.release()
                if cfg.gptq is not None and last_hessian_use[hessian_key(cand)] == i:
                    self.hessians.pop(hessian_key(cand), None)
                yield cand, cfg, result

    def solve(
        self, batch: list[tuple[WeightCandidate, WeightOnlyConfig]], hessians: dict[str, np.ndarray] | None = None
    ) -> dict[tuple, formats.QuantizedWeight]:
        """GPTQ on a batch of weights of one shape and config, together; their arrays by share key.

        Hessians by input name come from ``hessians``, else from the pass's own.
        """
        source = self.hessians if hessians is None else hessians
        found = []
        for cand, _ in batch:
            h = source.get(hessian_key(cand))
            if h is None:
                raise ValueError(f"{cand.node.op_type} '{cand.node.name}': GPTQ needs the Hessian of its input")
            found.append(h)
        cfg, dtype = batch[0][1], act_dtype(batch[0][0])
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # NaN weights: counted by call()
            results = gptq_quantize_many([c.matrix() for c, _ in batch], found, **_gptq_options(cfg, dtype))
        return {
            share_key(c, cf): formats.emit(r, cf.format, dtype.numpy())
            for (c, cf), r in zip(batch, results, strict=True)
        }

    def _rewrite(
        self,
        cand: WeightCandidate,
        cfg: WeightOnlyConfig,
        qw: formats.QuantizedWeight | None,
        emitted: dict,
        names: set[str],
        record: LayerRecord,
    ) -> None:
        graph, node = cand.graph, cand.node
        key = share_key(cand, cfg)
        base = cand.weight_name or node.name or "weight"
        if key in emitted:
            weight_inputs, qw, first = emitted[key]
            record.shared_with = first
        else:
            assert qw is not None
            # A fused op's weights go beside the float weight, so If branches and Loop bodies share one copy;
            # a DequantizeLinear and its inputs stay in the reading graph (ONNX Runtime's QDQ fusions look
            # for the weight there): the share key tells graphs apart for "qdq".
            fused = formats.FORMATS[qw.format].fused
            home = cand.home_graph if fused else graph
            weight_inputs = [
                nodes.initializer(home, f"{base}_{name}", arr, names) if arr is not None else None
                for name, arr in qw.arrays.items()
            ]
            if not fused:
                dq = nodes.dequantize_node(weight_inputs, qw.attrs, name=unique_name(f"{base}_DequantizeLinear", names))
                graph.insert_before(node, dq)
                dq.outputs[0].name = unique_name(f"{base}_dequantized", names)
                weight_inputs = [dq.outputs[0]]
            emitted[key] = (weight_inputs, qw, node.name or base)
            record.bytes_before, record.bytes_after = stored_nbytes(cand), qw.nbytes
        if not formats.FORMATS[qw.format].fused:
            node.replace_input_with(1, weight_inputs[0])
            if node.op_type == "Gemm":
                node.attributes["transB"] = ir.AttrInt64("transB", 0)
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            return
        self.replace_with_fused(cand, cfg, weight_inputs, qw, names)

    @staticmethod
    def replace_with_fused(
        cand: WeightCandidate, cfg: WeightOnlyConfig, weight_inputs: list, qw: formats.QuantizedWeight, names: set[str]
    ) -> None:
        """Replace the candidate's MatMul/Gemm by the fused op of ``qw``'s format over ``weight_inputs``."""
        graph, node = cand.graph, cand.node
        dtype = act_dtype(cand)
        bias_value = None
        bias, has_c = nodes.bias_vector(node, cand.n) if node.op_type == "Gemm" else (None, False)
        if bias is not None:
            bias_value = nodes.initializer(
                graph, f"{node.name or cand.weight_name}_bias", bias.astype(dtype.numpy()), names
            )
        slot = formats.FORMATS[qw.format].bias_slot is not None
        new = nodes.fused_node(
            qw,
            node.inputs[0],
            weight_inputs,
            name=f"{node.name}_Q{qw.bits}" if node.name else "",
            bias=bias_value if slot else None,
            accuracy_level=cfg.accuracy_level,
        )
        out = new.outputs[0]
        extra: list[ir.Node] = []
        if has_c and (bias_value is None or not slot):  # C at run time (beta == 1, checked in plan), or no slot
            out.name = unique_name(f"{node.outputs[0].name}_nobias", names)
            add = ir.node("Add", [out, bias_value or node.inputs[2]], name=f"{node.name}_bias")
            extra.append(add)
            out = add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new, *extra], [node.outputs[0]], [out])


def all_value_names(model: ir.Model) -> set[str]:
    """Every value name in the model, subgraphs included (new names must not shadow outer ones)."""
    names: set[str] = set()
    for graph in model.graphs():
        for value in (*graph.inputs, *graph.initializers.values()):
            if value.name:
                names.add(value.name)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


GPTQ_BATCH_BYTES = {"cuda": 4 << 30, "cpu": 48 << 20}


def gptq_batches(
    todo: list[tuple[WeightCandidate, WeightOnlyConfig]],
) -> dict[tuple, list[tuple[WeightCandidate, WeightOnlyConfig]]]:
    """GPTQ weights grouped for batched solves, by share key.

    One shape, config and activation dtype per batch, in graph order, each within :data:`GPTQ_BATCH_BYTES`
    (convolutions and weights that are not rounded by GPTQ: in no batch).
    """
    budget = 0
    classes: dict[tuple, list[list[tuple[WeightCandidate, WeightOnlyConfig]]]] = {}
    keys: set[tuple] = set()
    for cand, cfg in todo:
        key = share_key(cand, cfg)
        if cfg.gptq is None or cand.axis is not None or key in keys:
            continue
        if not budget:
            budget = GPTQ_BATCH_BYTES["cuda" if torch_device() == "cuda" else "cpu"]
        keys.add(key)
        per = 3 * 4 * (cand.k * cand.n + cand.k * cand.k)
        runs = classes.setdefault((cand.k, cand.n, cfg, act_dtype(cand)), [[]])
        if runs[-1] and (len(runs[-1]) + 1) * per > budget:
            runs.append([])
        runs[-1].append((cand, cfg))
    return {share_key(c, cf): run for runs in classes.values() for run in runs for c, cf in run}

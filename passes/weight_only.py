"""Weight-only quantization pass: MatMul/Gemm weights to MatMulNBits or DequantizeLinear + MatMul.

Weights are read one at a time (memory-mapped when external) and released after they are quantized,
so peak memory stays near the size of the output rather than the input. Quantization of the next
weights runs in worker threads while the graph is edited.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterator

import onnx_ir as ir

from qonnx import quant
from qonnx.config import Targets, WeightOnlyConfig
from qonnx.passes import _emit
from qonnx.passes.weights import WeightCandidate, find_weight_candidates

__all__ = ["LayerRecord", "QuantizeWeightsPass", "quantize_weight"]

QDQ_OPSET = 21


@dataclasses.dataclass
class LayerRecord:
    """What happened to one MatMul/Gemm node."""

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


def quantize_weight(cand: WeightCandidate, cfg: WeightOnlyConfig, dtype: ir.DataType) -> _emit.QuantizedWeight:
    """Quantize one candidate's weight into the arrays of the configured format (pure, thread-safe)."""
    w_nk = cand.matrix().T  # [N, K]: blocks run along K
    qb = quant.quantize_blocked(w_nk, cfg.bits, cfg.block_size, cfg.symmetric, scale_dtype=dtype.numpy())
    del w_nk
    if cfg.format == "matmulnbits":
        return _emit.matmulnbits_arrays(qb, dtype)
    return _emit.dequantize_arrays(qb, dtype)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize the constant weights of MatMul and Gemm nodes as ``targets`` says.

    After the pass, :attr:`records` lists every MatMul/Gemm node, quantized or skipped with the reason.
    Unused original weights are left for ``RemoveUnusedNodesPass`` to drop.
    """

    def __init__(
        self,
        targets: Targets,
        *,
        progress: Callable[[LayerRecord], None] | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__()
        self.targets = targets
        self.progress = progress
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.records: list[LayerRecord] = []
        self.planned: int = 0

    def plan(self, model: ir.Model) -> list[tuple[WeightCandidate, WeightOnlyConfig | None, str]]:
        """Every candidate with the config chosen for it (None: skipped) and the reason."""
        planned: list[tuple[WeightCandidate, WeightOnlyConfig | None, str]] = []
        for cand in find_weight_candidates(model):
            if cand.reason is not None:
                planned.append((cand, None, cand.reason))
                continue
            names = tuple(n for n in (cand.node.name, cand.weight_name) if n)
            cfg, rule = self.targets.resolve(cand.node.op_type, names)
            if cfg is None:
                planned.append((cand, None, f"excluded by {rule}"))
                continue
            reason = self._unsupported(cand, cfg)
            planned.append((cand, None, reason) if reason else (cand, cfg, f"{cfg.name} by {rule}"))
        return planned

    @staticmethod
    def _unsupported(cand: WeightCandidate, cfg: WeightOnlyConfig) -> str | None:
        node = cand.node
        if node.op_type == "Gemm" and cfg.format == "matmulnbits":
            bias, has_c = _emit.bias_vector(node, cand.n)
            if has_c and bias is None and node.attributes.get_float("beta", 1.0) != 1.0:
                return "Gemm with a run-time C and beta != 1"
        if cfg.format == "matmulnbits" and cand.k < 16:
            return f"K={cand.k} is smaller than MatMulNBits' smallest block (16)"
        return None

    def requires(self, model: ir.Model) -> None:
        """Blocked or 4-bit DequantizeLinear needs opset 21."""
        if model.opset_imports.get("", 0) >= QDQ_OPSET:
            return
        for _, cfg, _ in self.plan(model):
            if cfg is not None and cfg.format == "qdq" and (cfg.block_size is not None or cfg.bits == 4):
                raise ir.passes.PreconditionError(
                    f"blocked or int4 DequantizeLinear needs opset {QDQ_OPSET}; the model has opset "
                    f"{model.opset_imports.get('', 0)} (run UpgradeOpsetPass first)"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Quantize every planned weight; record skipped ones."""
        self.records = []
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
        emitted: dict[tuple, tuple[list[ir.Value | None], _emit.QuantizedWeight, str]] = {}
        count = 0
        for cand, cfg, qw in self._quantized(todo, emitted):
            record = LayerRecord(
                cand.node.name or "",
                cand.node.op_type,
                cand.weight_name,
                (cand.k, cand.n),
                True,
                reasons[id(cand.node)],
            )
            self._rewrite(cand, cfg, qw, emitted, record)
            self.records.append(record)
            count += 1
            if self.progress is not None:
                self.progress(record)
        if any(qw.format == "matmulnbits" for _, qw, _ in emitted.values()):
            model.opset_imports.setdefault(_emit.MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(count))

    def _quantized(
        self, todo: list[tuple[WeightCandidate, WeightOnlyConfig]], emitted: dict
    ) -> Iterator[tuple[WeightCandidate, WeightOnlyConfig, _emit.QuantizedWeight | None]]:
        """Yield (candidate, config, arrays) in graph order; arrays are None for an already-emitted weight."""
        seen: set[tuple] = set()

        def submit(pool, cand, cfg):
            key = _share_key(cand, cfg)
            if key in seen:
                return None
            seen.add(key)
            return pool.submit(quantize_weight, cand, cfg, _act_dtype(cand))

        # A stored tensor is unmapped after its last user is done, never while a worker may read it.
        last_use = {id(c.source): i for i, (c, _) in enumerate(todo)}
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
                yield cand, cfg, result

    def _rewrite(
        self,
        cand: WeightCandidate,
        cfg: WeightOnlyConfig,
        qw: _emit.QuantizedWeight | None,
        emitted: dict,
        record: LayerRecord,
    ) -> None:
        graph, node = cand.graph, cand.node
        key = _share_key(cand, cfg)
        base = cand.weight_name or node.name or "weight"
        if key in emitted:
            weight_inputs, qw_prev, first = emitted[key]
            record.shared_with = first
            qw = qw_prev
        else:
            assert qw is not None
            weight_inputs = [
                _emit.initializer(graph, f"{base}_{name}", arr) if arr is not None else None
                for name, arr in qw.arrays.items()
            ]
            if qw.format == "matmulnbits" and len(weight_inputs) == 2:
                weight_inputs.append(None)
            if qw.format == "qdq":
                dq = _emit.dequantize_node(weight_inputs, qw.attrs, name=f"{base}_DequantizeLinear")
                graph.insert_before(node, dq)
                weight_inputs = [dq.outputs[0]]
                dq.outputs[0].name = f"{base}_dequantized"
            emitted[key] = (weight_inputs, qw, node.name or base)
            record.bytes_before, record.bytes_after = _stored_nbytes(cand), qw.nbytes
        if qw.format == "qdq":
            node.replace_input_with(1, weight_inputs[0])
            if node.op_type == "Gemm":
                node.attributes["transB"] = ir.AttrInt64("transB", 0)
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            return
        self._replace_with_matmulnbits(cand, cfg, weight_inputs, qw)

    @staticmethod
    def _replace_with_matmulnbits(
        cand: WeightCandidate, cfg: WeightOnlyConfig, weight_inputs: list, qw: _emit.QuantizedWeight
    ) -> None:
        graph, node = cand.graph, cand.node
        dtype = _act_dtype(cand)
        bias_value = None
        bias, has_c = _emit.bias_vector(node, cand.n) if node.op_type == "Gemm" else (None, False)
        if bias is not None:
            bias_value = _emit.initializer(graph, f"{node.name or cand.weight_name}_bias", bias.astype(dtype.numpy()))
        new = _emit.matmulnbits_node(
            node.inputs[0],
            weight_inputs,
            qw.attrs,
            name=f"{node.name}_Q{qw.bits}" if node.name else "",
            bias=bias_value,
            accuracy_level=cfg.accuracy_level,
        )
        out = new.outputs[0]
        extra: list[ir.Node] = []
        if has_c and bias_value is None:  # C computed at run time (beta == 1, checked in plan): add it
            out.name = f"{node.outputs[0].name}_nobias"
            add = ir.node("Add", [out, node.inputs[2]], name=f"{node.name}_bias")
            extra.append(add)
            out = add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new, *extra], [node.outputs[0]], [out])


def _act_dtype(cand: WeightCandidate) -> ir.DataType:
    dtype = cand.node.inputs[0].dtype if cand.node.inputs[0] is not None else None
    if dtype is None:
        dtype = cand.tensor().dtype
        for n in cand.chain:
            if n.op_type == "Cast":
                dtype = ir.DataType(n.attributes.get_int("to", 1))
    return dtype


def _share_key(cand: WeightCandidate, cfg: WeightOnlyConfig) -> tuple:
    return (id(cand.graph), cand.key, cfg)


def _stored_nbytes(cand: WeightCandidate) -> int:
    t = cand.tensor()
    return int(t.nbytes)

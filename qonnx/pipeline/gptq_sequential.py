"""Sequential GPTQ: each layer's Hessian is measured on the model whose earlier layers are already quantized.

Plain GPTQ (:func:`qonnx.pipeline.quantize.quantize` with ``GPTQ()``) takes every Hessian from the float model in one
calibration pass. With ``GPTQ(sequential=True)`` the GPTQ layers are split, in graph order, into stages: a
layer starts a new stage when its input depends on a layer of the current stage (q/k/v, then o, then
gate/up, then down, in each decoder layer of a Llama model: the reference's "true sequential" order). For
each stage ONNX Runtime runs the calibration data through the float model with every weight quantized so far
fed in its dequantized form (:mod:`qonnx.runtime.sensitivity`'s weight-as-input session), pruned to the
nodes the stage's inputs need; the stage's Hessians are summed, its layers solved
(:func:`qonnx.passes.gptq.gptq_quantize_many`, batched by shape), and their dequantized weights join the fed
ones. Later layers thus correct the rounding error of earlier ones as they would see it at run time.

Cost: one calibration pass per stage instead of one in all (each pass shorter, as the model is cut after
the stage's inputs). The dequantized weights wait in memory-mapped, already unlinked files, so they add
page cache rather than resident memory. A weight that cannot be fed on its own (not an initializer of the
main graph, or also read in floating point by another node) is quantized in its stage but stays float in
later stages' runs.

Written here by hand: no library runs GPTQ layer by layer on an ONNX graph.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from qonnx.core.config import WeightOnlyConfig
from qonnx.core.formats import QuantizedWeight
from qonnx.passes.hessian import HessianAccumulator
from qonnx.passes.weight_only import QuantizeWeightsPass, gptq_batches
from qonnx.passes.weight_plan import Plan, hessian_key, share_key
from qonnx.passes.weights import WeightCandidate
from qonnx.pipeline.calibrate import calibration_run, is_sequential
from qonnx.pipeline.fake_quant import plan_layers, to_stored
from qonnx.runtime.calibration import spill
from qonnx.runtime.sensitivity import with_weight_inputs
from qonnx.runtime.session import make_session

__all__ = ["gptq_layers", "sequential_gptq", "stage_solver", "stages"]

Layer = tuple[WeightCandidate, WeightOnlyConfig]


def stages(model: ir.Model, layers: list[Layer], key: Callable[[WeightCandidate], str]) -> list[list[Layer]]:
    """``layers`` (graph order) cut into stages.

    A layer whose input ``key(cand)`` is computed from the output of a layer in the current stage starts the
    next one.
    """
    producer: dict[str, ir.Node] = {}
    for node in model.graph:
        for out in node.outputs:
            producer[out.name or ""] = node
    order = {id(node): i for i, node in enumerate(model.graph)}
    result: list[list[Layer]] = []
    current: list[Layer] = []
    nodes: set[int] = set()
    for cand, cfg in layers:
        if current and _depends(producer.get(key(cand)), nodes, order, min(order[n] for n in nodes)):
            result.append(current)
            current, nodes = [], set()
        current.append((cand, cfg))
        nodes.add(id(cand.node))
    return [*result, current] if current else result


def _depends(start: ir.Node | None, targets: set[int], order: dict[int, int], floor: int) -> bool:
    """Whether ``start`` or one of its ancestors is in ``targets``; nodes before ``floor`` are not searched."""
    seen: set[int] = set()
    todo = [start] if start is not None else []
    while todo:
        node = todo.pop()
        if id(node) in seen or order.get(id(node), -1) < floor:
            continue
        seen.add(id(node))
        if id(node) in targets:
            return True
        todo.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)  # type: ignore[misc]
    return False


def _pruned(proto: onnx.ModelProto, outputs: list[str]) -> bytes:
    """``proto`` cut to the nodes ``outputs`` need, with ``outputs`` as its only outputs.

    A graph with subgraphs (If/Loop/Scan, whose bodies may read outer names) is kept whole.
    """
    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        keep = list(graph.node)
    else:
        needed, keep = set(outputs), []
        for node in reversed(graph.node):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        keep.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    del out.graph.output[:]
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    used = {i for n in keep for i in n.input}
    inits = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    inputs = [i for i in out.graph.input if i.name in used]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out.SerializeToString()


def sequential_gptq(
    model: ir.Model,
    path: Path,
    layers: list[Layer],
    feeds: list[dict[str, np.ndarray]],
    *,
    solve: Callable[[list[Layer], dict[str, np.ndarray]], dict[tuple, QuantizedWeight]],
    key: Callable[[WeightCandidate], str],
    feedable: set[str],
    device: str = "auto",
    progress: bool = False,
) -> dict[tuple, QuantizedWeight]:
    """Solve ``layers`` stage by stage (see the module docstring); their arrays by share key.

    Args:
        model: the float model (for the graph structure).
        path: a file of it ONNX Runtime loads (weights may be external, beside it).
        layers: the GPTQ layers, one per stored weight, in graph order.
        feeds: calibration batches.
        solve: solves a list of layers given the Hessians of their inputs (by input name); returns their
            arrays by share key.
        key: the name of a layer's input tensor (its Hessian's key).
        feedable: stored weight names that may be fed in place of their initializers.
        device: where ONNX Runtime runs.
        progress: a progress bar on stderr.
    """
    cut = stages(model, layers, key)
    base = onnx.ModelProto.FromString(with_weight_inputs(path, sorted(feedable)))
    graph_inputs = {i.name for i in base.graph.input} - feedable
    fed: dict[str, np.ndarray] = {}
    solved: dict[tuple, QuantizedWeight] = {}
    bar = tqdm(
        total=len(cut) * len(feeds), desc="gptq (sequential)", unit="batch", file=sys.stderr, disable=not progress
    )
    try:
        with tempfile.TemporaryDirectory(prefix="qonnx-gptq-") as tmp:
            for s, stage in enumerate(cut):
                names = list(dict.fromkeys(key(c) for c, _ in stage))
                inner = [n for n in names if n not in graph_inputs]  # graph inputs come from the feeds
                session = None
                if inner:
                    proto = _pruned(base, inner)
                    session = make_session(proto, device, external_data_dir=path.parent, lean=True)
                    wanted = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
                accs = {n: HessianAccumulator(next(c.k for c, _ in stage if key(c) == n)) for n in names}
                for feed in feeds:
                    values = {n: np.asarray(feed[n]) for n in names if n in graph_inputs}
                    if session is not None:
                        run_feeds = {k: v for k, v in {**feed, **fed}.items() if k in wanted}
                        values.update(zip(inner, session.run(inner, run_feeds), strict=True))
                    for n in names:
                        accs[n].add_batch(values[n])
                    bar.update()
                del session
                hessians = {n: a.finalize() for n, a in accs.items()}
                arrays = solve(stage, hessians)
                solved.update(arrays)
                for cand, cfg in stage:
                    if cand.weight_name in feedable:
                        w = to_stored(cand, arrays[share_key(cand, cfg)].dequantize())
                        fed[cand.weight_name] = spill(w, Path(tmp), f"w{s}-{len(fed)}")
            return solved
    finally:
        bar.close()


def solve_sequential(
    model: ir.Model, source: Path | None, plan: Plan, qpass: QuantizeWeightsPass, progress: bool
) -> dict[tuple, QuantizedWeight]:
    """Arrays of the layers GPTQ rounds sequentially (:mod:`qonnx.pipeline.gptq_sequential`), by share key."""
    layers = gptq_layers(plan, is_sequential)
    if not layers:
        return {}
    feedable = {layer.name for layer in plan_layers(model, plan)[0]}
    with calibration_run(model, source, [(c, cfg.gptq) for c, cfg in layers]) as (path, feeds):
        return sequential_gptq(
            model, path, layers, feeds, solve=stage_solver(qpass), key=hessian_key, feedable=feedable, progress=progress
        )


def gptq_layers(plan: Plan, chosen: Callable[[WeightOnlyConfig | None], bool]) -> list[Layer]:
    """The layers of ``plan`` whose config ``chosen`` selects, one per share key (shared weights solved once)."""
    layers, keys = [], set()
    for cand, cfg, _ in plan:
        if cfg is not None and chosen(cfg) and cand.axis is None and share_key(cand, cfg) not in keys:
            keys.add(share_key(cand, cfg))
            layers.append((cand, cfg))
    return layers


def stage_solver(
    qpass: QuantizeWeightsPass,
) -> Callable[[list[Layer], dict[str, np.ndarray]], dict[tuple, QuantizedWeight]]:
    """GPTQ for one stage's layers from their Hessians, batched by shape (:func:`gptq_batches`)."""

    def solve(stage: list[Layer], hessians: dict[str, np.ndarray]) -> dict[tuple, QuantizedWeight]:
        out: dict[tuple, QuantizedWeight] = {}
        for batch in {id(b): b for b in gptq_batches(stage).values()}.values():
            out.update(qpass.solve(batch, hessians))
        return out

    return solve

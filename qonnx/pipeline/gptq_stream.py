"""Layer-streamed GPTQ: calibrate and quantize one decoder layer at a time, in one pass over the data.

The graph is cut at its layer boundaries (:class:`qonnx.passes.layer_cut.LayerCut`). The calibration feeds run
through the prefix (embedding, mask, rotary tables) once; then, for each layer in turn, ONNX Runtime runs
that layer's piece alone on the values the earlier pieces handed on: the layer's GPTQ Hessians are summed, its
weights solved, and the piece is run once more with its weights in their quantized (dequantized) form to
produce what the next layer reads. Every Hessian is thus measured on the model whose earlier layers are
already quantized (true-sequential GPTQ), at the cost of about two layer runs per layer, and only one layer's
weights are ever loaded in a session.

Within a layer, ``stages=True`` measures and solves q/k/v, then o, then gate/up, then down (the stages of
:func:`qonnx.pipeline.gptq_sequential.stages`), each on the layer with the stages before it quantized, as
``GPTQ(sequential=True)`` does on the whole model; ``stages=False`` takes all of a layer's Hessians from one
run (the layer's own weights float, the earlier layers' quantized).

What is held between layers is the values handed on, per calibration batch: the residual stream and the
prefix's shared values; with more than :data:`CARRY_BUDGET` bytes of them they wait in memory-mapped,
already unlinked files. The solved layers' dequantized weights are dropped when their layer is done.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from qonnx.core import modelfile
from qonnx.core.algos import GPTQ
from qonnx.core.config import SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import warn
from qonnx.core.formats import QuantizedWeight
from qonnx.passes.hessian import HessianAccumulator
from qonnx.passes.layer_cut import LayerCut, UncuttableError
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.passes.weight_plan import Plan, hessian_key, share_key
from qonnx.pipeline.calibrate import calibration_run, is_streamed
from qonnx.pipeline.fake_quant import plan_layers, to_stored
from qonnx.pipeline.gptq_sequential import Layer, gptq_layers, stage_solver, stages
from qonnx.runtime.calibration import spill
from qonnx.runtime.sensitivity import with_weight_inputs
from qonnx.runtime.session import make_session, resolve_device

__all__ = ["CARRY_BUDGET", "gpu_free_bytes", "solve_streamed", "stream_if_too_big", "streamed_gptq"]

#: Bytes of values handed on between layers kept in memory; beyond it they are spilled to unlinked files.
CARRY_BUDGET = 1 << 30


def streamed_gptq(
    model: ir.Model,
    path: Path,
    layers: list[Layer],
    feeds: list[dict[str, np.ndarray]],
    *,
    solve: Callable[[list[Layer], dict[str, np.ndarray]], dict[tuple, QuantizedWeight]],
    key: Callable,
    feedable: set[str],
    stages_in_layer: bool = True,
    device: str = "auto",
    progress: bool = False,
) -> dict[tuple, QuantizedWeight]:
    """Solve ``layers`` layer by layer (see the module docstring); their arrays by share key.

    Args:
        model: the float model (for the graph structure of the stages).
        path: a file of it ONNX Runtime loads (weights may be external, beside it).
        layers: the GPTQ layers, one per stored weight, in graph order.
        feeds: calibration batches.
        solve: solves a list of layers given the Hessians of their inputs (by input name).
        key: the name of a layer's input tensor (its Hessian's key).
        feedable: stored weight names that may be fed in place of their initializers.
        stages_in_layer: solve each layer's stages in turn (q/k/v, o, gate/up, down), else all at once.
        device: where ONNX Runtime runs.
        progress: a progress bar on stderr.

    Raises:
        UncuttableError: the graph cannot be cut into layers.
    """
    cut = LayerCut(onnx.ModelProto.FromString(with_weight_inputs(path, sorted(feedable))), str(path))
    segment_of = {id(c.node): cut.segment_of(c.node.outputs[0].name or "") for c, _ in layers}
    carried: list[dict[str, np.ndarray]] = [{} for _ in feeds]  # values handed on, per batch
    fed: dict[str, np.ndarray] = {}  # dequantized weights of solved layers still read
    solved: dict[tuple, QuantizedWeight] = {}

    def run(segment: int, outputs: list[str], per_batch: Callable[[int, list[np.ndarray]], None]) -> None:
        session = make_session(
            cut.piece(segment, outputs).SerializeToString(), device, external_data_dir=path.parent, lean=True
        )
        wanted = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
        for b, feed in enumerate(feeds):
            values = {k: v for k, v in {**feed, **carried[b], **fed}.items() if k in wanted}
            per_batch(b, session.run(outputs, values))
            bar.update()

    bar = tqdm(total=None, desc="gptq (streamed)", unit="run", file=sys.stderr, disable=not progress)
    try:
        with tempfile.TemporaryDirectory(prefix="qonnx-gptq-stream-") as tmp:
            for segment in range(cut.segments):
                mine = [(c, cfg) for c, cfg in layers if segment_of[id(c.node)] == segment]
                groups = stages(model, mine, key) if stages_in_layer else ([mine] if mine else [])
                for stage in groups:
                    names = list(dict.fromkeys(key(c) for c, _ in stage))
                    accs = {n: HessianAccumulator(next(c.k for c, _ in stage if key(c) == n)) for n in names}
                    inner = [n for n in names if cut.producer.get(n) == segment]
                    for b, feed in enumerate(feeds):  # inputs computed before this layer: already at hand
                        for n in names:
                            if n not in inner:
                                accs[n].add_batch(np.asarray(carried[b].get(n, feed.get(n))))

                    def add(b: int, values: list[np.ndarray], accs: dict = accs, inner: list = inner) -> None:
                        for n, v in zip(inner, values, strict=True):
                            accs[n].add_batch(v)

                    if inner:
                        run(segment, inner, add)
                    arrays = solve(stage, {n: a.finalize() for n, a in accs.items()})
                    solved.update(arrays)
                    for cand, cfg in stage:
                        if cand.weight_name in feedable:
                            w = to_stored(cand, arrays[share_key(cand, cfg)].dequantize())
                            fed[cand.weight_name] = spill(w, Path(tmp), f"w{len(solved)}-{len(fed)}")
                handed = cut.handed_on(segment)
                if handed:
                    spilling = sum(sum(a.nbytes for a in c.values()) for c in carried) > CARRY_BUDGET
                    folder = tempfile.mkdtemp(dir=tmp) if spilling else None  # one per segment: names repeat

                    def keep(
                        b: int, values: list[np.ndarray], handed: list = handed, spill_to: str | None = None
                    ) -> None:
                        for n, v in zip(handed, values, strict=True):
                            carried[b][n] = v if spill_to is None else spill(v, Path(spill_to), f"a{n}-{b}")

                    run(segment, handed, functools.partial(keep, spill_to=folder))
                for c in carried:  # what no later layer reads
                    for n in [n for n in c if not cut.needed_after(n, segment)]:
                        del c[n]
                for n in [n for n in fed if not cut.needed_after(n, segment)]:
                    del fed[n]
            return solved
    finally:
        bar.close()


def solve_streamed(
    model: ir.Model, source: Path | None, plan: Plan, qpass: QuantizeWeightsPass, progress: bool
) -> dict[tuple, QuantizedWeight]:
    """Arrays of the layers GPTQ rounds layer by layer (:mod:`qonnx.pipeline.gptq_stream`), by share key."""
    layers = gptq_layers(plan, is_streamed)
    if not layers:
        return {}
    per_stage = any(cfg.gptq and cfg.gptq.sequential for _, cfg in layers)
    feedable = {layer.name for layer in plan_layers(model, plan)[0]}
    solve = stage_solver(qpass)
    with calibration_run(model, source, [(c, cfg.gptq) for c, cfg in layers]) as (path, feeds):
        return streamed_gptq(
            model,
            path,
            layers,
            feeds,
            solve=solve,
            key=hessian_key,
            feedable=feedable,
            stages_in_layer=per_stage,
            progress=progress,
        )


def gpu_free_bytes() -> int | None:
    """Free memory of the GPU ONNX Runtime would calibrate on; None when it would run on the CPU."""
    if resolve_device("auto", quiet=True) != "cuda":
        return None
    import torch  # deferred: heavy (~1 s); only asked when ONNX Runtime has a GPU

    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None


def stream_if_too_big(config: SchemeConfig, model: ir.Model, source: Path | None) -> SchemeConfig:
    """``config`` with layer streaming on when its GPTQ would calibrate on a GPU too small for the weights.

    Only a weight-only scheme with GPTQ as its algorithm, a model from a file whose graph can be cut, and
    weights larger than the GPU's free memory; never on the CPU. Said in one line on stderr.
    """
    algo = getattr(config, "algo", None)
    if not isinstance(config, WeightOnlyConfig) or not isinstance(algo, GPTQ) or algo.stream_layers or source is None:
        return config
    free = gpu_free_bytes()
    if free is None:
        return config
    weights = sum(int(t.nbytes) for _, t in modelfile.iter_tensors(model))
    if weights <= free:
        return config
    try:
        LayerCut(onnx.load(os.fspath(source), load_external_data=False), str(source))
    except UncuttableError as e:
        warn(
            f"{e}; calibrating the whole model on the GPU although its weights ({weights / 1e9:.1f} GB) exceed "
            f"its free memory ({free / 1e9:.1f} GB)"
        )
        return config
    warn(
        f"the weights ({weights / 1e9:.1f} GB) exceed the GPU's free memory ({free / 1e9:.1f} GB): GPTQ "
        "calibrates and solves one decoder layer at a time (--stream-layers)"
    )
    return dataclasses.replace(config, algo=dataclasses.replace(algo, stream_layers=True))

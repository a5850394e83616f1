"""Static weight+activation quantization (W8A8, W4A8, FP8): calibrate, smooth, quantize weights, insert Q/DQ.

Called by :func:`qonnx.quantize` for an :class:`~qonnx.core.config_activations.ActivationConfig`. The order:

1. plan: which MatMul/Gemm/Conv nodes get the scheme (the weight-only planner, with the scheme's weight
   config), and the activation tensors they read (one per tensor, however many readers);
2. calibrate the float model through ONNX Runtime (:mod:`qonnx.runtime.activation_stats`): streaming
   range statistics, per-channel maxima and a few sample rows per tensor; or reuse a calibration cache;
3. SmoothQuant (optional): choose factors per tensor, fold them into norms / linears / a Mul and into
   the weights, then measure the ranges of the smoothed activations (a second pass over the data: the
   float model run again, each captured tensor divided by its factors);
4. quantize the weights (the weight-only pass, DequantizeLinear form) and insert one Q/DQ pair per tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qonnx.core import modelfile, numerics
from qonnx.core.config_activations import ActivationConfig, Calibration
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import Targets
from qonnx.passes.activations import ActivationQParams, InsertActivationQDQPass
from qonnx.passes.smooth_quant import SmoothGroup, factors, fake_quantize_weight, fold, search_alpha
from qonnx.passes.weight_only import all_value_names
from qonnx.passes.weight_plan import Plan
from qonnx.runtime.activation_stats import collect_activation_stats
from qonnx.runtime.calibration import calibration_feeds
from qonnx.runtime.observers import TensorObserver

__all__ = ["ActivationPlan", "plan_activations", "apply_activation_scheme"]

_CACHE_VERSION = 1


@dataclasses.dataclass
class ActivationPlan:
    """The activation tensors to quantize, their readers, and the scheme that governs them."""

    config: ActivationConfig
    readers: dict[str, list[tuple[ir.Node, int]]]
    groups: dict[str, SmoothGroup]  # tensors that SmoothQuant may smooth
    notes: dict[int, str]  # id(node) -> what happens to its activation


def plan_activations(model: ir.Model, targets: Targets, plan: Plan) -> ActivationPlan | None:
    """The activations read by planned nodes whose scheme quantizes activations (None: there are none)."""
    readers: dict[str, list[tuple[ir.Node, int]]] = {}
    configs: list[ActivationConfig] = []
    notes: dict[int, str] = {}
    linear: dict[str, list[tuple[ir.Node, ir.Value, bool]]] = {}
    blocked: set[str] = set()
    for cand, cfg, _ in plan:
        if cfg is None:
            continue
        names = tuple(n for n in (cand.node.name, cand.weight_name, cand.module) if n)
        scheme, _ = targets.resolve(cand.node.op_type, names)
        if not isinstance(scheme, ActivationConfig):
            continue
        if not scheme.form.static_activations and cfg.format == scheme.form.format:
            notes[id(cand.node)] = "activations int8 at run time (MatMulNBits accuracy_level 4, W4A8 on CPU)"
            continue
        x = cand.node.inputs[0]
        if cand.graph is not model.graph or x is None or not x.name:
            notes[id(cand.node)] = "activations stay float (node in a subgraph)"
            continue
        configs.append(scheme)
        readers.setdefault(x.name, []).append((cand.node, 0))
        simple = cand.axis is None and not cand.chain and cand.source is not None and cand.source.producer() is None
        simple = simple and len(cand.source.uses()) == 1 if cand.source is not None else False
        if simple and cand.node.op_type == "Gemm" and cand.node.attributes.get_float("alpha", 1.0) != 1.0:
            simple = False
        if simple and cand.source is not None:
            transposed = cand.node.op_type == "Gemm" and bool(cand.node.attributes.get_int("transB", 0))
            linear.setdefault(x.name, []).append((cand.node, cand.source, transposed))
        else:
            blocked.add(x.name)
    if not configs:
        return None
    first = configs[0]
    shared = ("act_type", "act_symmetric", "smooth_quant", "calibration", "attention", "keep_float", "target")
    for other in configs[1:]:
        for field in shared:
            if getattr(other, field) != getattr(first, field):
                raise ConfigError(
                    f"layers with activation schemes must share {field} ({getattr(first, field)!r} vs "
                    f"{getattr(other, field)!r}): one calibration and one activation format per model"
                )
    if first.attention:
        for node in model.graph:
            if node.domain == "" and node.op_type == "MatMul" and all(_is_activation(v) for v in node.inputs):
                for index, v in enumerate(node.inputs):
                    assert v is not None and v.name
                    readers.setdefault(v.name, []).append((node, index))
                    blocked.add(v.name)
    groups = {
        name: SmoothGroup(name, group)
        for name, group in linear.items()
        if name not in blocked and len(group) == len(readers[name])
    }
    return ActivationPlan(first, readers, groups, notes)


def _is_activation(value: ir.Value | None) -> bool:
    return value is not None and bool(value.name) and value.const_value is None and value.producer() is not None


def _model_key(path: Path, config: ActivationConfig) -> str:
    """What a calibration cache must match: the graph, the weights' files, the data and the smoothing setup."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    digest = hashlib.sha256(proto.graph.SerializeToString(deterministic=True))
    for f in sorted(path.parent.iterdir()):
        if f.is_file() and f != path and f.name.startswith(path.name):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    wc = config.weight_config()
    setup = {
        "version": _CACHE_VERSION,
        "data": config.calibration.data_key(),
        "smooth_quant": config.smooth_quant,
        "act": [config.act_type, config.act_symmetric],
        "weights": [wc.bits, wc.block_size, wc.symmetric, wc.grid == "fp8"],
    }
    digest.update(json.dumps(setup, sort_keys=True).encode())
    return digest.hexdigest()


def apply_activation_scheme(
    model: ir.Model, source: Path | None, plan: ActivationPlan, *, progress: bool = False
) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray | None]]]:
    """Calibrate (or read the cache), smooth, and insert activation Q/DQ; weights are left to the caller.

    Returns a JSON-ready description (tensors quantized, smoothing per tensor, tensors kept float), and
    for each quantized tensor the name of the value its readers now read and the smoothing factors (or
    None), which GPTQ needs to carry its Hessians over.
    """
    cfg = plan.config
    cal = cfg.calibration
    if cfg.act_type == "fp8" and cal.method in ("entropy", "mse"):
        raise ConfigError(f"fp8 activations take calibration method 'minmax' or 'percentile', not {cal.method!r}")
    tensors = list(plan.readers)
    estimate = cfg.smooth_quant == "auto" and bool(plan.groups)  # held-out rows for the alpha search
    info: dict[str, Any] = {"tensors": len(tensors), "method": cal.method, "smoothing": {}, "kept_float": {}}
    with tempfile.TemporaryDirectory(prefix="qonnx-calibration-") as tmp:
        path = source
        if path is None or model.ir_version > modelfile.MAX_RUNTIME_IR_VERSION:
            version = model.ir_version
            path = Path(tmp) / modelfile.MODEL_FILENAME
            modelfile.save(model, path)
            model.ir_version = version
        key = _model_key(path, cfg)
        cached = _read_cache(cal, key, tensors)
        if cached is not None:
            observers, smoothing = cached
            info["cache"] = f"reused {cal.cache}"
        else:
            folder = source.parent if source is not None else None
            feeds = calibration_feeds(path, cal.data, samples=cal.samples, seq_len=cal.seq_len, tokenizer_dir=folder)
            stats = collect_activation_stats(
                path, tensors, feeds, device=cal.device, progress=progress, sample_rows=256 if estimate else 0
            )
            observers = {name: st.observer for name, st in stats.items()}
            smoothing = _choose_smoothing(plan, stats, cfg) if cfg.smooth_quant is not None else {}
            smoothed = {n: s for n, (alpha, s, _) in smoothing.items() if alpha > 0}
            if smoothed:  # the ranges of X / s: the float model again, each tensor divided by its factors
                again = collect_activation_stats(
                    path, list(smoothed), feeds, device=cal.device, progress=progress, divide=smoothed
                )
                observers.update({name: st.observer for name, st in again.items()})
            if cal.cache:
                _write_cache(cal, key, observers, smoothing)
                info["cache"] = f"wrote {cal.cache}"
    taken = all_value_names(model)
    params: dict[str, ActivationQParams] = {}
    noise = {name: _output_noise(model, plan, name, observers[name], smoothing.get(name), cfg) for name in tensors}
    ranked = sorted(tensors, key=lambda n: -noise[n])
    if cfg.keep_float == "auto":  # the few that stand out: over a tenth of the worst, at most 5% of them
        top = noise[ranked[0]] if ranked else 0.0
        count = sum(1 for n in ranked[: len(ranked) // 20] if top > 0 and noise[n] > 0.1 * top)
    else:
        count = int(cfg.keep_float)
    kept = set(ranked[:count])
    for name in ranked[:count]:
        info["kept_float"][name] = {"output_noise": float(f"{noise[name]:.4g}")}
    renamed: dict[str, tuple[str, np.ndarray | None]] = {}  # tensor -> (what its readers read now, factors)
    first_reader: dict[str, tuple[ir.Node, int]] = {}
    for name in tensors:
        if name in kept:
            continue
        readers = plan.readers[name]
        target = name
        factors_used = None
        if name in smoothing and smoothing[name][0] > 0:
            alpha, s, err = smoothing[name]
            x = _value(model.graph, name)
            new, where = fold(model.graph, x, plan.groups[name], s, taken)
            target = new.name or name
            factors_used = s
            readers = [(node, 0) for node, _, _ in plan.groups[name].readers]
            info["smoothing"][name] = {"alpha": alpha, "into": where}
            if err is not None:
                info["smoothing"][name]["held_out_error"] = float(f"{err:.4g}")
        lo, hi = _range(observers[name], cfg)
        scale, zp = numerics.activation_qparams(lo, hi, "fp8" if cfg.act_type == "fp8" else "int8", cfg.act_symmetric)
        kind = "fp8" if cfg.act_type == "fp8" else ("int8" if cfg.act_symmetric else "uint8")
        params[target] = ActivationQParams(scale, zp, kind, tuple(readers))
        renamed[name] = (target, factors_used)
        first_reader[name] = readers[0]
    insert = InsertActivationQDQPass(params)
    insert(model)
    info["inserted"] = insert.inserted
    for name, (node, index) in first_reader.items():
        value = node.inputs[index]
        renamed[name] = (value.name if value is not None and value.name else name, renamed[name][1])
    return info, renamed


def _output_noise(
    model: ir.Model, plan: ActivationPlan, name: str, observer: Any, smoothing: tuple | None, cfg: ActivationConfig
) -> float:
    """How much rounding noise quantizing a tensor adds to the outputs of the layers that read it.

    The expected squared error of the (smoothed) activation under its range, from its histogram, times the
    energy per input channel of the (smoothed) weights that read it: the noise power that reaches the layer
    outputs, and from there the residual stream. Unlike an error relative to each layer's own output, it
    ranks the few down projections with massive activations first (SmolLM2: layers 28, 11, 29), which are
    the ones whose quantization costs perplexity.
    """
    symmetric = cfg.act_symmetric or cfg.act_type == "fp8"
    qmin, qmax = (-127, 127) if symmetric else (0, 255)
    lo, hi = _range(observer, cfg)
    try:
        err = observer.expected_error(lo, hi, symmetric=symmetric, qmin=qmin, qmax=qmax)
    except ConfigError:
        return 0.0
    s = smoothing[1] if smoothing is not None and smoothing[0] > 0 else None
    gain = 0.0
    for node, index in plan.readers[name]:
        w = node.inputs[1] if index == 0 and len(node.inputs) > 1 else None
        t = ir.convenience.get_const_tensor(w) if w is not None else None
        if t is None or len(t.shape) != 2:
            gain += 1.0
            continue
        arr = t.numpy().astype(np.float32)
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0:
            arr = arr.T
        if s is not None and arr.shape[0] == s.shape[0]:
            arr = arr * s[:, None]
        gain += float(np.square(arr).sum()) / arr.shape[0]
    return err * gain


def _range(observer: Any, cfg: ActivationConfig) -> tuple[float, float]:
    cal = cfg.calibration
    symmetric = cfg.act_symmetric or cfg.act_type == "fp8"
    qmin, qmax = (-127, 127) if symmetric else (0, 255)
    return observer.range(cal.method, symmetric=symmetric, qmin=qmin, qmax=qmax, percentile=cal.percentile)


def _choose_smoothing(plan: ActivationPlan, stats: dict[str, Any], cfg: ActivationConfig) -> dict[str, tuple]:
    """alpha, factors and estimated relative output error (held-out rows) per smoothable tensor.

    Without smoothing every tensor gets alpha 0 (factors 1): the error then ranks tensors for ``keep_float``.
    """
    wc = cfg.weight_config()
    fake_w = fake_quantize_weight(wc.bits, wc.block_size, wc.symmetric)
    kind = "fp8" if cfg.act_type == "fp8" else "int8"

    def fake_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        scale, zp = numerics.activation_qparams(lo, hi, kind, cfg.act_symmetric)
        if kind == "fp8":
            return numerics.FLOAT8.round(x / scale) * np.float32(scale)
        qmin, qmax = (-127, 127) if cfg.act_symmetric else (0, 255)
        q = np.clip(numerics.round_half_up(x / scale) + zp, qmin, qmax)
        return ((q - zp) * scale).astype(np.float32)

    def range_of(mn: np.ndarray, mx: np.ndarray) -> Any:
        def act_range(s: np.ndarray) -> tuple[float, float]:
            lo, hi = float((mn / s).min()), float((mx / s).max())
            if cfg.act_symmetric or kind == "fp8":
                a = max(-lo, hi)
                return -a, a
            return lo, hi

        return act_range

    chosen: dict[str, tuple] = {}
    for name, group in plan.groups.items():
        st = stats[name]
        absmax = np.maximum(np.abs(st.channel_min), np.abs(st.channel_max))
        if cfg.smooth_quant == "auto":
            samples = [(rows, range_of(mn, mx)) for rows, mn, mx in st.held_out()]
            chosen[name] = search_alpha(group, samples, absmax, fake_w, fake_act)
        else:
            alpha = float(cfg.smooth_quant or 0.0)
            chosen[name] = (alpha, factors(absmax, group.weight_absmax(), alpha), None)
        group.release()  # the next capture pass needs the memory more than these pages
    return chosen


def _value(graph: ir.Graph, name: str) -> ir.Value:
    for v in graph.inputs:
        if v.name == name:
            return v
    for node in graph:
        for v in node.outputs:
            if v.name == name:
                return v
    raise KeyError(name)


def _read_cache(cal: Calibration, key: str, tensors: list[str]) -> tuple[dict[str, Any], dict[str, tuple]] | None:
    """The cached observers and smoothing of ``tensors``, or None when there is no cache file yet.

    A cache of the same model and data that holds more tensors serves a run that quantizes fewer layers.
    """
    if not cal.cache or not Path(cal.cache).exists():
        return None
    try:
        with np.load(cal.cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{cal.cache}: not a qonnx calibration cache ({e}); delete it or pass another path") from None
    if meta.get("key") != key:
        raise ConfigError(
            f"{cal.cache}: the calibration cache was made for another model, data or scheme setup; "
            "delete it or pass another --calib-cache path"
        )
    missing = [t for t in tensors if t not in meta["tensors"]]
    if missing:
        raise ConfigError(
            f"{cal.cache}: the calibration cache lacks {len(missing)} of the activations to quantize (such as "
            f"'{missing[0]}'): it was made for fewer layers; delete it or pass another --calib-cache path"
        )
    observers: dict[str, Any] = {}
    smoothing: dict[str, tuple] = {}
    for i, name in enumerate(meta["tensors"]):
        if name not in tensors:
            continue
        prefix = f"t{i}."
        state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        observers[name] = TensorObserver.from_state(state)
        if name in meta["smoothing"]:
            alpha, err = meta["smoothing"][name]
            smoothing[name] = (alpha, arrays.get(f"s{i}"), err)
    return observers, smoothing


def _write_cache(cal: Calibration, key: str, observers: dict[str, Any], smoothing: dict[str, tuple]) -> None:
    assert cal.cache is not None
    names = list(observers)
    arrays: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        for k, v in observers[name].state().items():
            arrays[f"t{i}.{k}"] = np.asarray(v)
        if name in smoothing and smoothing[name][0] > 0:
            arrays[f"s{i}"] = smoothing[name][1]
    meta = {
        "key": key,
        "tensors": names,
        "smoothing": {n: [float(a), None if e is None else float(e)] for n, (a, _, e) in smoothing.items()},
    }
    target = Path(cal.cache)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".npz", dir=target.parent)
    except OSError as e:
        raise ConfigError(f"{target}: cannot write the calibration cache there: {e.strerror or e}") from None
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, *(), **{"meta": np.array(json.dumps(meta)), **arrays})  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"qonnx: calibration cache written to {target}", file=sys.stderr)

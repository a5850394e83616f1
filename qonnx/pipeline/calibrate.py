"""Calibrate once: the model loaded, a file of it ONNX Runtime can run, and the statistics the passes need.

``quantize`` runs these before any rewrite (ONNX Runtime sees the float model); sensitivity analysis and
mixed precision reuse them, so that the Hessians of one run are collected once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qonnx.core import modelfile
from qonnx.core.config import SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import ConfigError
from qonnx.passes.kv_cache import KV_CACHE_FORMATS, kv_cache_layers
from qonnx.passes.weight_plan import Plan, hessian_key
from qonnx.runtime.calibration import calibration_feeds, collect_hessians, kv_cache_ranges
from qonnx.runtime.data import PYDOC
from qonnx.runtime.evaluate import model_config

__all__ = [
    "ModelLike",
    "calibration_data",
    "calibration_run",
    "is_sequential",
    "is_streamed",
    "kv_ranges",
    "layer_hessians",
    "load_model",
    "runtime_file",
]

ModelLike = str | os.PathLike | ir.Model | onnx.ModelProto
#: Calibration windows (of 512 tokens) for the KV cache ranges of a scheme that calibrates nothing else.
KV_CACHE_SAMPLES = 8


def load_model(model: ModelLike) -> tuple[ir.Model, Path | None]:
    """The model as an IR model (changed in place when given one), and its file when it came from one."""
    if isinstance(model, ir.Model):
        return model, None
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    if isinstance(model, (str, os.PathLike)):
        path = modelfile.resolve_model_path(model)
        return modelfile.load(path), path
    raise ConfigError(f"model must be a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}")


def runtime_file(model: ir.Model, source: Path | None, folder: str | os.PathLike) -> Path:
    """A file of ``model`` ONNX Runtime loads: its own, or one written into ``folder`` (in memory, or IR too new)."""
    if source is not None and model.ir_version <= modelfile.MAX_RUNTIME_IR_VERSION:
        return source
    version = model.ir_version
    path = Path(folder) / modelfile.MODEL_FILENAME
    modelfile.save(model, path)
    model.ir_version = version
    return path


@contextlib.contextmanager
def calibration_run(model: ir.Model, source: Path | None, layers: list) -> Iterator[tuple[Path, list]]:
    """A file of the float model ONNX Runtime loads, and the calibration feeds ``layers``' configs ask for."""
    settings = {(g.calib_data, g.calib_samples, g.calib_seq_len) for _, g in layers}
    if len(settings) > 1:
        raise ConfigError(
            "GPTQ/AWQ layers must share one calibration setting (calib_data, calib_samples, calib_seq_len); "
            f"got {sorted(settings)}"
        )
    data, samples, seq_len = settings.pop()
    with tempfile.TemporaryDirectory(prefix="qonnx-calibration-") as tmp:
        path = runtime_file(model, source, tmp)
        folder = source.parent if source is not None else None
        yield path, calibration_feeds(path, data, samples=samples, seq_len=seq_len, tokenizer_dir=folder)


def is_sequential(cfg: WeightOnlyConfig | None) -> bool:
    """Whether a layer's GPTQ is solved stage by stage (:mod:`qonnx.pipeline.gptq_sequential`)."""
    return (
        cfg is not None
        and cfg.gptq is not None
        and cfg.awq is None
        and cfg.gptq.sequential
        and not cfg.gptq.stream_layers
    )


def is_streamed(cfg: WeightOnlyConfig | None) -> bool:
    """Whether a layer's GPTQ is solved decoder layer by decoder layer (:mod:`qonnx.pipeline.gptq_stream`)."""
    return cfg is not None and cfg.gptq is not None and cfg.awq is None and cfg.gptq.stream_layers


def layer_hessians(model: ir.Model, source: Path | None, plan: Plan, progress: bool) -> dict[str, np.ndarray]:
    """The Hessians of the inputs of the layers that GPTQ (neither sequential nor streamed) or AWQ quantize.

    They come from calibration runs of the float model.
    """
    layers = [
        (cand, cfg.calibrated)
        for cand, cfg, _ in plan
        if cfg is not None and cfg.calibrated is not None and not is_sequential(cfg) and not is_streamed(cfg)
    ]
    if not layers:
        return {}
    inputs = {hessian_key(cand): cand.k for cand, _ in layers}
    with calibration_run(model, source, layers) as (path, feeds):
        return collect_hessians(path, inputs, feeds, device="auto", progress=progress)


def calibration_data(config: SchemeConfig) -> str | None:
    """The data a scheme calibrates on when it is not the pydoc corpus (verification then uses it too)."""
    calibration: Any = getattr(config, "calibration", None)
    algo: Any = getattr(config, "algo", None)
    for data in (getattr(calibration, "data", None), getattr(algo, "calib_data", None)):
        if data is not None and str(data) != PYDOC:
            return str(data)
    return None


def kv_ranges(model: ir.Model, source: Path | None, config: WeightOnlyConfig, progress: bool) -> dict[str, np.ndarray]:
    """The largest |key| and |value| per KV head and channel of each cache input, from the float ``model``.

    The windows are those GPTQ/AWQ calibrate on when ``config`` uses them (its ``calib_*`` settings), else
    :data:`KV_CACHE_SAMPLES` windows of 512 tokens of the pydoc corpus (disjoint from evaluation; shorter for a
    model of fewer positions).

    Raises:
        ConfigError: the model is not lowered with GroupQueryAttention (:func:`qonnx.passes.kv_cache.kv_cache_layers`).
    """
    layers = kv_cache_layers(model)
    algo = config.calibrated
    if algo is not None:
        data, samples, seq_len = algo.calib_data, algo.calib_samples, algo.calib_seq_len
    else:  # windows of 512 tokens, or of the model's positions (its BOS included) when it has fewer
        data, samples, seq_len = PYDOC, KV_CACHE_SAMPLES, 512
        positions = model_config(source.parent).get("max_position_embeddings") if source is not None else None
        if isinstance(positions, int) and 2 < positions <= seq_len:
            seq_len = positions - 1
    caches = {}
    for layer in layers:
        caches[layer.past_key.name or ""] = layer.present_key.name or ""
        caches[layer.past_value.name or ""] = layer.present_value.name or ""
    with tempfile.TemporaryDirectory(prefix="qonnx-calibration-") as tmp:
        path = runtime_file(model, source, tmp)
        folder = source.parent if source is not None else None
        feeds = calibration_feeds(path, data, samples=samples, seq_len=seq_len, tokenizer_dir=folder)
        qmax = KV_CACHE_FORMATS[config.kv_cache or "int8"].qmax
        return kv_cache_ranges(path, caches, feeds, qmax=qmax, device="auto", progress=progress)

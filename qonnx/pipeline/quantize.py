"""The public verb: ``qonnx.quantize(model, W4A16(...), output=...)``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

from qonnx.core import __version__, modelfile, outputs
from qonnx.core.config import W4A16, SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import (
    ConfigError,
    ModelLoadError,
    NothingToQuantizeError,
    OutputPathError,
    escape_name,
    escape_text,
    warn,
)
from qonnx.core.schemes import Targets
from qonnx.core.sizes import human_bytes
from qonnx.core.targets import warn_if_slow
from qonnx.passes.cleanup import RemoveUnusedInitializersPass
from qonnx.passes.embeddings import QuantizeEmbeddingsPass, plan_embeddings
from qonnx.passes.kv_cache import QuantizeKVCachePass
from qonnx.passes.opset import OpsetConversionError, UpgradeOpsetPass
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.passes.weight_plan import QDQ_OPSET, LayerRecord
from qonnx.pipeline.activations import apply_activation_scheme, plan_activations
from qonnx.pipeline.awq import apply_awq
from qonnx.pipeline.calibrate import (
    ModelLike,
    calibration_data,
    is_sequential,
    is_streamed,
    kv_ranges,
    layer_hessians,
    load_model,
)
from qonnx.pipeline.deploy import METADATA_KEY, session_options, write_sidecar
from qonnx.pipeline.gptq_sequential import solve_sequential
from qonnx.pipeline.gptq_stream import solve_streamed, stream_if_too_big
from qonnx.pipeline.mixed_precision import Budget, MixedPrecision, mixed_precision
from qonnx.pipeline.rotation import RotatedSource, rotate
from qonnx.pipeline.verification import Verification, VerifyOptions, check_shapes, start_reference, start_verify
from qonnx.pipeline.verification import metadata as verification_metadata
from qonnx.pipeline.verification import verify as run_verify
from qonnx.runtime.session import InMemoryModel

__all__ = ["QuantizeSummary", "quantize"]


@dataclasses.dataclass
class QuantizeSummary:
    """What :func:`quantize` did.

    Attributes:
        config: the default scheme config, as a dict.
        layers: every MatMul/Gemm node, quantized or skipped with the reason.
        bytes_before: size of the input model (files on disk, or weight bytes in memory).
        bytes_after: size of the output model, measured the same way.
        outputs: files written (empty when no output path was given).
        seconds: wall time.
        phases: wall seconds of the longer steps that ran ("budget", "calibration", "awq", "activations",
            "quantization", "kv cache", "writing").
        model: the quantized model (onnx_ir).
        verification: the comparison of the output with the original (see :class:`VerifyOptions`).
    """

    config: dict[str, Any]
    layers: list[LayerRecord]
    bytes_before: int
    bytes_after: int
    outputs: list[Path]
    seconds: float
    model: ir.Model = dataclasses.field(repr=False)
    verification: Verification = dataclasses.field(default_factory=lambda: Verification(False))
    activations: dict[str, Any] | None = None
    mixed_precision: dict[str, Any] | None = None
    #: With a quantized KV cache: its format, the attentions changed and the cache bytes per position (batch 1).
    kv_cache: dict[str, Any] | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    passes: list[str] = dataclasses.field(default_factory=list)
    rotation: list[str] = dataclasses.field(default_factory=list)

    @property
    def quantized(self) -> list[LayerRecord]:
        """Layers that were quantized."""
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list[LayerRecord]:
        """Layers left in floating point, with their reasons."""
        return [r for r in self.layers if not r.quantized]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the model)."""
        return {
            "qonnx_version": __version__,
            "config": self.config,
            "quantized": len(self.quantized),
            "skipped": len(self.skipped),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression": round(self.bytes_before / self.bytes_after, 3) if self.bytes_after else None,
            "seconds": round(self.seconds, 3),
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "passes": self.passes,
            "rotation": self.rotation,
            "outputs": [str(p) for p in self.outputs],
            "verification": self.verification.to_dict(),
            "activations": self.activations,
            "mixed_precision": self.mixed_precision,
            **({"kv_cache": self.kv_cache} if self.kv_cache is not None else {}),
            "layers": [r.to_dict() for r in self.layers],
        }


def quantize(
    model: ModelLike,
    config: SchemeConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    targets: Mapping[str, SchemeConfig | None] | None = None,
    progress: bool = False,
    external_data: bool | None = None,
    workers: int | None = None,
    verify: VerifyOptions | bool | None = None,
    budget: Budget | None = None,
) -> QuantizeSummary:
    """Quantize a model: its weights, and with a weight+activation scheme (W8A8, W4A8, FP8) its activations.

    Args:
        model: a .onnx path, a folder holding model.onnx, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
            (changed in place).
        config: the scheme for every layer not named in ``targets`` (default ``W4A16()``); weight+activation
            schemes calibrate activation ranges by running ``config.calibration``'s data through ONNX Runtime.
        output: where to write: a .onnx path, or a folder (a folder input is mirrored there, tokenizer
            and config files included). Nothing is written when None.
        targets: per-layer overrides by exact node/weight name, ``re:`` regex or op type; ``None`` keeps
            a layer in floating point, e.g. ``{"re:lm_head": None}``.
        progress: show a progress bar on stderr.
        external_data: see :func:`qonnx.core.modelfile.save`.
        workers: threads that quantize weights (default: up to 4, by CPU count).
        verify: run the original and the quantized model on the same inputs before writing and record
            per-output SQNR, cosine, max error and top-1 agreement (:class:`VerifyOptions`; True/False to
            force it on/off; default on for models up to 2 GiB). The figures go into the output's
            ``metadata_props``; ``VerifyOptions(min_sqnr=...)`` refuses to write a worse model.
        budget: mixed precision (weight-only schemes): keep the layers whose quantization hurts most in
            8 bits, or floating point, to meet ``Budget(target_bits=...)`` or ``Budget(max_ppl_increase=...)``
            (see :mod:`qonnx.pipeline.mixed_precision`); the promotions go into the layer records, the summary and
            the output's metadata.

    Returns:
        A :class:`QuantizeSummary`.

    Raises:
        QonnxError: bad input model, bad option, nothing to quantize, unusable output path.
    """
    start = time.perf_counter()
    options = verify if isinstance(verify, VerifyOptions) else VerifyOptions(enabled=verify)
    if options.min_sqnr is not None and options.enabled is None:  # a gate is never skipped for size
        options = dataclasses.replace(options, enabled=True)
    config = W4A16() if config is None else config
    if not isinstance(config, SchemeConfig):
        raise ConfigError(f"config must be a scheme config such as W4A16(), not {type(config).__name__}")
    data = calibration_data(config)
    if options.feeds is None and options.data is None and data is not None:  # verified on the same kind of data
        options = dataclasses.replace(options, data=data)
    mixed = None
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:  # the wall time of the block goes to phases[name]
        begin = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - begin

    if budget is not None and config.rotate != "none":
        raise ConfigError("a mixed-precision budget is measured on the unrotated model: use it without rotate")
    if budget is not None:  # measured on the float model, before anything changes it
        with phase("budget"):
            mixed = mixed_precision(model, config, budget, targets=targets, progress=progress)
        targets = {**(targets or {}), **mixed.targets}
    resolved = Targets(config, targets)
    ir_model, source = load_model(model)
    if (streamed := stream_if_too_big(config, ir_model, source)) is not config:
        config, resolved = streamed, Targets(streamed, targets)
    check_shapes(options, ir_model)
    protect = modelfile.model_files(ir_model, source) if source is not None else []
    out_path, mirror = (None, None) if output is None else outputs.output_paths(output, source, model, protect)
    if out_path is not None:
        for p in protect:
            if out_path.exists() and os.path.samefile(out_path, p):
                raise OutputPathError(f"{out_path}: output would overwrite the input file {p}")
    bytes_before = sum(p.stat().st_size for p in protect) if protect else _weight_bytes(ir_model)
    original: Path | bytes | None = source
    wants_check = options.enabled or (options.enabled is None and bytes_before <= options.max_bytes)
    skip_note = ""
    if wants_check and ir_model.ir_version > modelfile.MAX_RUNTIME_IR_VERSION:
        # ONNX Runtime refuses the original as it is; compare with a copy at a version it accepts.
        if any(isinstance(t, ir.ExternalTensor) for _, t in modelfile.iter_tensors(ir_model)):
            skip_note = (
                f"verification skipped: ONNX Runtime cannot load the original (IR version "
                f"{ir_model.ir_version} > {modelfile.MAX_RUNTIME_IR_VERSION}) and its weights are external"
            )
            if options.min_sqnr is not None:
                raise ConfigError(f"{source}: min_sqnr cannot be checked: {skip_note.split(': ', 1)[1]}")
            wants_check = False
        else:
            version = ir_model.ir_version
            modelfile.make_runtime_compatible(ir_model)
            original = modelfile.to_bytes(ir_model)
            ir_model.ir_version = version
    if original is None and wants_check:  # in-memory input: keep a copy of the original to compare with
        original = modelfile.to_bytes(ir_model)
    # The original runs in ONNX Runtime in the background, while the weights are quantized.
    reference = start_reference(original, options) if wants_check and original is not None else None
    with phase("rotation"):
        rotated = rotate(ir_model, config.rotate)  # exact in float: the original stays the reference
    if rotated is None:
        phases.pop("rotation")
    else:  # the MatMuls it adds (Hadamard transforms) stay float
        resolved = Targets(config, {**(targets or {}), **dict.fromkeys(rotated.kept_float)})
    # Calibration runs the rotated model: a file of it is written on first need (removed at the end; a
    # TemporaryDirectory also removes itself when an error ends the run).
    copy = RotatedSource(ir_model, source, protect) if rotated is not None else None
    calib_source = copy.path if copy is not None else (lambda: source)

    planner = QuantizeWeightsPass(resolved)  # plans only; the pass that quantizes gets what calibration found
    plan = planner.plan(ir_model)
    hessians: dict[str, np.ndarray] = {}
    presolved: dict[tuple, Any] = {}
    todo = [cfg for _, cfg, _ in plan if cfg is not None]
    tables = _check_embeddings(ir_model, resolved, source)
    if not todo and not tables:
        reasons = sorted({r for _, cfg, r in plan if cfg is None})
        detail = f" ({'; '.join(reasons[:3])})" if reasons else " (no MatMul or Gemm nodes)"
        raise NothingToQuantizeError(f"nothing to quantize in the model{detail}")
    if any(cfg.calibrated is not None for cfg in todo):  # before any rewrite: ONNX Runtime runs the float model
        reuse = mixed.hessians if mixed is not None else {}  # the budget's measurements collected them already
        with phase("calibration"):
            hessians = reuse or layer_hessians(ir_model, calib_source(), plan, progress)
        if any(is_sequential(cfg) for cfg in todo):  # calibrated and solved stage by stage
            with phase("sequential gptq"):
                presolved = solve_sequential(ir_model, calib_source(), plan, planner, progress)
        if any(is_streamed(cfg) for cfg in todo):  # calibrated and solved decoder layer by decoder layer
            with phase("streamed gptq"):
                presolved.update(solve_streamed(ir_model, calib_source(), plan, planner, progress))
    kv_format = config.kv_cache if isinstance(config, WeightOnlyConfig) else None
    cache_ranges: dict[str, np.ndarray] = {}
    if kv_format is not None and isinstance(config, WeightOnlyConfig):  # on the float model, as the Hessians
        with phase("kv cache"):
            cache_ranges = kv_ranges(ir_model, calib_source(), config, progress)  # ConfigError: not lowered
    if any(c.format == "qdq" for c in todo) and ir_model.opset_imports.get("", 1) < QDQ_OPSET:
        try:
            UpgradeOpsetPass(QDQ_OPSET)(ir_model)
        except OpsetConversionError as e:
            convs = any(cand.axis is not None for cand, cfg, _ in plan if cfg is not None)
            hint = (
                "exclude convolutions with targets={'Conv': None, 'ConvTranspose': None} (--exclude for names)"
                if convs
                else "use format='matmulnbits' instead"
            )
            raise ModelLoadError(f"{source or 'model'}: {e}; {hint}") from None
    awq = None
    if any(cfg.awq is not None for cfg in todo):  # scales folded, clip ranges and Hessians of X / s for the pass
        with phase("awq"):
            awq = apply_awq(ir_model, planner.plan(ir_model), hessians, progress=progress)
    activations = plan_activations(ir_model, resolved, planner.plan(ir_model))  # after the upgrade: its nodes
    act_info: dict[str, Any] | None = None
    if activations is not None:
        warn_if_slow(activations.config)
        with phase("activations"):
            act_info, renamed = apply_activation_scheme(ir_model, calib_source(), activations, progress=progress)
        _carry_hessians(hessians, renamed)
    elif isinstance(config, WeightOnlyConfig):
        warn_if_slow(config)

    if copy is not None:
        copy.close()
    bar = tqdm(total=len(todo), unit="layer", desc="quantizing", leave=False) if progress else None
    qpass = QuantizeWeightsPass(
        resolved,
        workers=workers,
        hessians=hessians,
        shrinks=awq.shrinks if awq is not None else None,
        presolved=presolved,
        progress=(lambda record: bar.update()) if bar is not None else None,
    )
    embeddings = QuantizeEmbeddingsPass(resolved)  # after qpass: the tied heads it kept in floating point
    steps = ir.passes.PassManager(  # subgraphs too
        [qpass, embeddings, RemoveUnusedNodesPass(), RemoveUnusedInitializersPass()]
    )
    try:
        with phase("quantization"):
            steps(ir_model)
    finally:
        if bar is not None:
            bar.close()

    kv_info = None
    if kv_format is not None:
        kv_pass = QuantizeKVCachePass(kv_format, cache_ranges)
        kv_pass(ir_model)
        kv_info = {"format": kv_format, "layers": kv_pass.layers, "bytes_per_token": kv_pass.cache_bytes_per_token}

    qpass.records = embeddings.update(qpass.records)
    if qpass.nonfinite:
        total, first = sum(qpass.nonfinite.values()), next(iter(qpass.nonfinite))
        layers = len(qpass.nonfinite)
        warn(
            f"{total} weights are not finite (NaN or infinite) in {layers} layer{'s' if layers > 1 else ''} "
            f"(e.g. '{escape_name(first)}'): the blocks that hold them quantize to NaN; check the original model"
        )
    if activations is not None:
        _note_activations(qpass.records, activations, act_info or {})
    notes = awq.notes if awq is not None else {}
    for record in qpass.records:  # what AWQ did, in the records of its layers
        if record.quantized and record.weight in notes:
            record.reason = f"{record.reason}; {notes[record.weight]}"
    mixed_info = None if mixed is None else _note_mixed_precision(qpass.records, mixed)
    extra_props = {} if mixed_info is None else {"qonnx.mixed_precision": json.dumps(mixed_info, sort_keys=True)}
    deploy = session_options(config)
    if deploy is not None:
        extra_props[METADATA_KEY] = json.dumps(deploy, sort_keys=True)
    quantized = sum(1 for r in qpass.records if r.quantized)
    skipped = len(qpass.records) - quantized
    checked = Verification(False, note=skip_note or "verification disabled")
    if skip_note:
        warn(skip_note)

    # The quantized model runs from memory, in a background thread while the output is written; a model
    # written as one file is written from the same snapshot (taken here, on this thread).
    use = reference or original or b""
    snapshot = None
    if wants_check and out_path is not None and modelfile.writes_one_file(ir_model, external_data):
        snapshot = InMemoryModel.of(ir_model)
    pending = None
    if not skip_note and out_path is not None:
        pending = start_verify(use, snapshot or ir_model, options, bytes_before, config.to_dict())

    def finalize(tmp_model: Path) -> dict[str, str]:
        nonlocal checked
        assert original is not None or not wants_check
        if pending is not None:
            checked = pending.result()
        props = {**verification_metadata(config.to_dict(), checked, quantized, skipped), **extra_props}
        if protect:  # the whole model must shrink: scales, nodes and metadata can outweigh tiny layers
            size = sum(p.stat().st_size for p in tmp_model.parent.iterdir() if p.is_file())
            size += sum(len(k) + len(v) + 8 for k, v in props.items())
            if size >= bytes_before:
                raise NothingToQuantizeError(
                    f"quantizing would not make the model smaller ({human_bytes(bytes_before)} -> "
                    f"~{human_bytes(size)}: what the quantizable layers save is less than their scales, nodes and "
                    "metadata cost); nothing was written"
                )
        return props

    written: list[Path] = []
    if out_path is not None:
        with phase("writing"):
            written = modelfile.save(
                ir_model, out_path, protect=protect, external_data=external_data, finalize=finalize, snapshot=snapshot
            )
            if mirror is not None:  # after the model: a refused or failed write leaves no half-filled folder
                outputs.mirror_folder(mirror, out_path.parent)
        bytes_after = sum(p.stat().st_size for p in written)
        if deploy is not None:
            written.append(write_sidecar(deploy, out_path))
    else:
        bytes_after = _weight_bytes(ir_model)
        if wants_check:
            modelfile.make_runtime_compatible(ir_model)
            checked = run_verify(use, ir_model, options, bytes_before, config.to_dict())
        props = {**verification_metadata(config.to_dict(), checked, quantized, skipped), **extra_props}
        for key, value in props.items():
            ir_model.metadata_props[key] = value
    return QuantizeSummary(
        config=config.to_dict(),
        layers=qpass.records,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        outputs=written,
        seconds=time.perf_counter() - start,
        model=ir_model,
        verification=checked,
        activations=act_info,
        mixed_precision=mixed_info,
        kv_cache=kv_info,
        phases=phases,
        passes=([repr(rotated)] if rotated is not None else []) + [repr(p) for p in steps.passes],
        rotation=rotated.notes if rotated is not None else [],
    )


def _check_embeddings(model: ir.Model, targets: Targets, source: Path | None) -> int:
    """How many embedding tables will be quantized; refuse when the scheme asks for embeddings and none can be."""
    default = targets.default.weight_config() if targets.default is not None else None
    if default is None or default.embeddings is None:
        return 0
    tables = plan_embeddings(model, targets)
    doable = sum(1 for t in tables if t.cfg is not None)
    if not doable:
        why = (
            f"table '{escape_name(tables[0].name)}': {escape_text(tables[0].reason)}"
            if tables
            else "no Gather reads a constant 2-D float table"
        )
        raise ConfigError(f"{source or 'model'}: embeddings={default.embeddings} cannot be done: {why}")
    return doable


def _carry_hessians(hessians: dict[str, np.ndarray], renamed: dict[str, tuple[str, np.ndarray | None]]) -> None:
    """GPTQ's Hessians follow their tensor to its new name; smoothing makes them those of X / s."""
    for old, (new, s) in renamed.items():
        h = hessians.pop(old, None)
        if h is None:
            continue
        if s is not None:
            inv = (1.0 / s).astype(np.float32)
            h = np.asarray(h, dtype=np.float32) * inv[:, None] * inv[None, :]
        hessians[new] = h


def _note_activations(records: list[LayerRecord], plan: Any, info: dict[str, Any]) -> None:
    """Say in each layer record what happened to the activation it reads."""
    cfg = plan.config
    kind = "fp8 E4M3" if cfg.act_type == "fp8" else ("int8" if cfg.act_symmetric else "uint8")
    by_node: dict[str, str] = {}
    for tensor, readers in plan.readers.items():
        smoothed = info.get("smoothing", {}).get(tensor)
        note = f"{cfg.name}: activation '{tensor}' {kind} per tensor ({cfg.calibration.method})"
        if tensor in info.get("kept_float", {}):
            note = f"{cfg.name}: activation '{tensor}' kept in floating point (keep_float: its error ranks high)"
        elif smoothed:
            note += f", SmoothQuant alpha {smoothed['alpha']} folded into {smoothed['into']}"
        for node, _ in readers:
            by_node[node.name or ""] = note
    for record in records:
        if record.quantized and record.node in by_node:
            record.reason = f"{by_node[record.node]}; weights: {record.reason}"


def _note_mixed_precision(records: list[LayerRecord], mixed: MixedPrecision) -> dict[str, Any]:
    """Say in each promoted layer's record why; the budget's figures with the bits per weight as written."""
    params = stored = 0
    for record in records:
        why = mixed.reason(record.weight)
        if why is not None:
            record.reason = f"{record.reason}; {why}" if record.quantized else why
        if record.quantized and record.shared_with is None and record.shape is not None:
            params += record.shape[0] * record.shape[1]
            stored += record.bytes_after
    info = mixed.to_dict()
    info["bits_per_weight"]["output"] = round(8 * stored / params, 4) if params else None
    return info


def _weight_bytes(model: ir.Model) -> int:
    return sum(int(t.nbytes) for _, t in modelfile.iter_tensors(model))

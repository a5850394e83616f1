"""Lower a model for ONNX Runtime: load, fuse into contrib ops, check the numbers, save (``qonnx lower``).

The fusions are :class:`qonnx.passes.lower.FuseForOrtPass`. Before the output is written, the input and
the lowered model run on the same inputs in ONNX Runtime (CPU) and must agree within float tolerance
(:func:`qonnx.pipeline.lowering_check.compare_outputs`; a model with quantized activations is compared with
its rounding pinned, as that module says). Order with quantization: quantize first, then lower (the fusions
leave MatMul and MatMulNBits alone, and a lowered model can still be quantized, but its verification is then
of the fused graph).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qonnx.core import modelfile, outputs
from qonnx.core.errors import ModelLoadError, QonnxError
from qonnx.passes.lower import FuseForOrtPass
from qonnx.pipeline.lowering_check import LoweringMismatchError, compare_outputs
from qonnx.runtime.evaluate import model_config

#: The check lives in qonnx.pipeline.lowering_check; its error and comparison stay importable from here.
__all__ = ["LowerSummary", "LoweringMismatchError", "lower", "compare_outputs"]

#: Models above this many bytes are not verified unless asked (both would be loaded in ONNX Runtime).
VERIFY_MAX_BYTES = 2 << 30
#: Largest |lowered - input| allowed, relative to the output's largest magnitude (at least 1; for the float
#: input of a pinned QuantizeLinear, relative to its own largest magnitude).
TOLERANCE = {"tensor(float)": 1e-3, "tensor(float16)": 3e-2, "tensor(bfloat16)": 3e-2}


@dataclasses.dataclass
class LowerSummary:
    """What one lowering run did."""

    target: str
    fused: dict[str, int]
    fusions: dict[str, int]
    notes: list[str]
    nodes_before: int
    nodes_after: int
    outputs: list[Path]
    seconds: float
    max_abs_diff: dict[str, float] | None = None  # per output, when verified
    top1_agreement: float | None = None
    pinned: int | None = None  # quantized activations whose rounding the check took from the input model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dataclasses.asdict(self)
        d["outputs"] = [str(p) for p in self.outputs]
        return d


def _mismatches(found: dict[str, Any]) -> list[str]:
    """What in a :func:`compare_outputs` result is beyond float tolerance: pinned tensors (graph order), outputs."""
    rows = [
        (n, d, found["pinned_scale"][n], found["pinned_types"].get(n), 0.0) for n, d in found["pinned_diff"].items()
    ]
    rows += [(n, d, found["scale"][n], found["types"][n], 1.0) for n, d in found["max_abs_diff"].items()]
    return [
        f"{name}: max |difference| {d:.3g} (largest |value| {largest:.3g})"
        for name, d, largest, dtype, floor in rows
        if not d <= TOLERANCE.get(dtype or "", 1e-3) * max(floor, largest)
    ]


def _config_max_positions(folder: Path) -> int | None:
    """``max_position_embeddings`` from the Hugging Face config.json in ``folder`` (None: absent or unreadable)."""
    try:
        value = model_config(folder).get("max_position_embeddings")
    except ModelLoadError:  # computed at run time instead
        return None
    return value if isinstance(value, int) and value > 0 else None


def lower(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "cpu",
    attention: bool | None = None,
    verify: bool | None = None,
    external_data: bool | None = None,
    max_positions: int | None = None,
    merge_linear: bool = True,
) -> LowerSummary:
    """Fuse ``model`` into ONNX Runtime contrib ops for ``target`` and write it to ``output``.

    Args:
        model: a .onnx file or a folder holding model.onnx (an export, quantized or not).
        output: a .onnx path or a folder (a folder input is mirrored there: tokenizer and config files).
        target: "cpu" or "cuda", the execution provider the model is for.
        attention: fuse attention too (False: RMSNorm and rotary embedding only). Default: on. For CUDA attention
            is only ever fused into GroupQueryAttention (float16/bfloat16, causal mask), and it pays off when the
            decode loop binds past and present to one buffer, as ``qonnx generate`` does (7B Llama shape on an
            H100 with ONNX Runtime 1.31, benchmarks/RESULTS.md: 9.3 ms a step with attention unfused, 6.8 ms
            fused with a shared buffer, 6.0 ms with a CUDA graph); a loop with separate past and present buffers
            is 4-7x slower with it (46 ms), and MultiHeadAttention was 10x slower at decode.
        merge_linear: concatenate the linear layers that read one input (q/k/v, gate/up) into one node each
            (:mod:`qonnx.passes.merge_linear`); their names are then gone, so select layers before lowering.
        verify: compare the lowered model with the input before writing (default: up to 2 GiB of files).
        external_data: see :func:`qonnx.core.modelfile.save`.
        max_positions: size of the constant rotary cos/sin cache (positions 0 .. max_positions - 1); default:
            ``max_position_embeddings`` from the config.json beside the model, else computed at run time.

    Raises:
        QonnxError: bad input, nothing to fuse, unusable output path.
        LoweringMismatchError: the lowered model's outputs (or, with quantized activations, the float tensors
            their QuantizeLinear read) differ beyond float tolerance, or a quantized activation is gone.
    """
    start = time.perf_counter()
    source = modelfile.resolve_model_path(model)
    ir_model = modelfile.load(source)
    protect = modelfile.model_files(ir_model, source)
    out_path, mirror = outputs.output_paths(output, source, model, protect)
    size = sum(p.stat().st_size for p in protect)
    if attention is None:
        attention = True
    if max_positions is None:
        max_positions = _config_max_positions(Path(source).parent)
    fuse = FuseForOrtPass(target, attention=attention, max_positions=max_positions, merge_linear=merge_linear)
    try:
        fuse(ir_model)
    except ir.passes.PreconditionError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    if not fuse.fused:
        raise QonnxError(f"{source}: nothing to fuse (no RMSNorm, LayerNorm, rotary embedding or attention pattern)")
    found: dict[str, Any] = {}

    def finalize(tmp_model: Path) -> dict[str, str]:
        if verify or (verify is None and size <= VERIFY_MAX_BYTES):
            try:
                found.update(compare_outputs(source, tmp_model))
            except QonnxError:
                raise
            except Exception as e:  # ONNX Runtime refusing the lowered graph is a failed check, not a crash
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise LoweringMismatchError(f"ONNX Runtime cannot run the lowered model: {first}") from None
            bad = _mismatches(found)
            if bad:
                raise LoweringMismatchError(f"the lowered model differs from the input: {bad[0]}; nothing was written")
        record = {"target": target, "fused": fuse.fused, "notes": fuse.notes}
        return {"qonnx.lowered": json.dumps(record, sort_keys=True)}

    written = modelfile.save(ir_model, out_path, protect=protect, external_data=external_data, finalize=finalize)
    if mirror is not None:  # after the model: a failed verification leaves no half-filled folder behind
        outputs.mirror_folder(mirror, out_path.parent)
    notes = list(fuse.notes)
    if found.get("pinned"):
        notes.append(f"verified with the input's rounding: {found['pinned']} quantized activations' codes carried over")
    if found.get("float_matmulnbits"):
        notes.append(f"verified with {found['float_matmulnbits']} MatMulNBits computing on float activations")
    return LowerSummary(
        target=target,
        fused=fuse.fused,
        fusions=fuse.fusions,
        notes=notes,
        nodes_before=fuse.nodes_before,
        nodes_after=fuse.nodes_after,
        outputs=written,
        seconds=time.perf_counter() - start,
        max_abs_diff=found.get("max_abs_diff"),
        top1_agreement=found.get("top1"),
        pinned=found.get("pinned"),
    )

"""Lower a model for ONNX Runtime: load, fuse into contrib ops, check the numbers, save (``qonnx lower``).

The fusions are :class:`qonnx.passes.lower.FuseForOrtPass`. Before the output is written, the input and
the lowered model run on the same inputs in ONNX Runtime (CPU) and must agree within float tolerance: a
prefill of random tokens and, for a model with a KV cache, one decoding step fed with the prefill's
present. Order with quantization: quantize first, then lower (the fusions leave MatMul and MatMulNBits
alone, and a lowered model can still be quantized, but its verification is then of the fused graph).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qonnx import modelfile
from qonnx.errors import ModelLoadError, OutputPathError, QonnxError
from qonnx.passes.lower import FuseForOrtPass
from qonnx.verification import VerificationError

__all__ = ["LowerSummary", "LoweringMismatchError", "lower", "compare_outputs"]

#: Models above this many bytes are not verified unless asked (both would be loaded in ONNX Runtime).
VERIFY_MAX_BYTES = 2 << 30
#: Largest |lowered - input| allowed, relative to the output's largest magnitude (at least 1).
TOLERANCE = {"tensor(float)": 1e-3, "tensor(float16)": 3e-2, "tensor(bfloat16)": 3e-2}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class LoweringMismatchError(VerificationError):
    """The lowered model computes other numbers than its input (CLI exit code 3); nothing was written."""


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dataclasses.asdict(self)
        d["outputs"] = [str(p) for p in self.outputs]
        return d


def _output_path(output: str | os.PathLike, source: Path, source_arg: str | os.PathLike) -> tuple[Path, Path | None]:
    """(.onnx path to write, folder whose other files to copy beside it, if any)."""
    out = Path(output)
    if Path(source_arg).is_dir():
        if out.suffix == ".onnx":
            return out, None
        if out.exists() and out.resolve() == Path(source_arg).resolve():
            raise OutputPathError(f"{out}: output folder is the input folder")
        return out / modelfile.MODEL_FILENAME, Path(source_arg)
    if out.suffix != ".onnx":
        return out / source.name, None
    return out, None


def _mirror(src: Path, dst: Path, skip: set[Path]) -> None:
    """Copy the tokenizer, config and other files beside the model into the output folder."""
    for item in sorted(src.iterdir()):
        if item.resolve() in skip or item.name.startswith(".") or item.suffix in (".onnx", ".data"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def _feeds(session: Any, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Prefill inputs for a causal LM export (random tokens, empty past); None for another kind of model."""
    rng = np.random.default_rng(seed)
    vocab = session.get_outputs()[0].shape[-1]
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, vocab if isinstance(vocab, int) else 100, (1, seq))
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, seq), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(seq, dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values.") and inp.type in _NP and len(inp.shape) == 4:
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), _NP[inp.type])
        else:
            return None
    return feeds


def compare_outputs(reference: str | os.PathLike | bytes, lowered: str | os.PathLike | bytes) -> dict[str, Any]:
    """Run both models on the same inputs (CPU); max |difference| per output, logits' scale and top-1 agreement.

    A causal LM export is run for a 12-token prefill and, with a KV cache, one decoding step on the
    prefill's present; other models on inputs made from their declared shapes.
    """
    from qonnx.runtime.session import make_session
    from qonnx.runtime.verify import make_inputs

    sessions = [make_session(m, "cpu") for m in (reference, lowered)]
    names = [o.name for o in sessions[0].get_outputs()]
    types = {o.name: o.type for o in sessions[0].get_outputs()}
    feeds = _feeds(sessions[0]) or make_inputs(sessions[0])
    steps = [feeds]
    diffs: dict[str, float] = {}
    scale: dict[str, float] = {}
    agree = total = 0
    while steps:
        feed = steps.pop()
        ref, out = (dict(zip(names, s.run(names, feed), strict=True)) for s in sessions)
        for name in names:
            a, b = ref[name].astype(np.float64), out[name].astype(np.float64)
            if a.shape != b.shape:
                raise LoweringMismatchError(f"output {name} has shape {b.shape} after lowering, {a.shape} before")
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(a - b).max()) if a.size else 0.0)
            scale[name] = max(scale.get(name, 0.0), float(np.abs(a).max()) if a.size else 0.0)
        if "logits" in ref:
            agree += int((ref["logits"].argmax(-1) == out["logits"].argmax(-1)).sum())
            total += ref["logits"][..., 0].size
        past = [n for n in feed if n.startswith("past_key_values.")]
        if past and feed[past[0]].shape[2] == 0:  # one decoding step on the prefill's present
            seq = feed["input_ids"].shape[1]
            step = {"input_ids": ref["logits"][:, -1:].argmax(-1).astype(np.int64)}
            if "attention_mask" in feed:
                step["attention_mask"] = np.ones((1, seq + 1), np.int64)
            if "position_ids" in feed:
                step["position_ids"] = np.full((1, 1), seq, np.int64)
            step.update({n: ref[n.replace("past_key_values.", "present.")] for n in past})
            steps.append(step)
    return {"max_abs_diff": diffs, "scale": scale, "types": types, "top1": agree / total if total else None}


def _config_max_positions(folder: Path) -> int | None:
    """``max_position_embeddings`` from the Hugging Face config.json in ``folder`` (None: absent or unreadable)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
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
) -> LowerSummary:
    """Fuse ``model`` into ONNX Runtime contrib ops for ``target`` and write it to ``output``.

    Args:
        model: a .onnx file or a folder holding model.onnx (an export, quantized or not).
        output: a .onnx path or a folder (a folder input is mirrored there: tokenizer and config files).
        target: "cpu" or "cuda", the execution provider the model is for.
        attention: fuse attention too (False: RMSNorm and rotary embedding only). Default: on for the CPU, off
            for CUDA. For CUDA attention is only ever fused into GroupQueryAttention (float16/bfloat16, causal
            mask); measured on an H100 with ONNX Runtime 1.31 (1.1B Llama shape, benchmarks/RESULTS.md): it
            makes a 128-token prompt 2.5x faster (9.4 -> 3.8 ms) but a decode step 4x slower (12.1 -> 49.6 ms;
            2.35 ms per GroupQueryAttention call with past and present as separate buffers, whichever of its
            flash / memory-efficient / unfused kernels runs), and MultiHeadAttention was 10x slower at decode.
        verify: compare the lowered model with the input before writing (default: up to 2 GiB of files).
        external_data: see :func:`qonnx.modelfile.save`.
        max_positions: size of the constant rotary cos/sin cache (positions 0 .. max_positions - 1); default:
            ``max_position_embeddings`` from the config.json beside the model, else computed at run time.

    Raises:
        QonnxError: bad input, nothing to fuse, unusable output path.
        LoweringMismatchError: the lowered model's outputs differ beyond float tolerance.
    """
    start = time.perf_counter()
    source = modelfile.resolve_model_path(model)
    ir_model = modelfile.load(source)
    protect = modelfile.model_files(ir_model, source)
    out_path, mirror = _output_path(output, source, model)
    size = sum(p.stat().st_size for p in protect)
    if attention is None:
        attention = target != "cuda"
    if max_positions is None:
        max_positions = _config_max_positions(Path(source).parent)
    fuse = FuseForOrtPass(target, attention=attention, max_positions=max_positions)
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
            bad = [
                f"{n}: max |difference| {d:.3g} (largest |value| {found['scale'][n]:.3g})"
                for n, d in found["max_abs_diff"].items()
                if not d <= TOLERANCE.get(found["types"][n], 1e-3) * max(1.0, found["scale"][n])
            ]
            if bad:
                raise LoweringMismatchError(f"the lowered model differs from the input: {bad[0]}; nothing was written")
        record = {"target": target, "fused": fuse.fused, "notes": fuse.notes}
        return {"qonnx.lowered": json.dumps(record, sort_keys=True)}

    outputs = modelfile.save(ir_model, out_path, protect=protect, external_data=external_data, finalize=finalize)
    if mirror is not None:  # after the model: a failed verification leaves no half-filled folder behind
        _mirror(mirror, out_path.parent, set(protect))
    return LowerSummary(
        target=target,
        fused=fuse.fused,
        fusions=fuse.fusions,
        notes=fuse.notes,
        nodes_before=fuse.nodes_before,
        nodes_after=fuse.nodes_after,
        outputs=outputs,
        seconds=time.perf_counter() - start,
        max_abs_diff=found.get("max_abs_diff"),
        top1_agreement=found.get("top1"),
    )

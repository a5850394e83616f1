"""Lower a model for ONNX Runtime: load, fuse into contrib ops, check the numbers, save (``qonnx lower``).

The fusions are :class:`qonnx.passes.lower.FuseForOrtPass`. Before the output is written, the input and
the lowered model run on the same inputs in ONNX Runtime (CPU) and must agree within float tolerance: a
prefill of random tokens and, for a model with a KV cache, one decoding step fed with the prefill's
present. Order with quantization: quantize first, then lower (the fusions leave MatMul and MatMulNBits
alone, and a lowered model can still be quantized, but its verification is then of the fused graph).

A model with quantized activations is compared with its rounding pinned (:func:`compare_outputs`): a fused
RMSNorm sums in another order, so a few activations land on the other side of a QuantizeLinear rounding
boundary, and in a deep model those flipped codes grow layer by layer (SmolLM2-135M W8A8: logits 2.8 apart,
top-1 agreement 75% on 12 random tokens; ONNX Runtime's own graph optimizations move the unlowered model as
far). So the lowered model takes each quantized activation's codes from the input model's run, and what is
checked is that the float tensor each QuantizeLinear reads and every output still agree within float
tolerance: a fusion that changes a value, or takes a quantize/dequantize pair into a fused op, is refused.
MatMulNBits that quantize their activations inside the kernel (accuracy level 4, the dynamic scheme) cannot be
pinned from outside: for the check they compute on float activations in both models.
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
import onnx
import onnx_ir as ir

from qonnx.core import modelfile
from qonnx.core.errors import ModelLoadError, OutputPathError, QonnxError
from qonnx.passes.lower import FuseForOrtPass
from qonnx.pipeline.verification import VerificationError

__all__ = ["LowerSummary", "LoweringMismatchError", "lower", "compare_outputs"]

#: Models above this many bytes are not verified unless asked (both would be loaded in ONNX Runtime).
VERIFY_MAX_BYTES = 2 << 30
#: Largest |lowered - input| allowed, relative to the output's largest magnitude (at least 1; for the float
#: input of a pinned QuantizeLinear, relative to its own largest magnitude).
TOLERANCE = {"tensor(float)": 1e-3, "tensor(float16)": 3e-2, "tensor(bfloat16)": 3e-2}
#: Nodes that round an activation to a grid (int8, float8 codes): the lowered model takes their outputs from
#: the input model's run when the two are compared (see :func:`compare_outputs`).
ROUNDING_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")
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
    pinned: int | None = None  # quantized activations whose rounding the check took from the input model

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


def _proto(model: str | os.PathLike | bytes) -> tuple[onnx.ModelProto, Path | None]:
    """The model's graph without its external weights, and the folder their paths are relative to."""
    if isinstance(model, bytes):
        return onnx.load_from_string(model), None
    path = modelfile.resolve_model_path(model)
    return onnx.load(os.fspath(path), load_external_data=False), path.parent


def _float_matmulnbits(model: onnx.ModelProto) -> int:
    """Set every MatMulNBits to accuracy level 0 (float activations); returns the nodes changed.

    Level 4 (the dynamic scheme) quantizes the activations to int8 inside the kernel: a rounding that cannot be
    pinned from outside, and the lowering leaves these nodes as they are.
    """
    changed = 0
    for node in model.graph.node:
        for attr in node.attribute if node.op_type == "MatMulNBits" else ():
            if attr.name == "accuracy_level" and attr.i != 0:
                attr.i, changed = 0, changed + 1
    return changed


@dataclasses.dataclass
class _Pin:
    """One rounding node of the reference: the outputs the lowered model is fed, the float tensor it reads."""

    label: str
    outputs: list[str]
    ref_input: str
    low_input: str | None  # None: a graph input or constant there


@dataclasses.dataclass
class _Pinned:
    """Sessions of both models in which the lowered one takes its rounded activations from the reference's run."""

    sessions: list[Any]
    outputs: list[str]  # the reference's own outputs
    pins: list[_Pin]
    float_matmulnbits: int  # MatMulNBits nodes set to float activations, in both models


def _pinned_sessions(reference: str | os.PathLike | bytes, lowered: str | os.PathLike | bytes) -> _Pinned | None:
    """Both models ready to compare with the reference's rounding; None when neither rounds activations.

    The reference also outputs the codes and float inputs of its activation QuantizeLinear
    (DynamicQuantizeLinear) nodes; in the lowered model those nodes become graph inputs. Both run MatMulNBits
    with float activations.
    """
    from qonnx.runtime.session import make_session

    ref, ref_dir = _proto(reference)
    low, low_dir = _proto(lowered)
    names = [o.name for o in ref.graph.output]
    fixed = {v.name for v in ref.graph.input} | {t.name for t in ref.graph.initializer}
    fixed |= {o for n in ref.graph.node if n.op_type == "Constant" for o in n.output}
    low_fixed = {v.name for v in low.graph.input} | {t.name for t in low.graph.initializer}
    nodes = [n for n in ref.graph.node if n.op_type in ROUNDING_OPS and n.input[0] not in fixed]
    nodes = [n for n in nodes if not set(names).intersection(n.output)]
    float_matmulnbits = _float_matmulnbits(ref)
    if not float_matmulnbits + _float_matmulnbits(low) and not nodes:
        return None
    twins = {n.output[0]: n for n in low.graph.node if n.op_type in ROUNDING_OPS}
    pins = []
    for node in nodes:
        twin = twins.get(node.output[0])
        if twin is None or list(twin.output) != list(node.output):
            raise LoweringMismatchError(
                f"the lowered model lost {node.op_type} {node.name or node.output[0]!r}: a fusion took in a "
                "quantized activation, which it computes without rounding; nothing was written"
            )
        low.graph.node.remove(twin)
        label = f"{node.input[0]} (read by {node.op_type} {node.name or node.output[0]!r})"
        low_input = twin.input[0] if twin.input[0] not in low_fixed else None
        pins.append(_Pin(label, list(node.output), node.input[0], low_input))
    ref_wanted = [n for p in pins for n in (*p.outputs, p.ref_input)]
    for graph, wanted in ((ref.graph, ref_wanted), (low.graph, [p.low_input for p in pins])):
        have = {o.name for o in graph.output}
        for name in wanted:
            if name is not None and name not in have:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                have.add(name)
    ref_session = make_session(ref.SerializeToString(), "cpu", external_data_dir=ref_dir)
    types = {o.name: o.type for o in ref_session.get_outputs()}
    for name in (n for p in pins for n in p.outputs):
        low.graph.input.append(onnx.helper.make_tensor_value_info(name, _elem(types[name]), None))
    low_session = make_session(low.SerializeToString(), "cpu", external_data_dir=low_dir)
    return _Pinned([ref_session, low_session], names, pins, float_matmulnbits)


def _elem(type_string: str) -> int:
    """The ONNX element type of an ONNX Runtime type string ("tensor(float8e4m3fn)")."""
    return onnx.TensorProto.DataType.Value(type_string.removeprefix("tensor(").removesuffix(")").upper())


def compare_outputs(
    reference: str | os.PathLike | bytes, lowered: str | os.PathLike | bytes, *, pin_rounding: bool = True
) -> dict[str, Any]:
    """Run both models on the same inputs (CPU); max |difference| per output, logits' scale and top-1 agreement.

    A causal LM export is run for a 12-token prefill and, with a KV cache, one decoding step on the
    prefill's present; other models on inputs made from their declared shapes. With ``pin_rounding`` the
    lowered model takes the codes of each quantized activation from the reference's run (see the module
    docstring): ``pinned`` counts those nodes, ``pinned_diff`` / ``pinned_scale`` give the max |difference| and
    largest |value| of the float tensor each reads. MatMulNBits then run with float activations in both
    (``float_matmulnbits`` counts those that had another accuracy level).

    Raises:
        LoweringMismatchError: an output changed shape, or a quantized activation is gone from the lowered model.
    """
    import onnxruntime as ort

    from qonnx.runtime.session import make_session
    from qonnx.runtime.verify import make_inputs

    prepared = _pinned_sessions(reference, lowered) if pin_rounding else None
    if prepared is None:
        sessions = [make_session(m, "cpu") for m in (reference, lowered)]
        prepared = _Pinned(sessions, [o.name for o in sessions[0].get_outputs()], [], 0)
    sessions, names, pins = prepared.sessions, prepared.outputs, prepared.pins
    types = {o.name: o.type for o in sessions[0].get_outputs()}
    ref_names, low_names = ([o.name for o in s.get_outputs()] for s in sessions)
    pinned_outputs = [n for p in pins for n in p.outputs]
    feeds = _feeds(sessions[0]) or make_inputs(sessions[0])
    steps = [feeds]
    diffs: dict[str, float] = {}
    scale: dict[str, float] = {}
    pinned_diff: dict[str, float] = {}
    pinned_scale: dict[str, float] = {}
    agree = total = 0

    def compare(name: str, a: np.ndarray, b: np.ndarray, into: dict[str, float], largest: dict[str, float]) -> None:
        if a.shape != b.shape:
            raise LoweringMismatchError(f"{name} has shape {b.shape} after lowering, {a.shape} before")
        a, b = a.astype(np.float64), b.astype(np.float64)
        into[name] = max(into.get(name, 0.0), float(np.abs(a - b).max()) if a.size else 0.0)
        largest[name] = max(largest.get(name, 0.0), float(np.abs(a).max()) if a.size else 0.0)

    while steps:
        feed = steps.pop()
        ref = dict(zip(ref_names, sessions[0].run(ref_names, feed), strict=True))
        carried = {n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(ref[n], _elem(types[n])) for n in pinned_outputs}
        out = dict(zip(low_names, sessions[1].run(low_names, {**feed, **carried}), strict=True))
        for name in names:
            compare(name, ref[name], out[name], diffs, scale)
        for pin in pins:
            if pin.low_input is not None:
                compare(pin.label, ref[pin.ref_input], out[pin.low_input], pinned_diff, pinned_scale)
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
    return {
        "max_abs_diff": diffs,
        "scale": scale,
        "types": {n: types[n] for n in names},
        "top1": agree / total if total else None,
        "pinned": len(pins),
        "float_matmulnbits": prepared.float_matmulnbits,
        "pinned_diff": pinned_diff,
        "pinned_scale": pinned_scale,
        "pinned_types": {p.label: types[p.ref_input] for p in pins if p.ref_input in types},
    }


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
    from qonnx.runtime.evaluate import model_config

    value = model_config(folder).get("max_position_embeddings")
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
    out_path, mirror = _output_path(output, source, model)
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

    outputs = modelfile.save(ir_model, out_path, protect=protect, external_data=external_data, finalize=finalize)
    if mirror is not None:  # after the model: a failed verification leaves no half-filled folder behind
        _mirror(mirror, out_path.parent, set(protect))
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
        outputs=outputs,
        seconds=time.perf_counter() - start,
        max_abs_diff=found.get("max_abs_diff"),
        top1_agreement=found.get("top1"),
        pinned=found.get("pinned"),
    )

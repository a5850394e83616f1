"""Check a lowered model against its input: both run in ONNX Runtime (CPU) on the same inputs.

A causal LM export is run for a prefill of random tokens and, with a KV cache, one decoding step fed with the
prefill's present; other models on inputs made from their declared shapes (:mod:`qonnx.runtime.inputs`).

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
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qonnx.core import modelfile
from qonnx.pipeline.verification import VerificationError
from qonnx.runtime.inputs import make_inputs
from qonnx.runtime.session import make_session

__all__ = ["ROUNDING_OPS", "LoweringMismatchError", "compare_outputs"]

#: Nodes that round an activation to a grid (int8, float8 codes): the lowered model takes their outputs from
#: the input model's run when the two are compared (see :func:`compare_outputs`).
ROUNDING_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class LoweringMismatchError(VerificationError):
    """The lowered model computes other numbers than its input (CLI exit code 3); nothing was written."""


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

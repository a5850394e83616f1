"""qonnx.pipeline.lowering: quantized models lowered with their rounding pinned, checked against the input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest


def _count(path, op):
    return sum(1 for n in ir.load(path).graph if n.op_type == op)


def test_w8a8_lowers_checked_with_its_rounding_pinned(llama_w8a8, tmp_path):
    from qonnx.pipeline.lowering import lower

    summary = lower(llama_w8a8, tmp_path / "low.onnx")
    assert summary.fused["GroupQueryAttention"] == 2 and summary.fused["SkipSimplifiedLayerNormalization"] == 4
    quantized = _count(llama_w8a8, "QuantizeLinear")
    assert summary.pinned == quantized == _count(tmp_path / "low.onnx", "QuantizeLinear") > 0
    assert summary.max_abs_diff["logits"] < 1e-4 and summary.top1_agreement == 1.0
    assert any("codes carried over" in note for note in summary.notes)


def _nudged(path, out, ops, eps=1e-4):
    """``path`` with the float input of every ``ops`` node scaled by 1 + eps: float-order noise, within tolerance."""
    model = ir.load(path)
    for node in [n for n in model.graph if n.op_type in ops]:
        x = node.inputs[0]
        factor = ir.val(f"{node.name}_nudge", const_value=ir.tensor(np.array(1 + eps, np.float32)))
        model.graph.register_initializer(factor)
        mul = ir.node("Mul", [x, factor])
        mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
        model.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
    ir.save(model, out)
    return out


@pytest.mark.parametrize("scheme", ["w8a8", "dynamic"])
def test_rounding_flips_are_not_a_mismatch(llama, llama_w8a8, tmp_path, scheme):
    """Activations 1e-4 off land on other int8 codes, and the outputs move by more than float tolerance; with the
    input's rounding pinned (QuantizeLinear codes carried over, MatMulNBits on float activations) they agree."""
    import qonnx
    from qonnx.pipeline.lowering import _mismatches, compare_outputs

    if scheme == "w8a8":
        path, ops = llama_w8a8, ("QuantizeLinear",)
    else:  # MatMulNBits quantizing its activations to int8 inside the kernel (accuracy level 4)
        path, ops = (
            qonnx.quantize(llama, qonnx.Dynamic(), output=tmp_path / "dyn.onnx", verify=False).outputs[0],
            ("MatMulNBits",),
        )
    nudged = _nudged(path, tmp_path / "nudged.onnx", ops)
    free = compare_outputs(path, nudged, pin_rounding=False)
    assert _mismatches(free) and _mismatches(free)[0].startswith("logits")
    pinned = compare_outputs(path, nudged)
    assert not _mismatches(pinned), _mismatches(pinned)
    assert pinned["pinned"] == (_count(path, "QuantizeLinear") if scheme == "w8a8" else 0)
    assert pinned["float_matmulnbits"] == (0 if scheme == "w8a8" else _count(path, "MatMulNBits"))

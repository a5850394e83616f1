"""Converting between QDQ and MatMulNBits is exact; the opset upgrade pass."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
from helpers import run

import qonnx
from qonnx.passes import DequantizeToMatMulNBitsPass, MatMulNBitsToDequantizePass, UpgradeOpsetPass


@pytest.mark.parametrize(
    "cfg", [qonnx.W4A16(block_size=32, format="qdq"), qonnx.W8A16(block_size=16, format="qdq", symmetric=True)]
)
def test_convert_between_forms_is_exact(tmp_path, tiny_model, tiny_input, cfg):
    s = qonnx.quantize(tiny_model, cfg)
    model = s.model
    qdq_path = tmp_path / "qdq.onnx"
    qonnx.save(model, qdq_path)
    y_qdq = run(qdq_path, tiny_input)[0]
    DequantizeToMatMulNBitsPass()(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    assert {n.op_type for n in model.graph} >= {"MatMulNBits"} and "DequantizeLinear" not in {
        n.op_type for n in model.graph
    }
    qonnx.save(model, tmp_path / "nbits.onnx")
    y_nbits = run(tmp_path / "nbits.onnx", tiny_input)[0]
    np.testing.assert_allclose(y_nbits, y_qdq, rtol=1e-4, atol=1e-4 * np.abs(y_qdq).max())
    back = copy.deepcopy(ir.serde.serialize_model(model))
    back_model = ir.serde.deserialize_model(back)
    MatMulNBitsToDequantizePass()(back_model)
    RemoveUnusedNodesPass()(back_model)
    assert "MatMulNBits" not in {n.op_type for n in back_model.graph}
    qonnx.save(back_model, tmp_path / "back.onnx")
    np.testing.assert_allclose(
        run(tmp_path / "back.onnx", tiny_input)[0], y_qdq, rtol=1e-4, atol=1e-4 * np.abs(y_qdq).max()
    )


def test_opset_upgrade(tmp_path, tiny_model):
    model = qonnx.load(tiny_model)
    assert model.opset_imports[""] == 17
    UpgradeOpsetPass(21)(model)
    assert model.opset_imports[""] == 21

"""Graph passes on onnx_ir models (installed as ``qonnx.passes``)."""

from __future__ import annotations

from qonnx.passes.cleanup import RemoveUnusedInitializersPass
from qonnx.passes.convert import DequantizeToMatMulNBitsPass, MatMulNBitsToDequantizePass
from qonnx.passes.opset import UpgradeOpsetPass
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.passes.weight_plan import LayerRecord, needed_opset
from qonnx.passes.weights import WeightCandidate, find_weight_candidates

__all__ = [
    "DequantizeToMatMulNBitsPass",
    "LayerRecord",
    "MatMulNBitsToDequantizePass",
    "QuantizeWeightsPass",
    "RemoveUnusedInitializersPass",
    "UpgradeOpsetPass",
    "WeightCandidate",
    "find_weight_candidates",
    "needed_opset",
]

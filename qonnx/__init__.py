"""qonnx: quantize ONNX models into smaller, faster ONNX models that run well on ONNX Runtime.

Example::

    import qonnx
    summary = qonnx.quantize("model.onnx", qonnx.W4A16(block_size=128), output="model-w4.onnx")
"""

from __future__ import annotations

from qonnx.analysis import LayerSensitivity, Sensitivity, analyze
from qonnx.api import QuantizeSummary, quantize
from qonnx.config import AWQ, GPTQ, HQQ, W4A16, W8A16, SchemeConfig, Targets, WeightOnlyConfig
from qonnx.config_activations import FP8, W4A8, W8A8, ActivationConfig, Calibration, Dynamic
from qonnx.errors import ConfigError, ModelLoadError, NothingToQuantizeError, OutputPathError, QonnxError
from qonnx.mixed_precision import Budget, MixedPrecision, mixed_precision
from qonnx.modelfile import load, save

__version__ = "0.1.0"

__all__ = [
    "FP8",
    "AWQ",
    "GPTQ",
    "HQQ",
    "LayerSensitivity",
    "MixedPrecision",
    "Sensitivity",
    "W4A8",
    "W8A8",
    "ActivationConfig",
    "Budget",
    "Calibration",
    "Dynamic",
    "SchemeConfig",
    "W4A16",
    "W8A16",
    "ConfigError",
    "ModelLoadError",
    "NothingToQuantizeError",
    "OutputPathError",
    "QonnxError",
    "QuantizeSummary",
    "Targets",
    "WeightOnlyConfig",
    "__version__",
    "analyze",
    "load",
    "mixed_precision",
    "quantize",
    "save",
]

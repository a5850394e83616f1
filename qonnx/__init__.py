"""qonnx: quantize ONNX models into smaller, faster ONNX models that run well on ONNX Runtime.

Example::

    import qonnx
    summary = qonnx.quantize("model.onnx", qonnx.W4A16(block_size=128), output="model-w4.onnx")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qonnx.core.algos import AWQ, GPTQ, HQQ
from qonnx.core.config import FP4, NF4, W2A16, W3A16, W4A16, W8A16, SchemeConfig, WeightOnlyConfig
from qonnx.core.config_activations import FP8, W4A8, W8A8, ActivationConfig, Calibration, Dynamic
from qonnx.core.errors import ConfigError, ModelLoadError, NothingToQuantizeError, OutputPathError, QonnxError
from qonnx.core.schemes import Targets

if TYPE_CHECKING:
    from qonnx.core.modelfile import load, save
    from qonnx.pipeline.analysis import LayerSensitivity, Sensitivity, analyze
    from qonnx.pipeline.mixed_precision import Budget, MixedPrecision, mixed_precision
    from qonnx.pipeline.quantize import QuantizeSummary, quantize

from qonnx.core import __version__

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
    "W2A16",
    "W3A16",
    "W4A16",
    "W8A16",
    "NF4",
    "FP4",
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


#: Names imported on first use (PEP 562), so that ``qonnx.cli`` starts without loading onnx_ir, onnxscript
#: and the passes: ``qonnx quantize`` starts verifying the original meanwhile.
_LAZY = {
    "LayerSensitivity": "qonnx.pipeline.analysis",
    "Sensitivity": "qonnx.pipeline.analysis",
    "analyze": "qonnx.pipeline.analysis",
    "QuantizeSummary": "qonnx.pipeline.quantize",
    "quantize": "qonnx.pipeline.quantize",
    "Budget": "qonnx.pipeline.mixed_precision",
    "MixedPrecision": "qonnx.pipeline.mixed_precision",
    "mixed_precision": "qonnx.pipeline.mixed_precision",
    "load": "qonnx.core.modelfile",
    "save": "qonnx.core.modelfile",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qonnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

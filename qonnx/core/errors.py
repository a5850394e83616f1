"""Exceptions that qonnx raises for problems a user can fix.

The CLI prints these as one line on stderr and exits with code 2; anything else is a bug in qonnx.
"""

from __future__ import annotations

__all__ = ["QonnxError", "ModelLoadError", "ConfigError", "NothingToQuantizeError", "OutputPathError"]


class QonnxError(Exception):
    """Base class of every error caused by user input (a model, a path, an option)."""


class ModelLoadError(QonnxError):
    """The input is missing, is not ONNX, is truncated, or its external data is unusable."""


class ConfigError(QonnxError, ValueError):
    """A scheme configuration or option is invalid."""


class NothingToQuantizeError(QonnxError):
    """The model has no layer that the chosen scheme can quantize."""


class OutputPathError(QonnxError):
    """The output path is unusable, for example it would overwrite the input."""

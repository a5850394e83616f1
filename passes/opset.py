"""Upgrade the default-domain opset of a model (needed for blocked and int4 DequantizeLinear)."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript import version_converter

__all__ = ["UpgradeOpsetPass", "OpsetConversionError"]


class OpsetConversionError(ValueError):
    """The model's opset could not be converted."""


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Raise the default-domain opset to at least ``version``; a newer opset is left as it is."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Convert with onnxscript's version converter; raise OpsetConversionError with the reason."""
        current = model.opset_imports.get("", 1)
        if current >= self.version:
            return ir.passes.PassResult(model, modified=False)
        log = logging.getLogger(version_converter.__name__)
        level = log.level
        log.setLevel(logging.ERROR)  # it warns when it hands over to the onnx C converter: not news to a user
        try:
            version_converter.convert_version(model, self.version, fallback=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OpsetConversionError(
                f"cannot convert the model from opset {current} to {self.version}: {msg}"
            ) from None
        finally:
            log.setLevel(level)
        if model.opset_imports.get("", 1) < self.version:
            raise OpsetConversionError(f"cannot convert the model from opset {current} to {self.version}")
        return ir.passes.PassResult(model, modified=True)

"""Model recipes: export of PyTorch / Hugging Face models and small models built in code (``qonnx.models``)."""

from __future__ import annotations

from qonnx.models.synthetic import build_decoder_stack

__all__ = ["build_decoder_stack"]

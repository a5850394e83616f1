"""ONNX Runtime side of qonnx: sessions, evaluation and benchmarking (installed as ``qonnx.runtime``)."""

from __future__ import annotations

from qonnx.runtime.session import cuda_usable, make_session, resolve_device

__all__ = ["cuda_usable", "make_session", "resolve_device"]

"""What the causal-LM export (:mod:`qonnx.models.export`) and the encoder export (:mod:`qonnx.models.encoder`) share.

The precisions, the Hugging Face files written beside ``model.onnx``, a quiet logger for the exporter, and the
check after the export: a plain ONNX Runtime CPU session, the largest difference from PyTorch, and its report.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["DTYPES", "cpu_session", "max_diff", "report_export", "save_hf_files"]

#: Export precisions: the name on the command line and the torch dtype name.
DTYPES = {"fp32": "float32", "fp16": "float16"}


def save_hf_files(out_dir: Path, model: Any, tokenizer: Any | None, dtype: str, kv_cache: bool | None) -> None:
    """Write config.json, generation_config.json and the tokenizer files beside model.onnx.

    ``kv_cache`` sets the config's ``use_cache``; None (encoders) leaves it as it is.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF quantization does not apply to the ONNX weights
        delattr(config, "quantization_config")
    if kv_cache is not None:
        config.use_cache = kv_cache
    config.dtype = DTYPES[dtype]
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def report_export(
    path: Path, seconds: float, *, dtype: str, quiet: bool, what: str, check: Any | None, tolerance: float
) -> None:
    """Say how long the export took and, with ``check``, how far ONNX Runtime is from PyTorch.

    A difference above ``tolerance`` (or not finite) prints a warning.
    """
    if check is None:
        if not quiet:
            print(f"qonnx: exported {path} in {seconds:.1f} s", file=sys.stderr)
        return
    diff = check()
    if not quiet:
        print(
            f"qonnx: exported {path} in {seconds:.1f} s; "
            f"max |{what} ONNX Runtime ({dtype}) - PyTorch (fp32)| = {diff:.3g}",
            file=sys.stderr,
        )
    if diff > tolerance or not np.isfinite(diff):
        print(
            f"qonnx: warning: the ONNX {what} differ from PyTorch's by {diff:.3g} "
            f"(more than {tolerance:g} expected for {dtype})",
            file=sys.stderr,
        )


def cpu_session(model_path: str | os.PathLike) -> ort.InferenceSession:
    """A plain CPU session of an exported float model, quiet (the export's own check; no qonnx policies apply)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(model_path), so, providers=["CPUExecutionProvider"])


def max_diff(onnx_logits: np.ndarray, torch_logits: Any) -> float:
    """Max |difference| between an ONNX Runtime output and the PyTorch tensor it should equal (same shape)."""
    a = np.asarray(onnx_logits, dtype=np.float64)
    b = torch_logits.detach().double().numpy()
    if a.shape != b.shape:
        raise RuntimeError(f"ONNX outputs have shape {a.shape}, PyTorch's {b.shape}")
    return float(np.abs(a - b).max())

"""Where a model lies on disk, without importing the IR (cheap enough for the first thing a run does)."""

from __future__ import annotations

import os
from pathlib import Path

from qonnx.core.errors import ModelLoadError, escape_name

__all__ = ["MODEL_FILENAME", "resolve_model_path"]

#: The file name of the model inside a model folder (the layout Hugging Face Optimum uses).
MODEL_FILENAME = "model.onnx"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Return the .onnx file that ``path`` names: the file itself or ``<dir>/model.onnx``."""
    p = Path(path)
    try:
        if p.is_dir():
            candidate = p / MODEL_FILENAME
            if not candidate.is_file():
                raise ModelLoadError(f"{escape_name(p)}: folder holds no {MODEL_FILENAME}")
            return candidate
        if not p.exists():
            raise ModelLoadError(f"{escape_name(p)}: no such file")
        if not p.is_file():
            raise ModelLoadError(f"{escape_name(p)}: not a regular file")
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, a link loop
        raise ModelLoadError(f"{escape_name(p)}: unusable path: {getattr(e, 'strerror', None) or e}") from None
    return p

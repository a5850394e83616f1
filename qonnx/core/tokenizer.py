"""The tokenizer stored beside a model: read from local files only, never code from the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qonnx.core.errors import ModelLoadError

__all__ = ["load_tokenizer", "read_config"]


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The Hugging Face ``config.json`` in ``folder`` as a dict ({} when there is none).

    Raises:
        ModelLoadError: the file is not UTF-8 JSON, or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ModelLoadError(f"{path}: not a readable JSON file: {first}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object, not {type(config).__name__}")
    return config


def load_tokenizer(folder: str | os.PathLike, *, gguf_file: str | None = None, required: bool = True) -> Any:
    """Load the tokenizer stored in ``folder`` (or in its GGUF file).

    Raises:
        ModelLoadError: no tokenizer there and ``required`` is set (otherwise None is returned).
    """
    from transformers import AutoTokenizer  # heavy (about 1 s): only when a tokenizer is needed

    read_config(folder)  # transformers reads it too, and fails on a bad one in ways of its own
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # the folder's files are input: whatever transformers makes of them, the model is unusable
        if not required:
            return None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: no usable tokenizer files there: {first}") from None

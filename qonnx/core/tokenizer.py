"""The tokenizer stored beside a model: read from local files only, never code from the folder."""

from __future__ import annotations

import os
from typing import Any

from qonnx.core.errors import ModelLoadError

__all__ = ["load_tokenizer"]


def load_tokenizer(folder: str | os.PathLike, *, gguf_file: str | None = None, required: bool = True) -> Any:
    """Load the tokenizer stored in ``folder`` (or in its GGUF file).

    Raises:
        ModelLoadError: no tokenizer there and ``required`` is set (otherwise None is returned).
    """
    from transformers import AutoTokenizer  # heavy (about 1 s): only when a tokenizer is needed

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not required:
            return None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: no usable tokenizer files there: {first}") from None

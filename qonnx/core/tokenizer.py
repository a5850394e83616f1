"""The tokenizer stored beside a model: read from local files only, never code from the folder."""

from __future__ import annotations

import os
from typing import Any

from qonnx.core.errors import ModelLoadError

__all__ = ["HF_LOCAL", "load_tokenizer", "refuses_remote_code"]

#: Keyword arguments of every transformers ``from_pretrained`` call: local files only, and never the Python files
#: of a model folder (``auto_map`` in its config.json / tokenizer_config.json). Without ``trust_remote_code=False``
#: transformers asks on stdin whether to run them, and a "y" there runs them.
HF_LOCAL: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def refuses_remote_code(where: str | os.PathLike, e: BaseException) -> ModelLoadError | None:
    """The one-line error for transformers refusing a folder's own code (``auto_map``), else None."""
    if "trust_remote_code" not in str(e):
        return None
    return ModelLoadError(
        f"{where}: loading it needs the Python files of the model folder (auto_map in its config); "
        "qonnx never runs code from a model folder"
    )


def load_tokenizer(folder: str | os.PathLike, *, gguf_file: str | None = None, required: bool = True) -> Any:
    """Load the tokenizer stored in ``folder`` (or in its GGUF file), never running code from the folder.

    A tokenizer_config.json whose ``auto_map`` names the folder's own class loads as the transformers class
    it names in ``tokenizer_class`` when transformers has one; otherwise it is refused.

    Raises:
        ModelLoadError: no tokenizer there and ``required`` is set (otherwise None is returned), or the
            tokenizer needs the folder's own code (also when not ``required``).
    """
    from transformers import AutoTokenizer  # heavy (about 1 s): only when a tokenizer is needed

    kwargs: dict[str, Any] = dict(HF_LOCAL)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        refused = refuses_remote_code(folder, e)
        if refused is not None:
            raise refused from None
        if not required:
            return None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: no usable tokenizer files there: {first}") from None

"""The tokenizer stored beside a model: read from local files only, never code from the folder."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from qonnx.core.errors import ModelLoadError

__all__ = ["HF_LOCAL", "bos_token_id", "load_tokenizer", "read_config", "refuses_remote_code", "tokenizer_bos_token_id"]

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
    """Load the tokenizer stored in ``folder`` (or in its GGUF file), never running code from the folder.

    A tokenizer_config.json whose ``auto_map`` names the folder's own class loads as the transformers class
    it names in ``tokenizer_class`` when transformers has one; otherwise it is refused.

    Raises:
        ModelLoadError: no tokenizer there and ``required`` is set (otherwise None is returned), or the
            tokenizer needs the folder's own code (also when not ``required``).
    """
    from transformers import AutoTokenizer  # heavy (about 1 s): only when a tokenizer is needed

    read_config(folder)  # transformers reads it too, and fails on a bad one in ways of its own
    kwargs: dict[str, Any] = dict(HF_LOCAL)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # the folder's files are input: whatever transformers makes of them, the model is unusable
        refused = refuses_remote_code(folder, e)
        if refused is not None:
            raise refused from None
        if not required:
            return None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: no usable tokenizer files there: {first}") from None


#: A text the tokenizer's special-token rules are read from (what it adds around it).
_PROBE = "Hello world"


def bos_token_id(folder: str | os.PathLike, fast: tokenizers.Tokenizer | None = None) -> int | None:
    """The BOS token id the tokenizer in ``folder`` puts before every text; None when it puts none.

    The model's own setting decides: ``add_bos_token`` in ``tokenizer_config.json`` where it is there (Gemma
    and Llama 2 repositories say true), else what the tokenizer's post-processor puts before a text, when that
    is its ``bos_token`` (Llama 3's ``<|begin_of_text|>``; a GGUF's ``tokenizer.ggml.add_bos_token`` is written
    there on export). SmolLM2 names a BOS but adds none. Read from ``tokenizer.json`` with the ``tokenizers``
    library (no transformers import; ``fast``: that file already loaded), else from the tokenizer transformers
    loads; None without a tokenizer.
    """
    path = Path(folder)
    if fast is not None:
        return _fast_bos(fast, _config(path))
    stamps = tuple(_stamp(path / name) for name in ("tokenizer.json", "tokenizer_config.json"))
    return _bos_token_id(str(path.resolve()), stamps)


def tokenizer_bos_token_id(tokenizer: Any) -> int | None:
    """:func:`bos_token_id` of a loaded transformers tokenizer: the BOS it puts before a text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    with_special = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return bos if bos is not None and _prefix(with_special, plain) == [bos] else None


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def _prefix(with_special: list[int], plain: list[int]) -> list[int] | None:
    """What an encoding with special tokens holds before the plain one (None when it does not hold it)."""
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return None


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json ({} when absent or unreadable)."""
    try:
        loaded = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _fast_bos(fast: tokenizers.Tokenizer, config: dict[str, Any]) -> int | None:
    name = _token_name(config.get("bos_token"))
    bos = fast.token_to_id(name) if name is not None else None
    if bos is None:
        return None
    if isinstance(config.get("add_bos_token"), bool):
        return bos if config["add_bos_token"] else None
    plain = fast.encode(_PROBE, add_special_tokens=False).ids
    return bos if _prefix(fast.encode(_PROBE, add_special_tokens=True).ids, plain) == [bos] else None


@functools.lru_cache(maxsize=16)
def _bos_token_id(folder: str, stamps: tuple) -> int | None:
    config = _config(Path(folder))
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        try:
            fast = tokenizers.Tokenizer.from_file(str(path))
        except Exception:  # not a tokenizers file after all: transformers says why, or copes
            fast = None
        if fast is not None:
            return _fast_bos(fast, config)
    tokenizer = load_tokenizer(folder, required=False)
    if tokenizer is None:
        return None
    if isinstance(config.get("add_bos_token"), bool):
        return tokenizer.bos_token_id if config["add_bos_token"] else None
    return tokenizer_bos_token_id(tokenizer)

"""Text for evaluation and calibration: the standard pydoc corpus or a user's file, tokenized once.

The standard corpus is the Python documentation topics that ship with CPython
(``pydoc_data.topics.topics``), joined with blank lines in sorted key order: about 465,000 characters,
available offline on every machine, and the same text everywhere. The whole text is tokenized in one call
(no special tokens added), and every window is a slice of that one token stream:

* evaluation windows: the first N non-overlapping windows of L tokens, from token 0;
* calibration windows: from token :data:`CALIBRATION_START` on, so they never overlap the evaluation
  windows of the standard protocol (24 x 512 tokens).

A model whose tokenizer puts a BOS token before every text (:func:`qonnx.core.tokenizer.bos_token_id`) gets one
before each window (:func:`with_bos`): it reads L + 1 tokens, as it reads any text.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
import zlib
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import numpy as np
import tokenizers

from qonnx.core.errors import ConfigError, ModelLoadError
from qonnx.core.tokenizer import load_tokenizer

__all__ = [
    "PYDOC",
    "CALIBRATION_START",
    "pydoc_text",
    "read_text",
    "tokenize",
    "corpus_tokens",
    "evaluation_windows",
    "calibration_windows",
    "with_bos",
    "npz_batch",
    "npz_batches",
]

#: The name of the standard corpus.
PYDOC = "pydoc"
#: The first token of the calibration windows in a token stream.
CALIBRATION_START = 60_000


def pydoc_text() -> str:
    """The standard corpus: every pydoc topic, in sorted key order, joined with blank lines."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(data: str | os.PathLike) -> str:
    """The text of ``data``: ``"pydoc"``, a ``.txt`` file, or a ``.jsonl`` file with a "text" field per line.

    The texts of a ``.jsonl`` file are joined with blank lines, as the pydoc topics are.

    Raises:
        ConfigError: the file is missing, has another extension, or a line lacks a string "text" field.
    """
    if str(data) == PYDOC:
        return pydoc_text()
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (data is 'pydoc', a .txt file or a .jsonl file)")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".txt":
        text = raw
    elif suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{number}: each line must be a JSON object with a string 'text' field")
            texts.append(record["text"])
        text = "\n\n".join(texts)
    else:
        raise ConfigError(f"{path}: data files must end in .txt or .jsonl")
    if not text.strip():
        raise ConfigError(f"{path}: holds no text")
    return text


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids of ``text`` as one int64 stream, with no special tokens (no BOS) added."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _data_key(data: str | os.PathLike) -> tuple[str, int, int]:
    """A cache key that changes when a data file changes."""
    if str(data) == PYDOC:
        return (PYDOC, 0, 0)
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (data is 'pydoc', a .txt file or a .jsonl file)")
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def corpus_tokens(model_dir: str | os.PathLike, data: str | os.PathLike = PYDOC, *, lean: bool = False) -> np.ndarray:
    """Tokenize ``data`` once with the tokenizer stored in ``model_dir``; repeated calls reuse the result.

    Args:
        model_dir: a model folder holding tokenizer files (an exported ONNX folder), or a file in one.
        data: ``"pydoc"``, a ``.txt`` file or a ``.jsonl`` file.
        lean: for calibration: read ``tokenizer.json`` with the ``tokenizers`` library alone when it is there,
            without transformers (which imports torch: ~300 MB and ~3 s). Same ids as transformers' fast
            tokenizer on SmolLM2 (113,108 tokens of pydoc, checked); evaluation keeps transformers' tokenizer,
            the reference of the standard protocol.

    Raises:
        ModelLoadError: the folder holds no usable tokenizer.
        ConfigError: the data cannot be read.
    """
    folder = Path(model_dir)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder")
    return _cached_tokens(str(folder.resolve()), _data_key(data), os.fspath(data), lean)


@functools.lru_cache(maxsize=4)
def _cached_tokens(folder: str, key: tuple[str, int, int], data: str, lean: bool = False) -> np.ndarray:

    if lean and (Path(folder) / "tokenizer.json").is_file():
        try:
            fast = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        except Exception:  # not a tokenizers file after all: the full loader says why, or copes
            fast = None
        if fast is not None:
            ids = fast.encode(read_text(data), add_special_tokens=False).ids
            tokens = np.asarray(ids, dtype=np.int64)
            tokens.flags.writeable = False
            return tokens
    tokens = tokenize(read_text(data), load_tokenizer(folder))
    tokens.flags.writeable = False  # shared between callers
    return tokens


def _windows(tokens: np.ndarray, seq_len: int, count: int | None, start: int, what: str) -> np.ndarray:
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, not {seq_len}")
    if count is not None and count < 1:
        raise ConfigError(f"the number of {what} windows must be at least 1, not {count}")
    available = max(len(tokens) - start, 0) // seq_len
    if count is None:
        count = available
    if count == 0 or count > available:
        raise ConfigError(
            f"the corpus has {len(tokens)} tokens: {available} {what} windows of {seq_len} tokens fit "
            f"from token {start}, {count or 1} asked for; use fewer or shorter windows, or more text"
        )
    return np.asarray(tokens[start : start + count * seq_len]).reshape(count, seq_len)


def evaluation_windows(tokens: np.ndarray, seq_len: int, count: int | None) -> np.ndarray:
    """The first ``count`` non-overlapping windows of ``seq_len`` tokens, from token 0: [count, seq_len].

    ``count=None`` takes every whole window.

    Raises:
        ConfigError: fewer tokens than ``count * seq_len``.
    """
    return _windows(tokens, seq_len, count, 0, "evaluation")


def calibration_windows(
    tokens: np.ndarray, seq_len: int, count: int | None, *, start: int = CALIBRATION_START
) -> np.ndarray:
    """``count`` non-overlapping windows of ``seq_len`` tokens from token ``start``: [count, seq_len].

    Raises:
        ConfigError: the corpus is too short for them.
    """
    return _windows(tokens, seq_len, count, start, "calibration")


def with_bos(windows: np.ndarray, bos: int | None) -> np.ndarray:
    """``windows`` [N, L] with the token ``bos`` before each: [N, L + 1]; as they are when ``bos`` is None."""
    if bos is None:
        return windows
    return np.concatenate([np.full((len(windows), 1), bos, dtype=np.int64), windows], axis=1)


def npz_batches(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int]:
    """The arrays of a ``.npz`` file of feeds and how many batches they hold.

    The arrays are named after a model's inputs, their first axis indexing batches; a 0-d array is one value
    for every batch (a sample rate, say). Take batch i with :func:`npz_batch`.

    Raises:
        ConfigError: the file cannot be read (not a zip, truncated, a member that is not an array), holds no
            arrays, or its arrays disagree on the batch count.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive's first bytes (an empty one's)
                raise ConfigError(f"{path}: not a .npz file (a zip archive of named arrays, as numpy.savez writes)")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ConfigError(f"{path}: not a readable .npz file (numpy.savez): {first}") from None
    if not arrays:
        raise ConfigError(f"{path}: holds no arrays")
    odd = sorted(k for k, a in arrays.items() if not isinstance(a, np.ndarray))
    if odd:
        raise ConfigError(f"{path}: members {', '.join(odd)} are not .npy arrays; write the file with numpy.savez")
    lengths = {k: a.shape[0] for k, a in arrays.items() if a.ndim}
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise ConfigError(
            f"{path}: every array must have the same first axis (one entry per calibration batch; a 0-d array "
            f"is one value for all), got {lengths}"
        )
    return arrays, next(iter(lengths.values()), 1)


def npz_batch(arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Batch ``index`` of :func:`npz_batches`' arrays: arrays throughout (a scalar input's value a 0-d array)."""
    return {k: np.asarray(a[index]) if a.ndim else a for k, a in arrays.items()}

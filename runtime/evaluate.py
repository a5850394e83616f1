"""Perplexity of an exported causal LM with ONNX Runtime, by a fixed and simple protocol.

Each of the first N non-overlapping windows of L tokens (see :mod:`qonnx.runtime.data`) is one batch of
one sequence: ``input_ids`` [1, L], ``attention_mask`` all ones, ``position_ids`` 0..L-1, and an empty past
([1, kv_heads, 0, head_dim]) when the graph has past inputs. Every token but the first of a window is
scored from the logits at the position before it; perplexity is exp(mean negative log-likelihood) over
all scored tokens of all windows. :func:`perplexity_torch` applies the same protocol to a PyTorch model.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qonnx.errors import ConfigError, ModelLoadError
from qonnx.modelfile import resolve_model_path
from qonnx.runtime.data import PYDOC, corpus_tokens, evaluation_windows
from qonnx.runtime.session import make_session, resolve_device

__all__ = ["token_nlls", "perplexity", "perplexity_torch"]

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def token_nlls(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` given ``logits[:-1]`` ([L, vocab] and [L]): shape [L-1]."""
    x = np.asarray(logits[:-1], dtype=np.float32)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    target = x[np.arange(len(x)), np.asarray(ids[1:])]
    return (lse - target).astype(np.float64)


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_seq_len(config: dict[str, Any], seq_len: int, where: Path) -> None:
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"seq_len {seq_len} exceeds the {limit} positions the model in {where} supports")


def _feed_builder(session: Any, where: Path) -> tuple[Any, str]:
    """A function mapping window ids [L] to the session's feed, and the name of the logits output."""
    static: dict[str, np.ndarray] = {}
    names = []
    for inp in session.get_inputs():
        names.append(inp.name)
        if inp.name.startswith("past_key_values."):
            heads, dim = inp.shape[1], inp.shape[3]
            if not isinstance(heads, int) or not isinstance(dim, int):
                raise ModelLoadError(f"{where}: input {inp.name} has no fixed head count and size: {inp.shape}")
            if inp.type not in _NUMPY_TYPES:
                raise ModelLoadError(f"{where}: input {inp.name} has unsupported type {inp.type}")
            static[inp.name] = np.zeros((1, heads, 0, dim), dtype=_NUMPY_TYPES[inp.type])
        elif inp.name not in ("input_ids", "attention_mask", "position_ids"):
            raise ModelLoadError(f"{where}: input {inp.name} is not one a causal LM export has; cannot evaluate")
    if "input_ids" not in names:
        raise ModelLoadError(f"{where}: the model has no input_ids input; not a causal LM export")
    outputs = [o.name for o in session.get_outputs()]
    logits = "logits" if "logits" in outputs else outputs[0]

    def feed(ids: np.ndarray) -> dict[str, np.ndarray]:
        length = len(ids)
        values = {
            "input_ids": ids[None].astype(np.int64),
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None],
            **static,
        }
        return {n: values[n] for n in names}

    return feed, logits


def perplexity(
    model_dir: str | os.PathLike,
    *,
    data: str | os.PathLike = PYDOC,
    seq_len: int = 512,
    windows: int | None = 24,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Perplexity of an exported causal LM on ``data`` with ONNX Runtime.

    Args:
        model_dir: an exported ONNX folder (model.onnx with its tokenizer files), or its model.onnx.
        data: ``"pydoc"`` (the standard corpus), a ``.txt`` file, or a ``.jsonl`` file with "text" fields.
        seq_len: tokens per window (L).
        windows: number of windows (N); None for every whole window of the corpus.
        device: "cpu", "cuda" or "auto" (CUDA falls back to CPU with a note).
        progress: show a progress bar on stderr.
        threads: ONNX Runtime intra-op threads (default: its own choice).

    Returns:
        ``perplexity``, ``mean_nll``, ``tokens`` (scored), ``windows``, ``seq_len``, ``data``, ``model``,
        ``device`` and ``seconds``.

    Raises:
        ModelLoadError: no model or tokenizer there, or inputs that are not a causal LM export's.
        ConfigError: bad window options, or a corpus too short for them.
    """
    from tqdm import tqdm

    path = resolve_model_path(model_dir)
    config = _config(path.parent)
    _check_seq_len(config, seq_len, path.parent)
    batches = evaluation_windows(corpus_tokens(path.parent, data), seq_len, windows)
    device = resolve_device(device)
    start = time.perf_counter()
    session = make_session(path, device, threads=threads)
    feed, logits_name = _feed_builder(session, path)
    total, count = 0.0, 0
    for ids in tqdm(batches, desc="perplexity", unit="window", file=sys.stderr, disable=not progress):
        logits = session.run([logits_name], feed(ids))[0]
        nll = token_nlls(logits[0], ids)
        total += float(nll.sum())
        count += len(nll)
    mean = total / count
    return {
        "task": "perplexity",
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens": count,
        "windows": len(batches),
        "seq_len": seq_len,
        "data": os.fspath(data),
        "model": str(path),
        "device": device,
        "seconds": time.perf_counter() - start,
    }


def perplexity_torch(model: Any, windows: np.ndarray, *, progress: bool = False) -> float:
    """The same protocol on a PyTorch causal LM, for checking an export: windows is [N, L] token ids."""
    import torch
    from tqdm import tqdm

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tqdm(windows, desc="perplexity (torch)", file=sys.stderr, disable=not progress):
            x = torch.from_numpy(np.array(ids, dtype=np.int64))[None]  # a copy: windows may be read-only
            logits = model(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                position_ids=torch.arange(x.shape[1])[None],
                use_cache=False,
            ).logits
            nll = token_nlls(logits[0].float().numpy(), ids)
            total += float(nll.sum())
            count += len(nll)
    return math.exp(total / count)

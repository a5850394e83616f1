"""Evaluation with ONNX Runtime by fixed, simple protocols: perplexity (causal LMs), similarity (encoders).

Perplexity: each of the first N non-overlapping windows of L tokens (see :mod:`qonnx.runtime.data`) is one batch of
one sequence: ``input_ids`` [1, L], ``attention_mask`` all ones, ``position_ids`` 0..L-1, and an empty past
([1, kv_heads, 0, head_dim]) when the graph has past inputs. Every token but the first of a window is
scored from the logits at the position before it; perplexity is exp(mean negative log-likelihood) over
all scored tokens of all windows. When the model's tokenizer puts a BOS token before a text
(:func:`qonnx.core.tokenizer.bos_token_id`: Gemma, Llama 3), each window is read after one, as the model reads
any text: [1, L + 1] tokens, all L of the window scored. :func:`perplexity_torch` applies the same protocol to a
PyTorch model (given the same windows).

Similarity: the first N text chunks of the data (:func:`text_chunks`) are tokenized one by one (with the
special tokens, cut at L tokens) and run in batches of similar length, padded at the end; a chunk's
embedding is the mean of ``last_hidden_state`` over its attention mask. Against a reference model (the same
chunks, the reference's own tokenizer), each chunk's cosine similarity between the two embeddings and
whether its nearest other chunk is the same in both (top-1 retrieval agreement) are reported; on its own, a
model's mean pairwise cosine and embedding norms are reported as a sanity figure.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qonnx.core.errors import ConfigError, ModelLoadError
from qonnx.core.modelfile import resolve_model_path
from qonnx.core.tokenizer import bos_token_id, load_tokenizer, read_config
from qonnx.runtime.data import PYDOC, corpus_tokens, evaluation_windows, read_text, with_bos
from qonnx.runtime.session import make_session, resolve_device

__all__ = [
    "check_seq_len",
    "feed_builder",
    "model_config",
    "perplexity",
    "perplexity_torch",
    "sentence_embeddings",
    "similarity",
    "text_chunks",
    "token_nlls",
]

#: KV cache types; int8 and uint8 (int4 codes, two a byte): a quantized cache (qonnx.passes.kv_cache).
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def token_nlls(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` given ``logits[:-1]`` ([L, vocab] and [L]): shape [L-1]."""
    x = np.asarray(logits[:-1], dtype=np.float32)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    target = x[np.arange(len(x)), np.asarray(ids[1:])]
    return (lse - target).astype(np.float64)


def model_config(folder: Path) -> dict[str, Any]:
    """The Hugging Face config.json in ``folder`` ({} when absent).

    Raises:
        ModelLoadError: it is not JSON, or not a JSON object.
    """
    return read_config(folder)


def check_seq_len(config: dict[str, Any], seq_len: int, where: Path, option: str = "--seq-len") -> None:
    """Refuse ``seq_len`` beyond the positions the model's ``config`` (its config.json) supports.

    ``option`` names the setting in the error, as the caller's command spells it.
    """
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"{option} {seq_len} exceeds the {limit} positions the model in {where} supports")


def feed_builder(session: Any, where: Path) -> tuple[Any, str]:
    """A function mapping window ids [L] to the session's feed, and the name of the logits output.

    ``session`` lists the inputs and outputs of a causal LM export (an InferenceSession, or anything with its
    ``get_inputs()`` / ``get_outputs()``); ``where`` names the model in errors.

    Raises:
        ModelLoadError: the inputs are not those of a causal LM export (or it is an encoder).
    """
    static: dict[str, np.ndarray] = {}
    names = []
    outputs = [o.name for o in session.get_outputs()]
    if "logits" not in outputs and "last_hidden_state" in outputs:
        raise ModelLoadError(f"{where}: an encoder export (last_hidden_state, no logits), not a causal LM")
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
            raise ModelLoadError(f"{where}: input {inp.name} is not one a causal LM export has")
    if "input_ids" not in names:
        raise ModelLoadError(f"{where}: the model has no input_ids input; not a causal LM export")
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
        ``perplexity``, ``mean_nll``, ``tokens`` (scored), ``windows``, ``seq_len``, ``bos`` (whether each
        window was read after the tokenizer's BOS), ``data``, ``model``, ``device`` and ``seconds``.

    Raises:
        ModelLoadError: no model or tokenizer there, or inputs that are not a causal LM export's.
        ConfigError: bad window options, or a corpus too short for them.
    """
    path = resolve_model_path(model_dir)
    config = model_config(path.parent)
    bos = bos_token_id(path.parent)
    check_seq_len(config, seq_len + (bos is not None), path.parent, "--seq-len" if bos is None else "--seq-len + BOS")
    batches = with_bos(evaluation_windows(corpus_tokens(path.parent, data), seq_len, windows), bos)
    device = resolve_device(device)
    start = time.perf_counter()
    session = make_session(path, device, threads=threads)
    try:
        feed, logits_name = feed_builder(session, path)
    except ModelLoadError as e:
        encoder = "last_hidden_state" in {o.name for o in session.get_outputs()}
        raise ModelLoadError(f"{e}; {'use --task similarity' if encoder else 'cannot evaluate perplexity'}") from None
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
        "bos": bos is not None,
        "data": os.fspath(data),
        "model": str(path),
        "device": device,
        "seconds": time.perf_counter() - start,
    }


def perplexity_torch(model: Any, windows: np.ndarray, *, progress: bool = False) -> float:
    """The same protocol on a PyTorch causal LM, for checking an export: windows is [N, L] token ids.

    Give the windows as :func:`perplexity` reads them: with the BOS before each where the tokenizer adds one
    (:func:`qonnx.runtime.data.with_bos`).
    """
    import torch  # heavy (about 2 s): only checking an export against PyTorch needs it

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


#: Pydoc paragraphs shorter than this (headings, one-line code fragments) are not similarity chunks.
_PYDOC_MIN_WORDS = 8
#: The inputs an encoder export may have (see qonnx.models.encoder).
_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def text_chunks(data: str | os.PathLike = PYDOC, samples: int | None = 256) -> list[str]:
    """The first ``samples`` distinct text chunks of ``data``, whitespace collapsed.

    Chunks are the paragraphs (split at blank lines) of the pydoc corpus that have at least
    :data:`_PYDOC_MIN_WORDS` words, the non-empty lines of a ``.txt`` file, or the paragraphs of the texts
    of a ``.jsonl`` file. ``samples=None`` takes them all, as does a file with fewer.

    Raises:
        ConfigError: the data cannot be read, or it has fewer than 2 chunks.
    """
    text = read_text(data)
    is_txt = str(data) != PYDOC and Path(data).suffix.lower() == ".txt"
    pieces = text.splitlines() if is_txt else re.split(r"\n\s*\n", text)
    min_words = _PYDOC_MIN_WORDS if str(data) == PYDOC else 1
    chunks = dict.fromkeys(c for c in (" ".join(p.split()) for p in pieces) if len(c.split()) >= min_words)
    found = list(chunks)[:samples]
    if len(found) < 2:
        raise ConfigError(f"{data}: has {len(found)} text chunk(s); similarity needs at least 2")
    return found


def _encoder_session(model_dir: str | os.PathLike, device: str, threads: int | None) -> tuple[Any, Any, Path]:
    """(session, tokenizer, model.onnx path) of an encoder export, checked for its inputs and outputs."""
    path = resolve_model_path(model_dir)
    session = make_session(path, device, threads=threads)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if "last_hidden_state" not in outputs or "input_ids" not in inputs:
        raise ModelLoadError(
            f"{path}: has no input_ids input or no last_hidden_state output; "
            "the similarity task needs an encoder export (qonnx export of a BERT-like model)"
        )
    extra = [n for n in inputs if n not in _ENCODER_INPUTS]
    if extra:
        raise ModelLoadError(f"{path}: input {extra[0]} is not one an encoder export has; cannot evaluate")
    return session, load_tokenizer(path.parent), path


def sentence_embeddings(
    session: Any,
    tokenizer: Any,
    chunks: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """Mean-pooled (attention-mask-weighted) ``last_hidden_state`` of each chunk: [N, hidden] float64.

    Also returns the number of tokens embedded. Chunks are batched in order of length, padded at the end.
    """
    names = [i.name for i in session.get_inputs()]
    ids = [tokenizer(c, truncation=True, max_length=max_length, verbose=False)["input_ids"] for c in chunks]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    result: np.ndarray | None = None
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="embeddings", unit="batch", file=sys.stderr, disable=not progress):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        batch = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        values = {"input_ids": batch, "attention_mask": mask, "token_type_ids": np.zeros_like(batch)}
        hidden = session.run(["last_hidden_state"], {n: values[n] for n in names})[0].astype(np.float64)
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        if result is None:
            result = np.empty((len(chunks), pooled.shape[-1]), dtype=np.float64)
        result[rows] = pooled
    if result is None:
        raise ConfigError("no text chunks to embed")
    return result, sum(len(i) for i in ids)


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), np.finfo(np.float64).tiny)


def _nearest(u: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine), the first one on ties."""
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


def similarity(
    model_dir: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    data: str | os.PathLike = PYDOC,
    samples: int | None = 256,
    max_length: int = 128,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Sentence-embedding similarity of an encoder export, alone or against a reference export.

    Args:
        model_dir: an exported encoder folder (model.onnx with its tokenizer files), or its model.onnx.
        reference: another encoder export to compare with (e.g. the float model a quantized one came from).
        data: ``"pydoc"``, a ``.txt`` file (one chunk a line) or a ``.jsonl`` file with "text" fields.
        samples: number of text chunks (N); None for all of them.
        max_length: tokens per chunk at most (L), special tokens included.
        device: "cpu", "cuda" or "auto" (CUDA falls back to CPU with a note).
        progress: show progress bars on stderr.
        threads: ONNX Runtime intra-op threads (default: its own choice).

    Returns:
        ``mean_cosine``, ``min_cosine``, ``p5_cosine`` (cosine of each chunk's embeddings from the two
        models) and ``top1_agreement`` (fraction of chunks whose nearest other chunk is the same in both),
        all None without a reference; ``pairwise_cosine_mean``, ``norm_mean``, ``norm_min``, ``norm_max``
        of the model's embeddings; ``samples``, ``tokens``, ``max_length``, ``data``, ``model``,
        ``reference``, ``device`` and ``seconds``.

    Raises:
        ModelLoadError: no model or tokenizer there, or not an encoder export.
        ConfigError: bad options, or data with fewer than 2 chunks.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, not {max_length}")
    chunks = text_chunks(data, samples)
    device = resolve_device(device)
    start = time.perf_counter()
    folders = [model_dir] if reference is None else [model_dir, reference]
    embeddings, tokens, paths = [], 0, []
    for folder in folders:
        session, tokenizer, path = _encoder_session(folder, device, threads)
        check_seq_len(model_config(path.parent), max_length, path.parent, "--max-length")
        e, n = sentence_embeddings(session, tokenizer, chunks, max_length=max_length, progress=progress)
        embeddings.append(e)
        tokens = tokens or n
        paths.append(str(path))
        del session
    u = _unit(embeddings[0])
    norms = np.linalg.norm(embeddings[0], axis=1)
    count = len(chunks)
    pairwise = (float(u.sum(axis=0) @ u.sum(axis=0)) - float((u * u).sum())) / (count * (count - 1))
    result: dict[str, Any] = {
        "task": "similarity",
        "mean_cosine": None,
        "min_cosine": None,
        "p5_cosine": None,
        "top1_agreement": None,
        "pairwise_cosine_mean": pairwise,
        "norm_mean": float(norms.mean()),
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
        "samples": count,
        "tokens": tokens,
        "max_length": max_length,
        "data": os.fspath(data),
        "model": paths[0],
        "reference": paths[1] if reference is not None else None,
        "device": device,
    }
    if reference is not None:
        v = _unit(embeddings[1])
        # 1 - |u - v|^2 / 2 is the cosine of unit vectors, precise near 1 and exactly 1 for equal embeddings
        cos = 1.0 - 0.5 * ((u - v) ** 2).sum(axis=1)
        result["mean_cosine"] = float(cos.mean())
        result["min_cosine"] = float(cos.min())
        result["p5_cosine"] = float(np.percentile(cos, 5))
        result["top1_agreement"] = float((_nearest(u) == _nearest(v)).mean())
    result["seconds"] = time.perf_counter() - start
    return result

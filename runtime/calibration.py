"""Calibration through ONNX Runtime: the feeds, and the Hessians ``2/n X^T X`` of layer inputs for GPTQ.

Feeds come from text for an exported causal LM folder (its tokenizer, the causal-LM feeds of
:mod:`qonnx.runtime.evaluate`, windows from :func:`qonnx.runtime.data.calibration_windows`, which never
overlap the evaluation windows of the pydoc corpus, each after the tokenizer's BOS where it adds one), or from
a ``.npz`` file for any other model.
Activations are captured with :func:`qonnx.runtime.capture.capture` and folded into one
:class:`qonnx.passes.gptq.HessianAccumulator` per distinct tensor as each batch arrives: no activation is
kept. The Hessians come from the float model ("non-sequential" GPTQ).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from tqdm import tqdm

from qonnx.core.errors import ConfigError, ModelLoadError, escape_name
from qonnx.core.modelfile import resolve_model_path
from qonnx.core.tokenizer import bos_token_id
from qonnx.passes.hessian import HessianAccumulator, torch_device
from qonnx.runtime.capture import capture
from qonnx.runtime.data import (
    CALIBRATION_START,
    PYDOC,
    calibration_windows,
    corpus_tokens,
    npz_batch,
    npz_batches,
    with_bos,
)
from qonnx.runtime.evaluate import check_seq_len, feed_builder, model_config

__all__ = ["GraphIO", "calibration_feeds", "collect_hessians", "kv_cache_ranges", "spill"]

#: Bytes of captured activations one ONNX Runtime run may hand over at once (estimated from the feeds).
ACTIVATION_BUDGET = 256 << 20
#: Bytes of Hessian sums accumulated in one pass over the calibration data, in host memory (CPU) or on the
#: GPU (where torch sums them when it sees one: there they take no host memory, so one pass usually does).
HESSIAN_BUDGET = 256 << 20
HESSIAN_BUDGET_CUDA = 4 << 30


def _npz_feeds(path: Path, count: int) -> list[dict[str, np.ndarray]]:
    arrays, n = npz_batches(path)
    return [npz_batch(arrays, i) for i in range(min(count, n))]


def calibration_feeds(
    model: str | os.PathLike,
    data: str | os.PathLike = PYDOC,
    *,
    samples: int = 16,
    seq_len: int = 512,
    tokenizer_dir: str | os.PathLike | None = None,
) -> list[dict[str, np.ndarray]]:
    """Feeds for calibration runs of ``model``.

    Args:
        model: a .onnx file or a folder holding model.onnx.
        data: ``"pydoc"``, a ``.txt`` or ``.jsonl`` file (tokenized with the tokenizer beside the model, the
            model being a causal LM export), or a ``.npz`` file whose arrays are named after the model's
            inputs, the first axis indexing batches (feed i is ``{name: array[i]}``).
        samples: windows (or at most this many .npz batches).
        seq_len: tokens per window.
        tokenizer_dir: the folder holding the tokenizer (default: the model's).

    Raises:
        ConfigError: no usable data: a model without tokenizer needs a .npz file; too little text.
        ModelLoadError: the model's inputs are not those of a causal LM export.
    """
    path = resolve_model_path(model)
    if str(data).lower().endswith(".npz"):
        feeds = _npz_feeds(Path(data), samples)
        io = GraphIO(path)
        names = {i.name for i in io.get_inputs()}
        missing = sorted(names - io.initializers - set(feeds[0]))
        unknown = sorted(set(feeds[0]) - names)
        if missing or unknown:
            raise ConfigError(
                f"{data}: its arrays must be named after the model's inputs: "
                + "; ".join(f"{what} {', '.join(v)}" for what, v in (("missing", missing), ("unknown", unknown)) if v)
            )
        _check_feeds(data, feeds[0], io.get_inputs())
        return feeds
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else path.parent
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"{path}: calibration needs data: there is no tokenizer beside the model to tokenize {str(data)!r}; "
            "pass a .npz file of input feeds (calib_data='feeds.npz', --calib-data feeds.npz)"
        )
    try:
        feed, _ = feed_builder(GraphIO(path), path)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"{e}: calibration on text needs one; pass a .npz file of input feeds instead "
            "(calib_data='feeds.npz', --calib-data feeds.npz)"
        ) from None
    bos = bos_token_id(folder)
    option = "--calib-seq-len (calib_seq_len)" + ("" if bos is None else " + BOS")
    check_seq_len(model_config(folder), seq_len + (bos is not None), folder, option)
    start = CALIBRATION_START if str(data) == PYDOC else 0
    windows = calibration_windows(corpus_tokens(folder, data, lean=True), seq_len, samples, start=start)
    return [feed(ids) for ids in with_bos(windows, bos)]


def _check_feeds(data: str | os.PathLike, feed: Mapping[str, np.ndarray], inputs: list[SimpleNamespace]) -> None:
    """Refuse a batch whose arrays have another type, rank or fixed size than the model's inputs declare."""
    for inp in inputs:
        a = feed.get(inp.name)
        if a is None:
            continue
        try:
            given = f"tensor({onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(a.dtype)).lower()})"
        except (KeyError, ValueError, TypeError):
            given = f"numpy {a.dtype}"
        what = f"{data}: array '{escape_name(inp.name)}'"
        if given != inp.type:
            raise ConfigError(f"{what} holds {given[7:-1]}, the model's input takes {inp.type[7:-1]}; convert it")
        if len(a.shape) != len(inp.shape) or any(
            isinstance(d, int) and d > 0 and d != n for d, n in zip(inp.shape, a.shape, strict=True)
        ):
            shape = ["?" if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
            raise ConfigError(
                f"{what} has batches of shape {list(a.shape)}, the model's input takes {shape} (first axis of the "
                "array: the batch index)"
            )


class GraphIO:
    """The inputs and outputs of a model file as an ONNX Runtime session lists them, without loading weights."""

    def __init__(self, path: Path) -> None:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
        self._inputs = [self._arg(v) for v in graph.input]
        self._outputs = [self._arg(v) for v in graph.output]
        self.initializers = {t.name for t in graph.initializer}

    @staticmethod
    def _arg(value: onnx.ValueInfoProto) -> SimpleNamespace:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return SimpleNamespace(
            name=value.name, shape=dims, type=f"tensor({onnx.TensorProto.DataType.Name(t.elem_type).lower()})"
        )

    def get_inputs(self) -> list[SimpleNamespace]:
        """Graph inputs (name, shape, type)."""
        return self._inputs

    def get_outputs(self) -> list[SimpleNamespace]:
        """Graph outputs (name, shape, type)."""
        return self._outputs


def _groups(inputs: Mapping[str, int], rows: int, sums_budget: int = HESSIAN_BUDGET) -> list[list[str]]:
    """Tensors in order, grouped so that a group's activations and Hessian sums stay within the budgets."""
    groups: list[list[str]] = []
    current: list[str] = []
    activations = sums = 0
    for name, k in inputs.items():
        a, h = rows * k * 4, k * k * 4
        if current and (activations + a > ACTIVATION_BUDGET or sums + h > sums_budget):
            groups.append(current)
            current, activations, sums = [], 0, 0
        current.append(name)
        activations += a
        sums += h
    return [*groups, current] if current else groups


def spill(h: np.ndarray, folder: Path, index: int | str) -> np.ndarray:
    """``h`` memory-mapped from an unlinked file: read when used, freed when dropped (in memory on Windows).

    ``index`` names the file within ``folder`` (unique per call).
    """
    if os.name == "nt":  # a mapped file cannot be unlinked there
        return h
    path = folder / f"h{index}.npy"
    np.save(path, h)
    mapped = np.load(path, mmap_mode="r")
    path.unlink()
    return mapped


def collect_hessians(
    model: str | os.PathLike,
    inputs: Mapping[str, int],
    feeds: list[dict[str, np.ndarray]],
    *,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The Hessian ``2/n X^T X`` [K, K] (float32) of every named tensor, over all ``feeds``.

    Tensors are captured in groups, one pass over the feeds each, so that one run hands over at most
    :data:`ACTIVATION_BUDGET` bytes of activations and at most :data:`HESSIAN_BUDGET` bytes of sums (on a
    GPU :data:`HESSIAN_BUDGET_CUDA`) are accumulated at once. Finished Hessians wait in memory-mapped files
    that are already unlinked: they take memory only while they are read, and disk space until they are
    dropped.

    Args:
        model: a .onnx file or a folder holding model.onnx (ONNX Runtime runs it).
        inputs: tensor name -> K (the size of its last axis), e.g. the input of each MatMul to quantize.
        feeds: calibration batches (:func:`calibration_feeds`).
        device: where ONNX Runtime runs ("cpu", "cuda" or "auto"); the sums run in torch, on CUDA if present.
        progress: a progress bar on stderr.

    Raises:
        ModelLoadError: a captured tensor's last axis is not K.
    """
    if not feeds:
        raise ConfigError("calibration needs at least one batch of feeds")
    # A guess at the rows (tokens) of one batch: all elements of integer feeds (token ids), vectors of float ones
    rows = max(a.size if a.dtype.kind in "iub" or a.ndim < 2 else a.size // a.shape[-1] for a in feeds[0].values())
    groups = _groups(inputs, max(rows, 1), HESSIAN_BUDGET_CUDA if torch_device() == "cuda" else HESSIAN_BUDGET)
    bar = tqdm(total=len(groups) * len(feeds), desc="calibrating", unit="batch", file=sys.stderr, disable=not progress)
    hessians: dict[str, np.ndarray] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="qonnx-hessians-") as tmp:
            for group in groups:
                accumulators = {name: HessianAccumulator(inputs[name]) for name in group}

                def on_batch(values: dict[str, np.ndarray], accumulators: dict = accumulators) -> None:
                    for name, x in values.items():
                        acc = accumulators[name]
                        if x.ndim < 1 or x.shape[-1] != acc.k:
                            raise ModelLoadError(
                                f"tensor '{name}' has shape {x.shape}; expected a last axis of {acc.k}"
                            )
                        acc.add_batch(x)

                capture(model, group, feeds, on_batch, device=device, progress=bar.update)
                for name in group:
                    hessians[name] = spill(accumulators.pop(name).finalize(), Path(tmp), len(hessians))
    finally:
        bar.close()
    return hessians


#: Bytes of key/value samples kept (float32, over all caches) to choose the clipping ranges of a low-bit cache.
KV_SAMPLE_BUDGET = 512 << 20
#: The clipping ranges tried, as fractions of a channel's largest |x|.
KV_CLIP_FRACTIONS = np.linspace(0.2, 1.0, 33)


def kv_cache_ranges(
    model: str | os.PathLike,
    caches: Mapping[str, str],
    feeds: list[dict[str, np.ndarray]],
    *,
    qmax: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The range to quantize per KV head and channel [kv_heads, head_size] (float32) of each KV cache.

    ``caches`` maps each past input (``past_key_values.{i}.key|value``) to the output that holds its new
    contents (``present.{i}.key|value``, [batch, kv_heads, positions, head_size]): the keys after the rotary
    embedding, as the cache stores them. The feeds start from an empty past, so every position is seen once.

    ``qmax`` None: the largest |x| seen. Otherwise the clipping range, among :data:`KV_CLIP_FRACTIONS` of the
    largest |x|, whose symmetric codes in [-qmax - 1, qmax] have the least squared error over the positions
    kept (the first ones, up to :data:`KV_SAMPLE_BUDGET` bytes for all caches): int4's 15 levels spent on one
    outlier leave the rest of a channel a few codes.
    """
    if not feeds:
        raise ConfigError("calibration needs at least one batch of feeds")
    outputs = {present: past for past, present in caches.items()}
    ranges: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {}
    kept: dict[str, int] = {}

    def on_batch(values: dict[str, np.ndarray]) -> None:
        for present, x in values.items():
            if x.ndim != 4:
                raise ModelLoadError(f"output '{escape_name(present)}' has shape {x.shape}; expected 4 axes")
            x = np.asarray(x, dtype=np.float32)
            amax = np.abs(x).max(axis=(0, 2))
            past = outputs[present]
            ranges[past] = amax if past not in ranges else np.maximum(ranges[past], amax)
            if qmax is None:
                continue
            room = KV_SAMPLE_BUDGET // (4 * len(outputs) * x.shape[1] * x.shape[3]) - kept.get(past, 0)
            rows = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[3])[:, : max(room, 0)]
            if rows.shape[1]:
                samples.setdefault(past, []).append(rows)
                kept[past] = kept.get(past, 0) + rows.shape[1]

    bar = tqdm(total=len(feeds), desc="KV cache ranges", unit="batch", file=sys.stderr, disable=not progress)
    try:
        capture(model, list(outputs), feeds, on_batch, device=device, progress=bar.update)
    finally:
        bar.close()
    if qmax is None:
        return ranges
    return {past: _least_error_clip(np.concatenate(samples[past], axis=1), amax, qmax) for past, amax in ranges.items()}


def _least_error_clip(x: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Per channel of ``x`` [kv_heads, positions, head_size], the clip range of least squared code error."""
    best = np.full(amax.shape, np.inf)
    chosen = amax.copy()
    for fraction in KV_CLIP_FRACTIONS:
        clip = amax * fraction
        scale = np.maximum(clip / qmax, np.finfo(np.float32).tiny)[:, None, :]
        error = ((np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale - x) ** 2).sum(axis=1)
        better = error < best
        best = np.where(better, error, best)
        chosen = np.where(better, clip, chosen)
    return chosen.astype(np.float32)

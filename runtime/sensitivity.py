"""Measure a model with some of its weights replaced, in one ONNX Runtime session.

The weights to be replaced are made graph inputs that keep their initializers as default values: a run that
feeds one of them uses the fed array, a run that does not uses the stored weight. So "this layer alone
quantized" is one run with that layer's dequantized weight fed, and a mixed-precision model is one run with
every quantized layer's weight fed, all on one session built once (no session per layer).

Feeds: a causal LM export with a tokenizer beside it runs calibration windows of text
(:func:`qonnx.runtime.calibration.calibration_feeds`, pydoc from token 60,000: never the evaluation
windows) and is measured by the SQNR of its logits and its mean negative log-likelihood; any other model
runs the arrays of a ``.npz`` file, or inputs made from its declared shapes (as verification makes them),
and is measured by the SQNR of its floating-point outputs (the worst one).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx

from qonnx.core.modelfile import resolve_model_path
from qonnx.runtime.calibration import GraphIO, calibration_feeds
from qonnx.runtime.data import PYDOC
from qonnx.runtime.inputs import make_inputs
from qonnx.runtime.session import make_session

__all__ = ["Measurement", "WeightSwapSession", "sensitivity_feeds", "with_weight_inputs"]

_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")
#: Elements per float32 dot product when summing squared errors (the partial sums add up in float64).
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One run over the feeds against the float model.

    Attributes:
        sqnr_db: output SQNR against the float model (logits for a causal LM; else the worst float output).
        nll: mean negative log-likelihood per scored token (causal LMs), else None.
        kl: mean KL divergence of the next-token distribution from the float model's, per scored token
            (causal LMs; nats), else None. Unlike the NLL change it does not depend on which token came next,
            so it ranks small errors with far less noise.
    """

    sqnr_db: float
    nll: float | None = None
    kl: float | None = None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def sensitivity_feeds(
    model: str | os.PathLike, data: str | os.PathLike = PYDOC, *, samples: int = 4, seq_len: int = 256, seed: int = 0
) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Feeds to measure ``model`` on, and whether they are text windows of a causal LM (perplexity applies).

    Args:
        model: a .onnx file or a folder holding model.onnx.
        data: ``"pydoc"`` or a text file for a causal LM with a tokenizer; a ``.npz`` of feeds for any model.
            A model without a tokenizer and no ``.npz`` runs ``samples`` made-up inputs.
        samples: windows (or .npz batches, or made-up inputs).
        seq_len: tokens per window.
        seed: seed of the made-up inputs.
    """
    path = resolve_model_path(model)
    io = GraphIO(path)
    if str(data).lower().endswith(".npz"):
        return calibration_feeds(path, data, samples=samples), False
    is_lm = "logits" in {o.name for o in io.get_outputs()} and "input_ids" in {i.name for i in io.get_inputs()}
    if is_lm and (str(data) != PYDOC or _has_tokenizer(path.parent)):
        return calibration_feeds(path, data, samples=samples, seq_len=seq_len), True
    if str(data) != PYDOC:
        return calibration_feeds(path, data, samples=samples, seq_len=seq_len), False  # raises its own error
    shim = SimpleNamespace(
        get_inputs=lambda: [i for i in io.get_inputs() if i.name not in io.initializers],
        get_outputs=io.get_outputs,
    )
    return [make_inputs(shim, seed=seed + i) for i in range(samples)], False  # type: ignore[arg-type]


def with_weight_inputs(path: Path, weights: Sequence[str]) -> bytes:
    """The model's protobuf (weights left in their external file) with ``weights`` also listed as graph inputs."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    listed = {i.name for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    for name in weights:
        if name in listed:
            continue
        if name not in inits:
            raise ValueError(f"{path}: '{name}' is not an initializer of the main graph")
        t = inits[name]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return proto.SerializeToString()


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis of [L, V] logits, in float64 [L]."""
    top = x.max(axis=-1, keepdims=True)
    e = np.exp(x - top)
    return np.log(e.sum(axis=-1, dtype=np.float64)) + top[:, 0].astype(np.float64)


@dataclasses.dataclass
class _Window:
    """The float model on one text window: logits [L, V], next-token probabilities (float16) and log-normalisers."""

    ids: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    lse: np.ndarray
    nll: float

    @classmethod
    def of(cls, logits: np.ndarray, ids: np.ndarray) -> _Window:
        logits = logits.astype(np.float32, copy=False)
        lse = _logsumexp(logits)
        probs = np.exp(logits - lse[:, None].astype(np.float32)).astype(np.float16)
        return cls(ids, logits, probs, lse, _nll(logits, lse, ids))

    def compare(self, logits: np.ndarray) -> tuple[float, float, float]:
        """(squared logit error, summed NLL, summed KL) of ``logits`` over the scored positions 0..L-2."""
        logits = logits.astype(np.float32, copy=False)
        diff = self.logits - logits
        noise = _squared_sum(diff)
        lse = _logsumexp(logits)
        # KL(p || q) = sum_v p (x_p - x_q) - lse_p + lse_q, with x the logits
        shift = np.einsum("ij,ij->i", self.probs[:-1].astype(np.float32), diff[:-1], dtype=np.float64)
        kl = float((shift - self.lse[:-1] + lse[:-1]).sum())
        return noise, _nll(logits, lse, self.ids), max(kl, 0.0)


def _nll(logits: np.ndarray, lse: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` given the logits before each."""
    return float((lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def _squared_sum(x: np.ndarray) -> float:
    flat = x.reshape(-1)
    return sum(float(np.dot(c, c)) for c in (flat[s : s + _CHUNK] for s in range(0, flat.size, _CHUNK)))


def _squared_error(ref: np.ndarray, out: np.ndarray) -> float:
    return _squared_sum(out.astype(np.float32, copy=False) - ref.astype(np.float32, copy=False))


def _energy(x: np.ndarray) -> float:
    return _squared_sum(x.astype(np.float32, copy=False))


def _db(signal: float, noise: float) -> float:
    if not math.isfinite(noise):
        return -math.inf
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


class WeightSwapSession:
    """One ONNX Runtime session in which the named initializers can be replaced per run.

    The float model's outputs on ``feeds`` are computed once, on construction, and kept (a causal LM's
    logits: windows x tokens x vocabulary float32); :meth:`measure` compares a run with some weights fed
    against them.

    Args:
        model: a .onnx file (or folder) ONNX Runtime can load; its weights may be external.
        weights: names of main-graph initializers that :meth:`measure` may replace.
        feeds: the inputs (see :func:`sensitivity_feeds`).
        causal_lm: the feeds are text windows and the model has a ``logits`` output: measure perplexity too.
        device: "cpu", "cuda" or "auto".
    """

    def __init__(
        self,
        model: str | os.PathLike,
        weights: Sequence[str],
        feeds: list[dict[str, np.ndarray]],
        *,
        causal_lm: bool,
        device: str = "cpu",
    ) -> None:
        if not feeds:
            raise ValueError("sensitivity measurement needs at least one feed")
        path = resolve_model_path(model)
        self.weights = set(weights)
        self.session = make_session(with_weight_inputs(path, weights), device, external_data_dir=path.parent)
        self.feeds = feeds
        self.causal_lm = causal_lm
        if causal_lm:
            self.outputs = ["logits"]
        else:
            self.outputs = [o.name for o in self.session.get_outputs() if o.type in _FLOAT_OUTPUTS]
            if not self.outputs:
                raise ValueError("the model has no floating-point output to compare")
        self.reference: list[list[np.ndarray]] = []
        self.windows: list[_Window] = []
        self.signal = [0.0] * len(self.outputs)
        nll, self.tokens = 0.0, 0
        for feed in feeds:
            values = self.session.run(self.outputs, feed)
            for j, v in enumerate(values):
                self.signal[j] += _energy(v)
            if causal_lm:
                window = _Window.of(values[0][0], np.asarray(feed["input_ids"][0]))
                nll, self.tokens = nll + window.nll, self.tokens + len(window.ids) - 1
                self.windows.append(window)
            else:
                self.reference.append(values)
        self.float_nll = nll / self.tokens if causal_lm else None

    def measure(self, weights: Mapping[str, np.ndarray]) -> Measurement:
        """Run every feed with ``weights`` (name -> array, stored layout and dtype) in place of the stored ones."""
        unknown = set(weights) - self.weights
        if unknown:
            raise ValueError(f"not replaceable here: {', '.join(sorted(unknown))}")
        if self.causal_lm:
            noise = nll = kl = 0.0
            for feed, window in zip(self.feeds, self.windows, strict=True):
                logits = self.session.run(self.outputs, {**feed, **weights})[0][0]
                n, nl, k = window.compare(logits)
                noise, nll, kl = noise + n, nll + nl, kl + k
                del logits
            return Measurement(_db(self.signal[0], noise), nll / self.tokens, kl / self.tokens)
        noises = [0.0] * len(self.outputs)
        for feed, ref in zip(self.feeds, self.reference, strict=True):
            values = self.session.run(self.outputs, {**feed, **weights})
            for j, (r, v) in enumerate(zip(ref, values, strict=True)):
                noises[j] += _squared_error(r, v)
            del values
        return Measurement(min(_db(s, n) for s, n in zip(self.signal, noises, strict=True)))

    def describe(self) -> dict[str, Any]:
        """What the measurements run on."""
        first = self.feeds[0]
        return {
            "feeds": len(self.feeds),
            "tokens_per_feed": int(first["input_ids"].shape[-1]) if self.causal_lm else None,
            "outputs": self.outputs,
            "float_nll": self.float_nll,
        }

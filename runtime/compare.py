"""Comparing two models' outputs: SQNR, cosine, error and, for logits, KL divergence and top-1 agreement.

Outputs are compared a slice at a time (:class:`OutputComparison`), so that large outputs (logits of a long
sequence) are never held twice in float64; :func:`degenerate` says when a reference output shows nothing to
compare against (all zeros, constant, non-finite). Used by :mod:`qonnx.runtime.verify`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

__all__ = ["OutputComparison", "OutputMetrics", "compare_outputs", "degenerate", "is_logits", "kl_rows"]


@dataclasses.dataclass
class OutputMetrics:
    """How far one quantized output is from the original."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None
    #: Why the original's output shows nothing (:func:`degenerate`): the figures then certify nothing.
    degenerate: str | None = None
    #: For logits (an output named like ``logits``): the mean KL divergence (nats per token) of the quantized
    #: model's next-token distribution from the original's, softmax over the last axis.
    kl_divergence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite SQNR as a large finite number); ``degenerate`` only when set."""
        d = dataclasses.asdict(self)
        d["sqnr_db"] = round(min(self.sqnr_db, 999.0), 3)
        d["cosine"] = round(self.cosine, 6)
        d["max_abs_error"] = float(f"{self.max_abs_error:.6g}")
        if self.top1_agreement is not None:
            d["top1_agreement"] = round(self.top1_agreement, 6)
        if self.degenerate is None:
            del d["degenerate"]
        if self.kl_divergence is None:
            del d["kl_divergence"]
        else:
            d["kl_divergence"] = float(f"{self.kl_divergence:.6g}")
        return d


def is_logits(name: str) -> bool:
    """Whether an output named ``name`` holds a language model's next-token logits."""
    return bool(re.search(r"logits", name.lower()))


#: Rows (tokens) of logits turned into distributions at a time in float64.
_KL_ROWS = 64


def kl_rows(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(out)) in nats for each row of two [..., V] score arrays, as a flat array."""
    r = np.asarray(ref).reshape(-1, np.shape(ref)[-1])
    o = np.asarray(out).reshape(-1, np.shape(out)[-1])
    found = []
    for start in range(0, r.shape[0], _KL_ROWS):
        with np.errstate(over="ignore", invalid="ignore"):
            lp = _log_softmax(r[start : start + _KL_ROWS].astype(np.float64))
            lq = _log_softmax(o[start : start + _KL_ROWS].astype(np.float64))
            found.append(np.sum(np.exp(lp) * (lp - lq), axis=-1))
    return np.concatenate(found) if found else np.zeros(0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _looks_like_scores(name: str, arr: np.ndarray) -> bool:
    if arr.ndim < 2 or arr.shape[-1] < 2:
        return False
    return bool(re.search(r"logit|score|prob|class", name.lower())) or arr.ndim == 2


#: Elements summed at a time in float32 (BLAS): the sums of a slice this short stay within about 1e-7 of the
#: exact ones, and the slices add up in float64. Ten times faster than float64 copies of the whole output.
_CHUNK = 1 << 16


def _sums(r: np.ndarray, o: np.ndarray) -> tuple[float, float, float, float, float]:
    """(r.r, e.e, r.o, o.o, max |e|) for e = r - o."""
    e = r - o
    return float(np.dot(r, r)), float(np.dot(e, e)), float(np.dot(r, o)), float(np.dot(o, o)), float(np.abs(e).max())


class OutputComparison:
    """Streaming comparison of one output over batches: ``add(ref, out)`` ... ``finalize()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signal = self.noise = self.dot = self.out_energy = self.max_err = 0.0
        self.finite = True
        self.top1_hits = self.top1_total = 0
        self.scores: bool | None = None
        self.kl_sum, self.kl_rows = 0.0, 0
        self.reference = _Range()

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        """Accumulate one batch, a slice at a time (see ``_CHUNK``)."""
        if np.shape(ref) != np.shape(out):
            raise ValueError(f"output {self.name!r} has shape {np.shape(out)}, the original's {np.shape(ref)}")
        flat_ref, flat_out = np.asarray(ref).reshape(-1), np.asarray(out).reshape(-1)
        self.reference.add(flat_ref)
        work = np.float64 if np.float64 in (flat_ref.dtype, flat_out.dtype) else np.float32
        for start in range(0, flat_ref.size, _CHUNK):
            r = flat_ref[start : start + _CHUNK].astype(work, copy=False)
            o = flat_out[start : start + _CHUNK].astype(work, copy=False)
            with np.errstate(over="ignore", invalid="ignore"):
                sums = _sums(r, o)
            if not all(map(math.isfinite, sums)):  # float32 overflow or non-finite values: redo it in float64
                r, o = r.astype(np.float64), o.astype(np.float64)
                self.finite &= bool(np.all(np.isfinite(o)))
                with np.errstate(over="ignore", invalid="ignore"):  # a non-finite original: degenerate() says so
                    sums = _sums(r, o)
            self.signal += sums[0]
            self.noise += sums[1] if self.finite else 0.0
            self.dot += sums[2]
            self.out_energy += sums[3]
            self.max_err = max(self.max_err, sums[4])
        if flat_ref.size == 0:
            return
        if self.scores is None:
            self.scores = _looks_like_scores(self.name, np.asarray(ref))
        if self.scores:
            hits = np.asarray(ref).argmax(-1) == np.asarray(out).argmax(-1)
            self.top1_hits += int(hits.sum())
            self.top1_total += hits.size
            if is_logits(self.name):
                kl = kl_rows(ref, out)
                self.kl_sum += float(kl.sum())
                self.kl_rows += kl.size

    def finalize(self) -> OutputMetrics:
        """The metrics over every batch added."""
        if not self.finite:
            sqnr = -math.inf
        elif self.noise == 0:
            sqnr = math.inf
        else:
            sqnr = 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf
        denom = math.sqrt(self.signal * self.out_energy)
        cosine = self.dot / denom if denom > 0 and self.finite else (1.0 if self.noise == 0 and self.finite else 0.0)
        top1 = self.top1_hits / self.top1_total if self.top1_total else None
        max_err = self.max_err if self.finite else math.inf
        kl = None
        if self.kl_rows:
            kl = self.kl_sum / self.kl_rows if self.finite and math.isfinite(self.kl_sum) else math.inf
        return OutputMetrics(self.name, sqnr, cosine, max_err, top1, self.reference.degenerate(), kl)


class _Range:
    """The smallest and largest value of an original's output over batches, and whether all were finite."""

    def __init__(self) -> None:
        self.low, self.high, self.size, self.finite = math.inf, -math.inf, 0, True

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.size += values.size
        low, high = values.min(), values.max()  # NaN wins both
        if not (np.isfinite(low) and np.isfinite(high)):
            self.finite = False
            return
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))

    def degenerate(self) -> str | None:
        if not self.finite:
            return "not finite (NaN or infinite values)"
        if self.size and self.low == self.high == 0:
            return "all zeros"
        if self.size > 1 and self.low == self.high:
            return f"constant ({self.low:g} everywhere)"
        return None


def degenerate(ref: np.ndarray) -> str | None:
    """Why an original's output ``ref`` cannot show that another is close to it, or None when it can.

    All zeros (zero error on zero signal reads as infinite SQNR whatever the other model does), one value
    everywhere, or NaN / infinite values. An empty output is not degenerate: there is nothing to differ in.
    """
    r = _Range()
    r.add(np.asarray(ref).reshape(-1))
    return r.degenerate()


def compare_outputs(name: str, ref: np.ndarray, out: np.ndarray) -> OutputMetrics:
    """SQNR, cosine, max abs error and (for class scores) top-1 agreement of ``out`` against ``ref``."""
    acc = OutputComparison(name)
    acc.add(ref, out)
    return acc.finalize()

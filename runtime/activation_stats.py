"""Statistics of activation tensors over calibration data, captured through ONNX Runtime in bounded memory.

Every captured batch is folded into streaming statistics and dropped: a
:class:`~qonnx.runtime.observers.TensorObserver` (range histogram, exact min/max), the exact minimum and
maximum of every channel of the last axis (what SmoothQuant needs), and optionally a few sample rows
(the rows holding the batch's largest values first, then random ones) for searches that need real inputs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from qonnx.core.errors import ConfigError
from qonnx.runtime.capture import capture
from qonnx.runtime.observers import TensorObserver

__all__ = ["TensorStats", "collect_activation_stats", "ACTIVATION_BUDGET"]

#: Bytes of captured activations one ONNX Runtime run may hand over at once (estimated from the first run).
ACTIVATION_BUDGET = 128 << 20


@dataclasses.dataclass
class TensorStats:
    """What calibration keeps of one tensor."""

    observer: TensorObserver
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    #: per fold (batches alternate between two folds): channel minima, maxima and sample rows [R, K]
    fold_min: list[np.ndarray | None] = dataclasses.field(default_factory=lambda: [None, None])
    fold_max: list[np.ndarray | None] = dataclasses.field(default_factory=lambda: [None, None])
    fold_rows: list[np.ndarray | None] = dataclasses.field(default_factory=lambda: [None, None])
    batches: int = 0

    def add(self, x: np.ndarray, keep_rows: int, rng: np.random.Generator) -> None:
        """Fold one batch in."""
        self.observer.add_batch(x)
        flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        mn, mx = flat.min(axis=0).astype(np.float32), flat.max(axis=0).astype(np.float32)
        self.channel_min = mn if self.channel_min is None else np.minimum(self.channel_min, mn)
        self.channel_max = mx if self.channel_max is None else np.maximum(self.channel_max, mx)
        f = self.batches % 2
        self.batches += 1
        old_min, old_max = self.fold_min[f], self.fold_max[f]
        self.fold_min[f] = mn if old_min is None else np.minimum(old_min, mn)
        self.fold_max[f] = mx if old_max is None else np.maximum(old_max, mx)
        if keep_rows:
            peak = np.abs(flat).max(axis=1)
            top = np.argsort(peak)[-max(1, keep_rows // 8) :]
            rest = rng.choice(flat.shape[0], size=min(keep_rows, flat.shape[0]), replace=False)
            picked = flat[np.unique(np.concatenate([top, rest]))].astype(np.float32)
            rows = self.fold_rows[f]
            self.fold_rows[f] = picked if rows is None else np.concatenate([rows, picked])

    def held_out(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows of one fold, channel minima and maxima of the other) per fold; one batch: in-sample."""
        if self.fold_rows[1] is None:
            rows, mn, mx = self.fold_rows[0], self.fold_min[0], self.fold_max[0]
            return [] if rows is None or mn is None or mx is None else [(rows, mn, mx)]
        out = []
        for f in (0, 1):
            rows, mn, mx = self.fold_rows[f], self.fold_min[1 - f], self.fold_max[1 - f]
            assert rows is not None and mn is not None and mx is not None
            out.append((rows, mn, mx))
        return out


def collect_activation_stats(
    model: str | os.PathLike,
    tensors: Sequence[str],
    feeds: list[dict[str, np.ndarray]],
    *,
    device: str = "auto",
    progress: bool = False,
    sample_rows: int = 0,
    divide: Mapping[str, np.ndarray] | None = None,
) -> dict[str, TensorStats]:
    """Statistics of each named tensor over all ``feeds``.

    Args:
        model: a .onnx file or a folder holding model.onnx.
        tensors: the tensors (graph inputs or node outputs).
        feeds: calibration batches.
        device: where ONNX Runtime runs ("auto", "cpu", "cuda").
        progress: a progress bar on stderr.
        sample_rows: rows of each tensor to keep in all (spread over the batches), for searches.
        divide: per-channel factors to divide a tensor by before it is measured (the smoothed tensor of a
            float model, without building the smoothed model).
    """
    if not feeds:
        raise ConfigError("calibration needs at least one batch of feeds")
    divide = divide or {}
    rng = np.random.default_rng(0)
    per_batch = -(-sample_rows // len(feeds)) if sample_rows else 0
    stats = {name: TensorStats(TensorObserver()) for name in tensors}
    rows = max(a.size if a.dtype.kind in "iub" or a.ndim < 2 else a.size // a.shape[-1] for a in feeds[0].values())
    # A guess at a tensor's bytes: rows x (a wide hidden size); the first group tells the truth.
    guess = max(rows, 1) * 2048 * 4
    step = max(1, ACTIVATION_BUDGET // guess)
    bar = tqdm(
        total=-(-len(tensors) // step) * len(feeds),
        desc="calibrating",
        unit="batch",
        file=sys.stderr,
        disable=not progress,
    )

    def on_batch(values: dict[str, np.ndarray]) -> None:
        for name, x in values.items():
            if x.dtype.kind != "f":
                raise ConfigError(f"tensor '{name}' is {x.dtype}, not floating point: it cannot be calibrated")
            x = x.astype(np.float32, copy=False)
            if name in divide:
                x = x / divide[name]
            stats[name].add(x, per_batch, rng)

    try:
        capture(model, list(tensors), feeds, on_batch, device=device, max_outputs=step, progress=bar.update)
    finally:
        bar.close()
    return stats

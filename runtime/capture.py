"""Capture intermediate tensors of a model in ONNX Runtime, batch by batch, in bounded memory.

The tensors a scheme needs (the activations entering each MatMul, say) are exposed as extra graph
outputs of an in-memory copy of the model's protobuf; ONNX Runtime reads the weights from the original
external data file (nothing is written or linked beside it). Tensors are captured in groups (one session
per group) so that a run holds at most ``max_outputs`` of them at once, and every batch is handed to a
callback that keeps streaming statistics (min/max, histograms, X^T X ...) and drops the arrays: nothing
accumulates here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from qonnx.core.modelfile import resolve_model_path
from qonnx.runtime.session import make_session

__all__ = ["capture"]


def _exposed(model_path: Path, names: Sequence[str]) -> bytes:
    """The model's protobuf (weights left in their external file) with ``names`` as extra outputs."""
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto.SerializeToString()


def capture(
    model: str | os.PathLike,
    names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    on_batch: Callable[[dict[str, np.ndarray]], None],
    *,
    device: str = "cpu",
    max_outputs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``batches`` through the model and hand each batch's values of ``names`` to ``on_batch``.

    Args:
        model: a .onnx file or a folder holding model.onnx.
        names: tensor names to capture (graph inputs are taken from the feeds).
        batches: input feeds; re-iterated once per group, so pass a list (or a re-iterable).
        on_batch: called with {name: array} for every batch (and group); keep statistics, not arrays.
        device: "cpu", "cuda" or "auto".
        max_outputs: tensors per session run (default: all at once).
        progress: called with 1 after every batch run.
    """
    path = resolve_model_path(model)
    names = list(dict.fromkeys(names))  # each tensor once, in order
    feeds_list = batches if isinstance(batches, list) else list(batches)
    input_names = {i.name for i in onnx.load(os.fspath(path), load_external_data=False).graph.input}
    from_feeds = [n for n in names if n in input_names]
    inner = [n for n in names if n not in input_names]
    if from_feeds:
        for feeds in feeds_list:
            on_batch({n: np.asarray(feeds[n]) for n in from_feeds})
    if not inner:
        return
    step = max_outputs or len(inner)
    for start in range(0, len(inner), step):
        group = inner[start : start + step]
        session = make_session(_exposed(path, group), device, external_data_dir=path.parent, lean=True)
        for feeds in feeds_list:
            values = session.run(group, dict(feeds))
            on_batch(dict(zip(group, values, strict=True)))
            if progress is not None:
                progress(1)
        del session

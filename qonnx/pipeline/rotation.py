"""The rotation step of ``quantize``: rotate the float model, and give calibration a file of the rotated model.

The rotation (:class:`qonnx.passes.rotate.RotateResidualPass`) runs on the exported float graph before any
weight algorithm, so that GPTQ's Hessians, AWQ's scales and activation ranges are those of the rotated model.
Calibration runs ONNX Runtime on a file: when the input came from a folder, the rotated model is written once
into a temporary folder beside copies of the input folder's small files (the tokenizer).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qonnx.core import modelfile
from qonnx.passes.rotate import RotateResidualPass

__all__ = ["RotatedSource", "rotate"]

_SMALL = 64 << 20  # files of the input folder copied for calibration (tokenizer, configs); weights are not


def rotate(model: ir.Model, rotation: str) -> RotateResidualPass | None:
    """Rotate ``model`` in place as ``rotation`` says ("none": nothing); the pass, for its notes and added nodes."""
    if rotation == "none":
        return None
    step = RotateResidualPass(rotation)  # type: ignore[arg-type]
    step(model)
    return step


class RotatedSource:
    """A file of the rotated model for calibration runs, written on first use and removed by :meth:`close`."""

    def __init__(self, model: ir.Model, source: Path | None, protect: Collection[Path]) -> None:
        self.model = model
        self.source = source
        self.protect = {p.resolve() for p in protect}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._path: Path | None = None

    def path(self) -> Path | None:
        """The rotated model's file (its folder holds the input folder's tokenizer files), or None (in memory)."""
        if self.source is None:
            return None  # calibration writes an in-memory model itself and has no tokenizer folder
        if self._path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qonnx-rotated-")
            folder = Path(self._tmp.name)
            for f in self.source.parent.iterdir():
                if f.is_file() and f.resolve() not in self.protect and f.stat().st_size <= _SMALL:
                    shutil.copy2(f, folder / f.name)
            version = self.model.ir_version
            self._path = folder / modelfile.MODEL_FILENAME
            modelfile.save(self.model, self._path)
            self.model.ir_version = version
        return self._path

    def close(self) -> None:
        """Remove the temporary folder."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RotatedSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""What the causal-LM export (:mod:`qonnx.models.export`) and the encoder export (:mod:`qonnx.models.encoder`) share.

The precisions, the stage messages, the torch.onnx export with onnxscript's optimizer (:func:`torch_to_onnx`),
the Hugging Face files written beside ``model.onnx``, and the check after the export: a plain ONNX Runtime CPU
session, the largest difference from PyTorch, and its report.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from qonnx.core.errors import quiet_logger
from qonnx.models.optimize import optimize

__all__ = [
    "DTYPES",
    "Stages",
    "cpu_session",
    "max_diff",
    "quiet_torch",
    "report_export",
    "save_hf_files",
    "torch_to_onnx",
]

#: Export precisions: the name on the command line and the torch dtype name.
DTYPES = {"fp32": "float32", "fp16": "float16"}


class Stages:
    """Says on stderr what an export does now, with the seconds since it began: ``qonnx: 12.3 s: tracing ...``.

    An export is minutes of work with no progress to count; these lines say where it is. ``quiet``: none.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the export began."""
        return time.perf_counter() - self.start

    def __call__(self, what: str) -> None:
        """Say that the stage ``what`` begins."""
        if not self.quiet:
            print(f"qonnx: {self.elapsed():5.1f} s: {what} ...", file=sys.stderr, flush=True)


#: torch.onnx's own stage lines (printed with ``verbose=True``), and what :class:`Stages` says for each.
_TORCH_STAGES = {
    "Obtain model graph": "tracing with torch.export",
    "Run decompositions...": "decomposing into ATen ops",
    "Translate the graph into ONNX...": "translating into ONNX",
}


class _TorchStageLines(io.TextIOBase):
    """A stdout for torch.onnx.export(verbose=True): its stage lines become :class:`Stages` lines, the rest goes."""

    def __init__(self, stages: Stages) -> None:
        self.stages = stages
        self.said: set[str] = set()

    def write(self, text: str) -> int:
        line = text.removeprefix("[torch.onnx] ")
        for head, what in _TORCH_STAGES.items():
            if line.startswith(head) and not line.rstrip().endswith(("✅", "❌")) and what not in self.said:
                self.said.add(what)
                self.stages(what)
        return len(text)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Within the block, no warnings from torch or transformers.

    They are deprecations of the libraries' own APIs, and the exporter's notes on renamed dimensions and a
    missing torchvision: nothing a user can act on.
    """
    with (
        warnings.catch_warnings(),
        quiet_logger("torch.onnx._internal.exporter._registration"),
        quiet_logger("transformers"),
    ):
        warnings.simplefilter("ignore")
        yield


def torch_to_onnx(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any],
    opset: int | None,
    stages: Stages,
) -> Any:
    """``torch.onnx.export(dynamo=True)`` then onnxscript's optimizer (:func:`qonnx.models.optimize.optimize`).

    Returns the onnx_ir Model, its producer named ``qonnx``. Each stage is said through ``stages``.
    """
    with torch.no_grad(), quiet_torch(), contextlib.redirect_stdout(_TorchStageLines(stages)):
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=False,
            verbose=True,  # for its stage lines, which _TorchStageLines turns into ours
            report=False,
        )
    if program is None:  # only when exporting to a file-like destination, which we never do
        raise RuntimeError("torch.onnx.export returned no program")
    onnx_model = program.model
    stages("optimizing (onnxscript)")
    optimize(onnx_model)
    onnx_model.producer_name = "qonnx"
    return onnx_model


def save_hf_files(out_dir: Path, model: Any, tokenizer: Any | None, dtype: str, kv_cache: bool | None) -> None:
    """Write config.json, generation_config.json and the tokenizer files beside model.onnx.

    ``kv_cache`` sets the config's ``use_cache``; None (encoders) leaves it as it is.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF quantization does not apply to the ONNX weights
        delattr(config, "quantization_config")
    if kv_cache is not None:
        config.use_cache = kv_cache
    config.dtype = DTYPES[dtype]
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def report_export(
    path: Path, seconds: float, *, dtype: str, quiet: bool, what: str, check: Any | None, tolerance: float
) -> None:
    """Say how long the export took and, with ``check``, how far ONNX Runtime is from PyTorch.

    A difference above ``tolerance`` (or not finite) prints a warning.
    """
    if check is None:
        if not quiet:
            print(f"qonnx: exported {path} in {seconds:.1f} s", file=sys.stderr)
        return
    with quiet_torch():  # a reference forward warns of transformers' own deprecated arguments
        diff = check()
    if not quiet:
        print(
            f"qonnx: exported {path} in {seconds:.1f} s; "
            f"max |{what} ONNX Runtime ({dtype}) - PyTorch (fp32)| = {diff:.3g}",
            file=sys.stderr,
        )
    if diff > tolerance or not np.isfinite(diff):
        print(
            f"qonnx: warning: the ONNX {what} differ from PyTorch's by {diff:.3g} "
            f"(more than {tolerance:g} expected for {dtype})",
            file=sys.stderr,
        )


def cpu_session(model_path: str | os.PathLike) -> ort.InferenceSession:
    """A plain CPU session of an exported float model, quiet (the export's own check; no qonnx policies apply)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(model_path), so, providers=["CPUExecutionProvider"])


def max_diff(onnx_logits: np.ndarray, torch_logits: Any) -> float:
    """Max |difference| between an ONNX Runtime output and the PyTorch tensor it should equal (same shape)."""
    a = np.asarray(onnx_logits, dtype=np.float64)
    b = torch_logits.detach().double().numpy()
    if a.shape != b.shape:
        raise RuntimeError(f"ONNX outputs have shape {a.shape}, PyTorch's {b.shape}")
    return float(np.abs(a - b).max())

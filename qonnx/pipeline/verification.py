"""Every quantize run checks its own output before writing it: options, verdict and metadata."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qonnx.core import __version__
from qonnx.core.errors import ConfigError, QonnxError, escape_name, warn
from qonnx.core.sizes import human_bytes
from qonnx.runtime.session import InMemoryModel
from qonnx.runtime.verify import OriginalDidNotRun, ReferenceRun, verify_models

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "VerifyOptions",
    "Verification",
    "VerificationError",
    "check_shapes",
    "start_reference",
    "start_reference_early",
    "start_verify",
    "verify",
]

#: Below this SQNR (dB) on any output, the run warns loudly: the model has lost most of its signal. Not for a
#: language model (an output named ``logits``): there its next-token distribution decides (below).
DEFAULT_WARN_SQNR = 10.0
#: A language model's run warns above this mean KL divergence (nats per token) of the next-token distribution ...
DEFAULT_WARN_KL = 0.1
#: ... or below this top-1 agreement of its logits with the original's.
DEFAULT_WARN_TOP1 = 0.8
#: Models whose files exceed this are not verified unless asked: both would be loaded in ONNX Runtime.
DEFAULT_MAX_BYTES = 2 << 30


class VerificationError(QonnxError):
    """The quantized model is further from the original than ``min_sqnr`` allows (CLI exit code 3)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    """How a quantize run verifies its output.

    Attributes:
        enabled: True always, False never, None (default) unless the input exceeds ``max_bytes`` (and no
            ``min_sqnr`` asks for a check).
        min_sqnr: refuse to write the output when any output's SQNR (dB) is below this; finite, and not
            with ``enabled=False`` (ConfigError).
        warn_sqnr: warn on stderr below this (models without ``logits``).
        warn_kl, warn_top1: a language model (an output named ``logits``) warns on stderr when the KL
            divergence of its next-token distribution is above ``warn_kl`` (nats per token) or the top-1
            agreement of its logits below ``warn_top1``; its KV cache and other outputs do not decide.
        feeds: input batches to use; otherwise one batch from ``data``, else made from the declared inputs.
        data: what that batch comes from: a ``.npz`` of feeds (its last batch; inputs it lacks are made up) or
            text (``"pydoc"``, a ``.txt`` or ``.jsonl`` file: its last 128 tokens, through the tokenizer beside
            the model). None (default): ``quantize`` takes the calibration data when the scheme has some, else
            the end of the pydoc corpus for a model with a tokenizer.
        shapes: input name -> full shape, for inputs with dynamic dimensions.
        dims: dynamic dimension name -> size (e.g. {"sequence": 64}).
        device: "cpu", "cuda" or "auto".
        max_bytes: see ``enabled``.
    """

    enabled: bool | None = None
    min_sqnr: float | None = None
    warn_sqnr: float = DEFAULT_WARN_SQNR
    warn_kl: float = DEFAULT_WARN_KL
    warn_top1: float = DEFAULT_WARN_TOP1
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None
    data: str | os.PathLike | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    dims: Mapping[str, int] | None = None
    device: str = "cpu"
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.min_sqnr is None:
            return
        if not math.isfinite(self.min_sqnr):
            raise ConfigError(f"min_sqnr must be a finite number of dB, not {self.min_sqnr}")
        if self.enabled is False:
            raise ConfigError("min_sqnr needs the verification that enabled=False turns off")


@dataclasses.dataclass
class Verification:
    """What verification found (or why it did not run).

    ``unverified`` holds why a run that was meant to be checked certifies nothing: the original's output
    showed nothing on the inputs (all zeros, constant, not finite), or the original ran on none of the inputs
    made up for it. Its figures, if any, are then no verdict: ``worst_sqnr`` is None.
    """

    ran: bool
    outputs: list[Any] = dataclasses.field(default_factory=list)  # runtime.verify.OutputMetrics
    note: str = ""
    inputs: str = ""  # what both models ran on, e.g. "pydoc text, its last 128 tokens"
    seconds: float = 0.0
    unverified: str = ""
    sizes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # made-up inputs' shapes, by name
    tried: list[str] = dataclasses.field(default_factory=list)  # made-up sizes passed over, and why

    @property
    def verified(self) -> bool:
        """Whether the figures are a verdict: both models ran and the original's outputs showed something."""
        return self.ran and not self.unverified

    @property
    def worst_sqnr(self) -> float | None:
        """The lowest SQNR over the outputs (None when nothing was compared, or the comparison shows nothing)."""
        if self.unverified:
            return None
        return min((m.sqnr_db for m in self.outputs), default=None)

    @property
    def logits(self) -> Any | None:
        """A language model's logits (the output whose next-token distribution decides), else None."""
        if self.unverified:
            return None
        return next((m for m in self.outputs if m.kl_divergence is not None), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``unverified``, ``sizes``, ``tried`` and ``logits`` only where they say something."""
        worst = self.worst_sqnr
        d = {
            "ran": self.ran,
            "note": self.note,
            "inputs": self.inputs,
            "worst_sqnr_db": None if worst is None else round(max(min(worst, 999.0), -999.0), 3),
            "outputs": [m.to_dict() for m in self.outputs],
        }
        head = self.logits
        logits = None if head is None else {"output": head.name, **_figures(head)}
        extra = {"unverified": self.unverified, "sizes": self.sizes, "tried": self.tried, "logits": logits}
        return {**d, **{k: v for k, v in extra.items() if v}}


#: Runs started by :func:`start_reference_early`, each waiting for :func:`start_reference` to take it.
_EARLY: list[tuple[str, VerifyOptions, ReferenceRun]] = []


def check_shapes(options: VerifyOptions, model: ir.Model) -> None:
    """Refuse ``options.shapes`` (``--input-shape``) for names that are not inputs of ``model``.

    Raises:
        ConfigError: naming the unknown inputs and listing the model's.
    """
    if not options.shapes:
        return
    inputs = [v.name for v in model.graph.inputs if v.name and v.name not in model.graph.initializers]
    unknown = [name for name in options.shapes if name not in inputs]
    if unknown:
        missing = ", ".join(f"'{escape_name(n)}'" for n in unknown)
        listed = ", ".join(escape_name(n) for n in inputs) or "none"
        raise ConfigError(f"--input-shape: the model has no input {missing}; its inputs: {listed}")


def start_reference_early(model: str | os.PathLike, options: VerifyOptions) -> None:
    """Start the original's run as soon as its path is known: before quantize and what it imports load.

    :func:`start_reference` for the same file with the same ``options`` object takes the run over. Nothing
    starts where verification might not run: disabled, or the model's folder over ``max_bytes``.
    """
    path = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    if options.enabled is False or not path.is_file():
        return
    try:  # the folder's files bound the model's size from above
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    except OSError:  # quantize reports what is wrong with the path
        return
    if options.enabled is None and size > options.max_bytes:
        return
    _EARLY.append((os.path.realpath(path), options, _reference(path, options).start()))


def start_reference(original: str | os.PathLike | bytes, options: VerifyOptions) -> ReferenceRun:
    """Start running the original model in the background, to overlap with quantization.

    Pass the result to :func:`verify` as ``original``; errors surface there. A run that
    :func:`start_reference_early` started for the same file and ``options`` is returned instead.
    """
    if not isinstance(original, bytes):
        key = os.path.realpath(original)
        for i, (path, opts, early) in enumerate(_EARLY):
            if path == key and opts is options:
                del _EARLY[i]
                return early
    return _reference(original, options).start()


def _reference(original: str | os.PathLike | bytes, options: VerifyOptions) -> ReferenceRun:
    return ReferenceRun(
        original,
        feeds=options.feeds,
        shapes=options.shapes,
        dims=options.dims,
        data=options.data,
        device=options.device,
    )


def _figures(m: Any) -> dict[str, float | None]:
    top1 = None if m.top1_agreement is None else round(m.top1_agreement, 6)
    return {"kl_divergence": float(f"{m.kl_divergence:.6g}"), "top1_agreement": top1}


#: What the usual remedies bought on the reference model (SmolLM2-135M W4A16, perplexity on 24 x 512 tokens),
#: as measured in benchmarks/RESULTS.md: fp32 14.20, the default (RTN, asymmetric, block 128) 19.12.
_MEASURED = {
    "awq+gptq": ("--algo awq+gptq", "15.30"),
    "gptq": ("--algo gptq", "15.72"),
    "block32": ("--block-size 32 --symmetric --algo gptq", "15.21"),
    "bits5": ("--target-bits 5", "17.05"),
}


def advice(config: Mapping[str, Any] | None) -> str:
    """The quantize options that would bring a language model closer to its original, with their measured gain.

    For a weight-only scheme: a better algorithm, then smaller blocks, then more bits for the sensitive
    layers, each with the perplexity it gave SmolLM2-135M (benchmarks/RESULTS.md); else the layers to keep
    in floating point.
    """
    config = config or {}
    scheme, algo = str(config.get("scheme", "")), config.get("algo", "rtn")
    if isinstance(algo, Mapping):  # e.g. {"name": "gptq", ...}; AWQ with a "gptq" entry is awq+gptq
        algo = "awq+gptq" if algo.get("name") == "awq" and algo.get("gptq") else str(algo.get("name"))
    if scheme not in ("w4a16", "w3a16", "w2a16"):
        return "find the layers that lose most with `qonnx analyze MODEL`, then keep them in float with --exclude REGEX"
    if algo in ("awq+gptq", "gptq") and config.get("block_size") in (32, None):
        tries = ["bits5"]
    elif algo in ("awq+gptq", "gptq"):
        tries = ["block32", "bits5"]
    else:
        tries = ["awq+gptq", "gptq", "bits5"]
    said = ", ".join(f"`{_MEASURED[k][0]}` {_MEASURED[k][1]}" for k in tries)
    return (
        f"try `qonnx quantize` with {' or '.join(f'`{_MEASURED[k][0]}`' for k in tries)} (SmolLM2-135M W4A16 "
        "perplexity from "
        f"benchmarks/RESULTS.md: default 19.12, {said}; fp32 14.20)"
    )


def start_verify(
    original: str | os.PathLike | bytes | ReferenceRun,
    quantized: ir.Model | InMemoryModel,
    options: VerifyOptions,
    size: int,
    config: Mapping[str, Any] | None = None,
) -> Future[Verification]:
    """:func:`verify` the quantized model as it is now, in a background thread (e.g. while it is written).

    The model is taken on this thread (:class:`~qonnx.runtime.session.InMemoryModel`, unless it is one
    already) and may be saved meanwhile, but not changed. ``result()`` returns what :func:`verify` returns,
    or raises what it raises.
    """
    future: Future[Verification] = Future()
    skipped = _skipped(options, size)
    if skipped is not None:
        future.set_result(skipped)
        return future
    snapshot = quantized if isinstance(quantized, InMemoryModel) else InMemoryModel.of(quantized)

    def work() -> None:
        try:
            future.set_result(verify(original, snapshot, options, size, config))
        except BaseException as e:  # handed to the caller by result()
            future.set_exception(e)

    threading.Thread(target=work, name="qonnx-verify-quantized").start()
    return future


def _skipped(options: VerifyOptions, size: int) -> Verification | None:
    if options.enabled is False:
        return Verification(False, note="verification disabled")
    if options.enabled is None and size > options.max_bytes:
        return Verification(
            False,
            note=f"verification skipped: model over {human_bytes(options.max_bytes)} "
            "(both models would be loaded; ask for it explicitly)",
        )
    return None


def verify(
    original: str | os.PathLike | bytes | ReferenceRun,
    quantized: str | os.PathLike | bytes | ir.Model | InMemoryModel,
    options: VerifyOptions,
    size: int,
    config: Mapping[str, Any] | None = None,
) -> Verification:
    """Compare the models as ``options`` say; raises VerificationError below ``min_sqnr``.

    ``original`` is the model itself or its run started by :func:`start_reference`; ``quantized`` a file,
    bytes, or a model in memory. ``config`` (the scheme's ``to_dict()``) chooses the advice a warning gives.
    """
    skipped = _skipped(options, size)
    if skipped is not None:
        return skipped
    start = time.perf_counter()
    asked = options.enabled is True or options.min_sqnr is not None
    reference: ReferenceRun | None = None
    try:
        if isinstance(original, ReferenceRun):
            reference = original
        else:
            reference = _reference(original, options)
            reference.run()
        metrics = verify_models(reference, quantized)
    except QonnxError:
        raise
    except OriginalDidNotRun as e:  # the made-up inputs are at fault, not the quantization
        hint = "give input shapes with --input-shape NAME=DxD or data with --calib-data FEEDS.npz"
        if asked:
            raise QonnxError(f"verification could not run the models: {e}; {hint}") from None
        why = f"{e}; {hint}"
        _warn_unverified(why)
        return Verification(False, note=f"NOT VERIFIED: {why}", unverified=why, seconds=time.perf_counter() - start)
    except Exception as e:  # ORT's errors for inputs it cannot make up: say how to fix
        text = str(e).strip()
        msg = text.splitlines()[0][:300] if text else type(e).__name__
        if "NOT_IMPLEMENTED" in text or "is not a registered function/op" in text:
            hint = (
                f"ONNX Runtime's {options.device} provider cannot run this model (bfloat16 on CPU, or a custom "
                "op): verify with --device cuda or pass --no-verify"
            )
        else:
            hint = "give input shapes with --input-shape NAME=DxD or disable it with --no-verify"
        raise QonnxError(f"verification could not run the models: {msg}; {hint}") from None
    result = Verification(
        True,
        metrics,
        inputs=reference.inputs,
        seconds=time.perf_counter() - start,
        sizes=reference.sizes,
        tried=reference.tried,
    )
    shows_nothing = [m for m in metrics if m.degenerate]
    if shows_nothing or not metrics:
        what = ", ".join(f"'{m.name}' is {m.degenerate}" for m in shows_nothing) or "no float output to compare"
        result.unverified = (
            f"the original's output {what} on {reference.inputs}"
            + (f" (also tried {'; '.join(reference.tried)})" if reference.tried else "")
            + ": no figure can tell a good quantization from a broken one; give real inputs with --calib-data "
            "FEEDS.npz or --input-shape NAME=DxD"
        )
        if asked:
            gate = f"--min-sqnr {options.min_sqnr:g}" if options.min_sqnr is not None else "--verify"
            raise VerificationError(f"{gate}: not verified: {result.unverified}; nothing was written")
        _warn_unverified(result.unverified)
        return result
    worst = result.worst_sqnr
    if options.min_sqnr is not None and worst is not None and not worst >= options.min_sqnr:
        bad = min(metrics, key=lambda m: m.sqnr_db)
        raise VerificationError(
            f"output '{escape_name(bad.name)}' has SQNR {bad.sqnr_db:.1f} dB, below --min-sqnr "
            f"{options.min_sqnr:g}; nothing was written"
        )
    head = result.logits
    if head is not None:
        top1 = head.top1_agreement
        if not head.kl_divergence <= options.warn_kl or (top1 is not None and not top1 >= options.warn_top1):
            agree = "" if top1 is None else f", top-1 agreement {top1:.1%}"
            warn(
                f"the quantized model's next-token predictions moved on {reference.inputs}: "
                f"'{escape_name(head.name)}' KL divergence {head.kl_divergence:.3f} nats/token{agree}; {advice(config)}"
            )
    elif worst is not None and not worst >= options.warn_sqnr:
        bad = min(metrics, key=lambda m: m.sqnr_db)
        warn(
            f"output '{escape_name(bad.name)}' has SQNR {bad.sqnr_db:.1f} dB (cosine {bad.cosine:.3f}): "
            "the quantized model has lost much of its signal; " + advice(config)
        )
    return result


def _warn_unverified(why: str) -> None:
    warn(f"the output is NOT VERIFIED: {why}")


def metadata(config: dict[str, Any], verification: Verification, quantized: int, skipped: int) -> dict[str, str]:
    """The ``metadata_props`` a pipeline can gate on."""
    worst = verification.worst_sqnr
    return {
        "qonnx.version": __version__,
        "qonnx.config": json.dumps(config, sort_keys=True),
        "qonnx.layers": json.dumps({"quantized": quantized, "skipped": skipped}),
        "qonnx.verification": json.dumps(verification.to_dict(), sort_keys=True),
        "qonnx.worst_sqnr_db": "" if worst is None or not math.isfinite(worst) else f"{worst:.3f}",
    }

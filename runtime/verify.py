"""Self-verification: run the original and the quantized model on the same inputs and compare outputs.

Inputs come from the caller (calibration data), from text through the model's tokenizer, or are made from the
declared input shapes and types (:mod:`qonnx.runtime.inputs`), at sizes tried in turn until the original runs on
them and its outputs show something (:func:`degenerate`: not all zeros, constant or non-finite, where zero error
on no signal would read as a perfect match). The original runs first (``quantize`` starts it
in a background thread before quantizing) and its session is freed before the quantized model's is built; both
sessions are made for one run (:func:`~qonnx.runtime.single_run.verification_session`). The quantized model is
run straight from memory (:class:`~qonnx.runtime.session.InMemoryModel`), in a second background thread while
the output is written. Outputs are compared a slice at a time (:class:`OutputComparison`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from qonnx.core.errors import ConfigError
from qonnx.core.paths import resolve_model_path
from qonnx.core.tokenizer import bos_token_id
from qonnx.runtime.compare import OutputComparison, OutputMetrics, compare_outputs, degenerate, is_logits, kl_rows
from qonnx.runtime.data import PYDOC, npz_batch, npz_batches, read_text
from qonnx.runtime.inputs import (
    ORT_TO_NUMPY,
    declared_sizes,
    describe_shapes,
    make_inputs,
    parse_shape_overrides,
    size_trials,
)
from qonnx.runtime.session import InMemoryModel
from qonnx.runtime.single_run import feed_weights, untranspose_weights, verification_session

if TYPE_CHECKING:
    import onnx_ir as ir

#: The inputs, the one-run session and the output comparison live in qonnx.runtime.inputs, .single_run and
#: .compare; their public names stay importable from here, where verification's callers have always found them.
__all__ = [
    "OriginalDidNotRun",
    "OutputMetrics",
    "ReferenceRun",
    "compare_outputs",
    "degenerate",
    "feed_weights",
    "is_logits",
    "kl_rows",
    "make_inputs",
    "parse_shape_overrides",
    "untranspose_weights",
    "verification_session",
    "verify_models",
]


#: Tokens of real text the models are compared on when there is no calibration data. Fewer would cost less
#: (about 0.2 CPU-seconds per model on SmolLM2-135M for 64) but move the figures: on SmolLM2 W4A16 the logits
#: SQNR of the last 64 tokens of this text is 5.5 dB, of the last 128 9.6 dB.
VERIFY_TOKENS = 128


def text_token_ids(folder: Path, length: int = VERIFY_TOKENS, data: str | os.PathLike = PYDOC) -> np.ndarray | None:
    """[1, n] token ids of the end of ``data`` when ``folder`` holds a ``tokenizer.json``, else None.

    ``data``: ``"pydoc"`` (default: the end of the pydoc corpus, away from the evaluation windows and from
    calibration's start) or a ``.txt`` / ``.jsonl`` file. ``n`` is ``length``, or fewer when the text is
    shorter (at least 8 tokens, else None), plus one for the BOS the tokenizer puts before a text where it puts
    one (:func:`~qonnx.core.tokenizer.bos_token_id`). Real text gives top-1 agreement a meaning that made-up ids
    do not.
    """
    found = _text_ids(folder, length, data)
    return None if found is None else found[0]


def _text_ids(folder: Path, length: int, data: str | os.PathLike) -> tuple[np.ndarray, bool] | None:
    """:func:`text_token_ids`, and whether a BOS comes first."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    text = read_text(data)[-100 * length :]  # ConfigError: unreadable data is the caller's to report
    try:
        fast = Tokenizer.from_file(str(path))
        ids = fast.encode(text, add_special_tokens=False).ids
        bos = bos_token_id(folder, fast)
    except Exception:  # an unreadable tokenizer: fall back to made-up ids
        return None
    if len(ids) < 8:
        return None
    window = ([] if bos is None else [bos]) + ids[-length:]
    return np.asarray([window], dtype=np.int64), bos is not None


#: Reference outputs kept in memory while quantization runs; batches past this are run at comparison time.
REFERENCE_BUDGET_BYTES = 512 << 20


def _float_outputs(session: ort.InferenceSession) -> list[str]:
    floats = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")
    return [o.name for o in session.get_outputs() if o.type in floats]


class ReferenceRun:
    """The original model's outputs on the verification inputs, computed once, possibly in the background.

    ``start()`` runs the original in a thread (ONNX Runtime releases the GIL while it builds sessions
    and runs them), so that it overlaps with quantization; ``outputs(i)`` waits for it. The session is
    freed as soon as its outputs are in, unless the outputs would exceed ``budget`` bytes: then it is
    kept and the remaining batches run when asked for.
    """

    def __init__(
        self,
        original: str | os.PathLike | bytes,
        *,
        feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        dims: Mapping[str, int] | None = None,
        data: str | os.PathLike | None = None,
        device: str = "cpu",
        budget: int = REFERENCE_BUDGET_BYTES,
    ) -> None:
        self.original, self.device, self.budget = original, device, budget
        self._feeds, self._shapes, self._dims, self._data = feeds, shapes, dims, data
        #: What the models run on, in words (for reports): set by ``run()``.
        self.inputs = ""
        #: The shapes of the inputs made up (none given for them), by input name, unless the model runs on text.
        self.sizes: dict[str, list[int]] = {}
        #: Made-up sizes passed over, and why (the original refused them, or its output showed nothing).
        self.tried: list[str] = []
        self._kept_why = ""
        self.names: list[str] = []
        self.batches: list[Mapping[str, np.ndarray]] = []
        self._outputs: list[list[np.ndarray]] = []
        self._session: ort.InferenceSession | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ReferenceRun:
        """Run the original in a background thread; returns self."""
        self._thread = threading.Thread(target=self._run_catching, name="qonnx-verify-reference")
        self._thread.start()
        return self

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as e:  # handed to the caller by wait()
            self._error = e

    def run(self) -> None:
        """Build the original's session, make the inputs and run every batch that fits in the budget.

        In the background (``start()``) it takes half the cores: the other half quantize meanwhile. On 2 cores
        one thread instead of two took the verified SmolLM2 quantize from 2.42 s to 2.19 s (median of 10; 1.77 s
        unverified): the original still finishes before the weights do, without the threads fighting.
        """
        threads = max(1, (os.cpu_count() or 2) // 2) if self._thread is not None else 0
        session = verification_session(self.original, self.device, prepack=False, threads=threads)
        self.names = _float_outputs(session)
        if not self._feeds:
            found, outputs = self._search(session)
            self.batches, self._outputs = [found], [outputs]
            return
        self.batches = [{k: np.asarray(v) for k, v in b.items()} for b in self._feeds]  # numpy scalars too
        self.inputs = f"{len(self.batches)} given batch{'es' if len(self.batches) > 1 else ''}"
        held = 0
        for batch in self.batches:
            if held > self.budget:
                self._session = session  # the rest run when compared, one batch at a time
                return
            out = session.run(self.names, dict(batch))
            held += sum(int(o.nbytes) for o in out)
            self._outputs.append(out)

    def _given(self, session: ort.InferenceSession) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, int]]:
        """What ``data`` gives: arrays by input name, token ids, and the dimension sizes those fix; sets ``inputs``.

        From a ``.npz`` (its last batch), or text (the pydoc corpus by default) through the model's tokenizer.
        """
        data = self._data
        dims = dict(self._dims or {})
        if data is not None and str(data).lower().endswith(".npz"):
            arrays, n = npz_batches(data)
            declared = {i.name for i in session.get_inputs()}
            unknown = sorted(set(arrays) - declared)
            if unknown:
                raise ConfigError(f"{data}: arrays not named after an input of the model: {', '.join(unknown)}")
            given = npz_batch(arrays, n - 1)
            self.inputs = f"{Path(data).name}, its last batch (of {n})"
            for inp in session.get_inputs():  # sizes of dynamic dimensions as the given arrays have them
                if inp.name in given:
                    for d, size in zip(inp.shape or [], given[inp.name].shape, strict=False):
                        if isinstance(d, str):
                            dims.setdefault(d, int(size))
            return given, None, dims
        text = data if data is not None else PYDOC
        found = None if isinstance(self.original, bytes) else _text_ids(Path(self.original).parent, VERIFY_TOKENS, text)
        if found is None:
            self.inputs = "inputs made from the declared shapes"
            return {}, None, dims
        ids, bos = found
        source = "pydoc text" if str(text) == PYDOC else Path(text).name
        self.inputs = f"{source}, its last {ids.shape[1] - bos} tokens" + (" after BOS" if bos else "")
        return {}, ids, dims

    def _declared(self) -> dict[str, int]:
        """Sizes the original states for its dynamic input dimensions (:func:`declared_sizes`); {} if unreadable."""
        try:
            if isinstance(self.original, bytes):
                proto = onnx.ModelProto.FromString(self.original)
            else:
                proto = onnx.load(os.fspath(resolve_model_path(self.original)), load_external_data=False)
        except Exception:  # ONNX Runtime read it: what onnx cannot read states nothing
            return {}
        return declared_sizes(proto)

    def _search(self, session: ort.InferenceSession) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """The batch to compare on and the original's outputs on it.

        Inputs not given are made up (:func:`~qonnx.runtime.inputs.make_inputs`) at the sizes of
        :func:`~qonnx.runtime.inputs.size_trials`, tried in turn until the original runs on them and gives
        outputs that show something (:func:`degenerate`); the first that ran is kept when none does.
        ``sizes`` and ``tried`` then say what was made up and what was passed over.

        Raises:
            OriginalDidNotRun: the original ran on none of the sizes tried, where some inputs were made up.
        """
        given, ids, dims = self._given(session)
        shapes = dict(self._shapes or {})
        made = [
            i.name
            for i in session.get_inputs()
            if i.name not in given and i.name not in shapes and not (ids is not None and i.name == "input_ids")
        ]
        trials = size_trials(session, shapes=shapes, dims=dims, token_ids=ids)
        if len(trials) > 1:  # sizes to look for: first those the model states
            trials = size_trials(session, shapes=shapes, dims=dims, token_ids=ids, declared=self._declared())
        kept: tuple[dict[str, np.ndarray], list[np.ndarray]] | None = None
        passed: list[tuple[str, str]] = []  # (sizes, why) of every trial not kept
        seen: set[str] = set()
        for trial in trials:
            batch = {**make_inputs(session, shapes=shapes, dims=trial, token_ids=ids), **given}
            shown = describe_shapes({n: batch[n] for n in made})
            if shown in seen and made:
                continue
            seen.add(shown)
            try:
                outputs = session.run(self.names, batch, _QUIET)
            except Exception as e:
                if not made:
                    raise
                passed.append((shown, _ort_message(e)))
                continue
            bad = [f"'{n}' {why}" for n, o in zip(self.names, outputs, strict=True) if (why := degenerate(o))]
            if kept is not None and bad:
                passed.append((shown, f"output {', '.join(bad)}"))
                continue
            if kept is not None:  # the better one replaces the first that ran
                passed.append((describe_shapes(_named(kept[0], made)), self._kept_why))
            kept, self._kept_why = (batch, outputs), f"output {', '.join(bad)}"
            if ids is None:  # text: its token count says it all
                self.sizes = {n: [int(d) for d in a.shape] for n, a in _named(batch, made).items()}
            if not bad:
                break
        if kept is None:
            ends = passed if len(passed) < 3 else [passed[0], passed[-1]]
            tried = "; ".join(f"{shown}: {why}" for shown, why in ends)
            count = f"none of the {len(passed)} sets of inputs" if len(passed) > 1 else "none of the inputs"
            more = f"first and last: {tried}" if len(passed) > 2 else tried
            raise OriginalDidNotRun(f"the original model ran on {count} qonnx made up ({more})")
        self.tried = [f"{shown}: {why}" for shown, why in passed]
        if made and not given and ids is None:
            self.inputs = f"inputs made from the declared shapes: {describe_shapes(_named(kept[0], made))}"
        return kept

    def wait(self) -> ReferenceRun:
        """Wait for the background run; raises what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self

    def outputs(self, index: int) -> list[np.ndarray]:
        """The original's outputs for batch ``index`` (in the order of ``names``)."""
        self.wait()
        if index < len(self._outputs):
            return self._outputs[index]
        assert self._session is not None
        return self._session.run(self.names, dict(self.batches[index]))


def _named(batch: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of ``batch`` named in ``names``, in that order."""
    return {n: batch[n] for n in names}


class OriginalDidNotRun(Exception):
    """The original model ran on none of the inputs made up for it: the inputs are at fault, not a quantization."""


#: Runs whose failures are reported by the exception alone (ONNX Runtime logs them on stderr otherwise).
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4


def _ort_message(e: BaseException) -> str:
    """ONNX Runtime's error in a short line: the node that failed and why, without its source location."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    m = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if m:
        why = re.sub(r"^\S+:\d+ ", "", m.group(3))  # the source file and line
        why = re.sub(r"^[\w:~]+(\([^)]*\))? ", "", why)  # the function
        text = f"{m.group(1)} node {m.group(2)!r}: {why}"
    else:
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text[:200]


def verify_models(
    original: str | os.PathLike | bytes | ReferenceRun,
    quantized: str | os.PathLike | bytes | ir.Model | InMemoryModel,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    data: str | os.PathLike | None = None,
    device: str = "cpu",
) -> list[OutputMetrics]:
    """Run both models on the same inputs; one metrics row per float output, over all batches.

    ``original`` may be a :class:`ReferenceRun` already started (its own inputs and device are used);
    ``quantized`` a file, bytes, or a model in memory (run from there, see :class:`InMemoryModel`).
    Inputs: ``feeds``, else one batch from ``data`` (see :class:`ReferenceRun`).
    """
    if not isinstance(quantized, (str, os.PathLike, bytes, InMemoryModel)):
        quantized = InMemoryModel.of(quantized)
    if isinstance(original, ReferenceRun):
        reference = original
    else:
        reference = ReferenceRun(original, feeds=feeds, shapes=shapes, dims=dims, data=data, device=device)
        reference.run()
    q_sess = verification_session(quantized, reference.device, prepack=True)  # while the reference finishes
    reference.wait()
    # A quantized KV cache (qonnx.passes.kv_cache) keeps past and present in int8/uint8: its present outputs are
    # not compared, and the empty past the reference ran with is given in the quantized model's type.
    floats = set(_float_outputs(q_sess))
    names = [n for n in reference.names if n in floats]
    accs = {n: OutputComparison(n) for n in names}
    declared = {i.name: i for i in q_sess.get_inputs()}
    for i, batch in enumerate(reference.batches):
        out = q_sess.run(names, _retyped_empty(batch, declared))
        reference_out = dict(zip(reference.names, reference.outputs(i), strict=True))
        for n, o in zip(names, out, strict=True):
            accs[n].add(reference_out[n], o)
    return [a.finalize() for a in accs.values()]


def _retyped_empty(batch: Mapping[str, np.ndarray], declared: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``batch`` with each empty array whose type the model declares otherwise made anew in that type."""
    out = dict(batch)
    for name, array in batch.items():
        info = declared.get(name)
        if info is None:
            continue
        dtype = ORT_TO_NUMPY.get(info.type)
        if dtype is None or array.size or array.dtype == dtype:
            continue
        shape = [d if isinstance(d, int) and d > 0 else n for d, n in zip(info.shape, array.shape, strict=False)]
        out[name] = np.zeros(shape if len(shape) == array.ndim else array.shape, dtype=dtype)
    return out

"""Self-verification: run the original and the quantized model on the same inputs and compare outputs.

Inputs come from the caller (calibration data) or are made from the declared input shapes and types:
dynamic dimensions take sizes by name (batch 1, sequence 16, past length 0, others 1) unless overridden,
token ids are drawn below the vocabulary size read off the logits output, masks are ones, position ids
count up, and float inputs are standard normal.

The original runs first (``quantize`` starts it in a background thread before quantizing) and its session is
freed before the quantized model's is built; both sessions are made for one run (``verification_session``).
The quantized model is run straight from memory (:class:`~qonnx.runtime.session.InMemoryModel`), in a
second background thread while the output is written.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

from qonnx.runtime.data import PYDOC
from qonnx.runtime.session import PRECISE_QDQ, InMemoryModel, resolve_device

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "OutputMetrics",
    "ReferenceRun",
    "compare_outputs",
    "feed_weights",
    "make_inputs",
    "parse_shape_overrides",
    "untranspose_weights",
    "verification_session",
    "verify_models",
]

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(bfloat16)": ml_dtypes.bfloat16,
    "tensor(int16)": np.int16,
}


@dataclasses.dataclass
class OutputMetrics:
    """How far one quantized output is from the original."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite SQNR as a large finite number)."""
        d = dataclasses.asdict(self)
        d["sqnr_db"] = round(min(self.sqnr_db, 999.0), 3)
        d["cosine"] = round(self.cosine, 6)
        d["max_abs_error"] = float(f"{self.max_abs_error:.6g}")
        if self.top1_agreement is not None:
            d["top1_agreement"] = round(self.top1_agreement, 6)
        return d


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224"]`` -> ``{"x": (1, 3, 224, 224)}``; raises ValueError with the bad item."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise ValueError(f"bad --input-shape {item!r}; expected NAME=DxDxD, e.g. x=1x3x224x224")
        out[name] = shape
    return out


def _guess(label: str, name: str, axis: int) -> int:
    if "past" in label or ("past" in name.lower() and axis == 2):
        return 0
    if "batch" in label or axis == 0:
        return 1
    if any(k in label for k in ("seq", "len", "token", "time")):
        return 16
    return 1


def _dim(dim: Any, name: str, axis: int, dims: dict[str, int]) -> int:
    """Size of one dimension: a symbol keeps one size across inputs.

    Expressions of symbols, as exporters write them (``past_sequence_length + sequence_length``), are
    evaluated from the symbols' sizes.
    """
    if isinstance(dim, int) and dim >= 0:
        return dim
    label = str(dim or "").strip()
    key = label.lower()
    if key in dims:
        return dims[key]
    names = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", label)
    if label and (len(names) != 1 or names[0] != label):  # an expression
        try:
            tree = ast.parse(label, mode="eval")
            for n in names:
                dims.setdefault(n.lower(), _guess(n.lower(), name, axis))
            value = _eval(tree.body, dims)
            if value >= 0:
                return value
        except (SyntaxError, ValueError):
            pass
    dims[key] = _guess(key, name, axis) if key else _guess("", name, axis)
    return dims[key] if key else _guess("", name, axis)


def _eval(node: ast.AST, dims: Mapping[str, int]) -> int:
    """Integer arithmetic on dimension symbols; anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return dims[node.id.lower()]
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, dims), _eval(node.right, dims)
        ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
        if type(node.op) in ops:
            return ops[type(node.op)]
        if isinstance(node.op, ast.FloorDiv) and b:
            return a // b
    raise ValueError("unsupported dimension expression")


def _vocab_size(session: ort.InferenceSession) -> int | None:
    for out in session.get_outputs():
        if "logit" in out.name.lower() and out.shape and isinstance(out.shape[-1], int):
            return out.shape[-1]
    return None


def make_inputs(
    session: ort.InferenceSession,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    token_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for ``session`` made from its declared shapes and types (see the module docstring).

    ``token_ids`` ([batch, length], real text) feed an ``input_ids`` input and set its dimensions.
    """
    rng = np.random.default_rng(seed)
    shapes, sizes = dict(shapes or {}), {k.lower(): v for k, v in (dims or {}).items()}
    vocab = _vocab_size(session) or 100
    feeds: dict[str, np.ndarray] = {}
    inputs = {i.name: i for i in session.get_inputs()}
    if token_ids is not None and "input_ids" in inputs and "input_ids" not in shapes:
        for d, size in zip(inputs["input_ids"].shape or [], token_ids.shape, strict=False):
            if isinstance(d, str):
                sizes.setdefault(d.lower(), int(size))
        feeds["input_ids"] = token_ids.astype(np.int64)
    for inp in session.get_inputs():
        if inp.name in feeds:
            continue
        dtype = _ORT_TO_NUMPY.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has type {inp.type}; give verification inputs explicitly")
        shape = shapes.get(inp.name) or tuple(_dim(d, inp.name, i, sizes) for i, d in enumerate(inp.shape or []))
        lname = inp.name.lower()
        if np.issubdtype(dtype, np.floating) or dtype is ml_dtypes.bfloat16:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or "mask" in lname:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif "position" in lname:
            feeds[inp.name] = np.broadcast_to(np.arange(shape[-1] if shape else 1, dtype=dtype), shape).copy()
        elif "token_type" in lname or "segment" in lname:  # BERT's sentence A/B ids: 0 is always valid
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        elif "ids" in lname or "token" in lname:
            feeds[inp.name] = rng.integers(0, vocab, size=shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


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

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        """Accumulate one batch, a slice at a time (see ``_CHUNK``)."""
        if np.shape(ref) != np.shape(out):
            raise ValueError(f"output {self.name!r} has shape {np.shape(out)}, the original's {np.shape(ref)}")
        flat_ref, flat_out = np.asarray(ref).reshape(-1), np.asarray(out).reshape(-1)
        work = np.float64 if np.float64 in (flat_ref.dtype, flat_out.dtype) else np.float32
        for start in range(0, flat_ref.size, _CHUNK):
            r = flat_ref[start : start + _CHUNK].astype(work, copy=False)
            o = flat_out[start : start + _CHUNK].astype(work, copy=False)
            with np.errstate(over="ignore", invalid="ignore"):
                sums = _sums(r, o)
            if not all(map(math.isfinite, sums)):  # float32 overflow or non-finite values: redo it in float64
                r, o = r.astype(np.float64), o.astype(np.float64)
                self.finite &= bool(np.all(np.isfinite(o)))
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
        return OutputMetrics(self.name, sqnr, cosine, self.max_err if self.finite else math.inf, top1)


def compare_outputs(name: str, ref: np.ndarray, out: np.ndarray) -> OutputMetrics:
    """SQNR, cosine, max abs error and (for class scores) top-1 agreement of ``out`` against ``ref``."""
    acc = OutputComparison(name)
    acc.add(ref, out)
    return acc.finalize()


#: Tokens of real text the models are compared on when there is no calibration data. Fewer would cost less
#: (about 0.2 CPU-seconds per model on SmolLM2-135M for 64) but move the figures: on SmolLM2 W4A16 the logits
#: SQNR of the last 64 tokens of this text is 5.5 dB, of the last 128 9.6 dB.
VERIFY_TOKENS = 128


def text_token_ids(folder: Path, length: int = VERIFY_TOKENS, data: str | os.PathLike = PYDOC) -> np.ndarray | None:
    """[1, n] token ids of the end of ``data`` when ``folder`` holds a ``tokenizer.json``, else None.

    ``data``: ``"pydoc"`` (default: the end of the pydoc corpus, away from the evaluation windows and from
    calibration's start) or a ``.txt`` / ``.jsonl`` file. ``n`` is ``length``, or fewer when the text is
    shorter (at least 8 tokens, else None). Real text gives top-1 agreement a meaning that made-up ids do not.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from qonnx.runtime.data import read_text

    text = read_text(data)[-100 * length :]  # ConfigError: unreadable data is the caller's to report
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    except Exception:  # an unreadable tokenizer: fall back to made-up ids
        return None
    return np.asarray([ids[-length:]], dtype=np.int64) if len(ids) >= 8 else None


#: Reference outputs kept in memory while quantization runs; batches past this are run at comparison time.
REFERENCE_BUDGET_BYTES = 512 << 20


def verification_session(
    model: str | os.PathLike | bytes | InMemoryModel, device: str, *, prepack: bool, threads: int = 0
) -> ort.InferenceSession:
    """A session built for a single comparison run, as fast to build as ONNX Runtime allows.

    No graph optimization (the model's own ops as written, except that constant float weights read through a
    Transpose are read transposed in place: :func:`untranspose_weights`). Without ``prepack`` weights are used
    where they lie (external data stays memory-mapped) instead of being copied into packed layouts: that
    saves the float original most of its build time and memory, at a slower run. The quantized model keeps
    prepacking: its 4-bit MatMulNBits kernels run far slower unpacked than the packing costs. Idle threads
    do not spin: they would take the cores from quantization and from the comparison. No memory arena: the
    original's activations are returned before the quantized model's are allocated (about 120 MB less at
    the peak on SmolLM2-135M, at the same speed). An :class:`InMemoryModel` is built from memory: its large
    float weights are fed with each run (:func:`feed_weights`), the others handed over as initializers.
    ``threads``: ONNX Runtime's intra-op threads (0: its default, one per core).
    """
    device = resolve_device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", PRECISE_QDQ)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the cores
    so.enable_cpu_mem_arena = False  # no arena: its memory is returned as soon as a run's tensors go
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    import onnx

    fed: dict[str, np.ndarray] = {}
    keep: list[ort.OrtValue] = []
    if isinstance(model, InMemoryModel):
        proto = onnx.ModelProto.FromString(model.proto)
        fed = {n: model.weights[n] for n in _for_one_run(proto, model.weights)[1]}
        keep = model.add_to(so, exclude=fed)
        model = proto.SerializeToString()
    elif not isinstance(model, bytes):
        from qonnx.core.paths import (
            resolve_model_path,  # not qonnx.core.modelfile: the IR's import would delay the build
        )

        path = resolve_model_path(model)
        model = os.fspath(path)
        try:
            proto = onnx.load(model, load_external_data=False)
        except Exception:  # ONNX Runtime says what is wrong with the file
            proto = None
        untransposed = proto is not None and _for_one_run(proto)[0]
        if untransposed or (proto is not None and path.stat().st_size <= _REWRITE_MAX_BYTES):
            model = proto.SerializeToString()  # external data paths are relative to the model's folder:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = _FedSession(model, so, providers, fed)
    session._qonnx_weights = keep  # type: ignore[attr-defined]  # ONNX Runtime reads them where they lie
    return session


class _FedSession(ort.InferenceSession):
    """A session some of whose weights are graph inputs: fed with every run and left out of ``get_inputs()``."""

    def __init__(
        self, model: str | bytes, options: ort.SessionOptions, providers: list[str], fed: Mapping[str, np.ndarray]
    ) -> None:
        super().__init__(model, options, providers=providers)
        self._fed = dict(fed)

    def get_inputs(self) -> list[ort.NodeArg]:
        return [i for i in super().get_inputs() if i.name not in self._fed]

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        return super().run(output_names, {**input_feed, **self._fed}, run_options)


#: Ops that read a float weight like any input (none needs it constant): such weights can be fed.
_FEEDABLE_READERS = frozenset(
    {
        ("", "MatMul"),
        ("", "Gemm"),
        ("", "Gather"),
        ("", "Conv"),
        ("", "ConvTranspose"),
        ("com.microsoft", "FusedMatMul"),
    }
)
#: Float weights from this size on are fed rather than handed over (:func:`feed_weights`).
FEED_MIN_BYTES = 1 << 20


def feed_weights(model: bytes, weights: Mapping[str, np.ndarray]) -> tuple[bytes, list[str]] | None:
    """The model with its large float ``weights`` made graph inputs, and their names; None if there are none.

    ONNX Runtime copies an initializer it is handed from memory (0.06 s for the 113 MB table below, without
    prepacking), and prepacks those that a MatMul reads as its second input: work that one run does not pay
    back (a MatMul packs its weight as it goes). Fed as inputs they are used where they lie. On the tied
    lm_head of SmolLM2-135M W4A16 (the [49152, 576] float table read by Gather and, through
    :func:`untranspose_weights`, FusedMatMul) the quantized model's session built in 0.16 s instead of 0.36 s,
    and ran 128 tokens in the same 0.18 s (2 cores). Only weights of the main graph that every reader takes
    as an ordinary input (``_FEEDABLE_READERS``) and no subgraph reads; integer weights (quantized, prepacked
    by their kernels) are never fed.
    """
    import onnx

    proto = onnx.ModelProto.FromString(model)
    names = _feed(proto, weights)
    return (proto.SerializeToString(), names) if names else None


def _feed(proto: Any, weights: Mapping[str, np.ndarray]) -> list[str]:
    """:func:`feed_weights` on a ModelProto, in place; the names fed."""
    import onnx

    graph = proto.graph
    declared = {i.name for i in graph.input} | {o.name for o in graph.output}
    candidates = {
        t.name
        for t in graph.initializer
        if t.name in weights
        and t.name not in declared
        and weights[t.name].dtype.kind == "f"
        and weights[t.name].nbytes >= FEED_MIN_BYTES
    }
    for node in graph.node:
        if (node.domain if node.domain != "ai.onnx" else "", node.op_type) not in _FEEDABLE_READERS:
            candidates.difference_update(node.input)
        for attr in node.attribute:  # a subgraph may read any name of the graphs around it
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                candidates.difference_update(_names_read(sub))
    if not candidates:
        return []
    kept = [t for t in graph.initializer if t.name not in candidates]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    names = sorted(candidates)
    for name in names:
        w = weights[name]
        graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape))
        )
    return names


#: A model file above this size is handed to ONNX Runtime as it is unless a weight is untransposed: stripping
#: its metadata would not pay for serializing it again.
_REWRITE_MAX_BYTES = 64 << 20


def _for_one_run(proto: Any, weights: Mapping[str, np.ndarray] | None = None) -> tuple[bool, list[str]]:
    """Rewrite a ModelProto in place for a session built for one run.

    Returns whether a weight is now read untransposed and the names of the weights to feed.

    Node metadata goes (torch's exporter writes about 3.9 of SmolLM2's 4.4 MB of graph there; ONNX Runtime
    reads none of it and built the quantized model 0.03 s faster without it; shapes in ``value_info`` stay:
    without them the build took 1.0 s instead of 0.2), weights read through a Transpose are read in place
    (:func:`untranspose_weights`), and large float ``weights`` are fed (:func:`feed_weights`).
    """
    for node in proto.graph.node:
        node.ClearField("metadata_props")
    return _untranspose(proto), _feed(proto, weights) if weights else []


def _names_read(graph: Any) -> set[str]:
    """Every name the nodes of ``graph`` (a GraphProto) and of its subgraphs read."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub)
    return names


def untranspose_weights(model: bytes | Path) -> bytes | None:
    """The model with ``MatMul(X, Transpose(W))`` of a float32 2-D initializer ``W`` read as ``W`` transposed.

    Without graph optimization ONNX Runtime would transpose such a weight on every run: a tied ``lm_head``
    reads the [vocab, hidden] embedding table that way (113 MB, about 0.15 CPU-seconds per run on
    SmolLM2-135M, in both models). ``com.microsoft.FusedMatMul`` with ``transB=1`` computes the same product
    from ``W`` as it lies (the same logits bit for bit on SmolLM2). Only the main graph is rewritten; None when
    there is nothing to rewrite (or a file cannot be read), so the model is used as it is. A file is read
    without its external data.
    """
    import onnx

    try:
        proto = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, Path) else None
        if proto is None:
            proto = onnx.ModelProto.FromString(model)  # type: ignore[arg-type]
    except Exception:
        return None
    return proto.SerializeToString() if _untranspose(proto) else None


def _untranspose(proto: Any) -> bool:
    """:func:`untranspose_weights` on a ModelProto, in place; whether anything changed."""
    import onnx

    graph = proto.graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or t.input[0] not in floats:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if (perm and perm[0] != [1, 0]) or readers.get(t.output[0]) != 1 or t.output[0] in outputs:
            continue
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        node.input[1] = t.input[0]
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
        dropped.add(id(t))
    if not dropped:
        return False
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return True


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
        if self._feeds:
            self.batches = list(self._feeds)
            self.inputs = f"{len(self.batches)} given batch{'es' if len(self.batches) > 1 else ''}"
        else:
            self.batches = [self._batch(session)]
        self.names = _float_outputs(session)
        held = 0
        for batch in self.batches:
            if held > self.budget:
                self._session = session  # the rest run when compared, one batch at a time
                return
            out = session.run(self.names, dict(batch))
            held += sum(int(o.nbytes) for o in out)
            self._outputs.append(out)

    def _batch(self, session: ort.InferenceSession) -> dict[str, np.ndarray]:
        """The one batch to run, as ``inputs`` then says.

        From ``data`` (or the pydoc corpus when the model has a tokenizer); inputs it does not give are made
        from the declared shapes.
        """
        data = self._data
        if data is not None and str(data).lower().endswith(".npz"):
            from qonnx.core.errors import ConfigError
            from qonnx.runtime.data import npz_batches

            arrays, n = npz_batches(data)
            declared = {i.name for i in session.get_inputs()}
            unknown = sorted(set(arrays) - declared)
            if unknown:
                raise ConfigError(f"{data}: arrays not named after an input of the model: {', '.join(unknown)}")
            given = {k: a[-1] for k, a in arrays.items()}
            self.inputs = f"{Path(data).name}, its last batch (of {n})"
            dims = dict(self._dims or {})
            for inp in session.get_inputs():  # sizes of dynamic dimensions as the given arrays have them
                if inp.name in given:
                    for d, size in zip(inp.shape or [], given[inp.name].shape, strict=False):
                        if isinstance(d, str):
                            dims.setdefault(d, int(size))
            shapes = {k: a.shape for k, a in given.items()}
            return {**make_inputs(session, shapes=shapes, dims=dims), **given}
        text = data if data is not None else PYDOC
        ids = None if isinstance(self.original, bytes) else text_token_ids(Path(self.original).parent, data=text)
        if ids is not None:
            source = "pydoc text" if str(text) == PYDOC else Path(text).name
            self.inputs = f"{source}, its last {ids.shape[1]} tokens"
        else:
            self.inputs = "inputs made from the declared shapes"
        return make_inputs(session, shapes=self._shapes, dims=self._dims, token_ids=ids)

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
    accs = {n: OutputComparison(n) for n in reference.names}
    for i, batch in enumerate(reference.batches):
        out = q_sess.run(reference.names, dict(batch))
        for n, r, o in zip(reference.names, reference.outputs(i), out, strict=True):
            accs[n].add(r, o)
    return [a.finalize() for a in accs.values()]

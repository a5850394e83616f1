"""Inputs for a model that comes without any: made from its declared input shapes and types.

Dynamic dimensions take sizes by what they are: batch 1, sequence 16, past length 0; the height and width of an
image input (float, rank 4, 1 to 4 channels, or dimensions named so) 224 and its channels 3, the samples of an
audio input 16,000; others 1 (unless overridden). Token ids are drawn below the vocabulary size read off the
logits output, masks are ones, position ids count up, a sample-rate scalar is 16,000 and float inputs are
standard normal. Where a first guess does not suit the model (ONNX Runtime refuses it, or the output it gives
says nothing), :func:`size_trials` lists the sizes to try next: the sizes the model declares elsewhere
(metadata, the shapes of the tensors an input flows into), then 224, 320 and 640 for images, and 1, 16, 64 for
other dimensions. Verification, sensitivity measurement, the layer report and lowering's check run models on
them when no data is given.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

__all__ = [
    "AUDIO_SAMPLES",
    "IMAGE_SIZES",
    "ORT_TO_NUMPY",
    "OTHER_SIZES",
    "declared_sizes",
    "describe_shapes",
    "make_inputs",
    "parse_shape_overrides",
    "size_trials",
]

ORT_TO_NUMPY = {
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
_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")

#: Image heights and widths tried in turn: the common input sizes of classifiers (224) and detectors (320, 640),
#: all multiples of 32, so that the strides, pools and upsampling of a detector's neck agree.
IMAGE_SIZES = (224, 320, 640)
#: Audio samples: one second at 16 kHz.
AUDIO_SAMPLES = (16_000,)
#: Other dynamic dimensions without a better guess, tried in turn.
OTHER_SIZES = (1, 16, 64)
#: The sample rate fed to an integer input named like one.
SAMPLE_RATE = 16_000

_AUDIO_HINT = re.compile(r"audio|wav|speech|sample|pcm|signal|input_values")
_SAMPLE_RATE = re.compile(r"^(sr|sample_?rate|sampling_?rate)$")


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


def _kind(inp: Any, axis: int, label: str) -> str:
    """What a dynamic dimension is, which sets its first size (:data:`_FIRST`).

    "past", "batch", "image" (height or width), "channels" (of an image: 3), "audio" (samples), "sequence" or
    "other" (no better guess than 1).
    """
    name = inp.name.lower()
    if "past" in label or ("past" in name and axis == 2):
        return "past"
    if "batch" in label or axis == 0:
        return "batch"
    shape = list(inp.shape or [])
    if inp.type in _FLOATS:
        if any(k in label for k in ("height", "width")):
            return "image"
        if "channel" in label and len(shape) == 4:  # Optimum's pixel_values: [batch, num_channels, height, width]
            return "channels"
        if len(shape) == 4:
            channels = [i for i in (1, 3) if isinstance(shape[i], int) and 1 <= shape[i] <= 4]
            if (channels == [1] and axis in (2, 3)) or (channels == [3] and axis in (1, 2)):
                return "image"
        if len(shape) in (2, 3) and axis == len(shape) - 1 and _AUDIO_HINT.search(f"{name} {label}"):
            return "audio"
    if any(k in label for k in ("seq", "len", "token", "time")):
        return "sequence"
    return "other"


#: The first size of each kind of dimension; :func:`size_trials` tries the others.
_FIRST = {
    "past": 0,
    "batch": 1,
    "image": IMAGE_SIZES[0],
    "channels": 3,
    "audio": AUDIO_SAMPLES[0],
    "sequence": 16,
    "other": 1,
}
#: The sizes tried in turn for the kinds of dimension worth trying more than one size for.
_SERIES = {"image": IMAGE_SIZES, "audio": AUDIO_SAMPLES, "other": OTHER_SIZES}


def _key(dim: Any, name: str, axis: int) -> str:
    """The ``dims`` key of a dynamic dimension: its symbol, or ``input:axis`` for one without a name."""
    label = str(dim or "").strip()
    return label.lower() if label else f"{name.lower()}:{axis}"


def _dim(dim: Any, inp: Any, axis: int, dims: dict[str, int]) -> int:
    """Size of one dimension: a symbol keeps one size across inputs.

    Expressions of symbols, as exporters write them (``past_sequence_length + sequence_length``), are
    evaluated from the symbols' sizes.
    """
    if isinstance(dim, int) and dim >= 0:
        return dim
    label = str(dim or "").strip()
    key = _key(dim, inp.name, axis)
    if key in dims:
        return dims[key]
    names = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", label)
    if label and (len(names) != 1 or names[0] != label):  # an expression
        try:
            tree = ast.parse(label, mode="eval")
            for n in names:
                dims.setdefault(n.lower(), _FIRST[_kind(inp, axis, n.lower())])
            value = _eval(tree.body, dims)
            if value >= 0:
                return value
        except (SyntaxError, ValueError):
            pass
    dims[key] = _FIRST[_kind(inp, axis, label.lower())]
    return dims[key]


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

    ``token_ids`` ([batch, length], real text) feed an ``input_ids`` input and set its dimensions. ``dims``
    sizes dynamic dimensions by symbol, or by ``input:axis`` for those without one (see :func:`size_trials`).
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
        dtype = ORT_TO_NUMPY.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has type {inp.type}; give verification inputs explicitly")
        shape = shapes.get(inp.name) or tuple(_dim(d, inp, i, sizes) for i, d in enumerate(inp.shape or []))
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
        elif _SAMPLE_RATE.match(lname) and dtype in (np.int64, np.int32):
            feeds[inp.name] = np.full(shape, SAMPLE_RATE, dtype=dtype)
        else:
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def size_trials(
    session: ort.InferenceSession,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    declared: Mapping[str, int] | None = None,
    token_ids: np.ndarray | None = None,
) -> list[dict[str, int]]:
    """The ``dims`` to make inputs with (:func:`make_inputs`), in the order to try them: at least one.

    First the sizes the model ``declared`` (:func:`declared_sizes`) with :func:`make_inputs`'s guesses for the
    rest; then image dimensions at each of :data:`IMAGE_SIZES`, audio at :data:`AUDIO_SAMPLES` and other
    dimensions without a better guess at :data:`OTHER_SIZES`, in step. Dimensions the caller sized (``shapes``,
    ``dims``, ``token_ids``) keep their sizes throughout.
    """
    fixed = {k.lower(): v for k, v in (dims or {}).items()}
    shapes = shapes or {}
    if token_ids is not None:
        inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" in inputs and "input_ids" not in shapes:
            for d, size in zip(inputs["input_ids"].shape or [], token_ids.shape, strict=False):
                if isinstance(d, str):
                    fixed.setdefault(d.lower(), int(size))
    roles: dict[str, str] = {}
    for inp in session.get_inputs():
        if inp.name in shapes or inp.type not in ORT_TO_NUMPY:
            continue
        for axis, d in enumerate(inp.shape or []):
            if isinstance(d, int) and d >= 0:
                continue
            key = _key(d, inp.name, axis)
            label = str(d or "").strip().lower()
            if key in fixed or (label and re.fullmatch(r"[a-z_][a-z_0-9]*", label) is None):
                continue  # sized by the caller, or an expression of other symbols
            kind = _kind(inp, axis, label)
            if kind in _SERIES:
                roles.setdefault(key, kind)
    first = {**{k: _FIRST[r] for k, r in roles.items()}, **(declared or {}), **fixed}
    trials = [first]
    steps = max((len(_SERIES[r]) for r in roles.values()), default=0)
    for i in range(steps):
        trial = dict(fixed)
        for key, role in roles.items():
            sizes = _SERIES[role]
            trial[key] = sizes[min(i, len(sizes) - 1)]
        trials.append(trial)
    unique: list[dict[str, int]] = []
    for t in trials:
        if all(t != u for u in unique):
            unique.append(t)
    return unique


#: Ops whose output has the shape of their first input (an input normalized, cast or scaled on its way in).
_SAME_SHAPE = frozenset({"Cast", "Identity", "Sub", "Div", "Mul", "Add", "Clip", "Relu", "Sigmoid", "Neg", "Abs"})
#: Metadata keys that give an image's size (Ultralytics writes ``imgsz: [640, 640]``).
_IMAGE_KEYS = re.compile(r"^(imgsz|img_?size|image_?size|input_?size|input_?shape|image_?shape)$")


def declared_sizes(model: onnx.ModelProto, metadata: Mapping[str, str] | None = None) -> dict[str, int]:
    """Sizes of the graph inputs' dynamic dimensions that the model states elsewhere, as ``dims`` keys.

    From the ``metadata`` (the model's own ``metadata_props`` when None): a key named after a dimension's
    symbol (``height: 640``), or an image size (``imgsz: [640, 640]``, ``input_size: 224``) for the height and
    width of image inputs; and from ``value_info``: the static shape of a tensor an input flows into through
    shape-keeping ops (a Cast, a normalization) before anything changes its shape.
    """
    graph = model.graph
    meta = dict(metadata) if metadata is not None else {p.key: p.value for p in model.metadata_props}
    inits = {t.name for t in graph.initializer}
    found: dict[str, int] = {}
    image: list[int] = []
    for key, value in meta.items():
        numbers = [int(n) for n in re.findall(r"\d+", str(value))][:8]
        if _IMAGE_KEYS.match(key.lower()) and numbers:
            image = numbers[-2:] if len(numbers) >= 2 else numbers * 2
        elif re.fullmatch(r"\s*\d+\s*", str(value)):
            found[key.lower()] = numbers[0]
    shapes = {v.name: v for v in [*graph.value_info, *graph.output]}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out: dict[str, int] = {}
    for inp in graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = list(inp.type.tensor_type.shape.dim)
        spatial = _spatial_axes(inp)
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            key = _key(d.dim_param, inp.name, axis)
            if d.dim_param and d.dim_param.lower() in found:
                out[key] = found[d.dim_param.lower()]
            elif axis in spatial and image:
                out[key] = image[spatial.index(axis)]
        for axis, size in _static_downstream(inp.name, len(dims), readers, shapes).items():
            if not dims[axis].HasField("dim_value"):
                out.setdefault(_key(dims[axis].dim_param, inp.name, axis), size)
    return out


def _spatial_axes(inp: Any) -> list[int]:
    """The height and width axes of an image input (a ValueInfoProto), else []."""
    t = inp.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    kinds = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 16: "tensor(bfloat16)"}
    view = SimpleNamespace(name=inp.name, shape=shape, type=kinds.get(t.elem_type, ""))
    return [
        a
        for a in range(len(shape))
        if not isinstance(shape[a], int) and _kind(view, a, str(shape[a] or "").lower()) == "image"
    ]


def _static_downstream(
    name: str, rank: int, readers: Mapping[str, list[Any]], shapes: Mapping[str, Any]
) -> dict[int, int]:
    """Axis -> size where a tensor ``name`` flows into, through shape-keeping ops, has a static size."""
    sizes: dict[int, int] = {}
    todo, seen = [name], {name}
    while todo:
        current = todo.pop()
        info = shapes.get(current)
        if info is not None and current != name and info.type.HasField("tensor_type"):
            dims = list(info.type.tensor_type.shape.dim)
            if len(dims) == rank:
                for axis, d in enumerate(dims):
                    if d.HasField("dim_value") and d.dim_value > 0:
                        sizes.setdefault(axis, d.dim_value)
        for node in readers.get(current, []):
            if node.op_type in _SAME_SHAPE and node.domain in ("", "ai.onnx") and node.input[0] == current:
                for out in node.output[:1]:
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
    return sizes


def describe_shapes(feeds: Mapping[str, np.ndarray]) -> str:
    """``x 1x3x224x224, sr scalar``: the shapes of some inputs, for reports."""
    return ", ".join(f"{n} {'x'.join(map(str, a.shape)) if a.ndim else 'scalar'}" for n, a in feeds.items())

"""Inputs for a model that comes without any: made from its declared input shapes and types.

Dynamic dimensions take sizes by name (batch 1, sequence 16, past length 0, others 1) unless overridden, token
ids are drawn below the vocabulary size read off the logits output, masks are ones, position ids count up, and
float inputs are standard normal. Verification, sensitivity measurement, the layer report and lowering's check
run models on them when no data is given.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["make_inputs", "parse_shape_overrides"]

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

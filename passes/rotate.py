"""Rotate a decoder's residual stream (QuaRot / SpinQuant style), exactly, before quantization.

An RMSNorm only sees the stream through ``mean(x^2)``, which an orthogonal Q leaves unchanged; once its
weight g is folded into the linear layers that read it, the norm commutes with Q and the whole stream can
live in the rotated basis ``x Q``. In ONNX MatMul convention (``x @ W``):

* the embedding table E becomes ``E Q`` (a Gather reads rows of it);
* each layer reading a norm's output (q/k/v, gate/up, an untied head) gets ``W' = Q^T diag(g) W`` and the
  norm's weight becomes ones (the Mul stays, so the norm keeps the pattern that lowering fuses);
* each layer writing the stream (o_proj, down_proj: MatMuls whose output a residual Add adds) gets
  ``W' = W Q`` (and its bias ``b Q``).

A head tied to the embedding (``MatMul(x, Transpose(E))``, one table) needs ``Q^T diag(g) E^T``, which is not
the transpose of ``E Q`` unless g is all ones. The table stays one copy: the final norm's g becomes a d x d
MatMul ``Q^T diag(g) Q`` in front of the head (d^2 multiply-adds per token, ~1% of SmolLM2's head).

With ``online=True`` the input of each down projection (a layer that writes the stream and reads the
product of two activations, SwiGLU's ``silu(gate) * up``) is rotated too, where no weight can absorb it:
a Hadamard transform ``H = H_m (x) H_p`` (:mod:`qonnx.core.hadamard`) runs as Reshape -> MatMul(H_p) ->
MatMul(H_m) -> Reshape, and ``H^T`` is folded into the down projection's weight. This spreads the MLP's
outlier channels before the down projection is quantized.

Everything is exact in real arithmetic; the rotated float model's logits match the original's to float
rounding. The MatMuls this pass adds (the Hadamard transforms, the tied head's d x d) are listed in
:attr:`RotateResidualPass.kept_float`: they must stay in floating point (the quantize pipeline keeps them).

The pattern is checked before anything changes: a graph whose stream is read by anything other than
RMSNorms and residual Adds, or written by anything other than MatMuls with constant weights, is refused
with :class:`RotationError` naming the node.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qonnx.core.errors import QonnxError, escape_name
from qonnx.core.hadamard import kron_factors, random_orthogonal, randomized_hadamard, sylvester
from qonnx.passes.activations import unique_name

__all__ = ["RotateResidualPass", "RotationError"]

Rotation = Literal["hadamard", "random"]
_NORM_OPS = {
    ("", "RMSNormalization"),
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SimplifiedLayerNormalization"),
}
_UNARY = {"Sqrt", "Reciprocal", "Cast", "Identity"}


class RotationError(QonnxError):
    """The graph does not have the residual-stream pattern a rotation needs."""


def _name(v: ir.Value | ir.Node | None) -> str:
    return escape_name(getattr(v, "name", None) or "?")


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.is_graph_input():
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _last_axis(node: ir.Node, rank: int | None) -> bool:
    """A ReduceMean over the last axis alone, keeping it."""
    if node.attributes.get_int("keepdims", 1) == 0:
        return False
    axes = node.attributes.get_ints("axes")
    if axes is None and len(node.inputs) > 1:
        found = _const(node.inputs[1])
        axes = None if found is None else [int(a) for a in found.reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _square_of(value: ir.Value | None, x: ir.Value) -> ir.Node | None:
    """The node squaring ``x`` when ``value`` is a function of ``mean(x^2)`` over the last axis alone, else None.

    Such a value is the same for ``x`` and ``x Q`` (Q orthogonal): the norm's statistic ignores the rotation.
    """
    while value is not None:
        p = value.producer()
        if p is None or p.domain != "":
            return None
        if p.op_type in _UNARY:
            value = p.inputs[0]
        elif p.op_type == "Add":
            a, b = p.inputs[0], p.inputs[1]
            value = a if _scalar(b) else b if _scalar(a) else None
        elif p.op_type == "ReduceMean":
            sq = p.inputs[0].producer() if p.inputs[0] is not None else None
            if sq is None or sq.domain != "" or sq.inputs[0] is not x:
                return None
            two = _const(sq.inputs[1]) if sq.op_type == "Pow" else None
            squared = (two is not None and two.size == 1 and float(two.reshape(())) == 2.0) or (
                sq.op_type == "Mul" and sq.inputs[1] is x
            )
            rank = len(x.shape) if x.shape is not None else None
            return sq if squared and _last_axis(p, rank) else None
        else:
            return None
    return None


@dataclasses.dataclass
class _Norm:
    x: ir.Value  # the stream value normalized
    out: ir.Value  # what the linear layers read
    nodes: list[ir.Node]  # the norm's nodes that read x
    scale: tuple[ir.Node, int] | None  # (node, input index) of the weight g, if any
    g: np.ndarray | None


def _find_norms(graph: ir.Graph) -> dict[int, list[_Norm]]:
    """Every RMSNorm (decomposed as exported, or one op) by id of its input."""
    found: dict[int, list[_Norm]] = {}
    for node in graph:
        norm = None
        if (node.domain, node.op_type) in _NORM_OPS and node.inputs[0] is not None:
            if node.attributes.get_int("axis", -1) != -1 or any(o.uses() for o in node.outputs[1:]):
                continue
            g = _const(node.inputs[1]) if len(node.inputs) > 1 else None
            norm = _Norm(node.inputs[0], node.outputs[0], [node], (node, 1) if g is not None else None, g)
        elif node.domain == "" and node.op_type in ("Mul", "Div"):
            a, b = node.inputs[0], node.inputs[1]
            for x, r in ((a, b), (b, a)) if node.op_type == "Mul" else ((a, b),):
                square = _square_of(r, x) if x is not None else None
                if x is None or square is None:
                    continue
                out, scale, g = node.outputs[0], None, None
                uses = list(out.uses())
                if len(uses) == 1 and uses[0][0].op_type == "Mul" and not out.is_graph_output():
                    mul, other = uses[0][0], 1 - uses[0][1]
                    c = _const(mul.inputs[other])
                    if c is not None and c.ndim >= 1 and c.size == c.shape[-1] and c.size > 1:
                        out, scale, g = mul.outputs[0], (mul, other), c.reshape(-1)
                norm = _Norm(x, out, [node, square], scale, g)
                break
        if norm is not None:
            found.setdefault(id(norm.x), []).append(norm)
    return found


@dataclasses.dataclass
class _Slot:
    """One constant input slot whose tensor changes, and how."""

    node: ir.Node
    index: int
    value: ir.Value
    key: tuple  # equal keys give equal results: a shared tensor is changed once


def _weight_slot(node: ir.Node, index: int) -> tuple[ir.Node, int, ir.Value, bool] | None:
    """The constant behind a MatMul's weight input: (node, index, value, stored transposed) or None."""
    v = node.inputs[index]
    if v is None:
        return None
    if _const(v) is not None and v.producer() is None:
        return node, index, v, False
    p = v.producer()
    if p is not None and p.op_type == "Transpose" and p.domain == "" and len(v.uses()) == 1:
        perm = p.attributes.get_ints("perm")
        src = p.inputs[0]
        if (
            (perm is None or list(perm) == [1, 0])
            and src is not None
            and src.producer() is None
            and _const(src) is not None
        ):
            return p, 0, src, True
    return None


class RotateResidualPass(ir.passes.InPlacePass):
    """Fold RMSNorm weights into their readers and rotate the residual stream (see the module docstring).

    Attributes (after a run):
        kept_float: names of the MatMul nodes this pass added; they must not be quantized.
        notes: one line per decision worth telling (tied head handling, online transforms).
    """

    def __init__(self, rotation: Rotation = "hadamard", *, online: bool = True, seed: int = 0) -> None:
        if rotation not in ("hadamard", "random"):
            raise RotationError(f"rotation must be 'hadamard' or 'random', got {rotation!r}")
        self.rotation = rotation
        self.online = online
        self.seed = seed
        self.kept_float: list[str] = []
        self.notes: list[str] = []
        self._shared: dict[str, ir.Value] = {}  # constants the added nodes share (one Hadamard per size)

    def __repr__(self) -> str:
        return f"RotateResidualPass(rotation={self.rotation!r}, online={self.online}, seed={self.seed})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Check the pattern, then rotate (nothing changes when the pattern is refused)."""
        graph = model.graph
        norms = _find_norms(graph)
        if not norms:
            raise RotationError(
                "rotation: no RMSNorm found (Pow/ReduceMean/.../Mul over the last axis, or RMSNormalization)"
            )
        stream, embeds, _adds, writers = self._trace(graph, norms)
        d = int(_const(embeds[0][2]).shape[1])  # type: ignore[union-attr]
        q = self._matrix(d)
        slots: list[tuple[_Slot, np.ndarray]] = []  # (slot, the new array)
        table_ids = {id(v) for _, _, v in embeds}

        def add(node: ir.Node, index: int, value: ir.Value, key: tuple, array: np.ndarray) -> None:
            slots.append((_Slot(node, index, value, key), array))

        for node, index, table in embeds:
            add(node, index, table, ("right",), _const(table).astype(np.float64) @ q)  # type: ignore[union-attr]
        for mm, w, bias in writers:
            wv = _const(w.value).astype(np.float64)  # type: ignore[union-attr]
            if wv.ndim != 2 or wv.shape[1] != d:
                raise RotationError(
                    f"rotation: '{_name(mm)}' writes the stream with a weight of shape {wv.shape}, not [K, {d}]"
                )
            key: tuple = ("right",)
            if self.online and self._glu_input(mm):
                h = self._online(graph, mm, wv.shape[0])
                if h is not None:
                    wv = h.T @ wv
                    key = ("right", "online", id(mm))
            add(w.node, w.index, w.value, key, wv @ q)
            if bias is not None:
                node, index, value = bias
                add(node, index, value, ("right",), _const(value).astype(np.float64).reshape(-1) @ q)  # type: ignore[union-attr]
        ones: dict[tuple, ir.Value] = {}
        for group in norms.values():
            for norm in group:
                if id(norm.x) not in stream:
                    continue
                g = np.ones(d) if norm.g is None else norm.g.astype(np.float64)
                readers = self._readers(norm, d)
                tied = any(id(value) in table_ids for _, _, value, _ in readers)
                fold = not tied or np.array_equal(g, np.ones(d))
                for node, index, value, transposed in readers:
                    w = _const(value).astype(np.float64)  # type: ignore[union-attr]
                    gg = g if fold else np.ones(d)
                    if transposed:  # stored W^T [N, d]: (Q^T diag(g) W)^T = W^T diag(g) Q
                        key = ("right",) if np.array_equal(gg, np.ones(d)) else ("right", gg.tobytes())
                        add(node, index, value, key, (w * gg[None, :]) @ q)
                    else:
                        add(node, index, value, ("left", gg.tobytes()), q.T @ (gg[:, None] * w))
                if not fold:
                    self._head_matmul(graph, norm, q.T @ (g[:, None] * q))
                if norm.scale is not None:
                    node, index = norm.scale
                    old = node.inputs[index]
                    assert old is not None and old.dtype is not None
                    shape = _const(old).shape  # type: ignore[union-attr]
                    k = (shape, old.dtype.name)
                    if k not in ones:
                        ones[k] = _initializer(graph, f"rotate_norm_ones_{d}", np.ones(shape, dtype=old.dtype.numpy()))
                    node.replace_input_with(index, ones[k])
        _apply(graph, slots)
        self.notes.insert(0, f"residual stream ({d}) rotated by a {self._what(d)}; {len(stream)} stream values")
        return ir.passes.PassResult(model, modified=True)

    # -- the pattern ----------------------------------------------------------------------------------------

    def _trace(self, graph: ir.Graph, norms: dict[int, list[_Norm]]) -> tuple[set[int], list, list, list]:
        """Follow the stream forward from each embedding: (stream value ids, embeddings, residual Adds, writers).

        An embedding is a Gather of rows of a constant 2-D table whose output reaches an RMSNorm; from there
        every reader of a stream value must be one of its RMSNorms, a residual Add (the other operand a MatMul
        with a constant weight) or a Mul by a scalar. Anything else is a RotationError.
        """
        stream: set[int] = set()
        embeds: list[tuple[ir.Node, int, ir.Value]] = []
        adds: list[ir.Node] = []
        writers: list = []
        for gather in graph:
            if gather.domain != "" or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0) != 0:
                continue
            table = _const(gather.inputs[0])
            if table is None or table.ndim != 2 or gather.inputs[0].producer() is not None:  # type: ignore[union-attr]
                continue
            start = gather.outputs[0]
            while len(start.uses()) == 1 and _scale_op(next(iter(start.uses()))[0]):
                start = next(iter(start.uses()))[0].outputs[0]
            if id(start) not in norms:  # a table lookup that no norm reads (a rotary cache, say)
                continue
            embeds.append((gather, 0, gather.inputs[0]))  # type: ignore[arg-type]
            pending = [gather.outputs[0]]
            while pending:
                v = pending.pop()
                if id(v) in stream:
                    continue
                stream.add(id(v))
                if v.is_graph_output():
                    raise RotationError(f"rotation: the residual stream value '{_name(v)}' is a graph output")
                own = {id(n) for norm in norms.get(id(v), []) for n in norm.nodes}
                for user, index in v.uses():
                    if id(user) in own:
                        continue
                    if _scale_op(user):
                        pending.append(user.outputs[0])
                    elif user.domain == "" and user.op_type == "Add":
                        found = _writer(user.inputs[1 - index])
                        if found is None:
                            raise RotationError(
                                f"rotation: residual Add '{_name(user)}' does not add a MatMul with a constant weight "
                                "to the stream"
                            )
                        if all(user is not n for n in adds):
                            adds.append(user)
                            writers.append(found)
                        pending.append(user.outputs[0])
                    else:
                        raise RotationError(
                            f"rotation: the residual stream value '{_name(v)}' is read by {user.op_type} "
                            f"'{_name(user)}', which is neither an RMSNorm nor a residual Add"
                        )
        if not embeds:
            raise RotationError("rotation: no embedding Gather (rows of a constant table) feeds an RMSNorm")
        widths = {int(_const(t).shape[1]) for _, _, t in embeds}  # type: ignore[union-attr]
        if len(widths) != 1:
            raise RotationError(f"rotation: embeddings of different widths {sorted(widths)}")
        return stream, embeds, adds, writers

    def _readers(self, norm: _Norm, d: int) -> list[tuple[ir.Node, int, ir.Value, bool]]:
        if norm.out.is_graph_output():
            raise RotationError(f"rotation: the normalized value '{_name(norm.out)}' is a graph output")
        readers = []
        for user, index in norm.out.uses():
            slot = _weight_slot(user, 1) if user.op_type == "MatMul" and user.domain == "" and index == 0 else None
            if slot is None:
                raise RotationError(
                    f"rotation: the output of an RMSNorm is read by {user.op_type} '{_name(user)}', "
                    "not a MatMul with a constant weight"
                )
            w = _const(slot[2])
            assert w is not None
            k = w.shape[1] if slot[3] else w.shape[0]
            if w.ndim != 2 or k != d:
                raise RotationError(f"rotation: '{_name(user)}' reads the stream with a weight of shape {w.shape}")
            readers.append(slot)
        return readers

    # -- the matrices and the added nodes -------------------------------------------------------------------

    def _what(self, d: int) -> str:
        return "randomized Hadamard matrix" if self.rotation == "hadamard" else "random orthogonal matrix (seeded)"

    def _matrix(self, d: int) -> np.ndarray:
        if self.rotation == "random":
            return random_orthogonal(d, self.seed)
        h = randomized_hadamard(d, self.seed)
        if h is None:
            raise RotationError(
                f"rotation: no Hadamard matrix of order {d} is known to qonnx (Paley x Sylvester); "
                "use rotation 'random'"
            )
        return h

    @staticmethod
    def _glu_input(mm: ir.Node) -> bool:
        """Whether the writer reads a product of two activations (SwiGLU's silu(gate) * up)."""
        x = mm.inputs[0]
        p = x.producer() if x is not None else None
        return p is not None and p.op_type == "Mul" and p.domain == "" and all(_const(i) is None for i in p.inputs)

    def _online(self, graph: ir.Graph, mm: ir.Node, k: int) -> np.ndarray | None:
        """Insert ``x -> x H`` in front of writer ``mm``; H (orthogonal [k, k]) for its weight, or None."""
        factors = kron_factors(k)
        if factors is None:
            p = k & -k
            if p < 8:
                self.notes.append(f"no online Hadamard for '{_name(mm)}' (K={k} has no usable factor)")
                return None
            hm, hp = np.eye(k // p), sylvester(p) / np.sqrt(p)
            self.notes.append(f"'{_name(mm)}': K={k} has no Hadamard construction; block-diagonal Hadamard of {p}")
        else:
            hm, hp = factors
        x = mm.inputs[0]
        assert x is not None
        dtype = (x.dtype or ir.DataType.FLOAT).numpy()
        m, p = hm.shape[0], hp.shape[0]
        base = f"{mm.name or 'down_proj'}_hadamard"
        taken = {n.name for n in graph if n.name} | set(graph.initializers)
        shape = ir.node("Shape", [x], name=unique_name(f"{base}_shape", taken))
        dims = self._constant(graph, f"rotate_hadamard_{m}x{p}_dims", np.array([-1, m, p], dtype=np.int64))
        flat = ir.node("Reshape", [x, dims], name=unique_name(f"{base}_reshape", taken))
        hp_v = self._constant(graph, f"rotate_hadamard_{p}", hp.astype(dtype))
        mm_p = ir.node("MatMul", [flat.outputs[0], hp_v], name=unique_name(f"{base}_p", taken))
        new = [shape, flat, mm_p]
        last = mm_p
        self.kept_float.append(mm_p.name or "")
        if m > 1 and not np.array_equal(hm, np.eye(m)):
            hm_v = self._constant(graph, f"rotate_hadamard_{m}", hm.astype(dtype))
            mm_m = ir.node("MatMul", [hm_v, mm_p.outputs[0]], name=unique_name(f"{base}_m", taken))
            new.append(mm_m)
            last = mm_m
            self.kept_float.append(mm_m.name or "")
        back = ir.node("Reshape", [last.outputs[0], shape.outputs[0]], name=unique_name(f"{base}_back", taken))
        new.append(back)
        for n in new:
            for o in n.outputs:
                o.name = unique_name(f"{n.name}_out", taken)
        back.outputs[0].dtype = x.dtype  # type: ignore[assignment]
        back.outputs[0].shape = x.shape
        graph.insert_before(mm, new)
        mm.replace_input_with(0, back.outputs[0])
        if not self.notes or "online Hadamard" not in self.notes[-1]:
            self.notes.append(f"online Hadamard {m}x{p} (K={k}) in front of each down projection")
        return np.kron(hm.T, hp)

    def _constant(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        key = f"{name}:{array.dtype}"
        if key not in self._shared:
            self._shared[key] = _initializer(graph, name, array)
        return self._shared[key]

    def _head_matmul(self, graph: ir.Graph, norm: _Norm, g: np.ndarray) -> None:
        """The tied head keeps its table: the final norm's weight as ``x @ (Q^T diag(g) Q)`` in front of it."""
        taken = {n.name for n in graph if n.name} | set(graph.initializers)
        dtype = (norm.out.dtype or ir.DataType.FLOAT).numpy()
        w = _initializer(graph, "rotate_tied_head_norm", g.astype(dtype))
        readers = list(norm.out.uses())
        node = ir.node("MatMul", [norm.out, w], name=unique_name("rotate_tied_head_norm_MatMul", taken))
        node.outputs[0].name = unique_name("rotate_tied_head_norm_out", taken)
        node.outputs[0].dtype = norm.out.dtype  # type: ignore[assignment]
        node.outputs[0].shape = norm.out.shape
        first = next(n for n in graph if any(n is u for u, _ in readers))
        graph.insert_before(first, node)
        for user, index in readers:
            user.replace_input_with(index, node.outputs[0])
        self.kept_float.append(node.name or "")
        self.notes.append(
            f"tied head: one table kept; the final norm's weight runs as a {len(g)}x{len(g)} MatMul "
            f"'{_name(node)}' in front of the head"
        )


@dataclasses.dataclass
class _W:
    node: ir.Node
    index: int
    value: ir.Value


def _scale_op(node: ir.Node) -> bool:
    """A Mul by a scalar constant (Gemma scales its embeddings by sqrt(d)): it commutes with a rotation."""
    return node.domain == "" and node.op_type == "Mul" and any(_scalar(i) for i in node.inputs)


def _scalar(v: ir.Value | None) -> bool:
    c = _const(v)
    return c is not None and c.size == 1


def _writer(v: ir.Value | None) -> tuple[ir.Node, _W, tuple[ir.Node, int, ir.Value] | None] | None:
    """(MatMul, its weight slot, its bias slot) when ``v`` is ``x @ W (+ b)`` with constant W [K, d]."""
    if v is None or v.is_graph_output():
        return None
    p = v.producer()
    bias = None
    if p is not None and p.op_type == "Add" and p.domain == "" and len(v.uses()) == 1:
        for i in (0, 1):
            c = _const(p.inputs[1 - i])
            inner = p.inputs[i]
            if c is not None and inner is not None and inner.producer() is not None and len(inner.uses()) == 1:
                if inner.producer().op_type == "MatMul":  # type: ignore[union-attr]
                    bias = (p, 1 - i, p.inputs[1 - i])
                    p = inner.producer()
                    break
    if p is None or p.op_type != "MatMul" or p.domain != "":
        return None
    slot = _weight_slot(p, 1)
    if slot is None or slot[3]:
        return None
    return p, _W(slot[0], slot[1], slot[2]), bias  # type: ignore[return-value]


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _apply(graph: ir.Graph, slots: list[tuple[_Slot, np.ndarray]]) -> None:
    """Write the new arrays: a tensor shared by slots with one key changes once, others get private copies."""
    first: dict[int, tuple] = {}
    for slot, array in slots:
        value = slot.value
        dtype = value.const_value.dtype.numpy()  # type: ignore[union-attr]
        shape = tuple(value.const_value.shape.numpy())  # type: ignore[union-attr]
        new = array.reshape(shape).astype(dtype)
        seen = first.get(id(value))
        if seen is None:
            first[id(value)] = slot.key
            value.const_value = ir.tensor(new, name=value.name)
        elif seen != slot.key:  # the same tensor, changed two ways: this reader gets its own copy
            copy = _initializer(graph, f"{value.name}_rotated", new)
            slot.node.replace_input_with(slot.index, copy)

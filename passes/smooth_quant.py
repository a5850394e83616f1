"""SmoothQuant (Xiao et al., 2022), native: move activation outliers into the weights that read them.

For an activation X [.., K] read by linear layers with weights W_i [K, N_i], per-channel factors
``s_j = max|X_j|^alpha / max_i max|W_i[j, :]|^(1 - alpha)`` turn ``X @ W_i`` into ``(X / s) @ (s W_i)``:
the same product, with X's few huge channels shrunk and the weight rows that meet them grown, so a
per-tensor activation scale no longer spends its range on a handful of channels.

``X / s`` is folded into whatever produces X, so nothing is added at run time:

* a Mul by a constant vector along K (an exported RMSNorm's weight): the vector is divided by s;
* a normalization op over the last axis (LayerNormalization, RMSNormalization, ONNX Runtime's
  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization): its scale (and bias) are divided by s;
* a Mul of two activations one of which is a linear layer's output (SwiGLU's ``silu(gate) * up``):
  that layer's weight columns (and bias) are divided by s;
* a linear layer's output directly: its weight columns are divided by s;
* anything else (a Reshape of attention heads, say), or a producer whose output is also read by a node
  that is not smoothed: an explicit ``Mul(X, 1/s)`` in front of the smoothed readers.

``alpha="auto"`` picks alpha per tensor from a grid by the error of the quantized layer outputs on
calibration rows (:func:`search_alpha`); alpha 0 (no smoothing) is on the grid, so the search cannot
pick something worse than no smoothing on those rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from qonnx.core import quant
from qonnx.passes.activations import unique_name

__all__ = ["ALPHA_GRID", "SmoothGroup", "absorber", "factors", "search_alpha", "fold"]

ALPHA_GRID = (0.0, 0.3, 0.5, 0.65, 0.75, 0.85, 0.9, 0.95)
_S_MIN, _S_MAX = 1e-4, 1e4


@dataclasses.dataclass
class SmoothGroup:
    """One activation tensor and the linear layers (MatMul x @ W, or Gemm) that read it.

    Attributes:
        tensor: the activation's name.
        readers: (node, stored weight value, transposed) per reader; ``transposed`` for Gemm transB=1
            (the stored weight is [N, K]).
    """

    tensor: str
    readers: list[tuple[ir.Node, ir.Value, bool]]

    def weight_kn(self, i: int) -> np.ndarray:
        """Reader i's weight as float32 [K, N]."""
        _, value, transposed = self.readers[i]
        assert value.const_value is not None
        w = value.const_value.numpy().astype(np.float32)
        return w.T if transposed else w

    def release(self) -> None:
        """Unmap the readers' stored weights (external data) until they are read again."""
        for _, value, _ in self.readers:
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()

    def weight_absmax(self) -> np.ndarray:
        """Max |W[j, :]| over every reader, per input channel j: [K]."""
        return np.max([np.abs(self.weight_kn(i)).max(axis=1) for i in range(len(self.readers))], axis=0)


def factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel factors s [K] (float32); alpha 0 gives the weights' side only, so 1 is used."""
    if alpha == 0:
        return np.ones_like(act_absmax, dtype=np.float32)
    a = np.maximum(act_absmax.astype(np.float64), 1e-5)
    w = np.maximum(weight_absmax.astype(np.float64), 1e-5)
    s = a**alpha / w ** (1 - alpha)
    return np.clip(s, _S_MIN, _S_MAX).astype(np.float32)


def search_alpha(
    group: SmoothGroup,
    samples: Sequence[tuple[np.ndarray, Callable[[np.ndarray], tuple[float, float]]]],
    act_absmax: np.ndarray,
    quantize_weight: Callable[[np.ndarray], np.ndarray],
    quantize_act: Callable[[np.ndarray, float, float], np.ndarray],
    grid: Sequence[float] = ALPHA_GRID,
) -> tuple[float, np.ndarray, float]:
    """The alpha on ``grid`` whose smoothed, quantized outputs are closest to the float outputs.

    The error is measured out of sample: each entry of ``samples`` holds rows of the activation and the
    per-tensor range that the *other* calibration batches give X / s. Ranges measured on the very rows
    they are tested on reward the tight, equalized ranges of strong smoothing, which then clip the
    values calibration never saw (on a synthetic decoder: alpha 0.9 looked best in sample and was the
    worst out of sample).

    Args:
        group: the tensor and its readers.
        samples: (rows [R, K] float32, s -> (lo, hi) of X / s measured without those rows).
        act_absmax: max |X_j| over all calibration data [K].
        quantize_weight: fake-quantizes a [K, N] weight (quantize then dequantize).
        quantize_act: fake-quantizes rows with a (lo, hi) range.
        grid: candidate alphas.

    Returns:
        (alpha, s, the mean over rows of each row's relative squared output error, at that alpha).
    """
    weights = [group.weight_kn(i) for i in range(len(group.readers))]
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    references = [[rows @ w for w in weights] for rows, _ in samples]
    # Each row (token) counts alike: a few tokens with massive activations (attention sinks) would
    # otherwise hold most of the output energy and hide the rounding of every other token.
    energies = [sum(np.square(r).sum(axis=1) for r in refs) + 1e-30 for refs in references]
    count = sum(len(e) for e in energies) or 1
    best: tuple[float, np.ndarray, float] | None = None
    for alpha in grid:
        s = factors(act_absmax, w_absmax, alpha)
        wq = [quantize_weight(w * s[:, None]) for w in weights]
        err = 0.0
        for (rows, act_range), refs, energy in zip(samples, references, energies, strict=True):
            lo, hi = act_range(s)
            xq = quantize_act(rows / s, lo, hi)
            row_err = sum(np.square(xq @ w - ref).sum(axis=1) for w, ref in zip(wq, refs, strict=True))
            err += float((row_err / energy).sum())
        if best is None or err / count < best[2]:
            best = (alpha, s, err / count)
    assert best is not None
    return best


def _const_vector(value: ir.Value | None, k: int) -> bool:
    """A constant (not a graph input) that holds one value per channel of the last axis."""
    if value is None or value.is_graph_input() or value.const_value is None:
        return False
    shape = value.const_value.shape.numpy()
    return len(shape) >= 1 and int(shape[-1]) == k and int(np.prod(shape)) == k


_NORMS = {
    ("", "LayerNormalization"),
    ("", "RMSNormalization"),
    ("com.microsoft", "SimplifiedLayerNormalization"),
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "SkipLayerNormalization"),
}


def _is_norm(node: ir.Node) -> bool:
    """A normalization over the last axis whose output 0 is ``scale * normalized (+ bias)``."""
    if (node.domain, node.op_type) not in _NORMS:
        return False
    axis = node.attributes.get_int("axis", -1)
    return axis == -1


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    assert value.const_value is not None
    dtype = value.const_value.dtype.numpy()
    value.const_value = ir.tensor(array.astype(dtype), name=value.name)


def _scale_lazily(value: ir.Value, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> None:
    """Multiply a stored 2-D weight by ``rows[:, None]`` and/or divide it by ``cols[None, :]``, when it is read.

    The weight stays where it is stored (memory-mapped when external) and the scaled copy exists only while
    a pass reads it: smoothing a model costs no second copy of its weights. Composes with earlier scalings.
    """
    old = value.const_value
    assert old is not None
    dtype = old.dtype

    def compute() -> ir.TensorProtocol:
        w = old.numpy().astype(np.float32)
        if rows is not None:
            w = w * rows[:, None]
        if cols is not None:
            w = w / cols[None, :]
        if isinstance(old, ir.ExternalTensor):
            old.release()
        return ir.tensor(w.astype(dtype.numpy()))

    value.const_value = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(old.shape.numpy()), name=value.name)


def _linear_producer(value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """The MatMul x @ W (W a constant [K', K] read by it alone) whose output is ``value``, with W."""
    producer = value.producer()
    if producer is None or producer.domain != "" or producer.op_type != "MatMul":
        return None
    w = producer.inputs[1]
    if w is None or w.is_graph_input() or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if w.producer() is not None or len(w.uses()) != 1:
        return None
    return producer, w


def _absorber(
    x: ir.Value, group: SmoothGroup, k: int, taken: set[str] | None = None
) -> tuple[str, Callable[[np.ndarray], None]] | None:
    """What can take ``X / s`` without a new node (its description, and how to fold s into it), or None.

    A constant vector that other nodes read too (an exporter may share identical norm weights between
    layers) is copied for this producer first: a new initializer of K values, not a new node.
    """
    readers = {id(node) for node, _, _ in group.readers}
    exclusive = not x.is_graph_output() and all(id(user) in readers for user, _ in x.uses())
    producer = x.producer()
    if not exclusive or producer is None:
        return None

    def divide(*values: ir.Value) -> Callable[[np.ndarray], None]:
        def apply(s: np.ndarray) -> None:
            for v in values:
                assert v.const_value is not None and producer is not None
                c = v.const_value.numpy().astype(np.float32)
                if not _only_reader(v, producer):
                    assert taken is not None, "fold passes the names in use"
                    v = _private_copy(v, producer, taken)
                _set_const(v, c / s.reshape(c.shape))

        return apply

    def named(v: ir.Value) -> str:
        return f"'{v.name}'" + ("" if _only_reader(v, producer) else " (a copy: other nodes read it too)")

    if _is_norm(producer) and producer.outputs[0] is x:
        scale_bias = [v for v in producer.inputs[1:3] if v is not None]
        if producer.op_type.startswith("Skip"):  # (input, skip, gamma[, beta])
            scale_bias = [v for v in producer.inputs[2:4] if v is not None]
        if scale_bias and all(_const_vector(v, k) and not v.is_graph_output() for v in scale_bias):
            where = f"the scale of {producer.op_type} '{producer.name}'"
            if not all(_only_reader(v, producer) for v in scale_bias):
                where += " (a copy: other nodes read it too)"
            return where, divide(*scale_bias)
    linear = None
    if producer.domain == "" and producer.op_type == "Mul":
        a, b = producer.inputs[0], producer.inputs[1]
        for const in (a, b):
            if const is not None and _const_vector(const, k) and not const.is_graph_output():
                return f"the constant {named(const)} of Mul '{producer.name}'", divide(const)
        for operand in (b, a):
            if operand is not None and _only_reader(operand, producer):
                linear = _linear_producer(operand)
                if linear is not None:
                    break
    else:
        linear = _linear_producer(x)
    if linear is None:
        return None
    node, w = linear
    return f"the weight columns of {node.op_type} '{node.name}'", lambda s: _scale_lazily(w, cols=s)


def _private_copy(value: ir.Value, node: ir.Node, taken: set[str]) -> ir.Value:
    """A copy of a constant that only ``node`` reads (an initializer of its graph), swapped into ``node``."""
    assert value.const_value is not None and node.graph is not None
    name = unique_name(f"{value.name}_{node.name}" if node.name else f"{value.name}_copy", taken)
    tensor = ir.tensor(value.const_value.numpy().copy(), name=name)
    copy = ir.Value(
        name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    node.graph.register_initializer(copy)
    for index, inp in enumerate(node.inputs):
        if inp is value:
            node.replace_input_with(index, copy)
    return copy


def absorber(x: ir.Value, group: SmoothGroup) -> str | None:
    """Where :func:`fold` would put ``X / s`` without adding a node, or None when it would add a Mul."""
    _, value, transposed = group.readers[0]
    assert value.const_value is not None
    k = int(value.const_value.shape.numpy()[1 if transposed else 0])
    found = _absorber(x, group, k)
    return found[0] if found is not None else None


def fold(graph: ir.Graph, x: ir.Value, group: SmoothGroup, s: np.ndarray, taken: set[str]) -> tuple[ir.Value, str]:
    """Apply ``X / s`` and ``s W`` for one group; returns (the value the readers now read, where X / s went)."""
    k = s.shape[0]
    for _, value, transposed in group.readers:
        if transposed:  # Gemm transB: stored [N, K]
            _scale_lazily(value, cols=1.0 / s)
        else:
            _scale_lazily(value, rows=s)
    readers = {id(node) for node, _, _ in group.readers}
    found = _absorber(x, group, k, taken)
    if found is not None:
        where, apply = found
        apply(s)
        return x, where
    # Nothing can absorb it: an explicit Mul in front of the smoothed readers.
    dtype = x.dtype or (group.readers[0][1].const_value.dtype if group.readers[0][1].const_value else ir.DataType.FLOAT)
    name = unique_name(f"{x.name}_smooth", taken)
    inv = ir.tensor((1.0 / s).astype(dtype.numpy()), name=f"{name}_factors")
    taken.add(inv.name or "")
    inv_value = ir.Value(name=inv.name, shape=ir.Shape([k]), type=ir.TensorType(inv.dtype), const_value=inv)
    graph.register_initializer(inv_value)
    mul = ir.node("Mul", [x, inv_value], name=f"{name}_Mul")
    mul.outputs[0].name = name
    mul.outputs[0].dtype = dtype
    mul.outputs[0].shape = x.shape
    first = next(n for n in graph if id(n) in readers)
    graph.insert_before(first, mul)
    for node, _, _ in group.readers:
        for index, inp in enumerate(node.inputs):
            if inp is x and index == 0:
                node.replace_input_with(index, mul.outputs[0])
    return mul.outputs[0], f"a new Mul '{mul.name}'"


def fake_quantize_weight(bits: int, block_size: int | None, symmetric: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Quantize-dequantize of a [K, N] weight the way the weight pass will store it."""

    def run(w: np.ndarray) -> np.ndarray:
        return quant.quantize_kn(w, bits, block_size, symmetric).dequantize()

    return run

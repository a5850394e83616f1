"""``qonnx report``: which layers lost the most, measured per layer on the original and the quantized model.

For each layer of the original model that the quantized model holds in quantized form (MatMulNBits, or a
DequantizeLinear feeding MatMul/Gemm/Conv), the report gives the weight's error (SQNR of the dequantized
weight against the original), two errors of the layer's output activation, and bytes before and after:

- own: the error the layer adds on its own, its input taken from the original model (the original output
  against ``x @ W_quantized`` for the same ``x``; MatMul and Gemm);
- accumulated: the same tensor name in both models, each run on the same inputs (errors of earlier layers
  included, so it grows with depth).

Activations are captured through ONNX Runtime on the verification inputs, in bounded memory. Rows are ranked
worst own error first (the layers to keep in higher precision), with plots (:mod:`qonnx.pipeline.report_files`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qonnx.core import modelfile, packing
from qonnx.core.errors import QonnxError, escape_name
from qonnx.passes.weights import WeightCandidate, find_weight_candidates
from qonnx.pipeline.report_files import KINDS, REPORT_SUFFIXES, report_json, write_report
from qonnx.runtime.capture import capture
from qonnx.runtime.inputs import make_inputs
from qonnx.runtime.session import make_session
from qonnx.runtime.verify import text_token_ids

__all__ = [
    "KINDS",
    "REPORT_SUFFIXES",
    "LayerReport",
    "layer_report",
    "projection_kind",
    "report_json",
    "short_label",
    "write_report",
]


@dataclasses.dataclass
class LayerReport:
    """One quantized layer's figures."""

    node: str
    module: str
    op_type: str
    output: str
    weight: str
    shape: tuple[int, ...]
    weight_sqnr_db: float
    output_sqnr_db: float | None
    bytes_before: int
    bytes_after: int
    index: int  # position in graph order
    own_sqnr_db: float | None = None  # the output's SQNR with the input from the original model

    @property
    def name(self) -> str:
        """The layer's full name: its module path, else its weight's or node's name."""
        return self.module or self.weight or self.node

    @property
    def label(self) -> str:
        """A short name for plots and tables: ``L3.q_proj`` for ``model.layers.3.self_attn.q_proj``."""
        return short_label(self.name)

    @property
    def kind(self) -> str:
        """The projection type (q, k, v, o, gate, up, down), else "other"."""
        return projection_kind(self.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        for k in ("weight_sqnr_db", "output_sqnr_db", "own_sqnr_db"):
            if d[k] is not None:
                d[k] = round(min(d[k], 999.0), 3)
        return d


_KIND_OF = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "q_lin"), "q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "v_lin"), "v"),
    **dict.fromkeys(("o_proj", "out_proj", "wo", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1", "gate"), "gate"),
    **dict.fromkeys(("up_proj", "w3", "up", "fc1", "c_fc", "lin1"), "up"),
    **dict.fromkeys(("down_proj", "w2", "down", "fc2", "lin2"), "down"),
}
#: Trailing parts of a name that say nothing about the layer (an op type, the tensor's role).
_TRAILING = re.compile(r"[./](weight|bias|kernel|MatMul\w*|Gemm\w*|Conv\w*)$")
_BLOCK = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks|block)[./](\d+)(?:[./].*)?[./]([^./]+)$")


def short_label(name: str, limit: int = 28) -> str:
    """``model.layers.3.self_attn.q_proj`` as ``L3.q_proj``; other names by their last part (``lm_head``)."""
    while (m := _TRAILING.search(name)) is not None:
        name = name[: m.start()]
    block = _BLOCK.search(name)
    label = f"L{block.group(1)}.{block.group(2)}" if block else re.split(r"[./]", name.strip("./"))[-1] or name
    return label if len(label) <= limit else "…" + label[-(limit - 1) :]


def projection_kind(name: str) -> str:
    """The projection type of a layer name: one of :data:`KINDS`."""
    last = short_label(name, limit=1 << 16).rsplit(".", 1)[-1].lower()
    if last in ("dense", "c_proj"):  # the attention's output, or the MLP's down projection
        return "o" if re.search(r"attn|attention", name) else "down"
    return _KIND_OF.get(last, "other")


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    ref64 = ref.astype(np.float64).ravel()
    err = float(np.sum((ref64 - x.astype(np.float64).ravel()) ** 2))
    sig = float(np.dot(ref64, ref64))
    return math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _dequantize_linear(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """Evaluate a constant DequantizeLinear (per-tensor, per-axis or blocked) in numpy; (value, bytes)."""
    x, scale = _const(node.inputs[0]), _const(node.inputs[1])
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    if x is None or scale is None:
        return None
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    xf = x.astype(np.float32)
    zf = np.zeros_like(scale, np.float32) if zp is None else zp.astype(np.float32)
    s = scale.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        value = (xf - zf.reshape(())) * s.reshape(())
    elif block:
        reps = np.repeat(np.arange(s.shape[axis]), block)[: x.shape[axis]]
        value = (xf - np.take(zf, reps, axis=axis)) * np.take(s, reps, axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        value = (xf - zf.reshape(shape)) * s.reshape(shape)
    nbytes = sum(_nbytes(v) for v in node.inputs if v is not None)
    return value, nbytes


def _nbytes(v: ir.Value) -> int:
    t = ir.convenience.get_const_tensor(v)
    return 0 if t is None else int(t.nbytes)


def _matmulnbits_weight(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """The dequantized [K, N] weight of a MatMulNBits node; (value, bytes)."""
    b, scales = _const(node.inputs[1]), _const(node.inputs[2])
    zp = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    if b is None or scales is None:
        return None
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits, bs = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size")
    if k is None or n is None or bs is None:
        return None
    if zp is not None and zp.dtype != np.uint8:  # zero points in the scales' float type (HQQ): [N, nblocks]
        codes, _ = packing.unpack_matmulnbits(b, None, k=k, n=n, bits=bits, block_size=bs)
        zps = zp.reshape(n, -1).astype(np.float32)
    else:
        codes, zps = packing.unpack_matmulnbits(b, zp, k=k, n=n, bits=bits, block_size=bs)
    rows = np.arange(k) // bs
    w = (codes.astype(np.float32) - zps[:, rows]) * scales.reshape(n, -1).astype(np.float32)[:, rows]
    nbytes = sum(_nbytes(v) for v in node.inputs[1:4] if v is not None)
    return w.T, nbytes


def _quantized_node(producers: dict[str, ir.Node], output: str) -> ir.Node | None:
    """The node of the quantized model that computes ``output`` from a quantized weight, if any."""
    producer = producers.get(output)
    if producer is not None and producer.op_type == "Add":  # a bias added after MatMulNBits
        inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        producer = inner if inner is not None else producer
    if producer is None:
        return None
    if producer.op_type == "MatMulNBits":
        attrs = all(producer.attributes.get_int(a) is not None for a in ("K", "N", "block_size"))
        return producer if attrs and _constants(producer, 1, 2) else None
    if producer.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and len(producer.inputs) > 1:
        dq = producer.inputs[1].producer() if producer.inputs[1] is not None else None
        return producer if dq is not None and dq.op_type == "DequantizeLinear" and _constants(dq, 0, 1) else None
    return None


def _constants(node: ir.Node, *slots: int) -> bool:
    """Whether the node's inputs in ``slots`` are constants (their values are not read here)."""
    values = [node.inputs[i] if i < len(node.inputs) else None for i in slots]
    return all(v is not None and ir.convenience.get_const_tensor(v) is not None for v in values)


def _quantized_weight(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """The dequantized weight of a node :func:`_quantized_node` found, as a MatMul/Gemm reads it, and its bytes."""
    if node.op_type == "MatMulNBits":
        return _matmulnbits_weight(node)
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    found = _dequantize_linear(dq) if dq is not None else None
    if found is None or node.op_type != "Gemm":
        return found
    w = found[0].T if node.attributes.get_int("transB", 0) else found[0]
    return w * np.float32(node.attributes.get_float("alpha", 1.0)), found[1]


def _own_noise(x: np.ndarray, w: np.ndarray, w_q: np.ndarray) -> float:
    """Squared error of ``x @ w_q`` against ``x @ w``: the error the layer adds to an exact input."""
    rows = x.reshape(-1, w.shape[0]).astype(np.float64)
    e = rows @ (w.astype(np.float64) - w_q.astype(np.float64))
    return float(np.sum(e * e))


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)


def layer_report(
    original: str | os.PathLike,
    quantized: str | os.PathLike,
    *,
    device: str = "cpu",
    max_outputs: int = 32,
) -> list[LayerReport]:
    """Per-layer figures, worst own output SQNR first (then accumulated; layers without either last)."""
    orig_path, q_path = modelfile.resolve_model_path(original), modelfile.resolve_model_path(quantized)
    orig, qmodel = modelfile.load(orig_path), modelfile.load(q_path)
    producers = {o.name: n for n in ir.traversal.RecursiveGraphIterator(qmodel.graph) for o in n.outputs if o.name}
    found: list[tuple[int, WeightCandidate, ir.Node]] = []
    for index, cand in enumerate(find_weight_candidates(orig)):
        if cand.reason is not None or not cand.node.outputs:
            continue
        qnode = _quantized_node(producers, cand.node.outputs[0].name or "")
        if qnode is not None:
            found.append((index, cand, qnode))
    if not found:
        raise QonnxError(f"{q_path}: holds no quantized layer that matches a layer of {orig_path}")
    ids = text_token_ids(orig_path.parent)
    feeds = [make_inputs(make_session(orig_path, device), token_ids=ids)]
    rows: list[LayerReport] = []
    # Layer by layer in groups: at most one group's tensors (and one layer's weights) are held at once.
    for start in range(0, len(found), max_outputs):
        rows += _measure(orig_path, q_path, found[start : start + max_outputs], feeds, device)
    rows.sort(key=_rank)
    return rows


def _measure(
    orig_path: Path,
    q_path: Path,
    group: list[tuple[int, WeightCandidate, ir.Node]],
    feeds: list[dict[str, np.ndarray]],
    device: str,
) -> list[LayerReport]:
    """The rows of ``group``: the original's outputs and inputs captured, then the quantized model's outputs."""
    refs: dict[str, list[np.ndarray]] = {}  # per name, one array per feed

    def keep(values: dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            refs.setdefault(n, []).append(v)

    outs = [cand.node.outputs[0].name or "" for _, cand, _ in group]
    ins = [_input_name(cand) for _, cand, _ in group]
    capture(orig_path, [*outs, *(n for n in ins if n)], feeds, keep, device=device)
    stats = {n: [0.0, 0.0] for n in outs}  # accumulated: signal, noise
    batch = [0]  # which feed the quantized model's values come from

    def compare(values: dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            r = refs[n][batch[0]].astype(np.float64).ravel()
            e = r - v.astype(np.float64).ravel()
            stats[n][0] += float(np.dot(r, r))
            stats[n][1] += float(np.dot(e, e))
        batch[0] += 1

    capture(q_path, outs, feeds, compare, device=device)
    rows = []
    for (index, cand, qnode), out, x_name in zip(group, outs, ins, strict=True):
        rows.append(_row(index, cand, qnode, out, refs.get(out, []), refs.get(x_name, []) if x_name else []))
        rows[-1].output_sqnr_db = _db(*stats[out])
    return rows


def _input_name(cand: WeightCandidate) -> str | None:
    """The activation a MatMul/Gemm multiplies by its weight (the own error is measured there); None for others."""
    x = cand.node.inputs[0]
    return (x.name or None) if cand.axis is None and x is not None else None


def _row(
    index: int, cand: WeightCandidate, qnode: ir.Node, out: str, y: list[np.ndarray], x: list[np.ndarray]
) -> LayerReport:
    """One layer's figures from its weights and its captured input and output in the original model."""
    weight = _quantized_weight(qnode)
    if weight is None:
        raise QonnxError(f"{escape_name(qnode.name)}: its quantized weight could not be read")
    w_q, nbytes = weight
    w = cand.channel_rows() if cand.axis is not None else cand.matrix()
    w_q = np.moveaxis(w_q, cand.axis, 0).reshape(w.shape) if cand.axis is not None else w_q
    own = None
    if x and y and w.shape == w_q.shape:
        signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in y)
        own = _db(signal, sum(_own_noise(v, w, w_q) for v in x))
    row = LayerReport(
        cand.node.name or "",
        cand.module,
        cand.node.op_type,
        out,
        cand.weight_name,
        tuple(int(d) for d in cand.tensor().shape),
        _sqnr(w, w_q),
        None,
        int(cand.tensor().nbytes),
        nbytes,
        index,
        own,
    )
    del w, w_q  # views of the memory-mapped file must go before it is unmapped
    cand.release()
    return row


def _rank(r: LayerReport) -> tuple[bool, float]:
    """Worst own error first; a layer without one (a convolution) by its accumulated error."""
    value = r.own_sqnr_db if r.own_sqnr_db is not None else r.output_sqnr_db
    return (value is None, value if value is not None else 0.0)

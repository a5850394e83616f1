"""``qonnx report``: which layers lost the most, measured per layer on the original and the quantized model.

For each layer of the original model that the quantized model holds in quantized form (MatMulNBits, or a
DequantizeLinear feeding MatMul/Gemm/Conv), the report gives the weight's error (SQNR of the dequantized
weight against the original), the SQNR of the layer's output activation (the same tensor name in both models,
captured through ONNX Runtime on the verification inputs, in bounded memory), and bytes before and after;
ranked worst first, with plots. The ranking answers which layers to keep in higher precision.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qonnx.core import modelfile, outputs, packing
from qonnx.core.errors import QonnxError, escape_name
from qonnx.core.sizes import human_bytes
from qonnx.passes.embeddings import gather_table
from qonnx.passes.weights import find_weight_candidates
from qonnx.runtime.capture import capture
from qonnx.runtime.inputs import make_inputs
from qonnx.runtime.session import make_session
from qonnx.runtime.verify import text_token_ids

__all__ = ["LayerReport", "layer_report", "write_report"]


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        for k in ("weight_sqnr_db", "output_sqnr_db"):
            if d[k] is not None:
                d[k] = round(min(d[k], 999.0), 3)
        return d


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


def _gathered_table(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """The dequantized [V, W] table of a GatherBlockQuantized with packed uint8 data (MatMulNBits' layout)."""
    data = node.inputs[0]
    reshape = data.producer() if data is not None else None
    source = reshape.inputs[0] if reshape is not None and reshape.op_type == "Reshape" else data
    b, scales = _const(source), _const(node.inputs[2])
    zp = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    attrs = node.attributes
    bits, bs = attrs.get_int("bits", 4), attrs.get_int("block_size", 128)
    if b is None or scales is None or b.dtype != np.uint8 or scales.ndim != 2 or attrs.get_int("quantize_axis", 1) != 1:
        return None
    v, nb = scales.shape
    codes, zps = packing.unpack_matmulnbits(b.reshape(v, nb, -1), zp, k=nb * bs, n=v, bits=bits, block_size=bs)
    rows = np.arange(nb * bs) // bs
    table = (codes.astype(np.float32) - zps[:, rows]) * scales.astype(np.float32)[:, rows]
    nbytes = sum(_nbytes(x) for x in (source, node.inputs[2], node.inputs[3] if len(node.inputs) > 3 else None) if x)
    return table, nbytes


def _quantized_weight(model: ir.Model, output: str) -> tuple[ir.Node, np.ndarray, int] | None:
    """The node producing ``output`` in the quantized model and its dequantized weight, if quantized."""
    producer = None
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if any(o.name == output for o in node.outputs):
            producer = node
            break
    if producer is None:
        return None
    if producer.op_type == "Add":  # a bias added after MatMulNBits
        inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        producer = inner if inner is not None else producer
    if producer.op_type == "Slice":  # the rows of a table with a ragged last block, cut to the hidden size
        inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        producer = inner if inner is not None and inner.op_type == "GatherBlockQuantized" else producer
    if producer.op_type == "MatMulNBits":
        found = _matmulnbits_weight(producer)
    elif producer.op_type == "GatherBlockQuantized":
        found = _gathered_table(producer)
    elif producer.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and len(producer.inputs) > 1:
        dq = producer.inputs[1].producer() if producer.inputs[1] is not None else None
        found = _dequantize_linear(dq) if dq is not None and dq.op_type == "DequantizeLinear" else None
    else:
        found = None
    return None if found is None else (producer, found[0], found[1])


def layer_report(
    original: str | os.PathLike,
    quantized: str | os.PathLike,
    *,
    device: str = "cpu",
    max_outputs: int = 32,
) -> list[LayerReport]:
    """Per-layer figures, worst output SQNR first (layers whose output could not be captured last)."""
    orig_path, q_path = modelfile.resolve_model_path(original), modelfile.resolve_model_path(quantized)
    orig, qmodel = modelfile.load(orig_path), modelfile.load(q_path)
    rows: list[LayerReport] = []
    for index, cand in enumerate(find_weight_candidates(orig)):
        if cand.reason is not None or not cand.node.outputs:
            continue
        out = cand.node.outputs[0].name or ""
        found = _quantized_weight(qmodel, out)
        if found is None:
            continue
        _node, w_q, nbytes = found
        w = cand.channel_rows() if cand.axis is not None else cand.matrix()
        w_q = np.moveaxis(w_q, cand.axis, 0).reshape(w.shape) if cand.axis is not None else w_q
        rows.append(
            LayerReport(
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
            )
        )
        del w, w_q  # views of the memory-mapped file must go before it is unmapped
        cand.release()
    count = sum(1 for _ in orig.graph)
    for index, node in enumerate(orig.graph):  # embedding tables (GatherBlockQuantized), placed before the layers
        table_value = gather_table(node)
        found = _quantized_weight(qmodel, node.outputs[0].name or "") if table_value is not None else None
        if table_value is None or found is None or table_value.const_value is None:
            continue
        table = table_value.const_value.numpy().astype(np.float32)
        rows.append(
            LayerReport(
                node.name or "",
                "",
                "Gather",
                node.outputs[0].name or "",
                table_value.name or "",
                table.shape,
                _sqnr(table, found[1][:, : table.shape[1]]),
                None,
                int(table_value.const_value.nbytes),
                found[2],
                index - count,
            )
        )
        del table
    if not rows:
        raise QonnxError(f"{q_path}: holds no quantized layer that matches a layer of {orig_path}")
    ids = text_token_ids(orig_path.parent)
    feeds = [make_inputs(make_session(orig_path, device), token_ids=ids)]
    names = [r.output for r in rows]
    stats: dict[str, dict[str, float]] = {n: {"signal": 0.0, "noise": 0.0} for n in names}
    refs: dict[str, np.ndarray] = {}

    def keep_ref(values: dict[str, np.ndarray]) -> None:
        refs.update(values)  # one batch: the reference values of this group, compared below

    # Capture group by group in both models so that at most one group's tensors are held at once.
    for start in range(0, len(names), max_outputs):
        group = names[start : start + max_outputs]
        refs.clear()
        capture(orig_path, group, feeds, keep_ref, device=device)

        def compare(values: dict[str, np.ndarray]) -> None:
            for n, v in values.items():
                r = refs[n].astype(np.float64).ravel()
                e = r - v.astype(np.float64).ravel()
                stats[n]["signal"] += float(np.dot(r, r))
                stats[n]["noise"] += float(np.dot(e, e))

        capture(q_path, group, feeds, compare, device=device)
    for r in rows:
        s = stats[r.output]
        r.output_sqnr_db = math.inf if s["noise"] == 0 else 10 * math.log10(s["signal"] / s["noise"])
    rows.sort(key=lambda r: (r.output_sqnr_db is None, r.output_sqnr_db if r.output_sqnr_db is not None else 0))
    return rows


def _plot_paths(folder: Path, stem: str) -> tuple[Path, Path]:
    """The PNGs beside a report: layers in graph order, and the worst layers."""
    return folder / f"{stem}_layers.png", folder / f"{stem}_worst.png"


def _plots(rows: list[LayerReport], folder: Path, stem: str) -> list[Path]:
    try:
        import matplotlib  # heavy (about 1 s): only the plots need it
    except ImportError as e:  # a dependency of qonnx: only a broken install lacks it
        raise QonnxError(
            f"the report's plots need matplotlib, which is missing here ({e}); pip install matplotlib"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above

    by_order = sorted(rows, key=lambda r: r.index)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(
        [np.nan if r.output_sqnr_db is None else r.output_sqnr_db for r in by_order],
        marker=".",
        label="output SQNR (dB)",
    )
    ax.plot([r.weight_sqnr_db for r in by_order], marker=".", alpha=0.6, label="weight SQNR (dB)")
    ax.set_xlabel("quantized layer, in graph order")
    ax.set_ylabel("dB")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    order_png, worst_png = _plot_paths(folder, stem)
    fig.savefig(order_png, dpi=110)
    plt.close(fig)
    worst = rows[: min(6, len(rows))]
    fig, axes = plt.subplots(1, len(worst), figsize=(3 * len(worst), 2.6), squeeze=False)
    for ax, r in zip(axes[0], worst, strict=False):
        ax.barh([0, 1], [r.weight_sqnr_db, r.output_sqnr_db or 0], color=["#888", "#c33"])
        ax.set_yticks([0, 1], ["weight", "output"])
        name = escape_name(r.module or r.weight or r.node)[-28:]
        ax.set_title(name.replace("$", r"\$"), fontsize=8)  # a "$" would start matplotlib's math mode
        ax.set_xlabel("SQNR dB", fontsize=8)
    fig.tight_layout()
    fig.savefig(worst_png, dpi=110)
    plt.close(fig)
    return [order_png, worst_png]


def write_report(rows: list[LayerReport], path: str | os.PathLike, *, title: str) -> list[Path]:
    """Write ``rows`` as Markdown (.md) or HTML (.html) with PNG plots beside it; returns the files.

    A report that fails leaves none of its files and none of the folders it created.
    """
    out = Path(path)
    if out.suffix not in (".md", ".html"):
        raise QonnxError(f"{out}: the report must end in .md or .html")
    created = outputs.make_folder(out.parent)
    new = [p for p in (out, *_plot_paths(out.parent, out.stem)) if not os.path.lexists(p)]
    try:
        return _write_report(rows, out, title)
    except BaseException:
        for p in new:
            p.unlink(missing_ok=True)
        outputs.remove_folders(created)
        raise


def _write_report(rows: list[LayerReport], out: Path, title: str) -> list[Path]:
    pngs = _plots(rows, out.parent, out.stem)
    header = ["rank", "layer", "op", "weight shape", "output SQNR dB", "weight SQNR dB", "size before", "size after"]
    body = [
        [
            str(i + 1),
            escape_name(r.module or r.weight or r.node),
            escape_name(r.op_type),
            "x".join(map(str, r.shape)),
            "n/a" if r.output_sqnr_db is None else f"{r.output_sqnr_db:.1f}",
            f"{r.weight_sqnr_db:.1f}",
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
        ]
        for i, r in enumerate(rows)
    ]
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    summary = (
        f"{len(rows)} quantized layers, worst output first; weights {human_bytes(before)} -> {human_bytes(after)}. "
        "Output SQNR: the layer's output activation in the quantized model against the original, on the "
        "same inputs (errors of earlier layers included). The worst layers are the ones to keep in "
        "higher precision (`qonnx quantize --exclude REGEX`, or `--target-bits` for 8 bits where it matters most)."
    )
    title = escape_name(title)
    if out.suffix == ".md":
        lines = [
            f"# {_markdown(title)}",
            "",
            summary,
            "",
            *[f"![{_markdown(p.stem)}]({urllib.parse.quote(p.name)})" for p in pngs],
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(map(_markdown, row)) + " |" for row in body]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        imgs = "".join(
            f'<img src="{html.escape(urllib.parse.quote(p.name))}" alt="{html.escape(p.stem)}">' for p in pngs
        )
        out.write_text(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>{imgs}"
            f"<table border=1 cellspacing=0 cellpadding=3><tr>{cells}</tr>{trs}</table>\n",
            encoding="utf-8",
        )
    return [out, *pngs]


#: Characters that Markdown (GitHub's included) would read as markup in a table cell or a heading.
_MARKDOWN = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`*_[]()!|~#$"}}
)


def _markdown(text: str) -> str:
    """``text`` (a name from the model, already one printable line) as literal Markdown text.

    No raw HTML (``<script>``, ``<img onerror>``), no link or image, no ``|`` that would end a table cell.
    """
    return text.translate(_MARKDOWN)


def report_json(rows: list[LayerReport]) -> str:
    """The rows as JSON."""
    return json.dumps([r.to_dict() for r in rows], indent=2)

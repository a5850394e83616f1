"""The files of ``qonnx report``: a Markdown or HTML table, and two PNG plots beside it.

``<stem>_layers.png``: every quantized layer in graph order, named (``L3.q_proj``) and coloured by projection
type, its own error as bars and the accumulated one as a line. ``<stem>_worst.png``: the layers with the
largest own error as one sorted horizontal bar chart, values on the bars. One matplotlib style for both.
"""

from __future__ import annotations

import html
import json
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qonnx.core import outputs
from qonnx.core.errors import QonnxError, escape_name
from qonnx.core.sizes import human_bytes

if TYPE_CHECKING:
    from qonnx.pipeline.report import LayerReport

__all__ = ["KINDS", "REPORT_SUFFIXES", "report_json", "write_report"]

#: What a report file may be: Markdown or HTML (the plots are PNGs beside it).
REPORT_SUFFIXES = (".md", ".html")
#: The projection types a plot colours, in legend order (:func:`qonnx.pipeline.report.projection_kind`).
KINDS = ("q", "k", "v", "o", "gate", "up", "down", "other")
_COLORS = dict(
    zip(KINDS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"), strict=True)
)
#: The one style of every report plot (matplotlib rcParams).
STYLE: dict[str, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
#: Rows of the worst-layers chart.
WORST = 15
_OWN_TITLE = "own error (input from the original model), coloured by projection:"
_ACCUMULATED = "accumulated error (input from the quantized model)"
_LEGEND = {"title_fontsize": 8, "alignment": "left", "frameon": False}
_SUMMARY = (
    "SQNR of each layer's output against the original model's, in dB (lower: more error). Own: the layer's input "
    "taken from the original model, so only its own weights' error counts; the ranking (worst first) uses it. "
    "Accumulated: both models run on the same inputs, so errors of earlier layers are included and it falls with "
    "depth. Weight: the dequantized weight against the original. The worst layers are the ones to keep in higher "
    "precision (`qonnx quantize --exclude REGEX`, or `--target-bits` for 8 bits where it matters most)."
)
_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.4em}img{max-width:100%;height:auto;display:block;margin:1em 0}"
    "table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd}"
    "th{background:#f3f3f3;text-align:left;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:"
    "tabular-nums}tr:nth-child(even) td{background:#fafafa}"
)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else ("inf" if value == float("inf") else f"{value:.1f}")


def _plot_paths(folder: Path, stem: str) -> tuple[Path, Path]:
    """The PNGs beside a report: layers in graph order, and the worst layers."""
    return folder / f"{stem}_layers.png", folder / f"{stem}_worst.png"


def _text(name: str) -> str:
    """A model's name as matplotlib text: escaped, and a "$" kept from starting math mode."""
    return escape_name(name).replace("$", r"\$")


def _plots(rows: list[LayerReport], folder: Path, stem: str, title: str) -> list[Path]:
    try:
        import matplotlib  # heavy (about 1 s): only the plots need it
    except ImportError as e:  # a dependency of qonnx: only a broken install lacks it
        raise QonnxError(
            f"the report's plots need matplotlib, which is missing here ({e}); pip install matplotlib"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above

    order_png, worst_png = _plot_paths(folder, stem)
    with plt.style.context(STYLE):
        _plot_layers(plt, sorted(rows, key=lambda r: r.index), order_png, title)
        _plot_worst(plt, rows[:WORST], worst_png, title)
    return [order_png, worst_png]


def _finite(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None or not np.isfinite(v) else v for v in values], dtype=float)


def _kind_handles(patch: Any, rows: list[LayerReport]) -> list[Any]:
    """A legend entry per projection type the rows hold, in :data:`KINDS` order."""
    return [patch(color=_COLORS[k], label=k) for k in KINDS if any(r.kind == k for r in rows)]


def _plot_layers(plt: Any, rows: list[LayerReport], path: Path, title: str) -> None:
    """Own error as bars coloured by projection type, accumulated as dots; layers named, blocks separated."""
    from matplotlib.lines import Line2D  # heavy, as above
    from matplotlib.patches import Patch  # heavy, as above

    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(30.0, max(8.0, 0.12 * n + 1.5)), 5.0), layout="constrained")
    x = np.arange(n)
    labels = [_text(r.label) for r in rows]
    ax.bar(x, _finite([r.own_sqnr_db for r in rows]), width=0.8, color=[_COLORS[r.kind] for r in rows])
    ax.plot(x, _finite([r.output_sqnr_db for r in rows]), linestyle="none", marker="o", markersize=3, color="black")
    for i in range(1, n):  # a thin line where a new block (L3. after L2.) starts
        if labels[i].split(".", 1)[0] != labels[i - 1].split(".", 1)[0]:
            ax.axvline(i - 0.5, color="#999", linewidth=0.5)
    ax.set_xticks(x, labels, rotation=90, fontsize=6 if n > 40 else 8)
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("output SQNR (dB), lower = more error")
    ax.tick_params(axis="y", right=True, labelright=True)  # a wide plot: the scale on both sides
    ax.set_title(f"{_text(title)}: the error of each quantized layer, in graph order", loc="left")
    handles = _kind_handles(Patch, rows)
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=3, color="black", label=_ACCUMULATED))
    fig.legend(handles=handles, loc="outside lower left", ncol=len(handles), title=_OWN_TITLE, **_LEGEND)
    fig.savefig(path)
    plt.close(fig)


def _plot_worst(plt: Any, rows: list[LayerReport], path: Path, title: str) -> None:
    """The worst layers, worst at the top: own error (coloured by type) and accumulated (grey), values printed."""
    from matplotlib.patches import Patch  # heavy, as above

    n = len(rows)
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * n + 2.2), layout="constrained")
    y = np.arange(n)
    own, acc = _finite([r.own_sqnr_db for r in rows]), _finite([r.output_sqnr_db for r in rows])
    h = 0.4
    ax.barh(y - h / 2, own, height=h, color=[_COLORS[r.kind] for r in rows])
    ax.barh(y + h / 2, acc, height=h, color="#c8c8c8")
    top = float(np.nanmax(np.concatenate([own, acc, [1.0]])))
    for values, offset, weight in ((own, -h / 2, "bold"), (acc, h / 2, "normal")):
        for i, v in enumerate(values):
            if np.isfinite(v):
                ax.text(max(v, 0.0) + top * 0.01, i + offset, f"{v:.1f}", va="center", fontsize=7, fontweight=weight)
    ax.set_yticks(y, [_text(r.label) for r in rows])
    ax.invert_yaxis()  # the worst on top
    ax.set_xlim(min(0.0, float(np.nanmin(np.concatenate([own, acc, [0.0]])))), top * 1.1)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("output SQNR (dB), lower = more error")
    ax.set_title(f"{_text(title)}: the {n} layers with the most error of their own", loc="left")
    handles = _kind_handles(Patch, rows)
    handles.append(Patch(color="#c8c8c8", label=_ACCUMULATED))
    fig.legend(handles=handles, loc="outside lower left", ncol=min(len(handles), 5), title=_OWN_TITLE, **_LEGEND)
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: list[LayerReport], path: str | os.PathLike, *, title: str) -> list[Path]:
    """Write ``rows`` as Markdown (.md) or HTML (.html) with PNG plots beside it; returns the files.

    ``title`` heads the page and the plots (say which models are compared). A report that fails leaves none
    of its files and none of the folders it created.
    """
    out = Path(path)
    if out.suffix not in REPORT_SUFFIXES:
        raise QonnxError(f"{out}: the report must end in {' or '.join(REPORT_SUFFIXES)}")
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
    pngs = _plots(rows, out.parent, out.stem, title)
    header = ["rank", "layer", "type", "op", "weight shape", "own SQNR dB", "accumulated SQNR dB", "weight SQNR dB"]
    header += ["size before", "size after"]
    numeric = {0, 5, 6, 7, 8, 9}
    body = [
        [
            str(i + 1),
            escape_name(r.name),
            r.kind,
            escape_name(r.op_type),
            "x".join(map(str, r.shape)),
            _fmt(r.own_sqnr_db),
            _fmt(r.output_sqnr_db),
            _fmt(r.weight_sqnr_db),
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
        ]
        for i, r in enumerate(rows)
    ]
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    summary = f"{len(rows)} quantized layers; weights {human_bytes(before)} -> {human_bytes(after)}. {_SUMMARY}"
    title = escape_name(f"qonnx report: {title}")
    if out.suffix == ".md":
        lines = [
            f"# {_markdown(title)}",
            "",
            summary,  # qonnx's own words (no names from the model), its `commands` as code
            "",
            *[f"![{_markdown(p.stem)}]({urllib.parse.quote(p.name)})" for p in pngs],
            "",
            "| " + " | ".join(header) + " |",
            "|" + "".join("---:|" if i in numeric else "---|" for i in range(len(header))),
        ]
        lines += ["| " + " | ".join(map(_markdown, row)) + " |" for row in body]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join(
            "<tr>"
            + "".join(f"<td{' class=n' if i in numeric else ''}>{html.escape(c)}</td>" for i, c in enumerate(row))
            + "</tr>"
            for row in body
        )
        imgs = "".join(
            f'<img src="{html.escape(urllib.parse.quote(p.name))}" alt="{html.escape(p.stem)}">' for p in pngs
        )
        out.write_text(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>{imgs}"
            f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>\n",
            encoding="utf-8",
        )
    return [out, *pngs]


#: Characters that Markdown (GitHub's included) would read as markup in a table cell or a heading.
_MARKDOWN = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`*_[]()!|~#$"}})


def _markdown(text: str) -> str:
    """``text`` (a name from the model, already one printable line) as literal Markdown text.

    No raw HTML (``<script>``, ``<img onerror>``), no link or image, no ``|`` that would end a table cell.
    """
    return text.translate(_MARKDOWN)


def report_json(rows: list[LayerReport]) -> str:
    """The rows as JSON."""
    return json.dumps([r.to_dict() for r in rows], indent=2)

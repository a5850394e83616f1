"""Benchmark qonnx against ONNX Runtime's own weight-only quantizer (MatMulNBits, W4A16, block 128).

Two parts, in one run:

1. Speed and memory on a ~1B-parameter fp32 decoder-shaped MatMul stack (~4 GB, external data): each tool
   quantizes the same file in its own fresh process; wall time and peak RSS (``wait4``'s ``ru_maxrss`` of
   that one child) are measured. The input files are read once before every run, so both tools start with
   the model in the page cache.
2. Numerics on a small model whose hidden size (576) is not a multiple of the block (a ragged last block):
   the MatMulNBits initializers of both outputs are compared code by code, asymmetric and symmetric, and
   both models are run on random inputs with ONNX Runtime's CPU provider.

The results replace this script's section of ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/bench_weight_only.py              # full size (a few minutes on 2 cores)
    python benchmarks/bench_weight_only.py --small      # smoke test; writes <work-dir>/RESULTS-small.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import Run, machine, prewarm, run_child, write_section
from _common import median as _med

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START, END = "<!-- bench_weight_only:start -->", "<!-- bench_weight_only:end -->"
FULL = {"hidden": 2048, "intermediate": 5632, "layers": 20, "vocab": None}
SMALL = {"hidden": 512, "intermediate": 1408, "layers": 4, "vocab": None}
NUMERICS = {"hidden": 576, "intermediate": 1536, "layers": 2, "vocab": 1000}
RSS_TARGET = 1.5e9  # bytes (GB = 10^9 bytes throughout)
GB = 1e9


# ---------------------------------------------------------------------------------------------- children


def ort_child(src: str, dst: str, block_size: int, symmetric: bool) -> None:
    """Quantize with ONNX Runtime's MatMulNBitsQuantizer, as its documentation shows; print phase times."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    model = onnx.load(src)
    t1 = time.perf_counter()
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric)
    quant = MatMulNBitsQuantizer(model, algo_config=cfg)
    quant.process()
    t2 = time.perf_counter()
    quant.model.save_model_to_file(dst, use_external_data_format=True)
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2}))


def qonnx_cmd(src: Path, dst: Path, block_size: int, symmetric: bool = False, *extra: str) -> list[str]:
    """The CLI command line (the installed ``qonnx`` script, else ``python -m qonnx.cli``)."""
    exe = shutil.which("qonnx")
    head = [exe] if exe else [sys.executable, "-m", "qonnx.cli"]
    cmd = [*head, "quantize", str(src), "-o", str(dst), "--scheme", "w4a16", "--block-size", str(block_size)]
    return [*cmd, *(["--symmetric"] if symmetric else []), "--no-progress", *extra]


def qonnx_ext_cmd(src: Path, dst: Path, block_size: int, symmetric: bool = False) -> list[str]:
    """The CLI forced to write external data, as ORT's run does (the default is: above 1 GiB)."""
    return qonnx_cmd(src, dst, block_size, symmetric, "--external-data")


def ort_cmd(src: Path, dst: Path, block_size: int, symmetric: bool = False) -> list[str]:
    """This script in ORT-child mode."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ort-child", str(src), str(dst)]
    return [*cmd, "--block-size", str(block_size), *(["--symmetric"] if symmetric else [])]


#: Rows of the speed table: name -> (label, command builder). "qonnx" (the default command) is judged
#: against the targets; "qonnx-ext" shows the effect of external data on the output side.
TOOLS = {
    "qonnx": ("qonnx (default command)", qonnx_cmd),
    "qonnx-ext": ("qonnx --external-data", qonnx_ext_cmd),
    "ort": ("ONNX Runtime MatMulNBitsQuantizer", ort_cmd),
}


# ---------------------------------------------------------------------------------------------- speed


def model_files(path: Path) -> list[Path]:
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def expected_weight_bytes(shape: dict) -> int:
    h, i, n, v = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"]
    per_layer = 4 * h + 3 * h * h + h * h + 3 * h * i
    return 4 * (n * per_layer + 2 * h + (h * v if v else 0))


def ensure_model(work: Path, shape: dict) -> tuple[Path, float | None]:
    """Build the synthetic model unless an identical one is already there; return (path, build seconds)."""
    from qonnx.models import build_decoder_stack

    h, i, n, v = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"]
    path = work / f"decoder_h{h}_i{i}_l{n}_v{v or 0}.onnx"
    data = path.with_name(path.name + ".data")
    nbytes = expected_weight_bytes(shape)
    external = nbytes > 64 << 20
    if path.exists() and (not external or (data.exists() and data.stat().st_size == nbytes)):
        return path, None
    t0 = time.perf_counter()
    build_decoder_stack(path, hidden=h, intermediate=i, layers=n, vocab=v, external_data=external)
    return path, time.perf_counter() - t0


def bench_speed(model: Path, work: Path, repeat: int, timeout: float) -> list[Run]:
    """Each tool ``repeat`` times, rotating which goes first; every run on a warm page cache."""
    runs: list[Run] = []
    names = list(TOOLS)
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for tool in order:
            out = work / f"{tool}-w4-asym-b128.onnx"
            prewarm(model_files(model))
            run = run_child(tool, TOOLS[tool][1](model, out, 128), out, work, timeout)
            print(
                f"  run {r + 1} {tool:9s}: {run.wall_s:7.1f} s wall {run.cpu_s:7.1f} s CPU  "
                f"{run.maxrss / GB:6.2f} GB  {run.out_bytes / GB:.3f} GB  {run.status}",
                flush=True,
            )
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------- numerics


def _nbits_nodes(model) -> dict[str, tuple[dict, dict]]:
    """MatMulNBits nodes keyed by output name: (attributes, {input role: array})."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        arrays = {
            role: numpy_helper.to_array(inits[name])
            for role, name in zip(("B", "scales", "zero_points"), node.input[1:4], strict=False)
            if name and name in inits
        }
        nodes[node.output[0]] = (attrs, arrays)
    return nodes


def _unpack4(packed: np.ndarray, rows: int, length: int) -> np.ndarray:
    """4-bit codes, low nibble first, [rows, length] (an independent reference, not qonnx's)."""
    b = packed.reshape(rows, -1)
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(rows, -1)[:, :length]


def compare_nbits(path_q: Path, path_o: Path, source: Path) -> dict:
    """Code-by-code comparison of two models' MatMulNBits weights (4 bits), matched by node output.

    A differing code is a "tie" when the fp32 weight, divided by the (shared) scale, plus the zero point,
    lies within 1e-5 of a half-integer: the two tools then only round differently.
    """
    import onnx
    from onnx import numpy_helper

    q, o = _nbits_nodes(onnx.load(path_q)), _nbits_nodes(onnx.load(path_o))
    src = onnx.load(source)
    inits = {t.name: t for t in src.graph.initializer}
    weight_of = {n.output[0]: n.input[1] for n in src.graph.node if n.op_type == "MatMul"}
    ties = max_code_diff = 0
    res = {"nodes_qonnx": len(q), "nodes_ort": len(o), "unmatched": sorted(set(q) ^ set(o)), "attr_mismatch": 0}
    same = total = zp_same = zp_total = 0
    scale_abs = scale_rel = 0.0
    for key in sorted(set(q) & set(o)):
        (aq, wq), (ao, wo) = q[key], o[key]
        keys = ("K", "N", "bits", "block_size")
        if any(aq.get(k) != ao.get(k) for k in keys) or aq.get("bits") != 4:
            res["attr_mismatch"] += 1
            continue
        k, n, bs = aq["K"], aq["N"], aq["block_size"]
        nb = -(-k // bs)
        cq, co = _unpack4(wq["B"], n, nb * bs)[:, :k], _unpack4(wo["B"], n, nb * bs)[:, :k]
        same += int((cq == co).sum())
        total += cq.size
        rows, cols = np.nonzero(cq != co)
        if rows.size:
            max_code_diff = max(max_code_diff, int(np.abs(cq.astype(int) - co)[rows, cols].max()))
            w = numpy_helper.to_array(inits[weight_of[key]]).astype(np.float64).T[rows, cols]
            s = wo["scales"].reshape(n, nb).astype(np.float64)[rows, cols // bs]
            zp = _unpack4(wo["zero_points"], n, nb)[rows, cols // bs] if "zero_points" in wo else 8
            x = w / s + zp
            ties += int((np.abs(x - np.floor(x) - 0.5) < 1e-5).sum())
        sq = wq["scales"].reshape(n, nb).astype(np.float64)
        so = wo["scales"].reshape(n, nb).astype(np.float64)
        scale_abs = max(scale_abs, float(np.abs(sq - so).max()))
        scale_rel = max(scale_rel, float((np.abs(sq - so) / np.maximum(np.abs(so), 1e-30)).max()))
        if ("zero_points" in wq) != ("zero_points" in wo):
            res["attr_mismatch"] += 1
        elif "zero_points" in wq:
            zq, zo = _unpack4(wq["zero_points"], n, nb), _unpack4(wo["zero_points"], n, nb)
            zp_same += int((zq == zo).sum())
            zp_total += zq.size
    res.update(
        codes_same=same,
        codes_total=total,
        scale_max_abs=scale_abs,
        scale_max_rel=scale_rel,
        zp_same=zp_same,
        zp_total=zp_total,
        ties=ties,
        max_code_diff=max_code_diff,
    )
    return res


def run_outputs(paths: list[Path], hidden: int, seed: int = 0) -> list[np.ndarray]:
    """Outputs of each model on the same random input, ONNX Runtime CPU."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((2, 16, hidden), dtype=np.float32)
    outs = []
    for p in paths:
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": x})[0])
    return outs


def bench_numerics(work: Path, timeout: float) -> list[dict]:
    model, _ = ensure_model(work, NUMERICS)
    rows = []
    for sym in (False, True):
        tag = f"w4-{'sym' if sym else 'asym'}-b128"
        outs = {}
        for tool, make in (("qonnx", qonnx_cmd), ("ort", ort_cmd)):
            out = work / f"num-{tool}-{tag}.onnx"
            run = run_child(tool, make(model, out, 128, sym), out, work, timeout)
            if run.status != "ok":
                raise RuntimeError(f"{tool} {tag}: {run.status} (logs in {work})")
            outs[tool] = (out, run.out_bytes)
        row = compare_nbits(outs["qonnx"][0], outs["ort"][0], model)
        y_ref, y_q, y_o = run_outputs([model, outs["qonnx"][0], outs["ort"][0]], NUMERICS["hidden"])
        row.update(
            scheme=f"W4A16 {'sym' if sym else 'asym'} block 128",
            size_qonnx=outs["qonnx"][1],
            size_ort=outs["ort"][1],
            out_q_vs_o=float(np.abs(y_q - y_o).max()),
            out_q_vs_ref=float(np.abs(y_q - y_ref).max()),
            out_o_vs_ref=float(np.abs(y_o - y_ref).max()),
            out_ref_absmax=float(np.abs(y_ref).max()),
        )
        rows.append(row)
        print(
            f"  {row['scheme']}: codes identical {row['codes_same'] / max(row['codes_total'], 1):.6%}, "
            f"max |dscale| {row['scale_max_abs']:.3g}, max |y_qonnx - y_ort| {row['out_q_vs_o']:.3g}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- report


def _threshold() -> str:
    """qonnx's automatic external-data threshold, as installed."""
    from qonnx.core import modelfile

    n = getattr(modelfile, "EXTERNAL_DATA_THRESHOLD", None)
    return "an unknown size" if n is None else f"{n / 2**20:.0f} MiB"


def _speed_row(label: str, rs: list[Run]) -> tuple[str, list[Run]]:
    good = [r for r in rs if r.status == "ok"]
    status = "; ".join(sorted({r.status for r in rs})) or "not run"
    pick = good or rs
    walls = [r.wall_s for r in pick]
    each = f" ({', '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else ""
    size = f"{good[0].out_bytes / GB:.3f}" if good else "-"
    return (
        f"| {label} | {_med(walls):.1f}{each} | {_med([r.cpu_s for r in pick]):.1f} "
        f"| {max((r.maxrss for r in pick), default=0) / GB:.2f} | {size} | {status} |"
    ), good


def render(args, shape, model, build_s, runs, numerics, meta) -> str:
    by_tool = {t: [r for r in runs if r.tool == t] for t in TOOLS}
    qonnx_line = " ".join(qonnx_cmd(Path("IN.onnx"), Path("OUT.onnx"), 128))
    exe = shutil.which("qonnx")
    qonnx_line = qonnx_line.replace(exe, "qonnx") if exe else qonnx_line
    lines = [START, "## Weight-only W4A16 (MatMulNBits): qonnx vs ONNX Runtime's quantizer", ""]
    lines += [
        f"Measured {meta['date']} by `benchmarks/bench_weight_only.py`.",
        "",
        f"- Machine: {meta['machine']}.",
        f"- Load average (1, 5, 15 min) at the start: {meta['load']}; at the end of the speed runs: "
        f"{meta['load_end']}. The 2 cores are shared with other work, so wall times vary between runs; "
        "CPU time is steadier. qonnx quantizes in 2 threads, ORT mostly in one.",
        f"- Command: `{meta['command']}`",
        f"- Model: `build_decoder_stack(hidden={shape['hidden']}, "
        f"intermediate={shape['intermediate']}, "
        f"layers={shape['layers']}, vocab={shape['vocab']}, external_data=True)`: "
        f"{expected_weight_bytes(shape) / 4 / 1e9:.3f} B parameters, "
        f"{sum(p.stat().st_size for p in model_files(model)) / GB:.2f} GB fp32"
        + (f" (built in {build_s:.0f} s)" if build_s else " (reused)")
        + ".",
        "- Scheme: 4-bit asymmetric, block 128 along K, MatMulNBits; every tool quantizes every MatMul.",
        "- Each run is a fresh process; peak RSS is that process's `ru_maxrss` (from `wait4`), "
        "GB = 10^9 bytes; wall and CPU (user + system) time include interpreter start and imports. "
        "Before every run the input files are read once, so each starts with a warm page cache. "
        f"Runs: {args.repeat} per tool, rotating which goes first; the median is shown, "
        "every run's wall time in parentheses, peak RSS is the largest of the runs.",
        "",
        f"- qonnx (default command): `{qonnx_line}`",
        "- qonnx --external-data: the same plus `--external-data` (weights to `OUT.onnx.data`, as ORT "
        f"writes them; qonnx's default: external data above {meta['threshold']} of output weights)",
        "- ORT: `onnx.load(IN)`; `quant = MatMulNBitsQuantizer(model, algo_config="
        "DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False))`; `quant.process()`; "
        "`quant.model.save_model_to_file(OUT, use_external_data_format=True)`",
        "",
        "| tool | wall time (s) | CPU time (s) | peak RSS (GB) | output size (GB) | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    good = {}
    for tool, (label, _) in TOOLS.items():
        row, good[tool] = _speed_row(label, by_tool[tool])
        lines.append(row)
    verdict = []
    if good["ort"]:
        to, mo = _med([r.wall_s for r in good["ort"]]), max(r.maxrss for r in good["ort"])
        for tool in ("qonnx", "qonnx-ext"):
            if good[tool]:
                tq, mq = _med([r.wall_s for r in good[tool]]), max(r.maxrss for r in good[tool])
                lines.append(
                    f"| ratio {TOOLS[tool][0]} / ORT | {tq / to:.2f} | "
                    f"{_med([r.cpu_s for r in good[tool]]) / _med([r.cpu_s for r in good['ort']]):.2f} "
                    f"| {mq / mo:.2f} | {good[tool][0].out_bytes / good['ort'][0].out_bytes:.3f} | |"
                )
    lines.append("")
    for tool in ("qonnx", "qonnx-ext"):
        if not good[tool]:
            verdict.append(f"- {TOOLS[tool][0]}: did not finish ({by_tool[tool][0].status if by_tool[tool] else ''}).")
            continue
        tq, mq = _med([r.wall_s for r in good[tool]]), max(r.maxrss for r in good[tool])
        rss = f"{'met' if mq <= RSS_TARGET else 'NOT met'} ({mq / GB:.2f} GB = {mq / 2**30:.2f} GiB)"
        if good["ort"]:
            to = _med([r.wall_s for r in good["ort"]])
            bq, bo = min(r.wall_s for r in good[tool]), min(r.wall_s for r in good["ort"])
            speed = (
                f"{'met' if tq <= to else 'NOT met'} on the median ({tq:.1f} s vs {to:.1f} s), "
                f"{'met' if bq <= bo else 'NOT met'} on the best run ({bq:.1f} s vs {bo:.1f} s)"
            )
        else:
            speed = "cannot be compared: ORT's quantizer did not finish"
        verdict.append(
            f"- {TOOLS[tool][0]}: target peak RSS <= {RSS_TARGET / GB:.1f} GB {rss}; target wall time <= ORT's {speed}."
        )
    if good["ort"]:
        ph = good["ort"][0].phases
        verdict.append(
            f"- ORT phases (first run): load {ph.get('load_s', 0):.1f} s, quantize "
            f"{ph.get('quantize_s', 0):.1f} s, save {ph.get('save_s', 0):.1f} s."
        )
    if good["qonnx"]:
        verdict.append(f"- qonnx prints: {good['qonnx'][0].phases.get('summary', '')}")
    lines += [*verdict, ""]

    lines += [
        "### Numerics against ONNX Runtime's quantizer (same weights)",
        "",
        f"Model: `build_decoder_stack(hidden={NUMERICS['hidden']}, "
        f"intermediate={NUMERICS['intermediate']}, layers={NUMERICS['layers']}, "
        f"vocab={NUMERICS['vocab']})` (K=576 is not a multiple of 128: a ragged last block). "
        "Initializers matched by MatMulNBits output name; codes compared over the K real rows "
        "(padding excluded). Outputs: ONNX Runtime CPU, one random input [2, 16, 576], seed 0. "
        'A differing code "at a rounding tie" has w / scale + zero point within 1e-5 of a '
        "half-integer; ORT's MLAS kernel computes `roundf(w * (1 / scale) + zp)` in float32 "
        "(half away from zero, zero point added before rounding).",
        "",
        "| scheme | nodes | identical codes | identical zero points | max abs / rel scale diff "
        "| max abs output diff qonnx vs ORT | qonnx vs fp32 | ORT vs fp32 | max abs fp32 output "
        "| size qonnx / ORT (bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in numerics:
        zp = f"{r['zp_same'] / r['zp_total']:.5%}" if r["zp_total"] else "n/a (symmetric)"
        nodes = f"{min(r['nodes_qonnx'], r['nodes_ort'])}" + (
            f" ({len(r['unmatched'])} unmatched, {r['attr_mismatch']} attr mismatch)"
            if r["unmatched"] or r["attr_mismatch"]
            else ""
        )
        ndiff = r["codes_total"] - r["codes_same"]
        detail = f"{ndiff} of {r['codes_total']:,} differ"
        if ndiff:
            detail += f" by at most {r['max_code_diff']}, {r['ties']} of them at a rounding tie"
        lines.append(
            f"| {r['scheme']} | {nodes} | {r['codes_same'] / max(r['codes_total'], 1):.5%} "
            f"({detail}) | {zp} "
            f"| {r['scale_max_abs']:.3g} / {r['scale_max_rel']:.3g} | {r['out_q_vs_o']:.3g} "
            f"| {r['out_q_vs_ref']:.3g} | {r['out_o_vs_ref']:.3g} | {r['out_ref_absmax']:.3g} "
            f"| {r['size_qonnx']:,} / {r['size_ort']:,} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="quick smoke run on a small model")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/qonnx-bench"),
        help="where models and outputs go (reused between runs; default /tmp/qonnx-bench)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (alternating order; median reported)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a tool's run is killed")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown file to update (default benchmarks/RESULTS.md; <work-dir>/RESULTS-small.md with --small)",
    )
    ap.add_argument("--ort-child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--block-size", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ort_child:
        ort_child(*args.ort_child, args.block_size, args.symmetric)
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shape = SMALL if args.small else FULL
    results = args.results or (work / "RESULTS-small.md" if args.small else HERE / "RESULTS.md")
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "threshold": _threshold(),
        "command": "python benchmarks/bench_weight_only.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
    }
    print(f"machine: {meta['machine']}\nwork dir: {work}", flush=True)

    t0 = time.perf_counter()
    model, build_s = ensure_model(work, shape)
    print(f"model: {model} " + (f"(built in {build_s:.0f} s)" if build_s else "(reused)"), flush=True)
    print("speed and memory:", flush=True)
    runs = bench_speed(model, work, args.repeat, args.timeout)
    meta["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print("numerics:", flush=True)
    numerics = bench_numerics(work, args.timeout)
    section = render(args, shape, model, build_s, runs, numerics, meta)
    print("\n" + section.replace(START, "").replace(END, "").strip() + "\n")
    write_section(results, section, START, END)
    print(f"wrote {results} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

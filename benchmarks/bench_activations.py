"""Weight+activation schemes on the reference model, SmolLM2-135M-Instruct, beside ONNX Runtime's quantize_static.

Every row is made in its own fresh process (quantize wall time, CPU time and peak RSS from ``wait4``, calibration
included), then measured: perplexity by the standard protocol (``qonnx eval --task perplexity``), size on disk,
and CPU speed against fp32 in pairs measured back to back (prefill at batch 16 x 128 tokens, decode at batch 16
and at batch 1 after a 128-token cache). The results replace this script's section of ``benchmarks/RESULTS.md``
and its ``activations_ppl.png`` plot.

Usage::

    python benchmarks/bench_activations.py                       # full protocol (about an hour on 2 cores)
    python benchmarks/bench_activations.py --quick --rows w8a8-minmax,dynamic   # smoke run, into the work dir
    python benchmarks/bench_activations.py --fp32 /tmp/demo-real/smollm2-fp32 --reuse   # reuse an export and rows
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
import threading
import time
from pathlib import Path

from _common import Undisturbed, machine, median, prewarm, run_child, write_section
from bench_reference import export_reference, model_bytes

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench_activations:start -->", "<!-- bench_activations:end -->"
MB = 1e6
CALIB_SAMPLES, CALIB_LEN = 8, 512  # calibration windows (qonnx and ORT alike), from token 60,000 of pydoc
BATCH, PROMPT = 16, 128  # speed: prefill batch x tokens; decode after a cache of PROMPT tokens
SPEED_PROTOCOL = 2  # bumped when the speed measurement changes: --reuse then measures speed again
DISTURBED = 0.25  # cores used by other processes during a measurement that make it be repeated
MEMORY_FLOOR = 1.5e9  # an ORT child stops itself when the machine has less memory available than this

# ------------------------------------------------------------------------------------------------ rows
# Every qonnx flag that shapes a row is spelled out, so that a row means the same thing when defaults change.
CALIB = ("--calib-samples", str(CALIB_SAMPLES), "--calib-seq-len", str(CALIB_LEN), "--device", "cpu", "--algo", "rtn")
#: The smoothing of the keep-float row: the best of the w8a8 rows above it in the last full run (edit after one).
KEEP_FLOAT_SMOOTHING = ("--smooth-quant", "auto", "--calib-method", "mse")
KEEP_FLOAT = 4


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of the table: how it is made (tool + arguments)."""

    key: str
    label: str
    tool: str  # "fp32", "qonnx" or "ort"
    args: tuple[str, ...] = ()


def _static(scheme: str, block: int, *flags: str, target: str = "cpu", keep: int = 0) -> tuple[str, ...]:
    """A calibrated scheme's flags: weights per channel (block 0) or in blocks, 8 x 512 tokens, RTN weights."""
    return (
        "--scheme",
        scheme,
        "--block-size",
        str(block),
        *flags,
        "--keep-float",
        str(keep),
        "--target",
        target,
        *CALIB,
    )


ROWS = [
    Row("fp32", "fp32 (reference)", "fp32"),
    Row("ort-minmax", "ORT quantize_static, MinMax", "ort", ("MinMax",)),
    Row("ort-percentile", "ORT quantize_static, Percentile", "ort", ("Percentile",)),
    Row(
        "w8a8-minmax",
        "W8A8, minmax, no smoothing",
        "qonnx",
        _static("w8a8", 0, "--smooth-quant", "none", "--calib-method", "minmax"),
    ),
    Row(
        "w8a8-mse",
        "W8A8, mse, no smoothing",
        "qonnx",
        _static("w8a8", 0, "--smooth-quant", "none", "--calib-method", "mse"),
    ),
    Row(
        "w8a8-sq0.5",
        "W8A8, mse, SmoothQuant 0.5",
        "qonnx",
        _static("w8a8", 0, "--smooth-quant", "0.5", "--calib-method", "mse"),
    ),
    Row(
        "w8a8-sqauto",
        "W8A8, mse, SmoothQuant auto",
        "qonnx",
        _static("w8a8", 0, "--smooth-quant", "auto", "--calib-method", "mse"),
    ),
    Row(
        "w8a8-keep4",
        f"W8A8, {' '.join(KEEP_FLOAT_SMOOTHING[1::2])}, keep {KEEP_FLOAT} float",
        "qonnx",
        _static("w8a8", 0, *KEEP_FLOAT_SMOOTHING, keep=KEEP_FLOAT),
    ),
    Row(
        "w4a8-sq0.5",
        "W4A8 (block 128), mse, SmoothQuant 0.5, QDQ (target generic)",
        "qonnx",
        _static("w4a8", 128, "--smooth-quant", "0.5", "--calib-method", "mse", target="generic"),
    ),
    Row(
        "w4a8-cpu",
        "W4A8 (block 128), target cpu",
        "qonnx",
        _static("w4a8", 128, "--smooth-quant", "0.5", "--calib-method", "mse", target="cpu"),
    ),
    Row("fp8", "FP8 E4M3, minmax", "qonnx", _static("fp8", 0, "--smooth-quant", "none", "--calib-method", "minmax")),
    Row(
        "dynamic",
        "dynamic int8 (MatMulNBits 8-bit, acc. level 4)",
        "qonnx",
        ("--scheme", "dynamic", "--block-size", "32"),
    ),
    Row(
        "w4a16",
        "W4A16 RTN (block 128)",
        "qonnx",
        ("--scheme", "w4a16", "--block-size", "128", "--algo", "rtn", "--format", "matmulnbits"),
    ),
    Row(
        "w8a16",
        "W8A16 RTN (block 128)",
        "qonnx",
        ("--scheme", "w8a16", "--block-size", "128", "--algo", "rtn", "--format", "matmulnbits"),
    ),
]
SPEEDS = ("prefill", "decode16", "decode1")
SPEED_TITLES = {
    "prefill": f"prefill b{BATCH}x{PROMPT} (tok/s)",
    "decode16": f"decode b{BATCH} (tok/s)",
    "decode1": "decode b1 (tok/s)",
}


# ---------------------------------------------------------------------------------------------- children


def _memory_guard(floor: float) -> None:
    """Stop this process (exit 75, one line on stderr) before it takes the machine's last memory from others."""
    import psutil

    def watch() -> None:
        me = psutil.Process()
        while True:
            left = psutil.virtual_memory().available
            if left < floor:
                print(
                    f"stopped by the benchmark: {left / 1e9:.1f} GB of memory left on the machine "
                    f"with this process at {me.memory_info().rss / 1e9:.1f} GB RSS",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(75)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def ort_child(src: str, dst: str, method: str) -> None:
    """ONNX Runtime's quantize_static as documented: QDQ, MatMul only, per channel, U8 activations, S8 weights."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from qonnx.runtime.calibration import calibration_feeds

    _memory_guard(MEMORY_FLOOR)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    feeds = calibration_feeds(src, samples=CALIB_SAMPLES, seq_len=CALIB_LEN)  # the windows qonnx calibrates on

    class Reader(CalibrationDataReader):  # ORT may deep-copy it: a plain list, no generator
        def __init__(self) -> None:
            self.feeds, self.next = feeds, 0

        def get_next(self) -> dict | None:
            self.next += 1
            return self.feeds[self.next - 1] if self.next <= len(self.feeds) else None

    t0 = time.perf_counter()
    quantize_static(
        str(Path(src) / "model.onnx"),
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    print(json.dumps({"quantize_static_s": time.perf_counter() - t0}))


class Probe:
    """One model's session with the feed builders of :class:`qonnx.runtime.generate.Generator`.

    ``prefill`` runs [BATCH, PROMPT] corpus tokens with an empty past and keeps the model's own KV cache;
    ``decode`` runs greedy steps from that 128-token cache at batch 16 or 1 (its first row).
    """

    def __init__(self, folder: str, tokenizer, ids) -> None:
        from qonnx.runtime.generate import Generator

        self.gen = Generator(folder, device="cpu", tokenizer=tokenizer)  # make_session(folder, "cpu") inside
        self.outputs = ["logits", *self.gen.present_names]
        self.ids = ids
        self.cache: tuple | None = None

    def _run(self, ids, past: dict, start: int) -> tuple[float, list]:
        import numpy as np

        feeds = self.gen._feeds(ids, np.ones((ids.shape[0], start + ids.shape[1]), dtype=np.int64), start)
        feeds.update(past)
        t = time.perf_counter()
        out = self.gen.session.run(self.outputs, feeds)
        return time.perf_counter() - t, out

    def prefill(self) -> float:
        seconds, out = self._run(self.ids, self.gen._empty_past(len(self.ids)), 0)
        self.cache = (out[0][:, -1].argmax(-1), dict(zip(self.gen.past_names, out[1:], strict=True)))
        return self.ids.size / seconds

    def decode(self, batch: int, steps: int) -> float:
        import numpy as np

        assert self.cache is not None, "prefill first"
        nxt, past = self.cache
        if batch == 1:
            nxt, past = nxt[:1], {k: np.ascontiguousarray(v[:1]) for k, v in past.items()}
        total, pos = 0.0, self.ids.shape[1]
        for _ in range(steps):
            seconds, out = self._run(nxt[:, None].astype(np.int64), past, pos)
            total += seconds
            nxt, past, pos = out[0][:, -1].argmax(-1), dict(zip(self.gen.past_names, out[1:], strict=True)), pos + 1
        return batch * steps / total


def speed_child(fp32: str, model: str, rounds: int, steps: tuple[int, int], budget: float) -> None:
    """fp32 and one model measured in pairs, back to back, the order alternating by round; each measurement is
    repeated while other processes disturbed it (:class:`Undisturbed`). Prints one JSON line."""
    import numpy as np

    from qonnx.models.hf import load_tokenizer
    from qonnx.runtime.data import corpus_tokens

    ids = np.asarray(corpus_tokens(fp32)[: BATCH * PROMPT], dtype=np.int64).reshape(BATCH, PROMPT)
    tokenizer = load_tokenizer(fp32)
    probes = {"fp32": Probe(fp32, tokenizer, ids), "model": Probe(model, tokenizer, ids)}
    measure = {
        "prefill": lambda p: p.prefill(),
        "decode16": lambda p: p.decode(BATCH, steps[0]),
        "decode1": lambda p: p.decode(1, steps[1]),
    }
    for p in probes.values():  # warm-up; also each model's own KV cache for the decode measurements
        p.prefill()
        p.decode(BATCH, 1)
        p.decode(1, 1)
    guard = Undisturbed(limit=DISTURBED, deadline=time.monotonic() + budget)
    res: dict = {k: {"fp32": [], "model": [], "others": []} for k in SPEEDS}
    for r in range(rounds):
        order = ["fp32", "model"] if r % 2 == 0 else ["model", "fp32"]
        for kind in SPEEDS:
            worst = 0.0  # the more disturbed half of the pair
            for n in order:
                value, others = guard(lambda n=n, kind=kind: measure[kind](probes[n]))
                res[kind][n].append(value)
                worst = max(worst, others)
            res[kind]["others"].append(worst)
    res["retries"] = guard.retries
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- parent


def quantize_cmd(row: Row, src: Path, dst: Path) -> list[str]:
    if row.tool == "qonnx":
        exe = shutil.which("qonnx")
        head = [exe] if exe else [sys.executable, "-m", "qonnx.cli"]
        return [*head, "quantize", str(src), "-o", str(dst), *row.args, "--no-verify", "--no-progress", "--json"]
    return [sys.executable, str(Path(__file__).resolve()), "--ort-child", str(src), str(dst / "model.onnx"), *row.args]


def quantize_row(row: Row, src: Path, work: Path, timeout: float) -> dict:
    """Quantize one row in a fresh process on a warm page cache; its Run as a dict, with the qonnx summary."""
    dst, logs = work / row.key, work / "logs" / row.key
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    prewarm(list(src.glob("model.onnx*")))
    run = run_child(row.tool, quantize_cmd(row, src, dst), dst / "model.onnx", logs, timeout)
    if run.rc == 75:
        run.status = "stopped: " + (logs / "model.err").read_text().strip().splitlines()[-1].split(": ", 1)[-1]
    if row.tool == "ort" and run.status == "ok":  # tokenizer and config, to evaluate it as a folder (not timed)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy2(f, dst / f.name)
    run.out_bytes = model_bytes(dst) if run.status == "ok" else 0
    record = dataclasses.asdict(run)
    if run.status == "ok":
        record["graph"] = graph_counts(dst / "model.onnx")
    if row.tool == "qonnx" and run.status == "ok":
        summary = json.loads((logs / "model.out").read_text())
        act = _activation_info(summary["activations"])
        if act and act["kept_float"]:
            act["kept_float"] = [f"{n} ({_module_of(dst / 'model.onnx', n)})" for n in act["kept_float"]]
        record["phases"] = {"seconds": summary["seconds"], "activations": act}
    return record


def graph_counts(path: Path) -> dict:
    """Quantization nodes of a model: Q (activations), DQ of initializers (weights), MatMulNBits, float MatMuls."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    weights = sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    act_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        node = producer.get(node.input[0])
    lm_head = node is not None and node.op_type == "MatMul" and all(i in act_dq for i in node.input[:2])
    dq_outputs = [o.name for o in graph.output if getattr(producer.get(o.name), "op_type", "") == "DequantizeLinear"]
    return {
        "outputs through Q/DQ": dq_outputs,
        "lm_head MatMul of two quantized activations": lm_head,
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "weight DequantizeLinear": weights,
        "MatMul reading a quantized activation": sum(1 for n in matmuls if n.input[0] in act_dq),
        "MatMul of two quantized activations": sum(1 for n in matmuls if n.input[0] in act_dq and n.input[1] in act_dq),
        "MatMulNBits": ops.count("MatMulNBits"),
        "MatMulNBits accuracy levels": sorted(
            {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
        ),
        "MatMul": ops.count("MatMul"),
    }


def _module_of(path: Path, tensor: str) -> str:
    """The PyTorch module (``layers.11.mlp.down_proj``) of the node reading ``tensor``, from the export's metadata."""
    import ast

    import onnx

    for node in onnx.load(path, load_external_data=False).graph.node:
        if tensor in node.input:
            scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
            if scopes:
                modules = [m for m in ast.literal_eval(scopes) if m.startswith("model.")]
                return modules[-1].removeprefix("model.model.") if modules else node.name
            return node.name
    return "?"


def _activation_info(info: dict | None) -> dict | None:
    """The parts of qonnx's activation summary that the notes use (not the per-layer records)."""
    if not info:
        return None
    alphas = [s["alpha"] for s in info.get("smoothing", {}).values()]
    return {
        "tensors": info.get("tensors"),
        "inserted": info.get("inserted"),
        "smoothed": len(alphas),
        "alphas": sorted(alphas),
        "kept_float": sorted(info.get("kept_float", {})),
    }


def perplexity_row(folder: Path, windows: int, log: Path, timeout: float) -> dict:
    """``qonnx eval FOLDER --task perplexity --windows N --json`` in a child; its JSON, or {"error": ...}."""
    exe = shutil.which("qonnx")
    head = [exe] if exe else [sys.executable, "-m", "qonnx.cli"]
    cmd = [*head, "eval", str(folder), "--task", "perplexity", "--windows", str(windows), "--json", "--no-progress"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"perplexity timed out after {timeout:.0f} s"}
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"perplexity failed (rc {proc.returncode}): {lines[-1][:200] if lines else ''}"}
    return json.loads(proc.stdout)


def speed_row(fp32: Path, folder: Path, args, log: Path) -> dict:
    """The speed child for fp32 and one model; its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--speed-child", str(fp32), str(folder)]
    cmd += ["--rounds", str(args.rounds), "--steps", f"{args.steps[0]},{args.steps[1]}"]
    cmd += ["--speed-budget", str(args.speed_budget)]
    timeout = args.timeout + args.speed_budget
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"speed timed out after {timeout:.0f} s"}
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"speed failed (rc {proc.returncode}): {lines[-1][:200] if lines else ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(speed: dict, kind: str) -> float:
    """The median over rounds of model / fp32, each pair measured back to back."""
    s = speed.get(kind, {})
    return median([m / f for m, f in zip(s.get("model", []), s.get("fp32", []), strict=True)])


def best(values: list[float]) -> float:
    """The fastest round: other work on the shared cores only slows a run down."""
    return max(values, default=math.nan)


def run_rows(rows: list[Row], src: Path, work: Path, args, now: str) -> dict:
    """Quantize, evaluate and time every row; one record per row, kept in work/records/KEY.json for --reuse."""
    (work / "records").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    settings = {
        "ppl": {"windows": args.windows, "fp32": str(src)},
        "speed": {"rounds": args.rounds, "steps": list(args.steps), "fp32": str(src), "protocol": SPEED_PROTOCOL},
    }
    records: dict[str, dict] = {}
    for row in rows:
        path = work / "records" / f"{row.key}.json"
        old = json.loads(path.read_text()) if args.reuse and path.exists() else {}
        rec: dict = {"args": list(row.args), "dates": {}}
        if row.tool == "fp32":
            folder = src
        else:
            folder = work / row.key
            same = old.get("args") == list(row.args) and (folder / "model.onnx").exists()
            if same and old.get("quantize", {}).get("status") == "ok":
                rec["quantize"] = old["quantize"]
                rec["quantize"]["graph"] = graph_counts(folder / "model.onnx")  # counted by this version
                rec["dates"]["quantize"] = old.get("dates", {}).get("quantize", "an earlier run")
                print(f"  {row.key:16s} quantize: reused {folder}", flush=True)
            else:
                old = {}
                timeout = args.ort_timeout if row.tool == "ort" else args.timeout
                rec["quantize"] = q = quantize_row(row, src, work, timeout)
                rec["dates"]["quantize"] = now
                print(
                    f"  {row.key:16s} quantize: {q['wall_s']:6.1f} s wall {q['cpu_s']:6.1f} s CPU "
                    f"{q['maxrss'] / 1e9:5.2f} GB  {q['out_bytes'] / MB:6.1f} MB  {q['status']}",
                    flush=True,
                )
            if rec["quantize"]["status"] != "ok":
                records[row.key] = rec
                path.write_text(json.dumps(rec, indent=1))
                continue
        rec["bytes"] = model_bytes(folder)
        keep = {k: old.get("settings", {}).get(k) == v for k, v in settings.items()}
        rec["ppl"] = old["ppl"] if keep["ppl"] and "perplexity" in old.get("ppl", {}) else None
        rec["dates"]["ppl"] = old.get("dates", {}).get("ppl", "an earlier run") if rec["ppl"] else now
        if rec["ppl"] is None:
            rec["ppl"] = perplexity_row(folder, args.windows, work / "logs" / f"ppl-{row.key}.log", args.timeout)
        print(f"  {row.key:16s} perplexity: {rec['ppl'].get('perplexity', rec['ppl'].get('error'))}", flush=True)
        if row.tool != "fp32" and not args.no_speed:
            rec["speed"] = old["speed"] if keep["speed"] and "prefill" in old.get("speed", {}) else None
            rec["dates"]["speed"] = old.get("dates", {}).get("speed", "an earlier run") if rec["speed"] else now
            if rec["speed"] is None:
                rec["speed"] = speed_row(src, folder, args, work / "logs" / f"speed-{row.key}.log")
            sp = rec["speed"]
            shown = ", ".join(f"{k} {ratio(sp, k):.2f}x" for k in SPEEDS) if "prefill" in sp else sp.get("error")
            print(f"  {row.key:16s} speed vs fp32: {shown}", flush=True)
        rec["settings"] = settings
        records[row.key] = rec
        path.write_text(json.dumps(rec, indent=1))
    return records


# ---------------------------------------------------------------------------------------------- report


def _cmd_text(row: Row) -> str:
    if row.tool == "fp32":
        return "the fp32 export"
    if row.tool == "ort":
        return f"`quantize_static(..., calibrate_method=CalibrationMethod.{row.args[0]})`"
    return f"`qonnx quantize FP32 -o OUT {' '.join(row.args)} --no-verify --no-progress --json`"


def _speed_cells(rec: dict, row: Row, fp32: dict) -> list[str]:
    """Absolute best tok/s and the median paired ratio for each speed; fp32: best over every pair it ran in."""
    cells = []
    sp = rec.get("speed", {})
    for kind in SPEEDS:
        if row.tool == "fp32":
            vals, others = fp32.get(kind, ([], []))
            dag = "\u2020" if others and min(others) >= DISTURBED else ""
            cells += [f"{best(vals):.0f}{dag}" if vals else "", ""]
        elif kind in sp:
            dag = "\u2020" if min(sp[kind]["others"]) >= DISTURBED else ""
            most = "\u2020" if median(sp[kind]["others"]) >= DISTURBED else ""
            cells += [f"{best(sp[kind]['model']):.0f}{dag}", f"{ratio(sp, kind):.2f}x{most}"]
        else:
            cells += ["", ""]
    return cells


def render(rows: list[Row], records: dict, meta: dict, args, png: Path | None) -> str:
    """This script's section of RESULTS.md."""
    base = records.get("fp32", {})
    pairs = {k: [r["speed"][k] for r in records.values() if k in (r.get("speed") or {})] for k in SPEEDS}
    fp32_speed = {k: ([x for p in v for x in p["fp32"]], [x for p in v for x in p["others"]]) for k, v in pairs.items()}
    bppl, bbytes = base.get("ppl", {}).get("perplexity", math.nan), base.get("bytes", math.nan)
    export = "reused" if meta["export_s"] is None else f"exported in {meta['export_s']:.0f} s"
    retries = sum(r.get("speed", {}).get("retries", 0) for r in records.values())
    others = [x for r in records.values() for k in SPEEDS for x in (r.get("speed") or {}).get(k, {}).get("others", [])]
    disturbed = sum(1 for x in others if x >= DISTURBED)
    lines = [
        START,
        "## Weight+activation schemes on the reference model, beside ONNX Runtime's quantize_static (CPU)",
        "",
        f"Measured {meta['date']} by `{meta['command']}` in {meta['total_s'] / 60:.1f} min (fp32 {export}: "
        f"`{meta['fp32']}`)" + _reused_text(rows, records, meta) + ".",
        "",
        f"- Machine: {meta['machine']}."
        + (
            " **qonnx/, passes/ or runtime/ changed while this ran** (other work on the repository): rows may "
            "come from different code."
            if meta.get("code_changed")
            else ""
        ),
        f"- Load average (1, 5, 15 min) at the start: {meta['load']}; at the end: {meta['load_end']}. Other work "
        f"shares these {os.cpu_count()} cores.",
        "- Model: SmolLM2-135M-Instruct, fp32 with KV cache (`qonnx export smollm2`, "
        "`qonnx.models.export.export_causal_lm`); 30 layers, hidden 576.",
        f"- Calibration: {CALIB_SAMPLES} windows of {CALIB_LEN} tokens of the pydoc corpus from token 60,000 "
        "(`qonnx.runtime.calibration.calibration_feeds`), the same windows for ORT.",
        '- ORT: `quantize_static(IN, OUT, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], '
        "per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=M)` "
        "on the export as it is (no `quant_pre_process`), in a fresh process that stops itself when the "
        f"machine has less than {MEMORY_FLOOR / 1e9:.1f} GB of memory left (shared machine).",
        "- Quantize: each row a fresh process on a warm page cache; wall and CPU (user + system) time include "
        "interpreter start, imports, calibration and saving; peak RSS is the child's `ru_maxrss` from `wait4` "
        "(GB = 10^9 bytes). qonnx runs with `--no-verify` (ORT verifies nothing either).",
        f"- Perplexity: `qonnx eval DIR --task perplexity --windows {args.windows} --json`"
        + ("" if args.windows == 24 else " (**not** the standard 24 windows)")
        + ". Size: model.onnx + model.onnx.data (MB = 10^6 bytes).",
        f"- Speed: one process per row holds an fp32 session and the row's (`qonnx.runtime.make_session(folder, "
        '"cpu")` through `qonnx.runtime.generate.Generator`, whose feed builders it uses; ONNX Runtime\'s default '
        f"threads). Prefill: [{BATCH}, {PROMPT}] pydoc tokens, empty past, tokens/s = {BATCH * PROMPT} / time "
        f"(logits for every position, as exported). Decode: greedy steps from the model's own {PROMPT}-token KV "
        f"cache, {args.steps[0]} steps at batch {BATCH} ({BATCH} new tokens a step) and {args.steps[1]} steps at "
        f"batch 1. fp32 and the row are measured back to back (fp32 first in even rounds, the row first in odd "
        f"ones), {args.rounds} round(s); a measurement during which other processes used more than {DISTURBED} "
        "cores (from /proc/stat, minus this process) is repeated after a quiet moment, within "
        f"{args.speed_budget:.0f} s per row, after which the least disturbed attempt is kept ({retries} repeats in "
        f"all; {disturbed} of {len(others)} kept pairs had a half disturbed, median {median(others):.2f} cores). "
        "Columns: the best round's tokens/s (\u2020: every round disturbed) and the median over rounds of "
        "row / fp32 within each pair (\u2020: most pairs disturbed). fp32's tokens/s: the best over all pairs.",
        "",
        "| model | perplexity | vs fp32 | size (MB) | vs fp32 | quantize wall (s) | CPU (s) | peak RSS (GB) | "
        + " | ".join(f"{SPEED_TITLES[k]} | vs fp32" for k in SPEEDS)
        + " | status |",
        "|---|" + "---:|" * 13 + "---|",
    ]
    for row in rows:
        rec = records.get(row.key, {})
        q = rec.get("quantize", {})
        ppl = rec.get("ppl") or {}
        status = q.get("status", "ok")
        for what in (ppl, rec.get("speed") or {}):
            status += f"; {what['error']}" if "error" in what else ""
        cells = [row.label, "", "", "", ""]
        if "perplexity" in ppl:
            p = ppl["perplexity"]
            cells[1:5] = [
                f"{p:.3f}",
                f"{p / bppl:.3f}x" if row.tool != "fp32" else "",
                f"{rec['bytes'] / MB:.1f}",
                f"{rec['bytes'] / bbytes:.3f}x" if row.tool != "fp32" else "",
            ]
        if q:
            cells += [f"{q['wall_s']:.1f}", f"{q['cpu_s']:.1f}", f"{q['maxrss'] / 1e9:.2f}"]
        else:
            cells += ["", "", ""]
        cells += [*_speed_cells(rec, row, fp32_speed), status]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rows (FP32 = the fp32 folder; every flag spelled out so that rows keep their meaning):", ""]
    lines += [f"- {row.label}: {_cmd_text(row)}" for row in rows]
    lines += ["", *notes(rows, records), ""]
    lines += [f"![{png.stem}]({png.name})" if png else "", "", END]
    return "\n".join(lines)


def _reused_text(rows: list[Row], records: dict, meta: dict) -> str:
    """Which figures come from earlier runs of this script (``--reuse``: same flags and settings), and when."""
    earlier: dict[str, list[str]] = {}
    for r in rows:
        dates = records.get(r.key, {}).get("dates", {})
        parts = [p for p in ("quantize", "ppl", "speed") if dates.get(p, meta["date"]) != meta["date"]]
        for p in parts:
            earlier.setdefault(dates[p], []).append(f"{r.key} {p.replace('ppl', 'perplexity')}")
    if not earlier:
        return ""
    said = "; ".join(f"{date}: {', '.join(what)}" for date, what in sorted(earlier.items()))
    return f". Figures reused from earlier runs (`--reuse`, same flags and settings), by date: {said}"


def notes(rows: list[Row], records: dict) -> list[str]:
    """What the table alone does not say: slower than fp32, the keep-float row's smoothing, smoothing picked."""
    out = []
    for row in rows:
        sp = records.get(row.key, {}).get("speed", {})
        slow = [f"{k} {ratio(sp, k):.2f}x" for k in SPEEDS if k in sp and ratio(sp, k) < 1.0]
        if slow:
            out.append(f"- {row.label} is slower than fp32 here: {', '.join(slow)}.")
    w8 = [r for r in rows if r.key in ("w8a8-mse", "w8a8-sq0.5", "w8a8-sqauto", "w8a8-minmax")]
    done = [
        (records[r.key]["ppl"]["perplexity"], r)
        for r in w8
        if "perplexity" in (records.get(r.key, {}).get("ppl") or {})
    ]
    if done and any(r.key == "w8a8-keep4" for r in rows):
        p, r = min(done, key=lambda t: t[0])
        chosen = " ".join(KEEP_FLOAT_SMOOTHING)
        same = all(a in r.args for a in KEEP_FLOAT_SMOOTHING)
        out.append(
            f"- The keep-float row uses `{chosen}` (KEEP_FLOAT_SMOOTHING at the top of the script); the best W8A8 "
            f"row above it in this run is {r.label} ({p:.3f})" + ("." if same else ": **not the same**; edit it.")
        )
    for row in rows:
        g = records.get(row.key, {}).get("quantize", {}).get("graph")
        if row.tool == "ort" and g:
            text = (
                f"- {row.label}: {g['QuantizeLinear']} QuantizeLinear; {g['MatMul reading a quantized activation']} "
                f"of {g['MatMul']} MatMuls read a quantized activation, {g['MatMul of two quantized activations']} "
                "of them two (the attention MatMuls"
            )
            if g.get("lm_head MatMul of two quantized activations"):
                text += ", and the lm_head: its weight is the embedding behind a Transpose, quantized per tensor"
            text += ")"
            if g.get("outputs through Q/DQ"):
                text += f"; graph outputs quantized too: {', '.join(g['outputs through Q/DQ'][:3])}"
                more = len(g["outputs through Q/DQ"]) - 3
                text += f" and {more} more" if more > 0 else ""
            out.append(text + ".")
        act = (records.get(row.key, {}).get("quantize", {}).get("phases") or {}).get("activations")
        if row.tool == "qonnx" and g and not act and g["MatMulNBits"]:
            levels = ", ".join(map(str, g.get("MatMulNBits accuracy levels", []))) or "none"
            out.append(
                f"- {row.label}: {g['MatMulNBits']} MatMulNBits (accuracy_level {levels}), "
                f"{g['QuantizeLinear']} QuantizeLinear."
            )
        if act:
            text = f"- {row.label}: {act['tensors']} activation tensors, {act['inserted']} Q/DQ pairs inserted"
            if act["smoothed"]:
                alphas = act["alphas"]
                text += (
                    f"; {act['smoothed']} smoothed (alpha min {alphas[0]:g}, median {median(alphas):g}, "
                    f"max {alphas[-1]:g})"
                )
            if act["kept_float"]:
                text += f"; kept in float: {', '.join(act['kept_float'])}"
            out.append(text + ".")
    return ["Notes:", "", *out] if out else []


def plot(rows: list[Row], records: dict, folder: Path) -> Path | None:
    """Perplexity against size, prefill speed and decode speed (vs fp32), one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    done = [r for r in rows if "perplexity" in (records.get(r.key, {}).get("ppl") or {})]
    if not done:
        return None
    colors = {"fp32": "black", "qonnx": "tab:blue", "ort": "tab:orange"}
    markers = {"fp32": "*", "qonnx": "o", "ort": "s"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), sharey=True)
    xs = {
        "size on disk (MB)": lambda rec: rec["bytes"] / MB,
        "prefill b16x128 speed vs fp32": lambda rec: ratio(rec["speed"], "prefill") if "speed" in rec else 1.0,
        "decode b1 speed vs fp32": lambda rec: ratio(rec["speed"], "decode1") if "speed" in rec else 1.0,
    }
    panels = []
    for ax, (title, fx) in zip(axes, xs.items(), strict=True):
        points = sorted(
            ((fx(records[r.key]), records[r.key]["ppl"]["perplexity"], r) for r in done), key=lambda p: p[1]
        )
        points = [p for p in points if not math.isnan(p[0])]
        panels.append((ax, points))
        for x, y, r in points:
            ax.scatter(x, y, color=colors[r.tool], marker=markers[r.tool], s=70, zorder=3)
        ax.set_xlabel(title + ("" if "MB" in title else " (right is faster)"))
        ax.set_yscale("log")
        ax.margins(x=0.15, y=0.08)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3, which="both")
        if "perplexity" in (records.get("fp32", {}).get("ppl") or {}):
            ax.axhline(records["fp32"]["ppl"]["perplexity"], color="black", lw=0.6, ls=":")
        if "MB" not in title:
            ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    for ax, points in panels:  # labels once every panel's limits are final (the y axis is shared)
        ax.autoscale_view()
        to_axes = ax.transData + ax.transAxes.inverted()
        placed: list[tuple[float, float]] = []  # label positions (axes fraction), to keep labels apart
        for x, y, r in points:
            fx0, fy0 = to_axes.transform((x, y))
            ly = fy0
            while any(abs(px - fx0) < 0.15 and abs(py - ly) < 0.04 for px, py in placed):
                ly += 0.04
            placed.append((fx0, ly))
            ax.annotate(
                r.key,
                (x, y),
                xytext=(fx0 + 0.015, ly + 0.01),
                textcoords="axes fraction",
                fontsize=7,
                arrowprops=dict(arrowstyle="-", color="gray", lw=0.5) if ly - fy0 > 0.02 else None,
            )
    axes[0].set_ylabel(f"perplexity (pydoc, {args_windows(records)} x 512 tokens, log scale)")
    fig.suptitle("SmolLM2-135M-Instruct: weight+activation schemes (qonnx: circles, ORT quantize_static: squares)")
    fig.tight_layout()
    path = folder / "activations_ppl.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def args_windows(records: dict) -> str:
    return str(next((r["ppl"]["windows"] for r in records.values() if "windows" in (r.get("ppl") or {})), "?"))


def _code_state() -> str:
    """A digest of qonnx/, passes/ and runtime/ as committed and as changed since (the code under test)."""
    import hashlib

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(HERE.parent), *cmd], capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "qonnx", "passes", "runtime")
    trees = git("rev-parse", "HEAD:qonnx", "HEAD:passes", "HEAD:runtime")
    return hashlib.sha256((trees + diff).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qonnx-act"), help="quantized models, logs, records")
    ap.add_argument("--fp32", type=Path, default=None, help="an existing fp32 export to use (read only)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 windows, 1 round, results in the work dir")
    ap.add_argument(
        "--rows", default=None, help="comma-separated row keys (fp32 always runs): " + ",".join(r.key for r in ROWS)
    )
    ap.add_argument("--reuse", action="store_true", help="skip rows (and measurements) whose outputs exist")
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows of 512 tokens (default 24)")
    ap.add_argument("--rounds", type=int, default=None, help="speed pairs per measurement (default 3)")
    ap.add_argument("--steps", default=None, help="decode steps at batch 16 and 1 (default 8,16)")
    ap.add_argument("--no-speed", action="store_true", help="quantize and perplexity only")
    ap.add_argument("--speed-budget", type=float, default=None, help="seconds per row for disturbed pairs (90)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds before a qonnx or measuring child is killed")
    ap.add_argument("--ort-timeout", type=float, default=2400, help="seconds before quantize_static is killed")
    ap.add_argument("--results", type=Path, default=None, help="markdown file to update")
    ap.add_argument("--ort-child", nargs=3, metavar=("FP32", "OUT", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--speed-child", nargs=2, metavar=("FP32", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, full, quick in (("windows", 24, 4), ("rounds", 3, 1), ("steps", "8,16", "4,8"), ("speed_budget", 90, 20)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.steps = tuple(int(x) for x in str(args.steps).split(","))
    if args.ort_child:
        ort_child(*args.ort_child)
        return 0
    if args.speed_child:
        speed_child(*args.speed_child, args.rounds, args.steps, args.speed_budget)
        return 0

    keys = {r.key for r in ROWS}
    wanted = set(args.rows.split(",")) if args.rows else keys
    if wanted - keys:
        ap.error(f"unknown rows {', '.join(sorted(wanted - keys))}; rows are {', '.join(r.key for r in ROWS)}")
    rows = [r for r in ROWS if r.key == "fp32" or r.key in wanted]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "python benchmarks/bench_activations.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
    }
    print(f"machine: {meta['machine']}\nload average: {meta['load']}\nwork dir: {work}", flush=True)
    t0 = time.perf_counter()
    src = args.fp32.resolve() if args.fp32 else work / "fp32"
    meta["export_s"] = None if args.fp32 else export_reference(src)
    meta["fp32"] = str(src)
    if not (src / "model.onnx").exists():
        ap.error(f"{src}: no model.onnx there")
    code = _code_state()
    records = run_rows(rows, src, work, args, meta["date"])
    meta["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["code_changed"] = code != _code_state()
    meta["total_s"] = time.perf_counter() - t0
    (work / ("figures-quick.json" if args.quick else "figures.json")).write_text(
        json.dumps({"meta": meta, "records": records}, indent=1)
    )
    png = plot(rows, records, work if args.quick else HERE)
    section = render(rows, records, meta, args, png)
    print("\n" + section.replace(START, "").replace(END, "").strip() + "\n")
    out_md = args.results or (work / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    write_section(out_md, section, START, END)
    print(f"wrote {out_md}{f' and {png}' if png else ''} ({meta['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

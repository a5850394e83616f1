"""Where a quantize run's verification spends its time: each phase alone, in one process, one after another.

Phases, as ``qonnx quantize`` runs them (but without the overlap): the tokenizer (real text), the original's
session build and run, the in-memory snapshot of the quantized model, its session build and run, and the
comparison. Each is repeated (``--repeat``) and reported as the median wall and CPU time (user + system of the
whole process: ONNX Runtime's worker threads included); ``--profile`` adds ONNX Runtime's per-op profile of one
run of each model (1 thread). ``--cli-rounds N`` then times whole ``qonnx quantize MODEL -o TMP`` runs with
and without ``--no-verify``, interleaved N times (median wall, median user + system CPU and the largest peak
RSS of each child process): the overhead the issue's 20% is about.

    python benchmarks/bench_verify.py /tmp/demo-real/smollm2-fp32 [--tokens 64] [--profile] [--cli-rounds 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

import qonnx
from qonnx.runtime import verify
from qonnx.runtime.session import InMemoryModel


def timed(label: str, fn: Callable[[], Any], repeat: int) -> Any:
    """Run ``fn`` ``repeat`` times; print the median wall and CPU seconds; return the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(f"{label:44s} wall {statistics.median(walls):6.3f} s   cpu {statistics.median(cpus):6.3f} s", flush=True)
    return out


def profile(model: str | InMemoryModel, prepack: bool, feeds: dict[str, Any], names: list[str]) -> None:
    """Print the ops that took most of one single-threaded run."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/qonnx-bench-verify"
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    keep = model.add_to(so) if isinstance(model, InMemoryModel) else []
    session = ort.InferenceSession(model.proto if isinstance(model, InMemoryModel) else model, so)
    session.run(names, feeds)
    path = session.end_profiling()
    del keep
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    print("    " + ", ".join(f"{op} {us / 1e6:.3f} s" for op, us in by_op.most_common(4)))


def main() -> None:
    """Measure the phases on the model folder given."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a model folder with model.onnx and tokenizer.json")
    ap.add_argument("--tokens", type=int, default=verify.VERIFY_TOKENS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cli-rounds", type=int, default=0, help="also time whole CLI runs, on and off, N rounds")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    source = str(args.model / "model.onnx")
    ids = timed("tokenizer (load + encode)", lambda: verify.text_token_ids(args.model, args.tokens), args.repeat)

    def reference() -> tuple[dict[str, Any], list[str], list[Any]]:
        session = verify.verification_session(source, "cpu", prepack=False)
        feeds, names = verify.make_inputs(session, token_ids=ids), verify._float_outputs(session)
        return feeds, names, session.run(names, feeds)

    feeds, names, ref = timed(f"original: build + run, {args.tokens} tokens", reference, args.repeat)
    model = qonnx.quantize(args.model, verify=False).model
    snapshot = timed("quantized: in-memory snapshot", lambda: InMemoryModel.of(model), args.repeat)
    session = timed(
        "quantized: build (prepacked)", lambda: verify.verification_session(snapshot, "cpu", prepack=True), args.repeat
    )
    out = timed(f"quantized: run, {args.tokens} tokens", lambda: session.run(names, feeds), args.repeat)

    def compare() -> list[verify.OutputMetrics]:
        return [verify.compare_outputs(n, r, o) for n, r, o in zip(names, ref, out, strict=True)]

    metrics = timed("comparison", compare, args.repeat)
    print(f"logits: {metrics[0].to_dict()}; worst SQNR {min(m.sqnr_db for m in metrics):.2f} dB")
    if args.profile:
        print("original, one run (1 thread):")
        profile(source, False, feeds, names)
        print("quantized, one run (1 thread):")
        profile(snapshot, True, feeds, names)
    if args.cli_rounds:
        cli_rounds(args.model, args.cli_rounds)


def cli_child(model: Path, out: Path, verify_on: bool) -> tuple[float, float, int]:
    """Wall seconds, user + system CPU seconds and peak RSS (bytes) of one ``qonnx quantize`` run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qonnx.cli", "quantize", str(model), "-o", str(out), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd + ([] if verify_on else ["--no-verify"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"qonnx quantize failed: {err.strip()[-300:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def cli_rounds(model: Path, rounds: int) -> None:
    """Interleaved whole-CLI runs with and without verification; print the medians and the overhead."""
    runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="qonnx-bench-verify-") as tmp:
        for _ in range(rounds):
            for on in (False, True):
                runs[on].append(cli_child(model, Path(tmp) / "out", on))
    med = {on: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for on, v in runs.items()}
    peak = {on: max(r[2] for r in v) for on, v in runs.items()}
    print(f"whole CLI, {rounds} interleaved rounds, load average after {os.getloadavg()[0]:.2f}:")
    for on in (False, True):
        walls = " ".join(f"{r[0]:.2f}" for r in sorted(runs[on]))
        print(
            f"  {'verified   ' if on else '--no-verify'} wall {med[on][0]:.2f} s (all: {walls}), "
            f"CPU {med[on][1]:.2f} s, peak RSS {peak[on] / 1e9:.2f} GB"
        )
    overhead, cpu = 100 * (med[True][0] / med[False][0] - 1), med[True][1] - med[False][1]
    print(f"  overhead: {overhead:+.0f}% wall, {cpu:+.2f} CPU-s")


if __name__ == "__main__":
    main()

"""On the GPU machine's 16-core CPU: W8A8 against fp32 at batch 16 and 1 (issue 4's speed target).

Target: W8A8 >= 1.8x fp32 at batch >= 16 on the CPU provider. On the reference model (SmolLM2-135M-Instruct, the
fp32 export folder given by ``--model``) three quantized models are made, each in its own process (wall time,
CPU time and peak RSS from ``wait4``), calibration on the CPU provider:

- ``w8a8``: ``qonnx quantize SRC -o DST --scheme w8a8 --target cpu --device cpu`` (the default W8A8: SmoothQuant
  0.5, mse ranges, keep-float auto; the tied lm_head stays fp32), writing a calibration cache;
- ``w8a8-lmhead``: the same config through the API with the tied lm_head quantized as dynamic int8
  (``qonnx.quantize(SRC, W8A8(target="cpu", calibration=Calibration(device="cpu")), output=DST,
  targets={"re:lm_head": Dynamic()})``; perplexity 14.833 measured earlier), reading the cache (the same
  activation statistics, so the two differ only in the lm_head; without a usable cache it calibrates itself);
- ``ort``: ONNX Runtime's ``quantize_static`` (bench_activations.py's recipe: QDQ, MatMul only, per channel,
  U8 activations, S8 weights, MinMax, the same calibration windows), killed after ``--ort-timeout`` seconds.

Then one fresh process holds an fp32 session and one per quantized model (``intra_op_num_threads`` = every core
unless ``--threads``) and measures, with bench_activations.py's probe (feeds of qonnx's Generator): prefill latency
of [16, 128] and [1, 128] pydoc tokens (empty past), and greedy decode tokens/s at batch 16 and 1 from each model's
own 128-token KV cache. Each round measures every model once per kind, the order rotated by round; ratios are
taken within a round (model vs fp32 measured moments apart), and the tables give medians over rounds. Rounds stop
when the time budget runs out (``--deadline``, whole script). Results: ``--out`` JSON and ``--section-out``
markdown, written after every phase.

Usage (device; about 4-5 minutes on 16 cores: W8A8 ~80 s, the lm_head row ~15 s with the cache, quantize_static
~40 s, speed ~1.5 min; never past ``--deadline`` = 510 s, plus a minute or so if a child must be killed)::

    python benchmarks/device_cpu_batch.py --model /tmp/smol-fp32 --work /tmp/dcb \
        --out $OUT/cpu_batch.json --section-out $OUT/cpu_batch.md

Smoke test on a small machine: ``--calib-samples 2 --calib-seq-len 128 --rounds 1 --steps 2,4``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_activations as ba  # noqa: E402
from _common import Undisturbed, machine, median, prewarm, run_child  # noqa: E402
from bench_reference import model_bytes  # noqa: E402

TARGET = 1.8  # issue 4: W8A8 >= 1.8x fp32 at batch >= 16 on the CPU
SPEED_RESERVE = 110  # seconds of the deadline kept for the speed measurement (sessions, warm-up, a few rounds)
MODELS = ("w8a8", "w8a8-lmhead", "ort")
W8A8_FLAGS = ("--scheme", "w8a8", "--target", "cpu", "--device", "cpu", "--no-verify", "--no-progress", "--json")
LABELS = {
    "fp32": "fp32 (reference)",
    "w8a8": "W8A8 (`--scheme w8a8 --target cpu`), lm_head fp32",
    "w8a8-lmhead": "W8A8, lm_head dynamic int8 (`targets={'re:lm_head': Dynamic()}`)",
    "ort": "ORT quantize_static (QDQ, MinMax, per channel)",
}
#: kind -> (title, unit, True when larger is better)
KINDS = {
    "prefill16": (f"prefill {ba.BATCH}x{ba.PROMPT}", "ms", False),
    "prefill1": (f"prefill 1x{ba.PROMPT}", "ms", False),
    "decode16": (f"decode b{ba.BATCH}", "tok/s", True),
    "decode1": ("decode b1", "tok/s", True),
}


# ---------------------------------------------------------------------------------------------- children


def api_child(src: str, dst: str, cache: str, samples: int, seq_len: int) -> None:
    """W8A8 for the CPU with the tied lm_head as dynamic int8; prints the summary as JSON."""
    import qonnx

    cal = qonnx.Calibration(device="cpu", samples=samples, seq_len=seq_len, cache=cache or None)
    summary = qonnx.quantize(
        src,
        qonnx.W8A8(target="cpu", calibration=cal),
        output=dst,
        targets={"re:lm_head": qonnx.Dynamic()},
        verify=False,
    )
    print(json.dumps(summary.to_dict()))


def ort_child(src: str, dst: str, samples: int, seq_len: int) -> None:
    """bench_activations' quantize_static recipe (MinMax) on ``samples`` x ``seq_len`` calibration windows."""
    ba.CALIB_SAMPLES, ba.CALIB_LEN = samples, seq_len  # read by ba.ort_child when it builds the windows
    ba.ort_child(src, dst, "MinMax")


class Probe(ba.Probe):
    """bench_activations' probe with a session of ``threads`` intra-op threads and a batch-1 prefill."""

    def __init__(self, folder: str, tokenizer: Any, ids: Any, threads: int) -> None:
        super().__init__(folder, tokenizer, ids)
        if threads:  # the Generator's session has ONNX Runtime's default thread count: replace it
            from qonnx.runtime.session import make_session

            self.gen.session = None
            self.gen.session = make_session(folder, "cpu", threads=threads)

    def prefill_ms(self, batch: int) -> float:
        """Latency of one prefill of ``batch`` x PROMPT tokens (batch 16 also refreshes the decode cache)."""
        if batch == len(self.ids):
            return 1e3 * self.ids.size / self.prefill()  # prefill() gives tokens/s
        seconds, _ = self._run(self.ids[:batch], self.gen._empty_past(batch), 0)
        return 1e3 * seconds


def speed_child(fp32: str, models: list[str], threads: int, rounds: int, steps: tuple[int, int], budget: float) -> None:
    """Every model (``name=folder``) against fp32 in rounds; prints one JSON line."""
    import numpy as np

    from qonnx.models.hf import load_tokenizer
    from qonnx.runtime.data import corpus_tokens

    t0 = time.monotonic()
    deadline = t0 + budget
    ids = np.asarray(corpus_tokens(fp32)[: ba.BATCH * ba.PROMPT], dtype=np.int64).reshape(ba.BATCH, ba.PROMPT)
    tokenizer = load_tokenizer(fp32)
    folders = {"fp32": fp32, **dict(m.split("=", 1) for m in models)}
    probes: dict[str, Probe] = {}
    for name, folder in folders.items():
        t = time.monotonic()
        probes[name] = Probe(folder, tokenizer, ids, threads)
        print(f"  session {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    measure = {
        "prefill16": lambda p: p.prefill_ms(ba.BATCH),
        "prefill1": lambda p: p.prefill_ms(1),
        "decode16": lambda p: p.decode(ba.BATCH, steps[0]),
        "decode1": lambda p: p.decode(1, steps[1]),
    }
    for name, p in probes.items():  # warm-up; also each model's own 128-token KV cache for decoding
        t = time.monotonic()
        p.prefill()
        p.prefill_ms(1)
        p.decode(ba.BATCH, 1)
        p.decode(1, 1)
        print(f"  warm-up {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    names = list(probes)
    res: dict[str, Any] = {k: {n: [] for n in names} for k in KINDS}
    res["others"] = []
    # a measurement during which other processes used the cores is repeated, in the first 40% of the budget only
    guard = Undisturbed(limit=ba.DISTURBED, deadline=time.monotonic() + 0.4 * (deadline - time.monotonic()))
    took: list[float] = []
    for r in range(rounds):
        left = deadline - time.monotonic()
        if r and left < 1.2 * max(took):
            print(f"  stopping after {r} round(s): {left:.0f} s of the budget left", file=sys.stderr, flush=True)
            break
        t = time.monotonic()
        order = names[r % len(names) :] + names[: r % len(names)]
        worst = 0.0
        for kind in KINDS:
            for n in order:
                value, others = guard(lambda n=n, kind=kind: measure[kind](probes[n]))
                res[kind][n].append(value)
                worst = max(worst, others)
        res["others"].append(worst)
        took.append(time.monotonic() - t)
        print(f"  round {r + 1}: {took[-1]:.1f} s", file=sys.stderr, flush=True)
    res["rounds"] = len(took)
    res["retries"] = guard.retries
    res["threads"] = threads or "ONNX Runtime default"
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- parent


def quantize(key: str, cmd: list[str], dst: Path, logs: Path, timeout: float, src: Path) -> dict[str, Any]:
    """Run one quantizing child into ``dst``; its Run as a dict, with the model's size and node counts."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    prewarm(list(src.glob("model.onnx*")))
    run = run_child(key, cmd, dst / "model.onnx", logs, timeout)
    rec: dict[str, Any] = {
        "cmd": " ".join(cmd),
        "status": run.status,
        "wall_s": round(run.wall_s, 1),
        "cpu_s": round(run.cpu_s, 1),
        "peak_rss_gb": round(run.maxrss / 1e9, 2),
    }
    if run.status != "ok":
        return rec
    if key == "ort":  # tokenizer and config beside it, for the probe
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy2(f, dst / f.name)
    rec["bytes"] = model_bytes(dst)
    rec["graph"] = ba.graph_counts(dst / "model.onnx")
    if key != "ort":
        text = (logs / "model.out").read_text()  # the CLI's --json is indented; the API child prints one line
        try:
            summary = json.loads(text[text.index("{") :])
        except ValueError:
            rec["summary"] = f"unreadable: {text[-200:]!r}"
            return rec
        rec["seconds"] = summary.get("seconds")
        rec["phases"] = summary.get("phases")
        rec["activations"] = ba._activation_info(summary.get("activations"))
        rec["calibration_cache"] = (summary.get("activations") or {}).get("cache")
        rec["lm_head"] = [
            f"{r['node']}: {r['reason']}" for r in summary.get("layers", []) if "lm_head" in str(r.get("weight"))
        ]
    return rec


def quantize_all(args: argparse.Namespace, src: Path, work: Path, deadline: float) -> dict[str, Any]:
    """The three quantized models (each skipped with ``--reuse`` when its folder has a model); each child's timeout
    leaves SPEED_RESERVE seconds before ``deadline`` (time.monotonic()) for the speed measurement."""
    me = [sys.executable, str(Path(__file__).resolve())]
    exe = shutil.which("qonnx")
    cli = [exe] if exe else [sys.executable, "-m", "qonnx.cli"]
    cache = work / "calib-cache.npz"
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
    cmds = {
        "w8a8": [
            *cli,
            "quantize",
            str(src),
            "-o",
            str(work / "w8a8"),
            *W8A8_FLAGS,
            *calib,
            "--calib-cache",
            str(cache),
        ],
        "w8a8-lmhead": [*me, "--api-child", str(src), str(work / "w8a8-lmhead"), str(cache), *calib[1::2]],
        "ort": [*me, "--ort-child", str(src), str(work / "ort" / "model.onnx"), *calib[1::2]],
    }
    if args.skip_ort:
        cmds.pop("ort")
    if not args.reuse:
        cache.unlink(missing_ok=True)
    out: dict[str, Any] = {}
    for key, cmd in cmds.items():
        dst, logs = work / key, work / "logs" / key
        logs.mkdir(parents=True, exist_ok=True)
        if args.reuse and (dst / "model.onnx").exists():
            out[key] = {"status": "ok", "reused": str(dst), "bytes": model_bytes(dst)}
            print(f"{key:12s} reused {dst}", flush=True)
            continue
        timeout = min(
            args.ort_timeout if key == "ort" else args.quantize_timeout, deadline - time.monotonic() - SPEED_RESERVE
        )
        if timeout < 20:
            out[key] = {"status": "skipped: the time budget is used up"}
            print(f"{key:12s} skipped: the time budget is used up", flush=True)
            continue
        print(f"{key:12s} quantizing (timeout {timeout:.0f} s) ...", flush=True)
        rec = quantize(key, cmd, dst, logs, timeout, src)
        if key == "w8a8-lmhead" and rec["status"] != "ok" and "cache" in rec["status"]:
            print(f"{key:12s} {rec['status']}; again without the cache", flush=True)
            cmd = [*cmd[:5], "", *cmd[6:]]  # --api-child SRC DST CACHE ...: an empty cache path, no cache
            rec = quantize(key, cmd, dst, logs, timeout, src)
            rec["note"] = "calibrated itself (the cache was refused)"
        out[key] = rec
        size = f"{rec['bytes'] / 1e6:.1f} MB" if "bytes" in rec else ""
        print(f"{key:12s} {rec['wall_s']:6.1f} s wall {rec['peak_rss_gb']:5.2f} GB {size}  {rec['status']}", flush=True)
    return out


def speed(args: argparse.Namespace, src: Path, work: Path, done: list[str], budget: float) -> dict[str, Any]:
    """The speed child on fp32 and the models made; its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--speed-child", str(src)]
    cmd += [f"{k}={work / k}" for k in done]
    cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds), "--steps", args.steps]
    cmd += ["--speed-budget", f"{budget:.0f}"]
    who = ", ".join(["fp32", *done])
    print(f"speed: {who}, {args.threads or 'default'} threads, budget {budget:.0f} s", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        stdout, _ = proc.communicate(timeout=budget + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"error": f"speed child killed after {budget + 120:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"speed child failed (rc {proc.returncode}); its stderr is above"}
    return json.loads(stdout.strip().splitlines()[-1])


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per model and kind, and speed-ups against fp32 (medians of the per-round ratios)."""
    out: dict[str, Any] = {}
    for kind, (_, _, higher) in KINDS.items():
        values = raw.get(kind, {})
        base = values.get("fp32", [])
        for name, vals in values.items():
            row = out.setdefault(name, {})
            row[kind] = median(vals)
            if name != "fp32" and vals and base:
                pairs = zip(vals, base, strict=False)
                row[f"{kind}_x"] = median([(m / f) if higher else (f / m) for m, f in pairs])
    return out


def render(res: dict[str, Any]) -> str:
    """The markdown section."""
    meta, speeds = res["meta"], res.get("summary", {})
    raw = res.get("speed", {})
    lines = [
        "## W8A8 on the 16-core CPU of the GPU machine, batch 16 and 1 (issue 4's speed target)",
        "",
        f"Measured {meta['date']} by `{meta['command']}` in {meta.get('total_s', 0):.0f} s: {meta['machine']}.",
        "",
        f"- Model: `{meta['model']}` (SmolLM2-135M-Instruct fp32 export). Calibration: {meta['calib']} on the CPU "
        "provider; the lm_head row reads the W8A8 row's calibration cache (same activation statistics).",
        f"- Speed: one process, a session per model with {raw.get('threads', '?')} intra-op threads; prefill "
        f"latency of [{ba.BATCH}, {ba.PROMPT}] and [1, {ba.PROMPT}] pydoc tokens (empty past); decode: greedy steps "
        f"from each model's own {ba.PROMPT}-token cache ({meta['steps']} steps at batch {ba.BATCH} / 1). "
        f"{raw.get('rounds', 0)} round(s), every model once per kind in a rotated order; columns: medians over "
        "rounds, speed-up = median of the per-round ratios against fp32 (higher is faster).",
        "",
        "| model | quantize wall (s) | size (MB) | "
        + " | ".join(f"{t} ({u}) | x fp32" for t, u, _ in KINDS.values())
        + " | status |",
        "|---|---:|---:|" + "---:|---:|" * len(KINDS) + "---|",
    ]
    for name in ("fp32", *MODELS):
        q = res.get("quantize", {}).get(name, {})
        if name != "fp32" and not q:
            continue
        row = speeds.get(name, {})
        cells = [LABELS[name], f"{q['wall_s']:.1f}" if "wall_s" in q else ""]
        cells.append(f"{q['bytes'] / 1e6:.1f}" if "bytes" in q else f"{res['meta'].get('fp32_bytes', 0) / 1e6:.1f}")
        for kind, (_, unit, _) in KINDS.items():
            v = row.get(kind)
            cells.append("" if v is None else (f"{v:.1f}" if unit == "ms" else f"{v:.0f}"))
            x = row.get(f"{kind}_x")
            cells.append("" if x is None else f"{x:.2f}x")
        status = q.get("status", "ok") + (f"; {q['note']}" if "note" in q else "")
        status += "; reused from an earlier run (`--reuse`)" if "reused" in q else ""
        lines.append("| " + " | ".join(cells) + f" | {status} |")
    lines.append("")
    for name in ("w8a8", "w8a8-lmhead"):
        row = speeds.get(name, {})
        got = {k: row[f"{k}_x"] for k in ("prefill16", "decode16") if f"{k}_x" in row}
        if got:
            met = all(v >= TARGET for v in got.values())
            said = ", ".join(f"{KINDS[k][0]} {v:.2f}x" for k, v in got.items())
            verdict = "**met**." if met else "**not met**."
            lines.append(f"- Target (>= {TARGET}x fp32 at batch {ba.BATCH}), {LABELS[name]}: {said}: {verdict}")
    for name in ("w8a8", "w8a8-lmhead"):
        q = res.get("quantize", {}).get(name, {})
        act = q.get("activations")
        if act:
            lines.append(
                f"- {LABELS[name]}: {act['inserted']} activation Q/DQ pairs, {act['smoothed']} smoothed, kept float: "
                + (", ".join(act["kept_float"]) or "none")
                + (f"; lm_head: {'; '.join(q['lm_head'])}" if q.get("lm_head") else "")
                + "."
            )
    if raw.get("others"):
        lines.append(
            f"- Cores used by other processes during a round (from /proc/stat): median {median(raw['others']):.2f}, "
            f"max {max(raw['others']):.2f}; {raw.get('retries', 0)} disturbed measurements repeated."
        )
    if "error" in raw:
        lines.append(f"- Speed: {raw['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="the fp32 export folder (model.onnx + tokenizer)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dcb"))
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--section-out", type=Path, help="markdown section")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 0, help="intra-op threads (0: ORT's default)")
    p.add_argument("--rounds", type=int, default=9, help="at most this many rounds (the deadline may stop sooner)")
    p.add_argument("--steps", default="32,64", help="decode steps at batch 16 and 1")
    p.add_argument("--deadline", type=float, default=510, help="seconds for the whole script")
    p.add_argument("--quantize-timeout", type=float, default=300)
    p.add_argument("--ort-timeout", type=float, default=180, help="quantize_static is dropped past this")
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep quantized models already in --work")
    p.add_argument("--api-child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--ort-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--speed-child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--speed-budget", type=float, default=120, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.api_child:
        src, dst, cache, samples, seq_len = args.api_child
        api_child(src, dst, cache, int(samples), int(seq_len))
        return 0
    if args.ort_child:
        src, dst, samples, seq_len = args.ort_child
        ort_child(src, dst, int(samples), int(seq_len))
        return 0
    steps = tuple(int(x) for x in args.steps.split(","))
    if args.speed_child:
        fp32, *models = args.speed_child
        speed_child(fp32, models, args.threads, args.rounds, (steps[0], steps[1]), args.speed_budget)
        return 0
    if not (args.model and args.out):
        p.error("--model and --out are required")
    t0 = time.monotonic()
    src = args.model.resolve()
    if not (src / "model.onnx").exists():
        p.error(f"{src}: no model.onnx there")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "command": "python benchmarks/device_cpu_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": str(src),
            "fp32_bytes": model_bytes(src),
            "calib": f"{args.calib_samples} x {args.calib_seq_len} tokens",
            "steps": args.steps,
            "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
    }

    def save() -> None:
        res["meta"]["total_s"] = round(time.monotonic() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        if args.section_out:
            args.section_out.parent.mkdir(parents=True, exist_ok=True)
            args.section_out.write_text(render(res))

    print(f"machine: {res['meta']['machine']}\nwork dir: {work}", flush=True)
    res["quantize"] = quantize_all(args, src, work, t0 + args.deadline)
    save()
    done = [k for k in MODELS if res["quantize"].get(k, {}).get("status") == "ok"]
    budget = max(30.0, args.deadline - (time.monotonic() - t0) - 20)
    res["speed"] = speed(args, src, work, done, budget)
    res["summary"] = summarize(res["speed"])
    save()
    print("\n" + render(res), flush=True)
    print(f"wrote {args.out}" + (f" and {args.section_out}" if args.section_out else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

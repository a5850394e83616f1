"""Quantize one exported model with every scheme and record the sha256 of each output's model files.

Meant to prove that a refactoring leaves every scheme's output byte-identical: run it once on the old code
(--json before.json), once on the new code with --compare before.json.

    python benchmarks/scheme_hashes.py --qonnx /path/to/venv/bin/qonnx --model smol-fp32/ \
        --out work/ --json after.json --compare benchmarks/scheme_hashes_e8366f5.json

Each scheme is one plain `qonnx quantize MODEL -o OUT/NAME/ [flags]` run, with the environment of the caller
minus OMP_NUM_THREADS (as a user runs it). Recorded per scheme: the command, wall seconds, exit code, and the
sha256 of every file in OUT/NAME/ whose name ends in .onnx or .data (a fresh OUT/NAME/ gets MODEL.onnx.data;
MODEL.onnx.1.data etc. only replace a previous output). w4a16-rtn is always run twice and
w4a16-gptq twice (--repeat-gptq, on by default), with the same command line into the same folder, to show
whether outputs are deterministic. Where `onnx` is importable, each output .onnx also gets its
metadata_props and a sha256 of the model with metadata_props cleared, so that a difference can be told
apart as metadata (verification figures, config) or graph/weights.

GPTQ (and other torch/ONNX Runtime reductions) may round differently on another core count: compare runs
made on the same machine (cpu_count is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: name -> extra flags of `qonnx quantize MODEL -o OUT/NAME/`
SCHEMES: dict[str, list[str]] = {
    "w4a16-rtn": [],
    "w4a16-gptq": ["--algo", "gptq"],
    "w4a16-awq": ["--algo", "awq"],
    "w4a16-awq+gptq": ["--algo", "awq+gptq"],
    "w4a16-hqq": ["--algo", "hqq"],
    "w8a16": ["--scheme", "w8a16"],
    "w8a8": ["--scheme", "w8a8"],
    "w4a8": ["--scheme", "w4a8", "--algo", "gptq"],
    "fp8": ["--scheme", "fp8"],
    "dynamic": ["--scheme", "dynamic"],
    "w4a16-qdq": ["--format", "qdq"],
}

MODEL_SUFFIXES = (".onnx", ".data")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(MODEL_SUFFIXES))


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in model_files(folder)}


def onnx_details(folder: Path) -> dict[str, dict] | None:
    """Per .onnx file: metadata_props and the sha256 of the model with metadata_props cleared (None: no onnx)."""
    try:
        import onnx
    except ImportError:
        return None
    out: dict[str, dict] = {}
    for p in model_files(folder):
        if not p.name.endswith(".onnx"):
            continue
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as e:  # a broken output is reported, not fatal
            out[p.relative_to(folder).as_posix()] = {"error": f"{type(e).__name__}: {e}"}
            continue
        props = {m.key: m.value for m in proto.metadata_props}
        del proto.metadata_props[:]
        out[p.relative_to(folder).as_posix()] = {
            "metadata_props": props,
            "sha256_without_metadata": hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest(),
        }
    return out


def paths_inside(folder: Path, needles: list[str]) -> list[str]:
    """Which of the given path strings occur in the output's .onnx files (a path there breaks byte identity)."""
    found = set()
    encoded = [(n, n.encode()) for n in needles if n]
    for p in model_files(folder):
        if p.name.endswith(".onnx"):
            data = p.read_bytes()
            found.update(n for n, b in encoded if b in data)
    return sorted(found)


def run_once(cli: str, model: Path, out: Path, name: str, flags: list[str], env: dict[str, str], tag: str) -> dict:
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    cmd = [cli, "quantize", str(model), "-o", f"{target}/", *flags]
    log = out / f"{name}{tag}.log"
    load = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    result: dict = {
        "command": cmd,
        "seconds": round(seconds, 2),
        "exit_code": proc.returncode,
        "loadavg_at_start": [round(x, 2) for x in load],
        "log": str(log),
        "sha256": hashes(target),
    }
    details = onnx_details(target)
    if details is not None:
        result["onnx"] = details
    result["paths_in_onnx"] = paths_inside(target, [str(out.resolve()), str(model.resolve()), str(out), str(model)])
    if proc.returncode != 0:
        result["log_tail"] = log.read_text(errors="replace")[-2000:]
    return result


def diff_runs(a: dict, b: dict) -> dict:
    """How two runs of one command differ: files, and metadata keys where onnx details exist."""
    diff: dict = {"same": a["sha256"] == b["sha256"] and a["exit_code"] == b["exit_code"]}
    if diff["same"]:
        return diff
    diff["files_differing"] = sorted(
        k for k in set(a["sha256"]) | set(b["sha256"]) if a["sha256"].get(k) != b["sha256"].get(k)
    )
    if "onnx" in a and "onnx" in b:
        for k in set(a["onnx"]) & set(b["onnx"]):
            da, db = a["onnx"][k], b["onnx"][k]
            if "metadata_props" not in da or "metadata_props" not in db:
                continue
            ma, mb = da["metadata_props"], db["metadata_props"]
            diff.setdefault("metadata_keys_differing", {})[k] = sorted(
                x for x in set(ma) | set(mb) if ma.get(x) != mb.get(x)
            )
            diff.setdefault("same_without_metadata", {})[k] = (
                da["sha256_without_metadata"] == db["sha256_without_metadata"]
            )
    return diff


def compare(results: dict, previous_path: Path) -> bool:
    """Print same/DIFFERENT per scheme against a previous JSON; True when all are the same."""
    previous = json.loads(previous_path.read_text())
    prev_schemes = previous.get("schemes", {})
    ok = True
    print(f"\ncompare with {previous_path} (cpu_count then {previous.get('cpu_count')}, now {results['cpu_count']})")
    for name, now in results["schemes"].items():
        before = prev_schemes.get(name)
        if before is None:
            print(f"  {name:16s} DIFFERENT (not in {previous_path.name})")
            ok = False
            continue
        d = diff_runs(before, now)
        if d["same"]:
            note = "" if before["sha256"] else " (no model files on either side)"
            print(f"  {name:16s} same{note}")
            continue
        ok = False
        why = []
        if before["exit_code"] != now["exit_code"]:
            why.append(f"exit code {before['exit_code']} -> {now['exit_code']}")
        if d.get("files_differing"):
            why.append("files " + ", ".join(d["files_differing"]))
        for k, keys in d.get("metadata_keys_differing", {}).items():
            rest = "same" if d["same_without_metadata"][k] else "DIFFERENT"
            why.append(f"{k}: metadata keys {keys or 'none'} differ, graph+weights {rest}")
        if before.get("repeat_agrees") is False:
            why.append("(the baseline's own two runs differed)")
        print(f"  {name:16s} DIFFERENT: " + "; ".join(why))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qonnx", default="qonnx", help="the qonnx CLI to run (default: 'qonnx' on PATH)")
    ap.add_argument("--model", required=True, type=Path, help="an exported model folder (qonnx export)")
    ap.add_argument("--out", required=True, type=Path, help="work folder: OUT/NAME/ per scheme, OUT/NAME.log")
    ap.add_argument("--json", required=True, type=Path, help="where to write the results")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(SCHEMES))
    ap.add_argument("--compare", type=Path, help="a previous --json: print same/DIFFERENT, exit 1 if any differs")
    ap.add_argument(
        "--repeat-gptq",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run w4a16-gptq twice and record whether the runs agree (default: on)",
    )
    args = ap.parse_args()

    names = list(SCHEMES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCHEMES]
        if unknown:
            ap.error(f"unknown scheme(s) {unknown}; known: {', '.join(SCHEMES)}")
    if not args.model.is_dir():
        ap.error(f"--model {args.model} is not a folder")
    cli = shutil.which(args.qonnx) or args.qonnx
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)

    results: dict = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "qonnx": cli,
        "qonnx_resolved": os.path.realpath(cli),
        "model": str(args.model.resolve()),
        "model_sha256": hashes(args.model),
        "out": str(args.out.resolve()),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "omp_num_threads_in_caller": os.environ.get("OMP_NUM_THREADS"),
        "schemes": {},
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")

    for name in names:
        flags = SCHEMES[name]
        repeat = name == "w4a16-rtn" or (name == "w4a16-gptq" and args.repeat_gptq)
        print(f"{name}: qonnx quantize MODEL -o OUT/{name}/ {' '.join(flags)}", flush=True)
        first = run_once(cli, args.model, args.out, name, flags, env, "")
        print(
            f"  {first['seconds']:.1f} s, exit {first['exit_code']}, {len(first['sha256'])} model file(s)", flush=True
        )
        entry = dict(first)
        if repeat:
            kept = args.out / f"{name}.run1"
            if kept.exists():
                shutil.rmtree(kept)
            if (args.out / name).exists():
                (args.out / name).rename(kept)  # the second run writes to the same path as the first
            second = run_once(cli, args.model, args.out, name, flags, env, ".run2")
            d = diff_runs(first, second)
            entry["repeat"] = {k: second[k] for k in ("seconds", "exit_code", "loadavg_at_start", "sha256", "log")}
            if "onnx" in second:
                entry["repeat"]["onnx"] = second["onnx"]
            entry["repeat_agrees"] = d["same"]
            if not d["same"]:
                entry["repeat_diff"] = d
            print(
                f"  repeat: {second['seconds']:.1f} s, exit {second['exit_code']}, "
                f"{'agrees' if d['same'] else 'DIFFERS: ' + json.dumps(d)}",
                flush=True,
            )
        results["schemes"][name] = entry
        save()

    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print(f"\nwrote {args.json}")
    for name, e in results["schemes"].items():
        rep = "" if "repeat_agrees" not in e else f"  repeat {'agrees' if e['repeat_agrees'] else 'DIFFERS'}"
        print(f"  {name:16s} {e['seconds']:8.1f} s  exit {e['exit_code']}{rep}")

    if args.compare is not None:
        return 0 if compare(results, args.compare) else 1
    return 0


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


if __name__ == "__main__":
    sys.exit(main())

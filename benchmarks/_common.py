"""Helpers shared by the benchmark scripts: measured child processes, machine description, RESULTS.md sections.

Every tool runs in its own fresh process and is waited for with ``wait4``, so that its wall time, CPU time
and peak RSS (``ru_maxrss``) are its own. Latency measurements on cores shared with other work are repeated
while other processes disturb them (:class:`Undisturbed`). Each script owns one marked section of
``benchmarks/RESULTS.md`` and replaces only that section.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One measured child process."""

    tool: str
    cmd: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system
    maxrss: int = 0  # bytes
    rc: int = 0
    status: str = "ok"
    out_bytes: int = 0
    phases: dict = field(default_factory=dict)


def run_child(tool: str, cmd: list[str], out: Path, log_dir: Path, timeout: float) -> Run:
    """Run ``cmd`` alone and wait for it with wait4: its own wall time and peak RSS.

    ``out`` (and ``out.data``) are removed first and sized after; logs go to ``log_dir/<out.stem>.out|.err``.
    A tool named "ort" prints its phase times as JSON on its last stdout line; a "qonnx..." tool's stdout is
    kept as its summary.
    """
    for p in (out, out.with_name(out.name + ".data")):
        p.unlink(missing_ok=True)
    run = Run(tool, cmd)
    stem = out.stem
    with open(log_dir / f"{stem}.out", "w") as so, open(log_dir / f"{stem}.err", "w") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        run.wall_s = time.perf_counter() - t0
        timer.cancel()
    proc.returncode = run.rc = os.waitstatus_to_exitcode(status)
    run.maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    run.cpu_s = usage.ru_utime + usage.ru_stime
    if timed_out.is_set():
        run.status = f"timed out after {timeout:.0f} s"
    elif run.rc == -9:
        run.status = "killed by SIGKILL (out of memory?)"
    elif run.rc != 0:
        err = (log_dir / f"{stem}.err").read_text().strip().splitlines()
        run.status = f"failed (rc {run.rc}): {err[-1][:200] if err else ''}"
    if run.status == "ok":
        run.out_bytes = sum(p.stat().st_size for p in (out, out.with_name(out.name + ".data")) if p.exists())
        lines = (log_dir / f"{stem}.out").read_text().strip().splitlines()
        if tool == "ort" and lines:
            run.phases = json.loads(lines[-1])
        elif tool.startswith("qonnx"):
            run.phases = {"summary": " / ".join(lines)}
    return run


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (stolen time included) and by this process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class Undisturbed:
    """Runs a measurement again while other processes used more than ``limit`` cores during it.

    The cores are shared with other work; a measurement during which other processes ran is slowed (up to
    2.6x here) and is retried after a quiet moment, until ``deadline`` (time.monotonic()); after that, the
    least disturbed attempt is kept. Every kept value comes with the cores others used during it.
    """

    def __init__(self, limit: float, deadline: float) -> None:
        self.limit, self.deadline, self.retries = limit, deadline, 0

    def _others(self, seconds: float, machine: float, own: float) -> float:
        return max(0.0, machine - own) / seconds

    def wait_quiet(self, most: float = 20.0) -> None:
        """Wait (at most ``most`` seconds) for half a second in which other processes used under ``limit`` cores."""
        end = min(time.monotonic() + most, self.deadline)
        while time.monotonic() < end:
            (m0, p0), t0 = _cpu_seconds(), time.perf_counter()
            time.sleep(0.5)
            (m1, p1), t1 = _cpu_seconds(), time.perf_counter()
            if self._others(t1 - t0, m1 - m0, p1 - p0) < self.limit:
                return

    def __call__(self, measure) -> tuple:
        best = None
        while True:
            (m0, p0), t0 = _cpu_seconds(), time.perf_counter()
            value = measure()
            (m1, p1), t1 = _cpu_seconds(), time.perf_counter()
            others = self._others(t1 - t0, m1 - m0, p1 - p0)
            best = (value, others) if best is None or others < best[1] else best
            if others < self.limit or time.monotonic() > self.deadline:
                return best
            self.retries += 1
            self.wait_quiet()


def child_json(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run one of this script's measuring children; its JSON, or {"error": ...}."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"measurement timed out after {timeout:.0f} s"}
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"measurement failed (rc {proc.returncode}): {lines[-1][:200] if lines else ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prewarm(paths: list[Path]) -> None:
    """Read the files once so that every tool finds them in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def median(xs: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    """Cores, CPU, RAM, OS, Python and the versions that matter, with the git revision of this checkout."""
    import onnx
    import onnx_ir
    import onnxruntime
    import psutil

    import qonnx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "qonnx", "passes"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        rev += " (qonnx/ or passes/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return (
        f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, "
        f"numpy {np.__version__}, qonnx {qonnx.__version__} (git {rev})"
    )


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the section between the ``start`` and ``end`` markers of ``path`` (append it when absent).

    ``section`` includes both markers; the rest of the file is kept as it is.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)

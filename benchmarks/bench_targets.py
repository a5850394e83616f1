"""Which weight+activation forms are fast on which ONNX Runtime provider: single linear layers, timed.

One MatMul [M, K] x [K, N] (K = N), built in code with onnx.helper, is measured in every form qonnx emits (on
CUDA 8 such layers are chained in one graph and the time divided by 8: ``--layers``, see below), each made by
``qonnx.quantize`` from the float layer (calibration: random rows from an .npz, minmax; no
SmoothQuant, which in a real model folds into the preceding norm and adds no node; ``keep_float=0``, so that
the one activation is quantized: every option that shapes the form is spelled out, and a form whose graph
lacks its activation QuantizeLinear is reported as not built):

- ``float``: fp32 MatMul on CPU, fp16 MatMul on CUDA (the reference of every ratio);
- ``w8a8-qdq`` (W8A8: uint8 asymmetric activation Q/DQ, int8 per-channel weight DQ) and ``w8a8-qdq-sym``
  (int8 symmetric activations, as for TensorRT); ``w4a8-qdq`` (W4A8, int4 weights in blocks of 128);
  ``fp8-qdq`` (FP8, float8 E4M3 weights and activations); ``dynamic`` (qonnx Dynamic: 8-bit MatMulNBits,
  accuracy_level 4, block 32); ``w4a16`` (W4A16 MatMulNBits, block 128, for context);
- ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` of the fp32 layer (per-channel int8 weights;
  on CUDA too, with fp32 input and output);
- CUDA only, ``gemmfloat8``: ORT's com.microsoft GemmFloat8 (cuBLASLt FP8 GEMM): QuantizeLinear to E4M3,
  then GemmFloat8(x8, W8^T, scaleA, scaleB) with transB=1 and fp16 output, per-tensor scales. It computes
  the right numbers (checked below), but ORT 1.31's kernel (contrib_ops/cuda/math/gemm_float8.cu) waits for
  its stream, creates a cuBLASLt handle, asks for an algorithm and cudaMallocs and frees a 32 MiB workspace on
  every call, which costs ~0.2-0.3 ms whatever the shape.

Sessions get the options of ``qonnx.runtime.make_session`` (graph optimization on, QDQ MatMulNBits accuracy
level 0, ``session.disable_quant_qdq=1`` for float8 Q/DQ); CPU sessions also get
``session.intra_op.allow_spinning=0`` (``--spin`` to keep ORT's default): with every form's session open and
the forms interleaved, the idle thread pools of the others would spin on the cores the measured one needs (on
the 16-core GPU host this made fp32 at M=1 look 4x slower than the same MatMul behind fp8 Q/DQ). Each form's
outputs are checked against a float64 reference (relative error) and the ops ONNX Runtime ran, with their
provider, are read from a profiled run.
Timing: every form at one (K, M) is measured in rounds that rotate through the forms (noise on shared cores
hits all of them alike); the median run after warm-up is reported, with speed = float time / form time at the
same M, K, N (above 1: faster than float). On CUDA, input and output are bound on the device (IOBinding) and
every run is waited for. A run of one layer pays ONNX Runtime's per-run cost besides its kernels: one fp16
4096 x 4096 layer at M=1 took 32-60 us depending on the host (torch's matmul 22 us, the bandwidth floor ~11 us),
which pulls every ratio towards 1 (W4A16 at M=1: 1.35x with one layer, 1.72x per layer of 8 chained, where
fp16 takes 20 us a layer). Chained layers share that cost, as the layers of a model do. (Runs issued back to
back with ``disable_synchronize_execution_providers`` were tried instead and dropped: in ORT 1.31.1 that option
costs ~65 us of CPU time per run.) The layers are written with their intermediate types (shape inference), as
exporters write them.

The speed-table rows (``qonnx/speed_table.py``'s MEASURED) take the largest K measured and the smaller of the
ratios at M = 16 (decoding a batch) and M = 256 (prefill): a scheme that is slower than float at either is
worth a warning.

Each provider writes its own section of ``benchmarks/RESULTS.md``: ``bench_targets_cuda`` and
``bench_targets_cpuN`` for a CPU of N cores, so that CPU figures from different hosts stand side by side.

Usage::

    python benchmarks/bench_targets.py --device cpu                # CPU section of benchmarks/RESULTS.md
    python benchmarks/bench_targets.py --device cpu --threads 1    # cores shared with other work
    python benchmarks/bench_targets.py --device cpu --quick        # smoke run, RESULTS.md untouched
    python benchmarks/bench_targets.py --device all --json-out $OUT/targets.json --section-out $OUT/targets.md
    python benchmarks/bench_targets.py --merge targets.md           # then merge the GPU host's sections here

On the GPU machine (onnxruntime-gpu in /tmp/site, see ../shared/device/README.md), install qonnx with the
interpreter that runs the script: ``python -m pip install --no-deps --no-build-isolation -e .`` (its bare ``pip``
belongs to another Python). ``--device all`` takes ~3 min there (CPU ~1 min, CUDA ~2 min, most of it quantizing
the chained layers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SECTION = re.compile(r"<!-- bench_targets_([\w-]+):start -->")
FORMS = ("float", "w8a8-qdq", "w8a8-qdq-sym", "w4a8-qdq", "fp8-qdq", "dynamic", "ort-dynamic", "w4a16", "gemmfloat8")
#: speed_table scheme name -> the form that stands for what qonnx emits for it
TABLE_SCHEMES = {"w8a8": "w8a8-qdq", "w4a8": "w4a8-qdq", "fp8": "fp8-qdq", "dynamic": "dynamic"}
TABLE_M = (16, 256)
CAL_SAMPLES, CAL_ROWS = 4, 64


# ----------------------------------------------------------------------------------------------- models
def _save(nodes: list, inits: list, k: int, elem: int, path: Path, name: str, ms: bool = False) -> Path:
    """A graph x[M, K] -> y[M, K] of ``nodes`` (opset 21; com.microsoft 1 when ``ms``) written to ``path``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", elem, ["M", k])],
        [helper.make_tensor_value_info("y", elem, ["M", k])],
        inits,
    )
    ops = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 10
    # Types of the tensors between layers, as exporters write them: qonnx gives an activation of unknown type
    # a float32 scale, which ONNX Runtime refuses beside an fp16 tensor.
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, path)
    return path


def _names(layers: int) -> list[str]:
    """The tensors between the chained layers: x, h1, ..., y."""
    return ["x", *(f"h{i}" for i in range(1, layers)), "y"]


def float_layers(weights: list[np.ndarray], dtype: type, path: Path) -> Path:
    """MatMul x[M, K] @ W1 @ W2 ... (one MatMul per weight, K = N) written to ``path``."""
    t = _names(len(weights))
    nodes = [helper.make_node("MatMul", [t[i], f"w{i}"], [t[i + 1]], name=f"linear{i}") for i in range(len(weights))]
    inits = [numpy_helper.from_array(w.astype(dtype), f"w{i}") for i, w in enumerate(weights)]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _save(nodes, inits, weights[0].shape[0], elem, path, "linear")


def gemm_float8_layers(weights: list[np.ndarray], x_absmax: list[float], path: Path) -> Path:
    """Per layer: QuantizeLinear(h) to E4M3 -> com.microsoft GemmFloat8(h8, W8^T) -> fp16; per-tensor scales.

    The schema (ORT 1.31): A [M, K] (transA=0), B [N, K] with transB=1 (the only float8 layouts it takes),
    optional C, then float scalars scaleA / scaleB (device pointers for cuBLASLt), ``dtype`` = output type.
    """
    import ml_dtypes

    f8 = ml_dtypes.float8_e4m3fn
    t = _names(len(weights))
    nodes, inits = [], []
    for i, (w, amax) in enumerate(zip(weights, x_absmax, strict=True)):
        sx, sw = amax / 448.0, float(np.abs(w).max()) / 448.0
        inits += [
            numpy_helper.from_array(np.array(sx, np.float16), f"x_scale{i}"),
            numpy_helper.from_array(np.array(0, np.float32).astype(f8), f"x_zero{i}"),
            numpy_helper.from_array(np.ascontiguousarray((w.T / sw).astype(np.float32).astype(f8)), f"w8_{i}"),
            numpy_helper.from_array(np.array(sx, np.float32), f"scale_a{i}"),
            numpy_helper.from_array(np.array(sw, np.float32), f"scale_b{i}"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [t[i], f"x_scale{i}", f"x_zero{i}"], [f"x8_{i}"], name=f"quantize{i}"),
            helper.make_node(
                "GemmFloat8",
                [f"x8_{i}", f"w8_{i}", "", f"scale_a{i}", f"scale_b{i}"],
                [t[i + 1]],
                name=f"gemm_fp8_{i}",
                domain="com.microsoft",
                transA=0,
                transB=1,
                dtype=TensorProto.FLOAT16,
            ),
        ]
    return _save(nodes, inits, weights[0].shape[0], TensorProto.FLOAT16, path, "linear_fp8", ms=True)


def build_forms(
    work: Path, size: int, layers: int, device: str, forms: list[str]
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Every form's model file (or an error string) for one size; returns (forms, float weights)."""
    import qonnx

    rng = np.random.default_rng(size)
    weights = [(rng.standard_normal((size, size)) / math.sqrt(size)).astype(np.float32) for _ in range(layers)]
    rows = rng.standard_normal((CAL_SAMPLES, CAL_ROWS, size)).astype(np.float32)
    dtype = np.float16 if device == "cuda" else np.float32
    work.mkdir(parents=True, exist_ok=True)
    base = float_layers(weights, dtype, work / f"float-{size}.onnx")
    np.savez(work / f"cal-{size}.npz", x=rows.astype(dtype))
    cal = qonnx.Calibration(data=str(work / f"cal-{size}.npz"), samples=CAL_SAMPLES, method="minmax", device="cpu")
    act = dict(calibration=cal, smooth_quant=None, keep_float=0, algo="rtn", weight_symmetric=True)
    configs = {
        "w8a8-qdq": qonnx.W8A8(**act, act_symmetric=False, block_size=None),
        "w8a8-qdq-sym": qonnx.W8A8(**act, act_symmetric=True, block_size=None),
        "w4a8-qdq": qonnx.W4A8(**act, act_symmetric=False, block_size=128),
        "fp8-qdq": qonnx.FP8(**act),
        "dynamic": qonnx.Dynamic(block_size=32),
        "w4a16": qonnx.W4A16(block_size=128, symmetric=False),
    }
    out: dict[str, Any] = {}
    for form in forms:
        path = work / f"{form}-{size}.onnx"
        try:
            if form == "float":
                out[form] = base
            elif form in configs:
                qonnx.quantize(base, configs[form], output=path, verify=False)
                ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
                if isinstance(configs[form], qonnx.ActivationConfig) and ops.count("QuantizeLinear") != layers:
                    raise RuntimeError(
                        f"qonnx emitted {ops.count('QuantizeLinear')} activation QuantizeLinear, "
                        f"not {layers} (ops: {', '.join(sorted(set(ops)))})"
                    )
                out[form] = path
            elif form == "ort-dynamic":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
                fp32 = float_layers(weights, np.float32, work / f"float32-{size}.onnx")
                quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True)
                out[form] = path
            elif form == "gemmfloat8":
                h, amax = rows.astype(np.float64), []
                for w in weights:
                    amax.append(float(np.abs(h).max()))
                    h = h @ w
                out[form] = gemm_float8_layers(weights, amax, path)
        except Exception as e:  # a form that cannot be made is a finding, not a reason to stop
            out[form] = f"not built: {_first_line(e)}"
    return out, weights


# --------------------------------------------------------------------------------------------- running
class Runner:
    """One form's session on one provider: bind an input of M rows, time runs, read the ops it ran."""

    def __init__(self, path: Path, device: str, prof_dir: Path, threads: int | None, spin: bool) -> None:
        import onnxruntime as ort

        from qonnx.runtime.session import FLOAT8_SESSION_CONFIG, PRECISE_QDQ, has_float8_qdq

        so = ort.SessionOptions()  # make_session's options, plus a profile of the first run
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if device == "cpu" and not spin:  # idle pools of the other forms' sessions would spin on our cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", PRECISE_QDQ)
        if has_float8_qdq(str(path)):
            so.add_session_config_entry(*FLOAT8_SESSION_CONFIG)
        so.enable_profiling = True
        so.profile_file_prefix = str(prof_dir / path.stem)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.ort, self.device = ort, device
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        inp = self.session.get_inputs()[0]
        self.name, self.out_name = inp.name, self.session.get_outputs()[0].name
        self.dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.ran: list[str] | None = None

    def prepare(self, x: np.ndarray) -> None:
        """Bind ``x`` (and, on CUDA, an output buffer on the device) for the runs that follow."""
        x = x.astype(self.dtype)
        if self.device == "cpu":
            self.feed = {self.name: x}
            return
        ov = self.ort.OrtValue
        self.io = self.session.io_binding()
        self.io.bind_ortvalue_input(self.name, ov.ortvalue_from_numpy(x, "cuda", 0))
        self.out = ov.ortvalue_from_shape_and_type([x.shape[0], x.shape[1]], self.dtype, "cuda", 0)
        self.io.bind_ortvalue_output(self.out_name, self.out)

    def once(self) -> float:
        """Seconds of one run, waited for."""
        t = time.perf_counter()
        if self.device == "cpu":
            self.result = self.session.run([self.out_name], self.feed)[0]
        else:
            self.session.run_with_iobinding(self.io)
            self.io.synchronize_outputs()
        seconds = time.perf_counter() - t
        if self.ran is None:
            self.ran = self._profiled_ops()
        return seconds

    def output(self) -> np.ndarray:
        """The last run's output."""
        return self.result if self.device == "cpu" else self.out.numpy()

    def _profiled_ops(self) -> list[str]:
        path = Path(self.session.end_profiling())  # profiling stops here: later runs are not traced
        try:
            events = json.loads(path.read_text())
        finally:
            path.unlink(missing_ok=True)
        nodes: dict[str, set[str]] = {}  # op@provider -> node names, in the order they ran
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                a = ev.get("args", {})
                op = f"{a.get('op_name', '?')}@{a.get('provider', '?').removesuffix('ExecutionProvider')}"
                nodes.setdefault(op, set()).add(ev["name"])
        return [op if len(names) == 1 else f"{len(names)} x {op}" for op, names in nodes.items()]


def measure_cell(runners: dict[str, Runner], x: np.ndarray, args: argparse.Namespace) -> dict[str, dict]:
    """Every form at one M: warm up, then rounds that rotate through the forms; median microseconds.

    On CPU each round of a form is repeated while other processes used more than ``args.quiet_cores`` cores
    during it (``_common.Undisturbed``), for at most ``args.patience`` seconds per cell; then the least
    disturbed try is kept, and the cores others used go into the figures.
    """
    from _common import Undisturbed

    cpu = next(iter(runners.values())).device == "cpu" if runners else True
    gate = Undisturbed(args.quiet_cores, time.monotonic() + args.patience) if cpu else None
    others: dict[str, list[float]] = {}
    cell: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {}
    count: dict[str, int] = {}
    for form, r in runners.items():
        try:
            r.prepare(x)
            est = min(r.once() for _ in range(2 if r.device == "cpu" and x.shape[0] >= 256 else 3))
        except Exception as e:
            cell[form] = {"error": _first_line(e)}
            continue
        times[form] = []
        count[form] = max(5, min(args.repeats, int(args.budget / max(est, 1e-6))))
    rounds = min(5, max(count.values(), default=1))
    order = list(times)
    for i in range(rounds):
        for form in order[i % len(order) :] + order[: i % len(order)]:
            if form in cell:
                continue
            k = math.ceil(count[form] / rounds)
            try:
                if gate is None:
                    times[form] += [runners[form].once() for _ in range(k)]
                else:
                    ts, used = gate(lambda: [runners[form].once() for _ in range(k)])  # noqa: B023 (called here)
                    times[form] += ts
                    others.setdefault(form, []).append(used)
            except Exception as e:
                cell[form] = {"error": _first_line(e)}
    for form, ts in times.items():
        if form not in cell:
            cell[form] = {"us": 1e6 * statistics.median(ts), "runs": len(ts)}
            if form in others:
                cell[form]["others_cores"] = round(statistics.mean(others[form]), 2)
    base = cell.get("float", {}).get("us")
    for c in cell.values():
        if base and "us" in c:
            c["speed"] = base / c["us"]
    return cell


def measure_size(size: int, device: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """All forms at every M for one K = N: times, speeds, relative errors and the ops that ran."""
    forms = [f for f in args.forms if f != "gemmfloat8" or device == "cuda"]
    t0 = time.perf_counter()
    paths, weights = build_forms(work / device, size, args.layers, device, forms)
    entry: dict[str, Any] = {"forms": {f: {} for f in forms}, "batches": {}}
    runners: dict[str, Runner] = {}
    for form in forms:
        if isinstance(paths[form], str):
            entry["forms"][form]["error"] = paths[form]
            continue
        try:
            runners[form] = Runner(paths[form], device, work, args.threads, args.spin)
        except Exception as e:
            entry["forms"][form]["error"] = f"session: {_first_line(e)}"
    entry["build_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    check_m = next((m for m in args.batches if m >= 16), args.batches[-1])
    for m in args.batches:
        x = rng.standard_normal((m, size)).astype(np.float32)
        cell = measure_cell(runners, x, args)
        for c in cell.values():  # per layer
            if "us" in c:
                c["us"] /= args.layers
        if m == check_m:  # the last run of each form was on x
            ref = x.astype(np.float64)
            for w in weights:
                ref = ref @ w.astype(np.float64)
            for form, r in runners.items():
                if "us" in cell.get(form, {}):
                    err = np.linalg.norm(r.output().astype(np.float64) - ref) / np.linalg.norm(ref)
                    entry["forms"][form].update(ran=r.ran, rel_err=float(err), checked_at_m=m)
        entry["batches"][m] = cell
        print(f"{device} K=N={size} M={m}: " + ", ".join(_fmt(f, c) for f, c in cell.items()), flush=True)
    return entry


def _fmt(form: str, c: dict[str, Any]) -> str:
    return f"{form} failed" if "error" in c else f"{form} {_us(c['us'])} us ({c['speed']:.2f}x)"


def _us(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:400]


# ------------------------------------------------------------------------------------------- reporting
def table_rows(device: str, res: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(scheme, speed, what) for speed_table's MEASURED: the smaller speed at M = 16 and 256, largest K."""
    size = max(res["sizes"])
    batches = res["sizes"][size]["batches"]
    ms = sorted({min(batches, key=lambda b: abs(math.log(b / want))) for want in TABLE_M})
    rows = []
    for scheme, form in TABLE_SCHEMES.items():
        speeds = {m: batches[m].get(form, {}).get("speed") for m in ms}
        if None in speeds.values():
            continue
        what = (
            f"qonnx {scheme} ({form}) {size}x{size} MatMul"
            + (f" (per layer of {res['layers']} chained)" if res["layers"] > 1 else "")
            + f" vs {_float_name(device)}, ORT {res['ort']} "
            f"{device.upper()} provider, {res['where']}: " + ", ".join(f"{v:.2f}x at M={m}" for m, v in speeds.items())
        )
        rows.append((scheme, round(min(speeds.values()), 2), what))
    return rows


def speed_table_text(device: str, res: dict[str, Any]) -> str:
    """The rows in speed_table.py's format."""
    return "\n".join(
        f'    ("{scheme}", "{device}"): ({ratio}, "{what}", "benchmarks/RESULTS.md, bench_targets"),'
        + ("  # not consulted: Dynamic has no target" if scheme == "dynamic" else "")
        for scheme, ratio, what in table_rows(device, res)
    )


def summary(device: str, res: dict[str, Any]) -> list[str]:
    """One line per form: its speed vs float at every M (largest K), and whether the tool should warn."""
    size = max(res["sizes"])
    entry = res["sizes"][size]
    table = {TABLE_SCHEMES[scheme]: ratio for scheme, ratio, _ in table_rows(device, res)}
    lines = []
    for form, info in entry["forms"].items():
        ok = {m: c[form]["speed"] for m, c in entry["batches"].items() if "speed" in c.get(form, {})}
        if form == "float":
            continue
        if not ok:
            errors = [c[form]["error"] for c in entry["batches"].values() if "error" in c.get(form, {})]
            lines.append(f"- {device.upper()}, {form}: failed ({info.get('error') or (errors or ['no figures'])[0]})")
            continue
        fast, slow = [m for m, v in ok.items() if v >= 1], [m for m, v in ok.items() if v < 1]
        verdict = (
            ("faster at every M" if not slow else "slower at every M")
            if not (fast and slow)
            else f"faster at M={','.join(map(str, fast))}, slower at M={','.join(map(str, slow))}"
        )
        line = (
            f"- {device.upper()}, {form}: {' / '.join(f'{v:.2f}x' for v in ok.values())} {_float_name(device)} "
            f"at M={'/'.join(map(str, ok))} (K=N={size}): {verdict}"
        )
        if form in table:
            line += f"; speed table {table[form]:.2f}x -> {'warn' if table[form] < 1 else 'no warning'}"
        lines.append(line)
    return lines


def render(device: str, res: dict[str, Any], command: str) -> str:
    """This device's RESULTS.md section."""
    start, end = markers(res["section"])
    size = max(res["sizes"])
    forms = list(res["sizes"][size]["forms"])
    lines = [
        start,
        f"## Single linear layers on ONNX Runtime's {device.upper()} provider ({res['where']}): which "
        "weight+activation forms are fast",
        "",
        f"Measured {res['date']} by `{command}` ({res['seconds']:.0f} s): {res['machine']}.",
        _method_note(device, res),
        "",
        "| K=N | M | " + " | ".join(forms) + " |",
        "|---:|---:|" + "---:|" * len(forms),
    ]
    for k, entry in res["sizes"].items():
        for m, cell in entry["batches"].items():
            cells = [
                f"{_us(c['us'])} ({c['speed']:.2f}x)" if "us" in c else "failed" if "error" in c else ""
                for c in (cell.get(f, entry["forms"][f]) for f in forms)
            ]
            lines.append(f"| {k} | {m} | " + " | ".join(cells) + " |")
    lines += ["", f"What ONNX Runtime ran (profiled first run, K=N={size}) and the output's error vs float64:", ""]
    for form, info in res["sizes"][size]["forms"].items():
        if "error" in info:
            lines.append(f"- {form}: {info['error']}")
        elif "ran" in info:
            lines.append(
                f"- {form}: {', '.join(info['ran'])}; relative error {info['rel_err']:.2g} at M={info['checked_at_m']}"
            )
    failed = sorted(
        {
            f"{form} at K=N={k}, M={m}: {c['error']}"
            for k, e in res["sizes"].items()
            for m, cell in e["batches"].items()
            for form, c in cell.items()
            if "error" in c
        }
    )
    lines += [*(f"- failed: {f}" for f in failed), "", "What is fast where:", "", *summary(device, res), ""]
    lines += [
        f"Rows for `qonnx/speed_table.py` (the smaller speed of M = {' and '.join(map(str, TABLE_M))}, K=N={size}):",
        "",
        "```python",
        speed_table_text(device, res),
        "```",
        "",
        end,
    ]
    return "\n".join(lines)


def _method_note(device: str, res: dict[str, Any]) -> str:
    """How the cells were measured, and how disturbed the machine was."""
    text = (
        "One MatMul [M, K] x [K, N], K = N, in each form `qonnx.quantize` emits (see the script's docstring)"
        + (
            f"; {res['layers']} such layers chained in one graph and the time divided by {res['layers']}, so that"
            " ONNX Runtime's per-run cost is shared as in a model. "
            if res["layers"] > 1
            else ". "
        )
        + f"Cells: median microseconds per layer of up to {res['repeats']} runs (about {res['budget']} s of runs at "
        f"most) and speed = {_float_name(device)} time / form time at the same M, K, N (above 1: faster); forms "
        "interleaved in rotating rounds"
    )
    if device == "cuda":
        text += "; IOBinding, input and output on the device, every run waited for"
    if res["threads"]:
        text += f"; intra-op threads: {res['threads']}"
    if device == "cpu" and res["threads"] != 1 and not res["spin"]:
        text += "; idle threads do not spin (`session.intra_op.allow_spinning=0`)"
    text += f". Load average (1, 5, 15 min) at the start / end: {res['load'][0]} / {res['load'][1]}"
    used = [
        c["others_cores"]
        for e in res["sizes"].values()
        for cell in e["batches"].values()
        for c in cell.values()
        if "others_cores" in c
    ]
    if used:
        text += (
            f"; other processes used {statistics.mean(used):.2f} cores on average during the kept rounds "
            f"(rounds disturbed by more than {res['quiet_cores']} cores were retried for up to {res['patience']} s "
            "per M)"
        )
    return text + "."


def _float_name(device: str) -> str:
    return "fp16" if device == "cuda" else "fp32"


def run_device(device: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every size on one provider, with what the report needs to describe the run."""
    import onnxruntime

    cpu = device == "cpu"
    repeats = args.repeats or ((10 if cpu else 100) if args.quick else (20 if cpu else 300))
    budget = args.budget or ((0.25 if cpu else 0.1) if args.quick else (1.0 if cpu else 0.3))
    patience = args.patience if args.patience is not None else (1.0 if args.quick else 4.0)
    layers = args.layers or (1 if cpu else 8)
    dev_args = argparse.Namespace(
        **{**vars(args), "repeats": repeats, "budget": budget, "patience": patience, "layers": layers}
    )
    load0, t0 = os.getloadavg(), time.perf_counter()
    sizes = {size: measure_size(size, device, dev_args, work) for size in args.sizes}
    load1 = os.getloadavg()
    gpu = _gpu_name() if not cpu else ""
    return {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": (f"{gpu}; " if gpu else "") + describe_machine(),
        "where": gpu or f"{os.cpu_count()} cores",
        "section": "cuda" if gpu else f"cpu{os.cpu_count()}",
        "ort": onnxruntime.__version__,
        "repeats": repeats,
        "budget": budget,
        "quiet_cores": args.quiet_cores,
        "threads": args.threads,
        "layers": layers,
        "spin": args.spin,
        "patience": patience,
        "load": [", ".join(f"{v:.1f}" for v in load) for load in (load0, load1)],
        "seconds": time.perf_counter() - t0,
        "sizes": sizes,
    }


def describe_machine() -> str:
    try:
        from _common import machine

        return machine()
    except Exception:  # psutil or git missing
        import onnxruntime

        return f"{os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:
        return "GPU"


def markers(section: str) -> tuple[str, str]:
    """The RESULTS.md markers of one section: ``cuda``, or ``cpuN`` for a CPU of N cores (hosts coexist)."""
    return f"<!-- bench_targets_{section}:start -->", f"<!-- bench_targets_{section}:end -->"


def merge(path: Path) -> None:
    """Write the sections found in a file written by ``--section-out`` into RESULTS.md."""
    from _common import write_section

    text = path.read_text()
    for name in SECTION.findall(text):
        start, end = markers(name)
        if end in text:
            write_section(HERE / "RESULTS.md", start + text.split(start, 1)[1].split(end, 1)[0] + end, start, end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"], help="all: CPU, and CUDA when usable")
    p.add_argument("--sizes", default="2048,4096", help="K = N values")
    p.add_argument("--batches", default="1,16,64,256,1024", help="M values")
    p.add_argument("--layers", type=int, help="K x K layers chained in one graph (default CPU 1, CUDA 8)")
    p.add_argument("--repeats", type=int, help="most timed runs per form and cell (default CPU 20, CUDA 300)")
    p.add_argument("--budget", type=float, help="seconds of timed runs per form and cell (default CPU 1, CUDA 0.3)")
    p.add_argument("--quiet-cores", type=float, default=0.25, help="CPU: repeat rounds disturbed by more than this")
    p.add_argument("--patience", type=float, help="CPU: seconds per cell spent repeating disturbed rounds (default 4)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--spin", action="store_true", help="CPU: let idle ONNX Runtime threads spin (its default)")
    p.add_argument("--quick", action="store_true", help="K=N 2048, M 1,16,256, fewer runs; RESULTS.md untouched")
    p.add_argument("--forms", default=",".join(FORMS), help="a subset of: " + ",".join(FORMS))
    p.add_argument("--work", help="folder for the models (default: a temporary folder)")
    p.add_argument("--json-out", help="write every figure as JSON here")
    p.add_argument("--section-out", help="write the RESULTS.md section(s) here instead of into RESULTS.md")
    p.add_argument("--merge", help="merge a file written by --section-out into RESULTS.md and exit")
    args = p.parse_args(argv)
    if args.merge:
        merge(Path(args.merge))
        return 0
    if args.quick:
        args.sizes = "2048" if args.sizes == p.get_default("sizes") else args.sizes
        args.batches = "1,16,256" if args.batches == p.get_default("batches") else args.batches
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = sorted(int(b) for b in args.batches.split(","))
    args.forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in args.forms if f not in FORMS]
    if unknown or "float" not in args.forms:
        p.error(f"--forms: unknown {unknown}" if unknown else "--forms must include float (the reference)")
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        try:
            import torch  # noqa: F401  (the CUDA libraries onnxruntime-gpu's preload_dlls finds)
        except ImportError:
            pass
        from qonnx.runtime.session import cuda_usable

        if cuda_usable():
            devices.append("cuda")
        elif args.device == "cuda":
            print("bench_targets: CUDA is not usable here (no GPU or no CUDA provider)", file=sys.stderr)
            return 2
    command = " ".join(["python benchmarks/bench_targets.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qonnx-targets-") as tmp:
        for device in devices:
            results[device] = run_device(device, args, Path(args.work) if args.work else Path(tmp))
    sections = [render(d, res, command) for d, res in results.items()]
    print("\n\n".join(sections))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    if args.section_out:
        Path(args.section_out).write_text("\n\n".join(sections) + "\n")
    elif not args.quick:
        from _common import write_section

        for res, section in zip(results.values(), sections, strict=True):
            write_section(HERE / "RESULTS.md", section, *markers(res["section"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

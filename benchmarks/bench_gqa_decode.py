"""Why GroupQueryAttention decodes slowly on ONNX Runtime's CUDA provider (issue 3): one new token, L layers.

On the H100 a lowered 1.1B Llama (``qonnx lower --target cuda --attention``: com.microsoft.GroupQueryAttention
with separate past_key/past_value inputs and present_key/present_value outputs, fp16, ``seqlens_k`` and
``total_sequence_length`` from ``Shape(attention_mask)``) spent 2.35 ms per GroupQueryAttention call at decode,
where ~0.1 ms is expected, and decoded 4x slower than the unfused graph. This script builds, with onnx.helper,
graphs of L GroupQueryAttention nodes in a chain (each layer's output is the next one's query; random Q/K/V and
caches; no weights) and times one decode step (1 new token) per mode, as microseconds per attention call (run
time / L). Every mode's output is checked against a numpy reference of the same step.

Modes (what each shows):

- ``numpy``: separate past/present, lengths from ``Shape(attention_mask)``, ``session.run`` with numpy feeds, as
  qonnx's generation loop runs the model: every step copies every past cache to the device and every present
  back. Against ``iobind``: the cost of those host copies.
- ``iobind``: the same graph with IOBinding: inputs and (preallocated) outputs on the device, no host copies (as
  bench_gpu.py decodes). If this is still slow, the cost is inside ONNX Runtime's GroupQueryAttention with
  separate buffers (its profile column says how much of it the kernel's own timing sees).
- ``share``: ``past_present_share_buffer``: each layer's past and present bound to the SAME preallocated
  [batch, kv_heads, max_len, head] device buffer (ORT detects it by pointer equality and appends the new token in
  place at position seqlens_k; present then has max_len positions too), lengths still from
  ``Shape(attention_mask)`` (mask [batch, past + 1]). ORT's fast flash-decoding path needs this.
- ``share-fed``: the same with ``seqlens_k`` (int32 [batch], = past length = total - 1, on the device) and
  ``total_sequence_length`` (int32 scalar, a CPU input of the kernel) fed as graph inputs: no shape subgraph.
- ``share-xqa`` (CUDA): ``share-fed`` with ``ORT_ENABLE_XQA=1`` at session creation (ORT's XQA decode kernel,
  head size 128, when its build has it; otherwise the same as share-fed).
- ``graph`` (CUDA): ``share-fed`` plus CUDA graph capture (provider option ``enable_cuda_graph``): every input and
  output bound to fixed device OrtValues (total_sequence_length to a CPU one), static shapes; ORT captures on an
  early run and then replays the kernels without launching them one by one. A replay does not re-read host-side
  values: total_sequence_length (CPU) is frozen at capture, and only device data (seqlens_k, Q/K/V, caches)
  changes between replays; a real decode loop would capture with total_sequence_length = max_len and move
  seqlens_k on the device. Here it is captured with total = past + 1, as share-fed runs.
- ``graph-max`` (CUDA): ``graph`` captured with total_sequence_length = max_len (seqlens_k still = past): the
  capture a decode loop can replay at every step; its output check says whether ORT computes the right thing then.
- ``graph-mask`` (CUDA): ``graph`` with the lengths from ``Shape(attention_mask)``, as qonnx lowers models: ORT
  refuses capture when a Memcpy node is needed (the shape subgraph runs on the CPU and seqlens_k must reach the
  device); recorded as the error it gives.
- ``unfused-numpy`` / ``unfused-iobind``: the attention as transformers exports it (Concat of the cache, K/V
  repeated to the query heads with Expand, MatMul, scale, Softmax, MatMul) on the same shapes, numpy feeds / IOBinding:
  the reference the fused graph lost to.

Modes needing CUDA are skipped on a machine without a usable GPU (the CPU provider runs the rest, so the script
can be tested there). Results: ``--out`` JSON and ``--section-out`` markdown.

Usage (device, about 2-3 minutes on an H100; ``--budget`` stops measuring in time)::

    python benchmarks/bench_gqa_decode.py --out $OUT/gqa.json --section-out $OUT/gqa.md

Smoke test on CPU: ``--shapes 8/2/32 --pasts 16,64 --batches 1,2 --layers 2 --dtype float32``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODES = (
    "numpy",
    "iobind",
    "share",
    "share-fed",
    "share-xqa",
    "unfused-numpy",
    "unfused-iobind",
    "graph",
    "graph-max",
    "graph-mask",
)
CUDA_ONLY = ("share-xqa", "graph", "graph-max", "graph-mask")
MS = "com.microsoft"


# ------------------------------------------------------------------------------------------------ graphs


def _io(name: str, elem: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def gqa_model(layers: int, nq: int, nkv: int, hs: int, elem: int, lengths: str) -> onnx.ModelProto:
    """L GroupQueryAttention nodes in a chain; lengths ``"mask"`` (from Shape(attention_mask)) or ``"fed"``."""
    inputs = [
        _io("query", elem, ["batch", 1, nq * hs]),
        _io("key", elem, ["batch", 1, nkv * hs]),
        _io("value", elem, ["batch", 1, nkv * hs]),
    ]
    nodes, inits = [], []
    if lengths == "mask":  # as qonnx.passes.lower wrote it before the ReduceSum lengths
        inputs.append(_io("attention_mask", TensorProto.INT64, ["batch", "total"]))
        inits += [
            helper.make_tensor("axis1", TensorProto.INT64, [], [1]),
            helper.make_tensor("one", TensorProto.INT32, [], [1]),
            helper.make_tensor("start0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("end1", TensorProto.INT64, [1], [1]),
        ]
        nodes += [
            helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
            helper.make_node("Gather", ["mask_shape", "axis1"], ["total64"], axis=0),
            helper.make_node("Cast", ["total64"], ["total_sequence_length"], to=TensorProto.INT32),
            helper.make_node("Sub", ["total_sequence_length", "one"], ["last"]),
            helper.make_node("Slice", ["mask_shape", "start0", "end1"], ["batch_dim"]),
            helper.make_node("Expand", ["last", "batch_dim"], ["seqlens_k"]),
        ]
    else:
        inputs += [_io("seqlens_k", TensorProto.INT32, ["batch"]), _io("total_sequence_length", TensorProto.INT32, [])]
    outputs = []
    query = "query"
    for i in range(layers):
        inputs += [_io(f"past_{kv}_{i}", elem, ["batch", nkv, "past", hs]) for kv in ("key", "value")]
        out = "output" if i == layers - 1 else f"attn_{i}"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [query, "key", "value", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"],
                [out, f"present_key_{i}", f"present_value_{i}"],
                name=f"gqa_{i}",
                domain=MS,
                num_heads=nq,
                kv_num_heads=nkv,
            )
        )
        outputs += [_io(f"present_{kv}_{i}", elem, ["batch", nkv, "present", hs]) for kv in ("key", "value")]
        query = out
    outputs.insert(0, _io("output", elem, ["batch", 1, nq * hs]))
    graph = helper.make_graph(nodes, "gqa_decode", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8
    )


def unfused_model(layers: int, nq: int, nkv: int, hs: int, elem: int) -> onnx.ModelProto:
    """The same step as transformers exports it: Concat cache, repeat_kv (Expand), MatMul, Softmax, MatMul."""
    g = nq // nkv
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    inits = [
        helper.make_tensor("q_shape", TensorProto.INT64, [4], [0, 0, nq, hs]),
        helper.make_tensor("kv_shape", TensorProto.INT64, [4], [0, 0, nkv, hs]),
        helper.make_tensor("out_shape", TensorProto.INT64, [3], [0, 0, nq * hs]),
        helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("groups", TensorProto.INT64, [1], [g]),
        helper.make_tensor("heads", TensorProto.INT64, [1], [nq]),
        helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("s2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("s4", TensorProto.INT64, [1], [4]),
        helper.make_tensor("s1", TensorProto.INT64, [1], [1]),
        numpy_helper.from_array(np.array(hs**-0.5, dtype), "scale"),
    ]
    inputs = [
        _io("query", elem, ["batch", 1, nq * hs]),
        _io("key", elem, ["batch", 1, nkv * hs]),
        _io("value", elem, ["batch", 1, nkv * hs]),
    ]
    nodes = [
        helper.make_node("Reshape", ["key", "kv_shape"], ["k_bsnh"]),
        helper.make_node("Transpose", ["k_bsnh"], ["k_new"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["value", "kv_shape"], ["v_bsnh"]),
        helper.make_node("Transpose", ["v_bsnh"], ["v_new"], perm=[0, 2, 1, 3]),
    ]
    outputs = [_io("output", elem, ["batch", 1, nq * hs])]
    query = "query"
    for i in range(layers):
        p = f"l{i}_"
        inputs += [_io(f"past_{kv}_{i}", elem, ["batch", nkv, "past", hs]) for kv in ("key", "value")]
        outputs += [_io(f"present_{kv}_{i}", elem, ["batch", nkv, "present", hs]) for kv in ("key", "value")]
        out = "output" if i == layers - 1 else f"attn_{i}"
        nodes += [
            helper.make_node("Reshape", [query, "q_shape"], [p + "q_bsnh"]),
            helper.make_node("Transpose", [p + "q_bsnh"], [p + "q"], perm=[0, 2, 1, 3]),
            helper.make_node("Concat", [f"past_key_{i}", "k_new"], [f"present_key_{i}"], axis=2),
            helper.make_node("Concat", [f"past_value_{i}", "v_new"], [f"present_value_{i}"], axis=2),
        ]
        for kv in ("key", "value"):  # repeat_kv: [B, Nkv, T, H] -> [B, Nkv, G, T, H] -> [B, Nq, T, H]
            src = f"present_{kv}_{i}"
            nodes += [
                helper.make_node("Shape", [src], [p + kv + "_shape"]),
                helper.make_node("Slice", [p + kv + "_shape", "s0", "s2"], [p + kv + "_bn"]),
                helper.make_node("Slice", [p + kv + "_shape", "s2", "s4"], [p + kv + "_th"]),
                helper.make_node("Slice", [p + kv + "_shape", "s0", "s1"], [p + kv + "_b"]),
                helper.make_node("Concat", [p + kv + "_bn", "groups", p + kv + "_th"], [p + kv + "_big"], axis=0),
                helper.make_node("Concat", [p + kv + "_b", "heads", p + kv + "_th"], [p + kv + "_rep_shape"], axis=0),
                helper.make_node("Unsqueeze", [src, "ax2"], [p + kv + "_5d"]),
                helper.make_node("Expand", [p + kv + "_5d", p + kv + "_big"], [p + kv + "_exp"]),
                helper.make_node("Reshape", [p + kv + "_exp", p + kv + "_rep_shape"], [p + kv + "_rep"]),
            ]
        nodes += [
            helper.make_node("Transpose", [p + "key_rep"], [p + "k_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [p + "q", p + "k_t"], [p + "scores"]),
            helper.make_node("Mul", [p + "scores", "scale"], [p + "scaled"]),
            helper.make_node("Softmax", [p + "scaled"], [p + "probs"], axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "value_rep"], [p + "ctx"]),
            helper.make_node("Transpose", [p + "ctx"], [p + "ctx_bsnh"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_bsnh", "out_shape"], [out]),
        ]
        query = out
    graph = helper.make_graph(nodes, "unfused_decode", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, pk: np.ndarray, pv: np.ndarray, layers: int) -> np.ndarray:
    """The chained decode step in float32 numpy (every layer reads the same past)."""
    b, nkv, _, hs = pk.shape
    nq = q.shape[-1] // hs
    kk = np.concatenate([pk, k.reshape(b, 1, nkv, hs).transpose(0, 2, 1, 3)], 2).astype(np.float32)
    vv = np.concatenate([pv, v.reshape(b, 1, nkv, hs).transpose(0, 2, 1, 3)], 2).astype(np.float32)
    kk, vv = np.repeat(kk, nq // nkv, axis=1), np.repeat(vv, nq // nkv, axis=1)
    x = q.astype(np.float32)
    for _ in range(layers):
        qh = x.reshape(b, 1, nq, hs).transpose(0, 2, 1, 3)
        s = qh @ kk.transpose(0, 1, 3, 2) * hs**-0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        x = ((s / s.sum(-1, keepdims=True)) @ vv).transpose(0, 2, 1, 3).reshape(b, 1, nq * hs)
    return x


# ----------------------------------------------------------------------------------------------- running


def new_session(model: bytes, device: str, *, graph: bool = False, profile: str = "", env: dict | None = None) -> Any:
    """An InferenceSession on ``device``; ``graph``: CUDA graph capture; ``env``: variables set while it is made."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if device == "cuda":
        opts = {"device_id": "0", "enable_cuda_graph": "1" if graph else "0"}
        providers: list[Any] = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return ort.InferenceSession(model, so, providers=providers)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Case:
    """One shape, batch size and past length: host data, the numpy reference, and how each mode runs it."""

    def __init__(self, shape: tuple[int, int, int], batch: int, past: int, layers: int, max_len: int, dtype: Any):
        self.nq, self.nkv, self.hs = shape
        self.batch, self.past, self.layers, self.max_len, self.dtype = batch, past, layers, max_len, dtype
        rng = np.random.default_rng(0)

        def rand(*dims: int) -> np.ndarray:
            return rng.standard_normal(dims, dtype=np.float32).astype(dtype)

        self.q = rand(batch, 1, self.nq * self.hs)
        self.k, self.v = rand(batch, 1, self.nkv * self.hs), rand(batch, 1, self.nkv * self.hs)
        self.pk, self.pv = rand(batch, self.nkv, past, self.hs), rand(batch, self.nkv, past, self.hs)
        self.ref = reference(self.q, self.k, self.v, self.pk, self.pv, layers)
        self.mask = np.ones((batch, past + 1), np.int64)
        self.seqlens = np.full((batch,), past, np.int32)
        self.total = np.array(past + 1, np.int32)

    def feeds(self, lengths: str) -> dict[str, np.ndarray]:
        """Host feeds with separate past buffers."""
        f = {"query": self.q, "key": self.k, "value": self.v}
        if lengths == "mask":
            f["attention_mask"] = self.mask
        elif lengths == "fed":
            f.update(seqlens_k=self.seqlens, total_sequence_length=self.total)
        for i in range(self.layers):
            f[f"past_key_{i}"], f[f"past_value_{i}"] = self.pk, self.pv
        return f

    def numpy_mode(self, sess: Any, lengths: str) -> tuple[Callable[[], None], Callable[[], np.ndarray]]:
        """``session.run`` with host arrays: every cache goes to the device and back at every step."""
        feeds = self.feeds(lengths)
        last: dict[str, Any] = {}

        def step() -> None:
            last["out"] = sess.run(None, feeds)

        return step, lambda: last["out"][0]

    def bound_mode(
        self, sess: Any, device: str, lengths: str, share: bool, total: int = 0
    ) -> tuple[Callable[[], None], Callable[[], np.ndarray]]:
        """IOBinding: every input and output on ``device`` in fixed OrtValues; ``share``: past = present buffer;
        ``total``: the total_sequence_length fed (default past + 1)."""
        import onnxruntime as ort

        def dev(a: np.ndarray) -> Any:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)

        io = sess.io_binding()
        keep = []  # the OrtValues (and host arrays a CPU OrtValue wraps) must outlive the binding
        for name, arr in self.feeds(lengths).items():
            if name.startswith("past_"):
                continue
            if name == "total_sequence_length":  # a CPU input of the kernel
                arr = np.array(total or self.past + 1, np.int32)
                value = ort.OrtValue.ortvalue_from_numpy(arr, "cpu", 0)
            else:
                value = dev(arr)
            io.bind_ortvalue_input(name, value)
            keep += [arr, value]
        out = ort.OrtValue.ortvalue_from_shape_and_type(list(self.ref.shape), self.dtype, device, 0)
        io.bind_ortvalue_output("output", out)
        for i in range(self.layers):
            for kind, past in (("key", self.pk), ("value", self.pv)):
                if share:  # one [B, Nkv, max_len, H] buffer per layer and kind, the past in its first positions
                    host = np.zeros((self.batch, self.nkv, self.max_len, self.hs), self.dtype)
                    host[:, :, : self.past] = past
                    buf = dev(host)
                    io.bind_ortvalue_input(f"past_{kind}_{i}", buf)
                    io.bind_ortvalue_output(f"present_{kind}_{i}", buf)
                    keep += [host, buf]
                else:
                    src = dev(past)
                    dst = ort.OrtValue.ortvalue_from_shape_and_type(
                        [self.batch, self.nkv, self.past + 1, self.hs], self.dtype, device, 0
                    )
                    io.bind_ortvalue_input(f"past_{kind}_{i}", src)
                    io.bind_ortvalue_output(f"present_{kind}_{i}", dst)
                    keep += [past, src, dst]

        def step() -> None:
            sess.run_with_iobinding(io)
            io.synchronize_outputs()

        step.keep = (keep, io, out)  # type: ignore[attr-defined]
        return step, lambda: out.numpy()


def per_run(step: Callable[[], None], min_time: float, repeats: int) -> float:
    """Median seconds per run over ``repeats`` batches of runs of at least ``min_time`` each, after warm-up."""
    for _ in range(3):  # warm-up; a CUDA graph is captured here
        step()
    t = time.perf_counter()
    step()
    n = max(1, min(2000, int(min_time / max(time.perf_counter() - t, 1e-7))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            step()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def profiled_gqa_us(
    model: bytes, device: str, case: Case, lengths: str, share: bool, tmp: str, runs: int = 10
) -> float | None:
    """Median duration of a GroupQueryAttention node in ONNX Runtime's profile (host-side time of the kernel's
    Compute: launches plus any synchronization inside it), in microseconds."""
    sess = new_session(model, device, profile=os.path.join(tmp, "gqa"))
    step, _ = case.bound_mode(sess, device, lengths, share)
    for _ in range(runs + 3):
        step()
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    durs = [
        e["dur"]
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and e.get("args", {}).get("op_name") == "GroupQueryAttention"
    ]
    return float(statistics.median(durs)) if durs else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ----------------------------------------------------------------------------------------------- the plan


def measure_shape(
    shape: tuple[int, int, int],
    args: argparse.Namespace,
    device: str,
    deadline: float,
    records: list[dict],
    save: Callable[[], None],
) -> None:
    """Every (batch, past, mode) of one head shape: one record each appended to ``records``, saved as it comes."""
    nq, nkv, hs = shape
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(args.dtype))
    models = {
        "mask": gqa_model(args.layers, nq, nkv, hs, elem, "mask").SerializeToString(),
        "fed": gqa_model(args.layers, nq, nkv, hs, elem, "fed").SerializeToString(),
        "unfused": unfused_model(args.layers, nq, nkv, hs, elem).SerializeToString(),
    }
    modes = [m for m in args.modes if device == "cuda" or m not in CUDA_ONLY]
    sessions: dict[str, Any] = {}

    def session(key: str) -> Any:  # the sessions with dynamic shapes serve every batch and past length
        if key not in sessions:
            if key == "xqa":
                sessions[key] = new_session(models["fed"], device, env={"ORT_ENABLE_XQA": "1"})
            else:
                sessions[key] = new_session(models[key], device)
        return sessions[key]

    refused: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gqa-profile-") as tmp:
        for batch in args.batches:
            for past in args.pasts:
                case = Case(shape, batch, past, args.layers, args.max_len, np.dtype(args.dtype).type)
                for mode in modes:
                    rec: dict[str, Any] = {"shape": "/".join(map(str, shape)), "batch": batch, "past": past}
                    rec["mode"] = mode
                    records.append(rec)
                    save()
                    if time.monotonic() > deadline:
                        rec["error"] = "skipped: time budget used up"
                        continue
                    if mode in refused:
                        rec["error"] = refused[mode]
                        continue
                    t0 = time.monotonic()
                    try:
                        step, result = run_mode(mode, case, device, session, models)
                        seconds = per_run(step, args.min_time, args.repeats)
                        out = result().astype(np.float32)
                    except Exception as e:  # a mode ORT refuses is a result, not a crash
                        rec["error"] = _first_line(e)
                        if mode == "graph-mask":
                            refused[mode] = rec["error"] + " (at the first configuration)"
                        print(f"  {rec['shape']} b{batch} past {past:5d} {mode:15s} {rec['error']}", flush=True)
                        continue
                    finally:
                        step = result = None  # type: ignore[assignment]  # release the graph sessions' buffers
                    rec["us_per_run"] = 1e6 * seconds
                    rec["us_per_call"] = 1e6 * seconds / args.layers
                    rec["max_abs_diff"] = float(np.abs(out - case.ref).max())
                    rec["max_abs_ref"] = float(np.abs(case.ref).max())
                    if args.profile and mode in ("iobind", "share-fed") and time.monotonic() < deadline:
                        lengths, share = ("mask", False) if mode == "iobind" else ("fed", True)
                        try:
                            rec["profiled_gqa_us"] = profiled_gqa_us(models[lengths], device, case, lengths, share, tmp)
                        except Exception as e:
                            rec["profile_error"] = _first_line(e)
                    prof = rec.get("profiled_gqa_us")
                    print(
                        f"  {rec['shape']} b{batch} past {past:5d} {mode:15s} {rec['us_per_call']:9.1f} us/call "
                        f"(max |diff| {rec['max_abs_diff']:.2g})"
                        + (f", profiled GQA {prof:.1f} us" if prof else "")
                        + f"  [{time.monotonic() - t0:.1f} s]",
                        flush=True,
                    )
                save()
                del case


def run_mode(
    mode: str, case: Case, device: str, session: Callable[[str], Any], models: dict[str, bytes]
) -> tuple[Callable[[], None], Callable[[], np.ndarray]]:
    """The step and result functions of one mode (graph modes get a session of their own, kept by the step)."""
    if mode == "numpy":
        return case.numpy_mode(session("mask"), "mask")
    if mode == "iobind":
        return case.bound_mode(session("mask"), device, "mask", share=False)
    if mode == "share":
        return case.bound_mode(session("mask"), device, "mask", share=True)
    if mode == "share-fed":
        return case.bound_mode(session("fed"), device, "fed", share=True)
    if mode == "share-xqa":
        return case.bound_mode(session("xqa"), device, "fed", share=True)
    if mode in ("graph", "graph-max", "graph-mask"):
        lengths = "mask" if mode == "graph-mask" else "fed"
        sess = new_session(models[lengths], device, graph=True)  # static shapes: one capture per configuration
        total = case.max_len if mode == "graph-max" else 0
        step, result = case.bound_mode(sess, device, lengths, share=True, total=total)
        step.session = sess  # type: ignore[attr-defined]
        return step, result
    if mode == "unfused-numpy":
        return case.numpy_mode(session("unfused"), "none")
    if mode == "unfused-iobind":
        return case.bound_mode(session("unfused"), device, "none", share=False)
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------- reporting


def render(res: dict[str, Any]) -> str:
    """The markdown section: one table per head shape, rows (batch, past), columns modes (us per call)."""
    meta, records = res["meta"], res["records"]
    lines = [
        "## GroupQueryAttention at decode on ONNX Runtime's CUDA provider: where the time goes (issue 3)",
        "",
        f"Measured {meta['date']} by `{meta['command']}` in {meta['total_s']:.0f} s on {meta['device']}; "
        f"onnxruntime {meta['onnxruntime']}.",
        "",
        f"- {meta['layers']} attention layers in a chain ({meta['dtype']}, 1 new token, random data), microseconds "
        "per attention call = run time / layers (median of "
        f"{meta['repeats']} batches of runs of >= {meta['min_time']} s, after 3 warm-up runs); shared buffers hold "
        f"{meta['max_len']} positions. Modes: see the docstring of benchmarks/bench_gqa_decode.py.",
        "- profiled: ONNX Runtime's profile of a GroupQueryAttention node (host-side Compute time: launches and any "
        "synchronization inside), median over 13 runs, for iobind / share-fed.",
        "",
    ]
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    for shape in shapes:
        nq, nkv, hs = shape.split("/")
        lines += [
            f"Heads {nq} query / {nkv} KV, head size {hs}:",
            "",
            "| batch | past | " + " | ".join(modes) + " | profiled iobind / share-fed |",
            "|---:|---:|" + "---:|" * len(modes) + "---:|",
        ]
        rows = list(dict.fromkeys((r["batch"], r["past"]) for r in records if r["shape"] == shape))
        for batch, past in rows:
            got = {r["mode"]: r for r in records if r["shape"] == shape and r["batch"] == batch and r["past"] == past}
            cells = []
            for m in modes:
                r = got.get(m, {})
                err = r.get("error", "")
                cells.append(
                    f"{r['us_per_call']:.1f}"
                    if "us_per_call" in r
                    else ("skipped" if err.startswith("skipped") else "failed" if err else "")
                )
            prof = [got.get(m, {}).get("profiled_gqa_us") for m in ("iobind", "share-fed")]
            cells.append(" / ".join("" if p is None else f"{p:.1f}" for p in prof))
            lines.append(f"| {batch} | {past} | " + " | ".join(cells) + " |")
        lines.append("")
    bad = [r for r in records if "max_abs_diff" in r and r["max_abs_diff"] > 0.02 * max(r["max_abs_ref"], 1e-6) + 1e-3]
    worst = max((r["max_abs_diff"] for r in records if "max_abs_diff" in r), default=float("nan"))
    lines.append(
        f"- Outputs against the float32 numpy reference: largest |difference| {worst:.3g}"
        + (
            "; **disagreeing**: " + ", ".join(f"{r['shape']} b{r['batch']} past {r['past']} {r['mode']}" for r in bad)
            if bad
            else "; every mode agrees (within 2% of the largest |output|)."
        )
    )
    errors = dict.fromkeys(f"{r['mode']}: {r['error']}" for r in records if "error" in r)
    for e in list(errors)[:12]:
        lines.append(f"- {e}")
    lines += [f"- {note}" for note in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--section-out", type=Path, help="markdown section")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shapes", default="32/8/128,32/4/64", help="query heads/KV heads/head size, comma-separated")
    p.add_argument("--pasts", default="128,512,2048", help="past lengths")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-len", type=int, default=0, help="shared buffer length (default: largest past + 64)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per batch of runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--budget", type=float, default=200, help="seconds of measuring; the rest is skipped")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(x) for x in s.split("/")) for s in args.shapes.split(",")]
    args.pasts = [int(x) for x in args.pasts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(set(args.modes) - set(MODES))}; modes are {', '.join(MODES)}")
    args.max_len = args.max_len or max(args.pasts) + 64
    t0 = time.monotonic()
    import onnxruntime as ort

    device = "cpu"
    if args.device != "cpu":
        try:
            import torch  # (the CUDA libraries onnxruntime-gpu's preload_dlls finds)
        except ImportError:
            pass
        from qonnx.runtime.session import cuda_usable

        device = "cuda" if cuda_usable() else "cpu"
        if device == "cpu" and args.device == "cuda":
            print("bench_gqa_decode: CUDA is not usable here (no GPU or no CUDA provider)", file=sys.stderr)
            return 2
    name = "CPU"
    if device == "cuda":
        try:
            import torch

            name = torch.cuda.get_device_name(0)
        except Exception:
            name = "a CUDA GPU"
    notes = []
    skipped = [m for m in args.modes if m in CUDA_ONLY and device != "cuda"]
    if skipped:
        notes.append(f"Not run ({', '.join(skipped)}): they need the CUDA provider; this run is on the CPU provider.")
    res: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/bench_gqa_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": f"{device} ({name}), {os.cpu_count()} cores",
            "onnxruntime": ort.__version__,
            "layers": args.layers,
            "dtype": args.dtype,
            "max_len": args.max_len,
            "min_time": args.min_time,
            "repeats": args.repeats,
            "notes": notes,
        },
        "records": [],
    }
    print(f"device: {res['meta']['device']}, onnxruntime {ort.__version__}; {notes[0] if notes else ''}", flush=True)
    deadline = t0 + args.budget
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every record: a crash in ONNX Runtime keeps what was measured before it
        res["meta"]["total_s"] = time.monotonic() - t0
        args.out.write_text(json.dumps(res, indent=1))

    for shape in args.shapes:
        measure_shape(shape, args, device, deadline, res["records"], save)
    section = render(res)
    if args.section_out:
        args.section_out.parent.mkdir(parents=True, exist_ok=True)
        args.section_out.write_text(section)
    print("\n" + section, flush=True)
    print(f"wrote {args.out}" + (f" and {args.section_out}" if args.section_out else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU benchmark: fp16 vs qonnx W4A16 (MatMulNBits) Llama models on ONNX Runtime's CUDA provider.

For each size (random weights: speed does not depend on their values) the script builds a Llama model in
fp16 with transformers, exports it with the KV cache through ``qonnx.models.export_causal_lm``, quantizes it
with ``qonnx.quantize`` (W4A16, asymmetric, block 128), and measures on the CUDA provider with IOBinding:

- prefill latency: one forward over ``--prompt-len`` tokens (median of 5),
- decode: ``--new-tokens`` steps of one token each with the KV cache kept on the GPU (present outputs bound
  as the next step's past inputs), at every batch size in ``--batches``; tokens/s = batch * steps / time,
- achieved weight bandwidth: bytes of the model's weights read per decode step / step time, as a fraction
  of the device-to-device copy bandwidth measured in the same run with torch (bytes read + written).

With ``--fuse`` each of the two is also lowered with ``qonnx.pipeline.lowering.lower(target="cuda")`` (RMSNorm,
rotary embedding and attention fused into ONNX Runtime contrib ops; same inputs and outputs, KV cache
included) and measured the same way, and the fused model's logits are compared with the unfused model's on
the device (a prefill and 8 greedy steps).

Run on the GPU machine (see ../shared/device/README.md for onnxruntime-gpu)::

    python benchmarks/bench_gpu.py --sizes 1b,7b --fuse --work /tmp/gpubench --section-out $OUT/gpu.md

then merge the section into RESULTS.md here with ``python benchmarks/bench_gpu.py --merge gpu.md``.
``--sizes tiny --device cpu --fuse`` runs the whole pipeline on a tiny model for a smoke test.

CUDA graphs: with ``--cuda-graph`` (needs ``--fuse --share-kv``) the fused models are also decoded with fixed
shapes (``qonnx.runtime.decode.FixedShapeDecoder``: one KV buffer per layer, a ``[batch, max_len]`` attention mask
of ones then zeros, inputs and logits in fixed device buffers), so that ONNX Runtime captures a decode step once
(provider option ``enable_cuda_graph``) and replays it with one launch per step; its logits are compared with the
shared-buffer loop's on the same tokens. The unfused models cannot be captured: their KV cache grows every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_section

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"

SIZES: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # Llama-2-7B's shape
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), measured with torch."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - t)


def build_and_export(size: str, work: Path, device: str) -> tuple[Path, float, int]:
    """Random fp16 Llama of ``size`` exported with the KV cache; returns (folder, seconds, parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qonnx.models.export import export_causal_lm

    out = work / f"{size}-fp16"
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    dev = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # random init is fast on the GPU; the exporter traces on the CPU
        model = LlamaForCausalLM(cfg).to(torch.float16 if dev == "cuda" else torch.float32).eval()
    model = model.to("cpu")
    params = sum(p.numel() for p in model.parameters())
    if (out / "model.onnx").exists():
        return out, 0.0, params
    t = time.perf_counter()
    export_causal_lm(model, out, dtype="fp16" if dev == "cuda" else "fp32", kv_cache=True, verify=False, quiet=True)
    seconds = time.perf_counter() - t
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out, seconds, params


def quantize(src: Path, work: Path, size: str, symmetric: bool = False, block: int = 128) -> tuple[Path, float]:
    """qonnx W4A16 (block ``block``, asymmetric unless ``symmetric``) of the exported folder."""
    import qonnx

    out = work / f"{size}-w4a16{'-sym' if symmetric else ''}{'' if block == 128 else f'-b{block}'}"
    if (out / "model.onnx").exists():
        return out, 0.0
    t = time.perf_counter()
    qonnx.quantize(src, qonnx.W4A16(block_size=block, symmetric=symmetric), output=out, verify=False)
    return out, time.perf_counter() - t


def lower(
    src: Path, device: str, attention: bool | None = None, merge_linear: bool = True
) -> tuple[Path, dict[str, Any]]:
    """``qonnx lower`` of a folder for the device's provider (verified on the device later, not on the CPU);
    ``attention``: fuse attention too (GroupQueryAttention; default: as ``qonnx lower`` decides);
    ``merge_linear``: q/k/v and gate/up merged into one node each (``qonnx lower``'s default)."""
    from qonnx.pipeline.lowering import lower as run_lower

    out = src.with_name(
        src.name + ("-fused" if attention is False else "-fused-gqa") + ("" if merge_linear else "-sep")
    )
    target = "cuda" if device == "cuda" else "cpu"
    if (out / "model.onnx").exists():
        return out, {"seconds": 0.0, "target": target, "reused": True}
    summary = run_lower(src, out, target=target, attention=attention, verify=False, merge_linear=merge_linear)
    info = {
        "seconds": summary.seconds,
        "target": target,
        "nodes_before": summary.nodes_before,
        "nodes_after": summary.nodes_after,
        "fused": summary.fused,
        "notes": summary.notes,
    }
    return out, info


def weight_bytes(folder: Path) -> int:
    """Bytes a decode step must read at least once: every initializer except tables only gathered from
    (the token embedding: a step reads a few rows of it)."""
    from qonnx.core.modelfile import iter_tensors, load

    model = load(folder)
    total = 0
    for value, t in iter_tensors(model):
        uses = [u.node.op_type for u in value.uses()]
        if uses and all(op == "Gather" for op in uses):
            continue
        total += int(t.nbytes)
    return total


class Runner:
    """IOBinding decode loop for one model folder on one device.

    With ``share_kv`` (fused models only: GroupQueryAttention) each layer's past and present are bound to ONE
    preallocated buffer of ``max_len`` positions: ONNX Runtime then writes the new keys and values in place
    (past_present_share_buffer) instead of copying the whole cache into a new present every step. The model
    and its inputs are unchanged (the lengths still come from ``attention_mask``); ``past`` arguments are
    ignored and ``empty_past`` clears the buffers.
    """

    def __init__(self, folder: Path, device: str, share_kv: bool = False, max_len: int = 0) -> None:
        from qonnx.runtime.session import make_session

        self.share_kv, self.max_len = share_kv, max_len
        self.buffers: dict[str, Any] = {}
        self.session = make_session(folder, device)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        self.dtype = np.float16 if self.inputs[self.past[0]].type == "tensor(float16)" else np.float32

    def _ortvalue(self, arr: np.ndarray) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0)

    def step(self, ids: np.ndarray, past: dict[str, Any], past_len: int) -> tuple[float, dict[str, Any]]:
        """One forward with bound inputs/outputs; returns (seconds, present as OrtValues on the device)."""
        batch, seq = ids.shape
        io = self.session.io_binding()
        io.bind_ortvalue_input("input_ids", self._ortvalue(ids.astype(np.int64)))
        io.bind_ortvalue_input("attention_mask", self._ortvalue(np.ones((batch, past_len + seq), np.int64)))
        pos = np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0)
        io.bind_ortvalue_input("position_ids", self._ortvalue(pos))
        io.bind_output("logits", self.device)  # first: outputs come back in binding order
        if self.share_kv:
            for name, out in zip(self.past, self.present, strict=True):
                io.bind_ortvalue_input(name, self.buffers[name])
                io.bind_ortvalue_output(out, self.buffers[name])
        else:
            for name in self.past:
                io.bind_ortvalue_input(name, past[name])
            for name in self.present:
                io.bind_output(name, self.device)
        io.synchronize_inputs()
        t = time.perf_counter()
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        seconds = time.perf_counter() - t
        outs = io.get_outputs()
        self.logits = outs[0]
        if self.share_kv:
            return seconds, self.buffers
        return seconds, {p: outs[1 + i] for i, p in enumerate(self.past)}

    def empty_past(self, batch: int) -> dict[str, Any]:
        out = {}
        for name in self.past:
            shape = [
                batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(self.inputs[name].shape)
            ]
            shape[2] = self.max_len if self.share_kv else 0
            out[name] = self._ortvalue(np.zeros(shape, self.dtype))
        if self.share_kv:
            self.buffers = out
        return out

    def measure(self, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict[str, float]:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab, size=(batch, prompt_len))
        prefill = []
        for _ in range(5):
            seconds, past = self.step(ids, self.empty_past(batch), 0)
            prefill.append(seconds)
        steps = []
        length = prompt_len
        for _ in range(new_tokens):
            nxt = rng.integers(0, vocab, size=(batch, 1))
            seconds, past = self.step(nxt, past, length)
            steps.append(seconds)
            length += 1
        return decode_figures(batch, prefill, steps, warm=2)


def decode_figures(batch: int, prefill: list[float], steps: list[float], warm: int) -> dict[str, Any]:
    """Median prefill and decode-step times (seconds in, ms out) and tokens/s; the first ``warm`` steps are left
    out when there are more than twice as many."""
    step = statistics.median(steps[warm:] if len(steps) > 2 * warm else steps)
    return {
        "prefill_ms": 1e3 * statistics.median(prefill),
        "step_ms": 1e3 * step,
        "tokens_per_s": batch / step,
        "steps": len(steps),
    }


class GraphRunner:
    """Decode with fixed shapes replayed as a CUDA graph (:class:`qonnx.runtime.decode.FixedShapeDecoder`).

    The model must be lowered by this version (GroupQueryAttention lengths from the mask's sum, constant rotary
    cache). The prompt runs outside the graph; each decode step after the first few (ONNX Runtime runs a step
    normally, then captures) replays one captured graph. Each batch size gets its own decoder and graph.
    """

    def __init__(self, folder: Path, device: str, max_len: int) -> None:
        from qonnx.runtime.session import make_session

        self.session = make_session(folder, device, cuda_graph=True)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.max_len = max_len
        self.decoder: Any = None

    def new_decoder(self, batch: int) -> Any:
        from qonnx.runtime.decode import FixedShapeDecoder

        self.decoder = FixedShapeDecoder(self.session, batch, self.max_len, cuda_graph=True)
        return self.decoder

    # Runner's interface, for compare_logits: empty_past starts a decoder, step(ids, _, 0) is its prompt.
    def empty_past(self, batch: int) -> dict[str, Any]:
        self.new_decoder(batch)
        return {}

    def step(self, ids: np.ndarray, past: dict[str, Any], past_len: int) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        self.logits = self.decoder.prefill(ids) if past_len == 0 else self.decoder.step(ids)
        return time.perf_counter() - t, past

    def measure(self, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict[str, Any]:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab, size=(batch, prompt_len))
        decoder = self.new_decoder(batch)
        prefill = []
        for _ in range(5):
            t = time.perf_counter()
            decoder.prefill(ids)
            prefill.append(time.perf_counter() - t)
        steps = []
        for _ in range(new_tokens):
            nxt = rng.integers(0, vocab, size=(batch, 1))
            t = time.perf_counter()
            decoder.step(nxt)  # synchronizes its outputs
            steps.append(time.perf_counter() - t)
        figures = decode_figures(batch, prefill, steps, warm=4)  # the first steps run normally and capture
        figures["first_steps_ms"] = [round(1e3 * s, 2) for s in steps[:4]]
        return figures


def compare_logits(
    ref: Runner, other: Runner | GraphRunner, prompt_len: int, vocab: int, steps: int = 8
) -> dict[str, float]:
    """Both models on the same tokens (a prefill, then ``steps`` greedy tokens of ``ref``): max |logits diff|
    over the last prefill position and every step, the largest |logit|, and top-1 agreement."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=(1, prompt_len))
    _, past_a = ref.step(ids, ref.empty_past(1), 0)
    _, past_b = other.step(ids, other.empty_past(1), 0)
    diff = scale = 0.0
    agree = 0
    for i in range(steps + 1):
        a = ref.logits.numpy()[:, -1].astype(np.float64)
        b = other.logits.numpy()[:, -1].astype(np.float64)
        diff, scale = max(diff, float(np.abs(a - b).max())), max(scale, float(np.abs(a).max()))
        agree += int(a.argmax() == b.argmax())
        if i == steps:
            break
        nxt = np.array([[int(a.argmax())]])
        _, past_a = ref.step(nxt, past_a, prompt_len + i)
        _, past_b = other.step(nxt, past_b, prompt_len + i)
    return {"max_abs_diff": diff, "max_abs_logit": scale, "top1_agreement": agree / (steps + 1)}


def profile_decode(folder: Path, device: str, out_dir: str, vocab: int) -> None:
    """ONNX Runtime's profile of a few decode steps, summarised by op type and provider (for what limits decode)."""
    import collections

    runner = Runner(folder, device)
    so_path = Path(out_dir)
    so_path.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    from qonnx.core.modelfile import resolve_model_path

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(so_path / "decode")
    so.log_severity_level = 3
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if runner.device == "cuda" else ["CPUExecutionProvider"]
    )
    runner.session = ort.InferenceSession(str(resolve_model_path(folder)), so, providers=providers)
    rng = np.random.default_rng(0)
    _, past = runner.step(rng.integers(0, vocab, size=(1, 128)), runner.empty_past(1), 0)
    for i in range(8):
        _, past = runner.step(rng.integers(0, vocab, size=(1, 1)), past, 128 + i)
    trace = json.loads(Path(runner.session.end_profiling()).read_text())
    by_op: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            a = ev.get("args", {})
            by_op[(a.get("op_name", "?"), a.get("provider", "?"))].append(ev["dur"])
    total = sum(sum(v) for v in by_op.values())
    calls = sum(len(v) for v in by_op.values())
    print(
        f"profile {folder.name}: kernel time over 1 prefill + 8 decode steps = {total / 1e3:.1f} ms, "
        f"{calls} node runs ({calls / 9:.0f} per run)"
    )
    for (op, prov), durs in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(f"  {op:<28} {prov:<24} calls {len(durs):>5}  total {sum(durs) / 1e3:8.2f} ms")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from qonnx.runtime.session import resolve_device

    device = resolve_device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth() if device == "cuda" else float("nan")
    results: dict[str, Any] = {"device": device, "copy_bandwidth": bw, "ort": ort.__version__, "sizes": {}}
    for size in args.sizes.split(","):
        fp16, export_s, params = build_and_export(size, work, device)
        w4, quant_s = quantize(fp16, work, size, symmetric=args.symmetric, block=args.block_size)
        entry: dict[str, Any] = {"params": params, "export_s": export_s, "quantize_s": quant_s, "models": {}}
        pairs: list[tuple[str, Path, Path | None]] = [("fp16", fp16, None), ("w4a16", w4, None)]
        if args.fuse:
            entry["lowered"] = {}
            for i, (label, folder, _) in enumerate(pairs):
                fused, info = lower(
                    folder, device, attention=True if args.share_kv else None, merge_linear=not args.no_merge_linear
                )
                entry["lowered"][label] = info
                pairs[i] = (label, folder, fused)
                print(f"{size} {label} lowered: {json.dumps(info)}", flush=True)
        print(f"{size}: export {export_s:.0f} s, quantize {quant_s:.0f} s", flush=True)
        if args.prepare_only:
            results["sizes"][size] = entry
            continue
        vocab = SIZES[size]["vocab_size"]
        if args.profile:
            profile_decode(w4, device, args.profile, vocab)
            if args.fuse and pairs[1][2] is not None:
                profile_decode(pairs[1][2], device, args.profile, vocab)
        for label, folder, fused in pairs:
            base = measure_model(folder, device, args, vocab, bw, f"{size} {label}", entry["models"], label)
            if fused is None:
                del base
                continue
            other = measure_model(
                fused, device, args, vocab, bw, f"{size} {label} fused", entry["models"], label + " fused"
            )
            if base is not None and other is not None:
                _agreement(entry, size, label, "agreement", "fused vs unfused", base, other, args.prompt_len, vocab)
            del base  # 7B fp16: four sessions at once do not fit in 80 GB
            if args.share_kv and other is not None:
                shared = measure_model(
                    fused, device, args, vocab, bw, f"{size} {label} fused", entry["models"], label + " fused+kv", True
                )
                if shared is not None:
                    what = "fused, shared KV buffer vs separate"
                    _agreement(entry, size, label, "shared_kv_agreement", what, other, shared, args.prompt_len, vocab)
                if args.cuda_graph and shared is not None:
                    graph = measure_model(
                        fused,
                        device,
                        args,
                        vocab,
                        bw,
                        f"{size} {label} fused",
                        entry["models"],
                        label + " fused+graph",
                        graph=True,
                    )
                    if graph is not None:
                        what = "CUDA graph vs shared KV buffer"
                        _agreement(entry, size, label, "graph_agreement", what, shared, graph, args.prompt_len, vocab)
                    del graph
                del shared
            del other
        results["sizes"][size] = entry
    return results


def _agreement(
    entry: dict[str, Any], size: str, label: str, key: str, what: str, ref: Any, other: Any, prompt_len: int, vocab: int
) -> None:
    """compare_logits of two runners into ``entry["lowered"][label][key]``, printed; a failure is recorded too."""
    try:
        check = compare_logits(ref, other, prompt_len, vocab)
    except Exception as e:  # a failing comparison is a finding, not a reason to stop the run
        check = {"error": _first_line(e)}
    entry["lowered"][label][key] = check
    print(f"{size} {label} {what}: {json.dumps(check)}", flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def measure_model(
    folder: Path,
    device: str,
    args: argparse.Namespace,
    vocab: int,
    bw: float,
    name: str,
    into: dict,
    label: str,
    share_kv: bool = False,
    graph: bool = False,
) -> Runner | GraphRunner | None:
    """Measure one model at every batch size into ``into[label]``; its runner, or None when it failed."""
    try:
        wbytes = weight_bytes(folder)
        max_len = args.prompt_len + args.new_tokens + 16
        runner: Runner | GraphRunner = (
            GraphRunner(folder, device, max_len) if graph else Runner(folder, device, share_kv, max_len)
        )
        rows = {}
        for batch in (int(b) for b in args.batches.split(",")):
            m = runner.measure(batch, args.prompt_len, args.new_tokens, vocab)
            m["weight_gbps"] = wbytes / (m["step_ms"] / 1e3) / 1e9
            m["bw_fraction"] = (wbytes / (m["step_ms"] / 1e3)) / bw if bw == bw else float("nan")
            rows[batch] = m
            print(f"{name} batch {batch}: {json.dumps(m)}", flush=True)
    except Exception as e:  # e.g. a fused op the provider does not take: record it and go on
        into[label] = {"error": _first_line(e)}
        print(f"{name}: failed: {into[label]['error']}", flush=True)
        return None
    into[label] = {"weight_bytes": wbytes, "batches": rows}
    return runner


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    bw = results["copy_bandwidth"]
    fuse = (" --fuse" if args.fuse else "") + (" --share-kv" if args.share_kv else "")
    fuse += " --cuda-graph" if args.cuda_graph else ""
    fuse += " --no-merge-linear" if args.no_merge_linear else ""
    fuse += " --symmetric" if args.symmetric else ""
    fuse += f" --block-size {args.block_size}" if args.block_size != 128 else ""
    fpa = os.environ.get("ORT_FPA_INTB_GEMM")
    fuse += f"` with `ORT_FPA_INTB_GEMM={fpa}" if fpa else ""
    lines = [
        START,
        "## GPU: fp16 vs qonnx W4A16 (MatMulNBits) on ONNX Runtime's CUDA provider"
        + (", unfused and fused (`qonnx lower --target cuda`)" if args.fuse else ""),
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python benchmarks/bench_gpu.py --sizes {args.sizes} --batches {args.batches} --prompt-len {args.prompt_len} "
        f"--new-tokens {args.new_tokens}{fuse}` on the lent GPU ({results.get('gpu', 'see device')}), onnxruntime-gpu "
        f"{results['ort']}, Python {platform.python_version()}.",
        "Random-weight Llama models (TinyLlama-1.1B and Llama-2-7B shapes), exported by "
        "`qonnx.models.export_causal_lm` (fp16, KV cache), quantized by "
        + f"`qonnx.quantize(W4A16(block_size={args.block_size}{', symmetric=True' if args.symmetric else ''}))`"
        + ("; fused = the same model after `qonnx.pipeline.lowering.lower(target=...)`" if args.fuse else "")
        + (
            "; fused+kv = the fused model with past and present bound to one KV buffer per layer"
            if args.share_kv
            else ""
        )
        + (
            "; fused+graph = fused+kv decoded with fixed shapes (a [batch, max_len] attention mask, "
            "`qonnx.runtime.decode.FixedShapeDecoder`), each step replaying one captured CUDA graph"
            if args.cuda_graph
            else ""
        )
        + f"; IOBinding with the KV cache on the GPU; prefill = {args.prompt_len} tokens (median of 5); "
        f"decode = median step of {args.new_tokens} steps. "
        f"Copy bandwidth measured in the same run: {bw / 1e12:.2f} TB/s (read + written). "
        "Weight bandwidth = bytes of all weights but the gathered embedding / decode step time; fraction = that / "
        "copy bandwidth.",
        "",
        "| model | params | weights (GB) | batch | prefill (ms) | decode step (ms) | tokens/s | vs fp16 | "
        "fused / unfused | weight GB/s | of copy BW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, entry in results["sizes"].items():
        models = entry["models"]
        fp = models.get("fp16", {}).get("batches", {})
        for label, model in models.items():
            if "error" in model:
                lines.append(f"| {size} {label} | failed: {model['error']} | | | | | | | | | |")
                continue
            unfused = models.get(label.split(" fused")[0], {}).get("batches", {})
            for batch, m in model["batches"].items():
                ratio = m["tokens_per_s"] / fp[batch]["tokens_per_s"] if batch in fp else float("nan")
                gain = (
                    f"{m['tokens_per_s'] / unfused[batch]['tokens_per_s']:.2f}x"
                    if " fused" in label and batch in unfused
                    else ""
                )
                lines.append(
                    f"| {size} {label} | {entry['params'] / 1e9:.2f} B | {model['weight_bytes'] / 1e9:.2f} | {batch} | "
                    f"{m['prefill_ms']:.1f} | {m['step_ms']:.2f} | {m['tokens_per_s']:.1f} | {ratio:.2f}x | {gain} | "
                    f"{m['weight_gbps']:.0f} | {m['bw_fraction']:.0%} |"
                )
        lines.append(
            f"| {size}: export {entry['export_s']:.0f} s, quantize {entry['quantize_s']:.0f} s | | | | | | | | | | |"
        )
    notes = [
        _lowering_note(size, label, info)
        for size, e in results["sizes"].items()
        for label, info in e.get("lowered", {}).items()
    ]
    if notes:
        lines += [
            "",
            "Lowering (nodes before -> after, fused ops; the fused model's logits against the unfused one's on the "
            "device, over the last prompt position and 8 greedy steps):",
            "",
            *notes,
        ]
    lines += ["", END]
    return "\n".join(lines)


def _lowering_note(size: str, label: str, info: dict[str, Any]) -> str:
    """One line per lowered model for the section."""
    if info.get("reused"):
        head = f"- {size} {label}: lowered in an earlier run (reused)"
    else:
        ops = ", ".join(f"{op} {n}" for op, n in info["fused"].items())
        head = f"- {size} {label} ({info['target']}): {info['nodes_before']} -> {info['nodes_after']} nodes; {ops}"
        head += f"; {info['seconds']:.0f} s" + "".join(f"; {n}" for n in info.get("notes", []))
    shared = info.get("shared_kv_agreement")
    if shared is not None:
        head += (
            f"; shared KV buffer against separate past/present: comparison failed: {shared['error']}"
            if "error" in shared
            else f"; shared KV buffer against separate past/present: max |logits difference| "
            f"{shared['max_abs_diff']:.3g}, top-1 agreement {shared['top1_agreement']:.0%}"
        )
    graph = info.get("graph_agreement")
    if graph is not None:
        head += (
            f"; CUDA graph against shared KV buffer: comparison failed: {graph['error']}"
            if "error" in graph
            else f"; CUDA graph against shared KV buffer: max |logits difference| "
            f"{graph['max_abs_diff']:.3g}, top-1 agreement {graph['top1_agreement']:.0%}"
        )
    check = info.get("agreement")
    if check is None:
        return head
    if "error" in check:
        return f"{head}; comparison failed: {check['error']}"
    return (
        f"{head}; max |logits difference| {check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}), "
        f"top-1 agreement {check['top1_agreement']:.0%}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1b,7b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--work", default="/tmp/qonnx-gpubench")
    p.add_argument("--section-out", help="write the RESULTS.md section to this file instead of RESULTS.md")
    p.add_argument("--json-out", help="also write the raw results as JSON here")
    p.add_argument("--merge", help="merge a section file written on the GPU machine into RESULTS.md and exit")
    p.add_argument("--prepare-only", action="store_true", help="export and quantize, measure nothing")
    p.add_argument("--profile", metavar="DIR", help="also profile W4A16 decode steps with ONNX Runtime into DIR")
    p.add_argument("--fuse", action="store_true", help="also lower both models (qonnx lower) and measure them")
    p.add_argument("--symmetric", action="store_true", help="W4A16 with symmetric weights (no zero points)")
    p.add_argument("--block-size", type=int, default=128, help="W4A16 block size (32 with --symmetric: fpA_intB)")
    p.add_argument(
        "--share-kv",
        action="store_true",
        help="with --fuse: fuse attention too (GroupQueryAttention) and also measure the fused models with past "
        "and present bound to one KV buffer per layer",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="with --share-kv: also decode the fused models with fixed shapes, each step a replayed CUDA graph",
    )
    p.add_argument(
        "--no-merge-linear",
        action="store_true",
        help="with --fuse: lower without merging q/k/v and gate/up (qonnx lower --no-merge-linear)",
    )
    args = p.parse_args(argv)
    if args.cuda_graph and not args.share_kv:
        p.error("--cuda-graph needs --fuse --share-kv")
    results_md = HERE / "RESULTS.md"
    if args.merge:
        write_section(results_md, Path(args.merge).read_text().strip(), START, END)
        return 0
    results = run(args)
    try:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch without CUDA
        results["gpu"] = "no GPU"
    section = render(results, args)
    print(section)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    if args.section_out:
        Path(args.section_out).write_text(section)
    else:
        write_section(results_md, section, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

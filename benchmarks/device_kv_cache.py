"""Quantized KV cache on the device: decode tokens/s and KV memory, float vs int8 vs int4 cache, W4A16 weights.

A random Llama of ``--size`` (default 7b: Llama-2-7B's shape, 32 KV heads; speed does not depend on the weights'
values) is exported in fp16 with enough positions for the longest context, quantized W4A16 (asymmetric, block
128) and lowered for the provider (GroupQueryAttention), as ``bench_gpu.py`` does. Its int8 and int4 cache
variants are written by :class:`qonnx.passes.kv_cache.QuantizeKVCachePass` with unit ranges (no calibration: a
random model has no text to calibrate on, and the timing does not depend on the scales).

Each variant decodes with :class:`qonnx.runtime.decode.FixedShapeDecoder` (one shared KV buffer per layer; on
CUDA each step replays one captured CUDA graph) at every context in ``--contexts`` and batch in ``--batches``:
a 16-token prompt is run, the decoder is then told ``context`` positions are filled (the buffers' contents do
not change the time a step takes: every step reads ``context`` positions of every layer), and ``--new-tokens``
steps are timed (median, the first 4 left out: they run normally and capture). KV memory is the bytes of the
shared buffers (exact, from their shapes and types); ``gpu_used_gib`` is the device memory in use then (torch's
``mem_get_info``, all processes). A configuration that does not fit is recorded with its error.

``--probe`` first runs one GroupQueryAttention node (fp16 on CUDA, float32 on the CPU) with each cache type and
quant type, and reports whether the provider runs it and how far its output is from the float cache's; the prompt
attention is included (on the CPU it reads the quantized cache too, see passes/kv_cache.py).

On the GPU machine::

    python benchmarks/device_kv_cache.py --probe --work /tmp/kv --out $OUT/kv_cache.json

A smoke test on the CPU with a tiny model (a minute)::

    python benchmarks/device_kv_cache.py --size tiny --device cpu --contexts 64,200 --batches 1,2 \\
        --new-tokens 8 --probe --work /tmp/kvtiny --out /tmp/kvtiny/kv_cache.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_gpu import SIZES, lower, quantize

VARIANTS = ("float", "int8", "int4")


def build(size: str, work: Path, device: str, positions: int) -> Path:
    """A random Llama of ``size`` exported with the KV cache (fp16 on CUDA) and ``positions`` positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qonnx.models.export import export_causal_lm

    out = work / f"{size}-p{positions}"
    if (out / "model.onnx").exists():
        return out
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    dev = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.float16 if dev == "cuda" else torch.float32).eval()
    model = model.to("cpu")
    export_causal_lm(model, out, dtype="fp16" if dev == "cuda" else "fp32", kv_cache=True, verify=False, quiet=True)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def cache_variant(lowered: Path, kv_cache: str) -> Path:
    """The lowered model with its KV cache in ``kv_cache`` (int8 / int4), unit ranges."""
    from qonnx.core import modelfile
    from qonnx.passes.kv_cache import QuantizeKVCachePass, kv_cache_layers

    out = lowered.with_name(f"{lowered.name}-kv{kv_cache}")
    if (out / "model.onnx").exists():
        return out
    model = modelfile.load(modelfile.resolve_model_path(lowered))
    ranges = {}
    for layer in kv_cache_layers(model):
        for value in (layer.past_key, layer.past_value):
            ranges[value.name] = np.ones((layer.kv_heads, layer.head_size), np.float32)
    QuantizeKVCachePass(kv_cache, ranges)(model)
    out.mkdir(parents=True, exist_ok=True)
    modelfile.save(model, out / "model.onnx")
    return out


def gpu_used_gib() -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return round((total - free) / 2**30, 2)
    except Exception:  # no torch or no GPU: not measured
        return None


def measure(session: Any, batch: int, context: int, new_tokens: int, vocab: int, cuda_graph: bool) -> dict[str, Any]:
    """Decode ``new_tokens`` steps after ``context`` filled positions; step time, tokens/s and KV bytes."""
    from qonnx.runtime.decode import FixedShapeDecoder

    rng = np.random.default_rng(0)
    max_len = context + new_tokens + 16
    need = sum(
        batch * i.shape[1] * max_len * i.shape[3] * _SIZES[i.type]
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    )
    free = _gpu_free() if "CUDAExecutionProvider" in session.get_providers() else None
    if free is not None and need > 0.9 * free:  # refused before the host allocates the zeros it copies from
        return {
            "error": f"does not fit: KV buffers {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
            "kv_mib": round(need / 2**20, 2),
        }
    decoder = FixedShapeDecoder(session, batch, max_len, cuda_graph=cuda_graph)
    kv_bytes = sum(_ortvalue_bytes(v) for v in decoder.kv.values())
    decoder.prefill(rng.integers(0, vocab, size=(batch, 16)))
    decoder.length = context  # what a step reads: every position up to here
    decoder.mask[:, :context] = 1
    steps = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        decoder.step(rng.integers(0, vocab, size=(batch, 1)))
        steps.append(time.perf_counter() - t)
    step = statistics.median(steps[4:] if len(steps) > 8 else steps)
    out = {
        "step_ms": round(1e3 * step, 3),
        "tokens_per_s": round(batch / step, 1),
        "kv_mib": round(kv_bytes / 2**20, 2),
        "gpu_used_gib": gpu_used_gib(),
        "first_steps_ms": [round(1e3 * s, 2) for s in steps[:4]],
    }
    del decoder
    gc.collect()
    return out


_SIZES = {"tensor(float16)": 2, "tensor(float)": 4, "tensor(int8)": 1, "tensor(uint8)": 1, "tensor(bfloat16)": 2}


def _ortvalue_bytes(value: Any) -> int:
    return int(np.prod(value.shape())) * _SIZES[value.data_type()]


def _gpu_free() -> int | None:
    try:
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    except Exception:  # no torch: not checked
        return None


def probe(device: str) -> dict[str, Any]:
    """One GroupQueryAttention, prompt of 6 then 3 decode steps, with each cache type: runs? error vs float cache."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    half = device == "cuda"
    elem, np_float = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    b, n, kv, h = 1, 4, 2, 64

    def session(quant: str, bits: int, cache_elem: int, scale_shape: list[int]) -> Any:
        info = helper.make_tensor_value_info
        inputs = [
            info("query", elem, [b, "S", n * h]),
            info("key", elem, [b, "S", kv * h]),
            info("value", elem, [b, "S", kv * h]),
            info("past_key", cache_elem, [b, kv, "P", None]),
            info("past_value", cache_elem, [b, kv, "P", None]),
            info("seqlens_k", TensorProto.INT32, [b]),
            info("total", TensorProto.INT32, []),
            info("k_scale", TensorProto.FLOAT, scale_shape),
            info("v_scale", TensorProto.FLOAT, scale_shape),
        ]
        attrs: dict[str, Any] = {"num_heads": n, "kv_num_heads": kv}
        if quant != "NONE":
            attrs.update(k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=bits)
        names = [i.name for i in inputs[:7]] + [""] * 5 + ["k_scale", "v_scale"]
        node = helper.make_node(
            "GroupQueryAttention", names, ["out", "present_key", "present_value"], domain="com.microsoft", **attrs
        )
        outputs = [
            info("out", elem, None),
            info("present_key", cache_elem, None),
            info("present_value", cache_elem, None),
        ]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        proto = helper.make_model(helper.make_graph([node], "g", inputs, outputs), opset_imports=opsets, ir_version=10)
        return ort.InferenceSession(proto.SerializeToString(), providers=[provider])

    def run(sess: Any, cache_dtype: Any, width: int, scale: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        past_k = past_v = np.zeros((b, kv, 0, width), cache_dtype)
        outs, length = [], 0
        for s in (6, 1, 1, 1):
            q, k, v = (rng.standard_normal((b, s, c)).astype(np_float) for c in (n * h, kv * h, kv * h))
            length += s
            feeds = {
                "query": q,
                "key": k,
                "value": v,
                "past_key": past_k,
                "past_value": past_v,
                "seqlens_k": np.array([length - 1], np.int32),
                "total": np.array(length, np.int32),
                "k_scale": scale,
                "v_scale": scale,
            }
            o, past_k, past_v = sess.run(None, feeds)
            outs.append(o.astype(np.float32))
        return outs

    one = np.ones(1, np.float32)
    base = run(session("NONE", 8, elem, [1]), np_float, h, one)
    results: dict[str, Any] = {"provider": provider}
    for quant in ("PER_TENSOR", "PER_CHANNEL"):
        for bits, cache_elem, cache_dtype, qmax in (
            (8, TensorProto.INT8, np.int8, 127),
            (4, TensorProto.UINT8, np.uint8, 7),
        ):
            shape = [1] if quant == "PER_TENSOR" else [1, kv, 1, h]
            scale = np.full(shape, 4.0 / qmax, np.float32)
            key = f"{quant.lower()}-int{bits}"
            try:
                outs = run(session(quant, bits, cache_elem, shape), cache_dtype, h if bits == 8 else h // 2, scale)
                errors = [float(np.abs(a - r).max()) for a, r in zip(outs, base, strict=True)]
                results[key] = {"runs": True, "max_error_prompt": errors[0], "max_error_steps": max(errors[1:])}
            except Exception as e:  # the provider refuses it: what we came to find out
                results[key] = {"runs": False, "error": str(e).strip().splitlines()[0][-300:]}
            print("probe", key, json.dumps(results[key]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="7b", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--probe", action="store_true", help="first check the provider's GroupQueryAttention cache types")
    ap.add_argument("--no-cuda-graph", action="store_true")
    args = ap.parse_args(argv)
    from qonnx.runtime.session import make_session

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {"size": args.size, "device": args.device, "new_tokens": args.new_tokens, "runs": {}}
    out = Path(args.out)
    if args.probe:
        results["probe"] = probe(args.device)
        out.write_text(json.dumps(results, indent=1))
    exported = build(args.size, work, args.device, max(contexts) + args.new_tokens + 64)
    weights, _ = quantize(exported, work, f"{args.size}-p{max(contexts) + args.new_tokens + 64}")
    lowered, _ = lower(weights, args.device, attention=True)
    vocab = SIZES[args.size]["vocab_size"]
    graph = args.device == "cuda" and not args.no_cuda_graph
    for variant in args.variants.split(","):
        folder = lowered if variant == "float" else cache_variant(lowered, variant)
        session = make_session(folder, args.device, cuda_graph=graph)
        rows = results["runs"].setdefault(variant, {})
        for context in contexts:
            for batch in batches:
                key = f"ctx{context}-b{batch}"
                try:
                    rows[key] = measure(session, batch, context, args.new_tokens, vocab, graph)
                except Exception as e:  # out of memory at a long context or a large batch: recorded
                    rows[key] = {"error": str(e).strip().splitlines()[0][-300:]}
                gc.collect()
                print(variant, key, json.dumps(rows[key]), flush=True)
                out.write_text(json.dumps(results, indent=1))
        del session
        gc.collect()
    base = results["runs"].get("float", {})
    for variant, rows in results["runs"].items():
        parts = []
        for key, row in rows.items():
            ref = base.get(key, {})
            speed = f"{row['tokens_per_s']} tok/s" if "tokens_per_s" in row else "error"
            if "tokens_per_s" in row and "tokens_per_s" in ref:
                speed += f" ({row['tokens_per_s'] / ref['tokens_per_s']:.2f}x)"
            parts.append(f"{key}: {speed}, KV {row.get('kv_mib', '?')} MiB")
        print(f"{variant}: " + "; ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

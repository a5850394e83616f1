"""Which weight form is fastest on ONNX Runtime's CUDA provider, per layer shape and token count M?

One Llama-7B layer shape at a time (K x N), fp16 activations, IOBinding, median of ``--runs`` runs after a
warm-up at each M. Forms (each checked against numpy on the dequantized weight: SQNR in dB):

- ``fp16``: MatMul on fp16 weights (the baseline),
- ``mnb-asym-b128``: MatMulNBits 4-bit, zero points, block 128 (qonnx's default W4A16),
- ``mnb-sym-b32-fpa``: symmetric block 32 with the session option ``ep.cuda.fpa_intb_gemm=1``,
- ``mnb-sym-bB-pp1`` / ``pp2``: symmetric, weights prepacked for the CUTLASS mixed GEMM (SM80 layout,
  ``weight_prepacked=1``; SM90 layout, ``weight_prepacked=2``) with ONNX Runtime's own packer,
- ``dq-b128+matmul``: blocked int4 DequantizeLinear then fp16 MatMul (the weight dequantized on every call),
- ``fp8-blockw``: ``MatMulBlockQuantizedFp8Weight`` (E4M3 weights, block 128 scales),
- ``fp8-gemm``: QuantizeLinear(E4M3, per tensor) + ``GemmFloat8`` (Hopper FP8 tensor cores).

Run on the GPU machine: ``python benchmarks/device_cuda_forms.py --out $OUT/forms.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def model(nodes: list, inits: list, K: int, N: int) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", T.FLOAT16, ["M", K])],
                          [helper.make_tensor_value_info("Y", T.FLOAT16, ["M", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    return m.SerializeToString()


def raw(name: str, dt: int, a: np.ndarray) -> Any:
    return helper.make_tensor(name, dt, list(a.shape), np.ascontiguousarray(a).tobytes(), raw=True)


def int4_blocks(w: np.ndarray, bs: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] -> codes [N, K/bs, bs] uint8 in [0, 15], scales [N, K/bs], zero points [N, K/bs], dequantized [K, N]."""
    K, N = w.shape
    blk = w.T.reshape(N, K // bs, bs).astype(np.float32)
    if sym:
        s = np.abs(blk).max(-1) / 8
        z = np.full(s.shape, 8.0, np.float32)
    else:
        lo, hi = np.minimum(blk.min(-1), 0), np.maximum(blk.max(-1), 0)
        s = (hi - lo) / 15
        z = np.clip(np.rint(-lo / s), 0, 15)
    s = s.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blk / s[..., None]) + z[..., None], 0, 15).astype(np.uint8)
    deq = ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(N, K).T
    return q, s, z.astype(np.uint8), deq


def nibbles(q: np.ndarray) -> np.ndarray:  # [..., bs] -> [..., bs/2], low nibble first (MatMulNBits)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def mnb_form(w: np.ndarray, bs: int, sym: bool, prepacked: int = 0) -> tuple[bytes, np.ndarray]:
    K, N = w.shape
    q, s, z, deq = int4_blocks(w, bs, sym)
    packed = nibbles(q)  # [N, K/bs, bs/2]
    if prepacked:
        from onnxruntime.quantization import cuda_quantizer as cq  # only on the GPU machine

        arch = 80 if prepacked == 1 else 90
        packed = np.asarray(cq._pack_weights_for_cuda_mixed_gemm(packed.reshape(N, -1), N, K, 4, arch))
        packed = packed.view(np.uint8).reshape(N, K // bs, bs // 2)
    inits = [raw("B", T.UINT8, packed), raw("S", T.FLOAT16, s.astype(np.float16).reshape(-1))]
    ins = ["A", "B", "S"]
    if not sym:
        kb = K // bs
        zz = z.reshape(N, kb)
        if kb % 2:
            zz = np.concatenate([zz, np.zeros((N, 1), np.uint8)], 1)
        inits.append(raw("Z", T.UINT8, nibbles(zz).reshape(-1)))
        ins.append("Z")
    attrs: dict[str, Any] = dict(K=K, N=N, bits=4, block_size=bs)
    if prepacked:
        attrs["weight_prepacked"] = prepacked
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", **attrs)
    return model([node], inits, K, N), deq


def dq_form(w: np.ndarray, bs: int) -> tuple[bytes, np.ndarray]:
    K, N = w.shape
    q, s, z, deq = int4_blocks(w, bs, sym=False)
    codes = q.reshape(N, K).T  # [K, N]
    inits = [helper.make_tensor("Wq", T.UINT4, [K, N], codes.reshape(-1).tolist()),
             raw("Ws", T.FLOAT16, s.T.astype(np.float16)),
             helper.make_tensor("Wz", T.UINT4, [K // bs, N], z.T.reshape(-1).tolist())]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=0, block_size=bs),
             helper.make_node("MatMul", ["A", "W"], ["Y"])]
    return model(nodes, inits, K, N), deq


def fp8_forms(w: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    K, N = w.shape
    bs = 128
    sc = np.abs(w.reshape(K // bs, bs, N)).max(1) / 448  # [K/bs, N]
    codes = (w.reshape(K // bs, bs, N) / sc[:, None, :]).astype(ml_dtypes.float8_e4m3fn)
    deq = (codes.astype(np.float32) * sc[:, None, :]).reshape(K, N)
    blockw = model([helper.make_node("MatMulBlockQuantizedFp8Weight", ["A", "W8", "bsc"], ["Y"], domain="com.microsoft",
                                     block_size=bs)],
                   [raw("W8", T.FLOAT8E4M3FN, codes.reshape(K, N).T.copy().view(np.uint8)),
                    raw("bsc", T.FLOAT, sc.T.astype(np.float32).copy())], K, N)
    ws = float(np.abs(w).max() / 448)
    w8 = (w / ws).astype(ml_dtypes.float8_e4m3fn)
    a_scale = 4.0 / 448  # activations are N(0, 0.5): |a| < 4
    one = lambda n, v, dt=T.FLOAT: helper.make_tensor(n, dt, [], [v])  # noqa: E731
    gemm = model([helper.make_node("QuantizeLinear", ["A", "sa", "za"], ["A8"]),
                  helper.make_node("GemmFloat8", ["A8", "W8", "", "sa32", "sw"], ["Y"], domain="com.microsoft",
                                   transB=1, dtype=10)],
                 [raw("W8", T.FLOAT8E4M3FN, w8.T.copy().view(np.uint8)), one("sa", a_scale, T.FLOAT16),
                  raw("za", T.FLOAT8E4M3FN, np.zeros((), ml_dtypes.float8_e4m3fn).view(np.uint8)),
                  one("sa32", a_scale), one("sw", ws)], K, N)
    return {"fp8-blockw": (blockw, deq), "fp8-gemm": (gemm, w8.astype(np.float32) * ws)}


def bench(blob: bytes, deq: np.ndarray, cfg: dict[str, str], runs: int, rng: np.random.Generator) -> dict[int, Any]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in cfg.items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(blob, so, providers=["CUDAExecutionProvider"])
    K, N = deq.shape
    out: dict[int, Any] = {}
    for M in MS:
        x = (rng.standard_normal((M, K)) * 0.5).astype(np.float16)
        a = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        y = ort.OrtValue.ortvalue_from_shape_and_type((M, N), np.float16, "cuda", 0)
        io = s.io_binding()
        io.bind_ortvalue_input("A", a)
        io.bind_ortvalue_output("Y", y)
        try:
            for _ in range(10):
                s.run_with_iobinding(io)
            io.synchronize_outputs()
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run_with_iobinding(io)
                io.synchronize_outputs()
                times.append(time.perf_counter() - t)
        except Exception as e:  # a form the build lacks: record why
            out[M] = {"error": str(e).splitlines()[0][-160:]}
            break
        ref = x.astype(np.float32) @ deq
        got = y.numpy().astype(np.float32)
        err = float(((ref - got) ** 2).sum())
        out[M] = {"us": statistics.median(times) * 1e6,
                  "sqnr": 10 * np.log10((ref ** 2).sum() / max(err, 1e-30))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    args = ap.parse_args(argv)
    ort.preload_dlls()
    results: dict[str, Any] = {"ort": ort.__version__, "shapes": {}}
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
        w16 = w.astype(np.float16)
        fpa = {"ep.cuda.fpa_intb_gemm": "1"}
        forms: dict[str, tuple[bytes, np.ndarray, dict[str, str]]] = {
            "fp16": (model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [raw("W", T.FLOAT16, w16)], K, N),
                     w16.astype(np.float32), {}),
            "mnb-asym-b128": (*mnb_form(w, 128, False), {}),
            "mnb-sym-b32-fpa": (*mnb_form(w, 32, True), fpa),
        }
        for bs in (64, 128):
            for pp in (1, 2):
                try:
                    forms[f"mnb-sym-b{bs}-pp{pp}"] = (*mnb_form(w, bs, True, pp), fpa)
                except Exception as e:
                    print(f"{shape} pp{pp} b{bs}: packing failed: {e}", flush=True)
        forms["dq-b128+matmul"] = (*dq_form(w, 128), {})
        for name, (blob, deq) in fp8_forms(w).items():
            forms[name] = (blob, deq, {})
        row: dict[str, Any] = {}
        for name, (blob, deq, cfg) in forms.items():
            try:
                row[name] = bench(blob, deq, cfg, args.runs, rng)
            except Exception as e:
                row[name] = {"error": str(e).splitlines()[0][-200:]}
            r = row[name]
            base = row.get("fp16", {})
            cells = []
            if "error" in r:
                cells.append("ERR " + r["error"])
            else:
                for M, v in r.items():
                    if "error" in v:
                        cells.append(f"M{M}: ERR {v['error']}")
                    else:
                        ratio = base[M]["us"] / v["us"] if M in base and "us" in base[M] else float("nan")
                        cells.append(f"M{M}:{v['us']:.0f}us {ratio:.2f}x {v['sqnr']:.0f}dB")
            print(f"{shape} {name}: " + "  ".join(cells), flush=True)
        results["shapes"][shape] = row
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

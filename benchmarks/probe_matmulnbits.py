"""Probe ONNX Runtime's CUDA MatMulNBits paths at M=1: plain, fpA_intB enabled (session config), prepacked SM80."""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

ort.preload_dlls()


def model(pre, K, N, bs=128):
    attrs = dict(K=K, N=N, bits=4, block_size=bs)
    if pre is not None:
        attrs["weight_prepacked"] = pre
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", **attrs)
    rng = np.random.default_rng(0)
    b = rng.integers(0, 255, (N, K // bs, bs // 2)).astype(np.uint8)
    B = helper.make_tensor("B", T.UINT8, list(b.shape), b.tobytes(), raw=True)
    S = helper.make_tensor(
        "S", T.FLOAT16, [N * (K // bs)], np.full(N * (K // bs), 0.01, np.float16).tobytes(), raw=True
    )
    nz = N * ((K // bs + 1) // 2)
    Z = helper.make_tensor("Z", T.UINT8, [nz], np.full(nz, 0x88, np.uint8).tobytes(), raw=True)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", T.FLOAT16, [1, K])],
        [helper.make_tensor_value_info("Y", T.FLOAT16, [1, N])],
        [B, S, Z],
    )
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=ops, ir_version=10).SerializeToString()


for K, N in ((4096, 4096), (4096, 11008), (11008, 4096)):
    for pre in (None, 1):
        for cfg in ({}, {"ep.cuda.fpa_intb_gemm": "1"}):
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                for k, v in cfg.items():
                    so.add_session_config_entry(k, v)
                s = ort.InferenceSession(model(pre, K, N), so, providers=["CUDAExecutionProvider"])
                a = ort.OrtValue.ortvalue_from_numpy(np.ones((1, K), np.float16), "cuda", 0)
                y = ort.OrtValue.ortvalue_from_shape_and_type((1, N), np.float16, "cuda", 0)
                io = s.io_binding()
                io.bind_ortvalue_input("A", a)
                io.bind_ortvalue_output("Y", y)
                for _ in range(20):
                    s.run_with_iobinding(io)
                io.synchronize_outputs()
                t = time.perf_counter()
                for _ in range(200):
                    s.run_with_iobinding(io)
                io.synchronize_outputs()
                us = (time.perf_counter() - t) / 200 * 1e6
                print(K, N, pre, cfg, "ok", float(y.numpy()[0, 0]), f"{us:.1f} us, {K * N / 2 / us / 1e6:.2f} TB/s")
            except Exception as e:
                print(K, N, pre, cfg, "ERR", str(e).splitlines()[0][-200:])

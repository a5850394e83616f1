"""One SmolLM2 MLP layer shape (K=576, N=1536), decode (M=1) and prefill (M=128), 1 thread: min over rounds.
Forms: float MatMul; kept Q4_1 (symmetric MatMulNBits + block-sum offset, fp16 d/m Cast-folded);
MatMulNBits float zero points zp=-m/d (fp32 scales); RTN-like uint8 zero points (speed reference)."""

import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

rng = np.random.default_rng(0)
K, N = 576, 1536
nb = K // 32
q = rng.integers(0, 16, (N, nb, 32)).astype(np.uint8)
d = (rng.random((N, nb)) * 0.02 + 0.001).astype(np.float16)
m = (-rng.random((N, nb)) * 0.1).astype(np.float16)
W = (d.astype(np.float32)[..., None] * q + m.astype(np.float32)[..., None]).reshape(N, K).T.copy()
B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def model(nodes, inits):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", 1, ["b", "s", K])],
        [helper.make_tensor_value_info("Y", 1, ["b", "s", N])],
        inits,
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    ).SerializeToString()


def mnb(ins, out="Y"):
    return helper.make_node("MatMulNBits", ins, [out], domain="com.microsoft", K=K, N=N, bits=4, block_size=32)


forms = {
    "float MatMul": model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(W, "W")]),
    "kept Q4_1 (split)": model(
        [
            helper.make_node("Cast", ["d16"], ["d32"], to=1),
            mnb(["A", "B", "d32"], "Y0"),
            helper.make_node("Cast", ["m16"], ["m32"], to=1),
            helper.make_node("Transpose", ["d32"], ["dT"], perm=[1, 0]),
            helper.make_node("Mul", ["dT", "eight"], ["d8"]),
            helper.make_node("Add", ["m32", "d8"], ["off"]),
            helper.make_node("Reshape", ["A", "shp"], ["Ab"]),
            helper.make_node("ReduceSum", ["Ab", "ax"], ["S"], keepdims=0),
            helper.make_node("MatMul", ["S", "off"], ["Y1"]),
            helper.make_node("Add", ["Y0", "Y1"], ["Y"]),
        ],
        [
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(d, "d16"),
            numpy_helper.from_array(np.ascontiguousarray(m.T), "m16"),
            numpy_helper.from_array(np.array(8, np.float32), "eight"),
            numpy_helper.from_array(np.array([0, 0, nb, 32], np.int64), "shp"),
            numpy_helper.from_array(np.array([-1], np.int64), "ax"),
        ],
    ),
    "float zero points": model(
        [mnb(["A", "B", "s", "zp"])],
        [
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(d.astype(np.float32), "s"),
            numpy_helper.from_array(-(m.astype(np.float32) / d.astype(np.float32)), "zp"),
        ],
    ),
    "uint8 zero points": model(
        [mnb(["A", "B", "s", "zp"])],
        [
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(d.astype(np.float32), "s"),
            numpy_helper.from_array(np.full((N, (nb + 1) // 2), 0x88, np.uint8), "zp"),
        ],
    ),
}
so = ort.SessionOptions()
so.intra_op_num_threads = 1
sess = {k: ort.InferenceSession(v, so, providers=["CPUExecutionProvider"]) for k, v in forms.items()}
for M in (1, 128):
    A = rng.standard_normal((1, M, K)).astype(np.float32)
    ref = A @ W
    best = {k: 1e9 for k in sess}
    for _ in range(7):
        for k, s in sess.items():
            y = s.run(None, {"A": A})[0]
            t = time.perf_counter()
            for _ in range(20):
                s.run(None, {"A": A})
            best[k] = min(best[k], (time.perf_counter() - t) / 20)
    for k in sess:
        err = np.abs(sess[k].run(None, {"A": A})[0] - ref).max()
        print(f"M={M:4d} {k:20s} {best[k] * 1e3:8.3f} ms  max|y - x@W| {err:.1e}")

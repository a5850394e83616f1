"""The weight-only pass: outputs equal the dequantized weights and ONNX Runtime's quantizer's codes; Gemm,
Cast/Transpose chains, shared weights, skips with reasons.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import matmul_model
from helpers import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.core import packing, quant

CASES = [  # (config, SQNR bound in dB on the tiny decoder)
    (qonnx.W4A16(block_size=32), 12),
    (qonnx.W4A16(block_size=16, symmetric=True), 12),
    (qonnx.W4A16(block_size=128), 10),
    (qonnx.W8A16(block_size=64), 30),
    (qonnx.W8A16(block_size=32, symmetric=True), 30),
    (qonnx.W4A16(block_size=32, format="qdq"), 12),
    (qonnx.W4A16(block_size=32, symmetric=True, format="qdq"), 12),
    (qonnx.W8A16(block_size=64, format="qdq"), 30),
    (qonnx.W8A16(block_size=None, symmetric=True, format="qdq"), 25),
    (qonnx.W4A16(block_size=None, format="qdq"), 5),
    (qonnx.W3A16(block_size=32), 6),  # 3-bit codes in 4-bit containers
    (qonnx.W3A16(block_size=32, symmetric=True, format="qdq"), 6),
    (qonnx.W3A16(block_size=None, format="qdq"), 2),
    (qonnx.W2A16(block_size=16), 1),  # MatMulNBits bits=2
    (qonnx.W2A16(block_size=32, format="qdq"), 1),  # 2-bit codes in uint4
]


def dequantized_reference(src, dst, cfg):
    """The original model with every MatMul weight replaced by dequantize(quantize(w)), computed here."""
    m = onnx.load(src)
    weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for init in m.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            qb = quant.quantize_blocked(w.T.astype(np.float32), cfg.bits, cfg.block_size, cfg.symmetric)
            init.CopyFrom(numpy_helper.from_array(qb.dequantize().T.astype(w.dtype), init.name))
    onnx.save(m, dst)
    return dst


@pytest.mark.parametrize(("cfg", "bound"), CASES, ids=lambda c: str(c) if not isinstance(c, int) else "")
def test_output_equals_dequantized_weights(tmp_path, tiny_model, tiny_input, cfg, bound):
    summary = qonnx.quantize(tiny_model, cfg, output=tmp_path / "q.onnx")
    assert len(summary.quantized) == 11 and not summary.skipped
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"), full_check=True)
    y = run(tmp_path / "q.onnx", tiny_input)[0]
    ref = run(dequantized_reference(tiny_model, tmp_path / "deq.onnx", cfg), tiny_input)[0]
    # same weights, different kernels: float-rounding tolerance proves the packing contract
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    orig = run(tiny_model, tiny_input)[0]
    assert sqnr_db(orig, y) > bound
    assert summary.bytes_after < summary.bytes_before
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "MatMul" not in ops if cfg.format == "matmulnbits" else "DequantizeLinear" in ops
    if cfg.bits < 4:  # codes stay in their own range inside wider containers
        stored = 2 if cfg.bits == 2 and cfg.format == "matmulnbits" else 4
        note = "" if stored == cfg.bits else f"{cfg.bits}-bit codes in 4-bit containers"
        assert all(note in r.reason for r in summary.quantized)
        for node in onnx.load(tmp_path / "q.onnx").graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in node.attribute}
                assert attrs["bits"] == stored


def test_wrong_packing_would_be_caught(tmp_path, tiny_model, tiny_input):
    """The equality above can fail: swapping nibbles in one weight breaks it."""
    qonnx.quantize(tiny_model, qonnx.W4A16(block_size=32), output=tmp_path / "q.onnx")
    m = onnx.load(tmp_path / "q.onnx")
    b = next(i for i in m.graph.initializer if i.name.endswith("_B"))
    arr = numpy_helper.to_array(b)
    b.CopyFrom(numpy_helper.from_array(((arr >> 4) | (arr << 4)).astype(np.uint8), b.name))
    onnx.save(m, tmp_path / "bad.onnx")
    ref = run(dequantized_reference(tiny_model, tmp_path / "deq.onnx", qonnx.W4A16(block_size=32)), tiny_input)[0]
    y = run(tmp_path / "bad.onnx", tiny_input)[0]
    assert not np.allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_same_codes_as_onnxruntime_quantizer(tmp_path, rng):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = rng.standard_normal((576, 40)).astype(np.float32)  # K=576: ragged last block of 64
    src = matmul_model(tmp_path / "m.onnx", w)
    for sym in (False, True):
        ort_q = MatMulNBitsQuantizer(
            onnx.load(src), algo_config=DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=sym)
        )
        ort_q.process()
        theirs = {i.name.split("_")[-1]: numpy_helper.to_array(i) for i in ort_q.model.model.graph.initializer}
        qonnx.quantize(src, qonnx.W4A16(block_size=128, symmetric=sym), output=tmp_path / "q.onnx")
        ours = {
            i.name.split("_")[-1]: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer
        }
        np.testing.assert_array_equal(ours["B"], theirs["Q4"])
        np.testing.assert_array_equal(ours["scales"], theirs["scales"])
        if not sym:
            np.testing.assert_array_equal(ours["points"], theirs["points"])


def _gemm_model(tmp_path, rng, *, trans_b, alpha, beta, c_kind):
    k, n = 48, 24
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])]
    gemm_inputs = ["x", "w"]
    if c_kind == "vector":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        gemm_inputs.append("c")
    elif c_kind == "input":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [3, n]))
        gemm_inputs.append("c")
    node = helper.make_node("Gemm", gemm_inputs, ["y"], name="gemm", transB=int(trans_b), alpha=alpha, beta=beta)
    return matmul_model(tmp_path / "gemm.onnx", w, nodes=[node], initializers=inits, inputs=inputs, k=k)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize(
    ("trans_b", "alpha", "beta", "c_kind"),
    [
        (True, 1.0, 1.0, "vector"),
        (False, 0.5, 2.0, "vector"),
        (True, 1.0, 1.0, None),
        (True, 1.0, 1.0, "input"),
    ],
)
def test_gemm(tmp_path, rng, fmt, trans_b, alpha, beta, c_kind):
    src = _gemm_model(tmp_path, rng, trans_b=trans_b, alpha=alpha, beta=beta, c_kind=c_kind)
    feeds = {"x": rng.standard_normal((3, 48)).astype(np.float32)}
    if c_kind == "input":
        feeds["c"] = rng.standard_normal((3, 24)).astype(np.float32)
    s = qonnx.quantize(src, qonnx.W8A16(block_size=16, format=fmt), output=tmp_path / "q.onnx")
    assert len(s.quantized) == 1
    y, ref = run(tmp_path / "q.onnx", feeds)[0], run(src, feeds)[0]
    assert sqnr_db(ref, y) > 35


def test_weight_behind_cast_and_transpose_and_constant(tmp_path, rng):
    k, n = 64, 32
    w16 = rng.standard_normal((n, k)).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0], name="tr"),
        helper.make_node("MatMul", ["x", "wt"], ["h"], name="mm1"),
        helper.make_node(
            "Constant",
            [],
            ["wc"],
            value=numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "wc"),
            name="const",
        ),
        helper.make_node("MatMul", ["h", "wc"], ["y"], name="mm2"),
    ]
    src = matmul_model(tmp_path / "m.onnx", w16, nodes=nodes, initializers=[numpy_helper.from_array(w16, "w16")], k=k)
    s = qonnx.quantize(src, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx")
    assert [r.quantized for r in s.layers] == [True, True]
    out = onnx.load(tmp_path / "q.onnx")
    assert {n.op_type for n in out.graph.node} == {"MatMulNBits"}  # Cast, Transpose, Constant gone
    x = {"x": rng.standard_normal((4, k)).astype(np.float32)}
    assert sqnr_db(run(src, x)[0], run(tmp_path / "q.onnx", x)[0]) > 35


def test_shared_weight_is_quantized_once(tmp_path, rng):
    w = rng.standard_normal((32, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
    ]
    src = matmul_model(tmp_path / "m.onnx", w, nodes=nodes)
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx")
    assert [r.shared_with for r in s.layers] == [None, "a"]
    out = onnx.load(tmp_path / "q.onnx")
    assert sum(1 for i in out.graph.initializer if i.name.endswith("_B")) == 1
    x = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    assert sqnr_db(run(src, x)[0], run(tmp_path / "q.onnx", x)[0]) > 10


def test_skips_with_reasons(tmp_path, rng):
    w = rng.standard_normal((32, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="keep"),
        helper.make_node("MatMul", ["h", "dyn"], ["h2"], name="dynamic"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="lm_head"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
        helper.make_tensor_value_info("dyn", TensorProto.FLOAT, [32, 32]),
    ]
    src = matmul_model(
        tmp_path / "m.onnx",
        w,
        nodes=nodes,
        inputs=inputs,
        initializers=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w, "w2")],
    )
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx", targets={"re:^lm_": None})
    reasons = {r.node: (r.quantized, r.reason) for r in s.layers}
    assert reasons["keep"][0] and not reasons["dynamic"][0] and not reasons["lm_head"][0]
    assert "graph input" in reasons["dynamic"][1] and "excluded by pattern" in reasons["lm_head"][1]
    # exact names and op types choose configs too
    s2 = qonnx.quantize(src, qonnx.W4A16(block_size=16), targets={"keep": qonnx.W8A16(block_size=16), "MatMul": None})
    assert [(r.node, r.quantized, r.reason.split(" by ")[0]) for r in s2.layers if r.quantized] == [
        ("keep", True, "w8a16")
    ]


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_fp16_model(tmp_path, rng, fmt):
    w = (rng.standard_normal((64, 48)) / 8).astype(np.float16)
    src = matmul_model(tmp_path / "m.onnx", w, elem=TensorProto.FLOAT16)
    s = qonnx.quantize(src, qonnx.W4A16(block_size=32, format=fmt), output=tmp_path / "q.onnx")
    assert len(s.quantized) == 1
    x = {"x": rng.standard_normal((4, 64)).astype(np.float16)}
    y = run(tmp_path / "q.onnx", x)[0]
    assert y.dtype == np.float16 and sqnr_db(run(src, x)[0], y) > 12
    scales = [i for i in onnx.load(tmp_path / "q.onnx").graph.initializer if "scale" in i.name]
    assert scales and all(i.data_type == TensorProto.FLOAT16 for i in scales)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_three_bit_codes_stay_in_range(tmp_path, rng, fmt, symmetric):
    """W3A16: every stored code (and zero point) is one of the 8 values of 3 bits, in 4-bit storage."""
    w = rng.standard_normal((200, 40)).astype(np.float32)
    qonnx.quantize(
        matmul_model(tmp_path / "m.onnx", w),
        qonnx.W3A16(block_size=32, symmetric=symmetric, format=fmt),
        output=tmp_path / "q.onnx",
    )
    arrays = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    if fmt == "matmulnbits":
        codes, zps = packing.unpack_matmulnbits(
            arrays["w_B"], arrays.get("w_zero_points"), k=200, n=40, bits=4, block_size=32
        )
        lo = 4 if symmetric else 0  # symmetric: signed [-4, 3] around the default zero point 8
        assert codes.min() >= lo and codes.max() <= lo + 7 and zps.min() >= lo and zps.max() <= lo + 7
    else:
        codes = arrays["w_x"].astype(np.int16)
        assert codes.min() >= (-4 if symmetric else 0) and codes.max() <= (3 if symmetric else 7)
        assert len(np.unique(codes)) == 8

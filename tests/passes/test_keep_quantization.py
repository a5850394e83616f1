"""KeepQuantizationPass: GGUF codes in place of the float weights they dequantize to, checked in ONNX Runtime."""

from __future__ import annotations

import gguf
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qonnx.core.ggml import decode_blocks
from qonnx.core.modelfile import to_bytes
from qonnx.passes.keep_quantization import KeepQuantizationPass

K, N = 96, 40


def _kept(type_name: str, seed: int):
    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
    return decode_blocks(raw, type_name, (N, K)), gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name])


def _model(weights: list[np.ndarray]) -> ir.Model:
    """x [batch, seq, K] -> one MatMul per weight ([K, N] each), outputs y0, y1, ..."""
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", N]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 21)], ir_version=10
    )
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_kept_weights_read_back_bit_exactly():
    q8, w8 = _kept("Q8_0", 0)
    q40, w40 = _kept("Q4_0", 1)
    q41, w41 = _kept("Q4_1", 2)
    model = _model([w8, w40, w41])
    keep = KeepQuantizationPass({"a": q8, "b": q40, "c": q41})
    keep(model)
    assert sorted((layer.tensor, layer.type) for layer in keep.layers) == [("a", "Q8_0"), ("b", "Q4_0"), ("c", "Q4_1")]
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 3
    assert not any(n.op_type == "MatMul" and n.inputs[1].const_value is not None for n in model.graph)
    # Bits per weight are the GGUF type's own: codes, float16 d (and m).
    assert {layer.type: 8 * layer.nbytes / (K * N) for layer in keep.layers} == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0}
    eye = np.eye(K, dtype=np.float32)[None]  # each output is one weight: the dequantized values themselves
    y8, y40, y41 = _run(model, eye)
    np.testing.assert_array_equal(y8[0], w8.T)
    np.testing.assert_array_equal(y40[0], w40.T)
    np.testing.assert_allclose(y41[0], w41.T, rtol=0, atol=1e-6)  # d * (q - 8) + (m + 8 d): float32 rounding
    x = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    for y, w in zip(_run(model, x), (w8, w40, w41), strict=True):
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_a_weight_that_differs_in_one_bit_stays_float():
    q40, w40 = _kept("Q4_0", 1)
    changed = w40.copy()
    changed[3, 7] = np.nextafter(changed[3, 7], np.float32(np.inf))
    model = _model([changed])
    keep = KeepQuantizationPass({"b": q40})
    keep(model)
    assert keep.layers == [] and keep.unmatched == ["b"]
    assert [n.op_type for n in model.graph] == ["MatMul"]


@pytest.mark.parametrize("rank", [2, 4])
def test_q4_1_offset_follows_the_input_rank(rank):
    q41, w41 = _kept("Q4_1", 4)
    model = _model([w41])
    x_value = model.graph.inputs[0]
    shape = [2] * (rank - 1) + [K]
    x_value.shape = ir.Shape(shape)
    model.graph.outputs[0].shape = ir.Shape([2] * (rank - 1) + [N])
    KeepQuantizationPass({"c": q41})(model)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ w41.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_tied", [False, True])
def test_a_tied_table_stays_float_unless_asked(keep_tied):
    q8, w8 = _kept("Q8_0", 6)  # [N=40 tokens, K=96]: an embedding table and the lm_head reading it transposed
    table = numpy_helper.from_array(w8, "table")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="t"),
        helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head"),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", N])
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [ids], [out], [table]), opset_imports=[helper.make_opsetid("", 21)], ir_version=10
    )
    model = ir.serde.deserialize_model(proto)
    keep = KeepQuantizationPass({"token_embd.weight": q8}, keep_tied=keep_tied)
    keep(model)
    ops = [n.op_type for n in model.graph]
    if keep_tied:  # handed to the weight pass, whose size check still decides (here: too small to gain)
        assert keep.tied == {} and keep.matched == {"table": "token_embd.weight"}
    else:
        assert "MatMulNBits" not in ops and [layer.tensor for layer in keep.layers] == []
        assert "tied: the float table stays for Gather 'embed'" in keep.tied["token_embd.weight"]


def test_gemm_with_bias_and_a_shared_weight():
    """Gemm (transB, constant bias) and two MatMuls reading one Q4_1 weight: each output gets its offset."""
    q41, w41 = _kept("Q4_1", 7)
    bias = np.random.default_rng(8).standard_normal(N).astype(np.float32)
    inits = [
        numpy_helper.from_array(w41, "w_nk"),
        numpy_helper.from_array(np.ascontiguousarray(w41.T), "w_kn"),
        numpy_helper.from_array(bias, "bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w_nk", "bias"], ["y0"], transB=1, name="gemm"),
        helper.make_node("MatMul", ["x", "w_kn"], ["y1"], name="mm_a"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w_kn"], ["y2"], name="mm_b"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", N]) for i in range(3)]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 21)], ir_version=10
    )
    model = ir.serde.deserialize_model(proto)
    keep = KeepQuantizationPass({"c": q41})
    keep(model)
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 3
    assert {layer.weight for layer in keep.layers} == {"w_nk", "w_kn"}
    xv = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    y0, y1, y2 = session.run(None, {"x": xv})
    np.testing.assert_allclose(y0, xv @ w41.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1, xv @ w41.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, np.maximum(xv, 0) @ w41.T, rtol=1e-5, atol=1e-5)

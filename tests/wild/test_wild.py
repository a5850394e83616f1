"""Graphs from the wild: each corpus graph under each scheme quantizes with a stated SQNR, or refuses in one line.

Never a traceback, never silent garbage (SQNR finite and above the bound on every float output, in
qonnx's own verification and in an ONNX Runtime run here), never an output larger than its input.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from wild.corpus import BUILDERS

import qonnx
from qonnx.core import quant
from qonnx.core.errors import NothingToQuantizeError, QonnxError

SCHEMES = {
    "w8": qonnx.W8A16(block_size=32),
    "w4": qonnx.W4A16(block_size=32),
    "w8-qdq": qonnx.W8A16(block_size=32, format="qdq"),
    "w4-qdq": qonnx.W4A16(block_size=32, symmetric=True, format="qdq"),
}


# graph -> (lowest SQNR in dB on any float output with 8-bit, with 4-bit weights), or (error, message fragment)
EXPECT: dict[str, tuple] = {
    "cnn": (40, 20),
    "conv_transpose": (45, 22),
    "conv1d": (40, 18),
    "encoder": (40, 18),
    "decoder": (35, 12),
    "decoder_fp16": (35, 12),
    "lstm_linear": (45, 22),
    "gru_only": (NothingToQuantizeError, "recurrent weights live inside the GRU op"),
    "old_opset9": (35, 14),
    "ir3_opset7": (40, 16),
    # ONNX Runtime's CPU provider has no bfloat16 kernels: the original cannot run for verification either
    "bf16": (QonnxError, "verification could not run the models"),
    "subgraphs": (33, 10),
    "odd_ops": (38, 15),
    "custom_domain": (QonnxError, "org.example.plugins:FancyAct(-1) is not a registered function/op"),
    "multi_output": (35, 12),
    "shared_weights": (35, 12),
    "constant_nodes": (38, 15),
    "tiny": (NothingToQuantizeError, "nothing to quantize in the model"),
    "already_quantized": (NothingToQuantizeError, "already quantized (MatMulNBits)"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Builds each graph once, on first use."""
    built: dict[str, tuple] = {}

    def get(name):
        if name not in built:
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _float_outputs(path, feeds):
    outs = run(path, feeds)
    return [o for o in outs if np.issubdtype(o.dtype, np.floating)]


def test_corpus_is_complete():
    assert set(EXPECT) == set(BUILDERS) and len(BUILDERS) >= 10


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("graph", BUILDERS)
def test_wild(corpus, tmp_path, graph, scheme):
    src, feeds = corpus(graph)
    cfg = SCHEMES[scheme]
    out = tmp_path / "q.onnx"
    expect = EXPECT[graph]
    if isinstance(expect[0], type):
        with pytest.raises(expect[0]) as err:
            qonnx.quantize(src, cfg, output=out)
        message = str(err.value)
        assert expect[1] in message and "\n" not in message and not out.exists()
        return
    bound = expect[0] if cfg.bits == 8 else expect[1]
    s = qonnx.quantize(src, cfg, output=out)
    assert s.quantized and all(r.reason for r in s.layers)
    worst = s.verification.worst_sqnr
    assert s.verification.ran and worst is not None and math.isfinite(worst) and worst > bound, worst
    assert s.bytes_after <= s.bytes_before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    for batch in feeds:
        for ref, y in zip(_float_outputs(src, batch), _float_outputs(out, batch), strict=True):
            assert y.dtype == ref.dtype and y.shape == ref.shape
            assert bound < sqnr_db(ref, y) < math.inf


def _initializers(path):
    """Every initializer of every graph of a saved model, by name."""
    model = ir.load(path)
    return {v.name: v for g in model.graphs() for v in g.initializers.values()}


@pytest.mark.parametrize("graph", ["cnn", "conv_transpose", "conv1d"])
@pytest.mark.parametrize("cfg", [qonnx.W8A16(block_size=32), qonnx.W4A16(block_size=32, format="qdq")], ids=str)
def test_conv_output_equals_dequantized_weights(corpus, tmp_path, graph, cfg):
    """Per output channel (axis 0 for Conv, 1 for ConvTranspose): ORT computes with exactly these weights."""
    src, feeds = corpus(graph)
    s = qonnx.quantize(src, cfg, output=tmp_path / "q.onnx")
    convs = [r for r in s.layers if r.op_type in ("Conv", "ConvTranspose")]
    assert convs and all(r.quantized and "per output channel" in r.reason for r in convs)
    q = onnx.load(tmp_path / "q.onnx")
    assert q.opset_import[0].version == 21  # int4 and fp16-scale DequantizeLinear: the opset was raised
    axes = {n.input[0]: n.attribute[0].i for n in q.graph.node if n.op_type == "DequantizeLinear"}
    ref = onnx.load(src)
    for node in ref.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        init = next(i for i in ref.graph.initializer if i.name == node.input[1])
        w = numpy_helper.to_array(init)
        if node.op_type == "Gemm":  # the Linear head (transB=1: [N, K]) is quantized in blocks along K
            deq = quant.quantize_blocked(w, cfg.bits, cfg.block_size, cfg.symmetric).dequantize()
        else:
            axis = 0 if node.op_type == "Conv" else 1
            assert axes[f"{node.input[1]}_x"] == axis
            moved = np.moveaxis(w, axis, 0)
            qb = quant.quantize_blocked(moved.reshape(moved.shape[0], -1), cfg.bits, None, cfg.symmetric)
            deq = np.moveaxis(qb.dequantize().reshape(moved.shape), 0, axis)
        init.CopyFrom(numpy_helper.from_array(deq.astype(w.dtype), init.name))
    onnx.save(ref, tmp_path / "deq.onnx")
    for batch in feeds:
        y, want = run(tmp_path / "q.onnx", batch)[0], run(tmp_path / "deq.onnx", batch)[0]
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("scheme", ["w8", "w8-qdq"])
def test_subgraph_weights_replaced_everywhere(corpus, tmp_path, scheme):
    src, _ = corpus("subgraphs")
    s = qonnx.quantize(src, SCHEMES[scheme], output=tmp_path / "q.onnx")
    assert len(s.quantized) == 4
    inits = _initializers(tmp_path / "q.onnx")
    assert not {"w_outer", "w_else", "w_body"} & set(inits)  # no float copy left in any graph
    codes = [n for n in inits if n.endswith(("_B", "_x")) or n.rstrip("0123456789").endswith("_x_")]
    if scheme == "w8":  # MatMulNBits: the outer weight is quantized once, beside the float one
        assert sorted(codes) == ["w_body_B", "w_else_B", "w_outer_B"]
        assert [r.shared_with for r in s.layers if r.node == "body_mm_outer"] == ["then_mm"]
    else:  # DequantizeLinear reads initializers of its own graph (ONNX Runtime's fusions need that)
        assert sorted(codes) == ["w_body_x", "w_else_x", "w_outer_x", "w_outer_x_1"]


def test_tied_embedding_kept_in_float_unless_named(corpus, tmp_path):
    """A tied lm_head keeps its float copy for the Gather: by default it stays in float with the reason;
    named in targets it is quantized (with the cost stated) while the model still shrinks as a whole
    (4 bits here), and kept in float when it would grow (8 bits)."""
    src, _ = corpus("shared_weights")
    s = qonnx.quantize(src, qonnx.W4A16(block_size=32), verify=False)
    reasons = {r.node: (r.quantized, r.reason) for r in s.layers}
    assert not reasons["lm_head"][0] and "stays (also read by Gather 'embed_tokens')" in reasons["lm_head"][1]
    assert "targets" not in reasons["lm_head"][1]  # printed by the CLI too, which has no such option
    s4 = qonnx.quantize(
        src,
        qonnx.W4A16(block_size=32),
        output=tmp_path / "q4.onnx",
        verify=False,
        targets={"lm_head": qonnx.W4A16(block_size=32)},
    )
    reasons = {r.node: (r.quantized, r.reason) for r in s4.layers}
    assert reasons["lm_head"][0] and "stays (also read by Gather 'embed_tokens'): adds ~" in reasons["lm_head"][1]
    assert re.search(r"adds ~\d+(\.\d)? (B|KiB|MiB)$", reasons["lm_head"][1]), reasons["lm_head"][
        1
    ]  # a size for people
    assert s4.bytes_after < s4.bytes_before
    s8 = qonnx.quantize(
        src,
        qonnx.W8A16(block_size=32),
        output=tmp_path / "q8.onnx",
        verify=False,
        targets={"lm_head": qonnx.W8A16(block_size=32)},
    )
    reasons = {r.node: (r.quantized, r.reason) for r in s8.layers}
    assert not reasons["lm_head"][0] and "would make the model larger" in reasons["lm_head"][1]
    assert [r.node for r in s8.quantized] == ["mix1", "mix2"] and s8.quantized[1].shared_with == "mix1"
    assert s8.bytes_after < s8.bytes_before


def test_ir3_weights_listed_as_inputs_are_quantized(corpus, tmp_path):
    src, _ = corpus("ir3_opset7")
    qonnx.quantize(src, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx")
    q = onnx.load(tmp_path / "q.onnx")
    assert q.ir_version >= 4 and [i.name for i in q.graph.input] == ["x", "b1"]
    assert "w1" not in {i.name for i in q.graph.initializer}


def _bf16_as_float32(path, dst):
    """The same model with every bfloat16 tensor and type made float32 (ORT's CPU provider lacks bfloat16)."""
    m = onnx.load(path)
    for init in m.graph.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.save(m, dst)
    return dst


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_without_verification(corpus, tmp_path, scheme):
    """bfloat16 weights are quantized in float32 and stored with bfloat16 scales (CUDA runs those)."""
    src, feeds = corpus("bf16")
    s = qonnx.quantize(src, SCHEMES[scheme], output=tmp_path / "q.onnx", verify=False)
    assert len(s.quantized) == 2
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    scales = [i for i in q.graph.initializer if "scale" in i.name]
    assert scales and all(i.data_type == TensorProto.BFLOAT16 for i in scales)
    x = {"x": feeds[0]["x"].astype(np.float32)}
    ref = run(_bf16_as_float32(src, tmp_path / "ref32.onnx"), x)[0]
    y = run(_bf16_as_float32(tmp_path / "q.onnx", tmp_path / "q32.onnx"), x)[0]
    assert sqnr_db(ref, y) > (35 if SCHEMES[scheme].bits == 8 else 14)


def test_small_model_output_not_larger(tmp_path, rng):
    w = (rng.standard_normal((8, 16)) / 3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    try:
        s = qonnx.quantize(tmp_path / "m.onnx", qonnx.W8A16(block_size=None, format="qdq"), output=tmp_path / "q.onnx")
    except NothingToQuantizeError:
        return
    assert s.bytes_after <= s.bytes_before

"""Verification sessions and comparisons: figures in slices, made-up inputs, the original run ahead, models
run from memory.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import matmul_model
from helpers import sqnr_db
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.models import build_decoder_stack
from qonnx.runtime import verify as verify_module
from qonnx.runtime.session import InMemoryModel, make_session
from qonnx.runtime.verify import (
    ReferenceRun,
    compare_outputs,
    make_inputs,
    parse_shape_overrides,
    verification_session,
    verify_models,
)


def test_compare_outputs_math():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    m = compare_outputs("logits", ref, ref)
    assert m.sqnr_db == math.inf and m.cosine == pytest.approx(1) and m.top1_agreement == 1.0
    noisy = ref + np.array([[0.1, 0, 0], [0, 0, 0]], np.float32)
    m = compare_outputs("logits", ref, noisy)
    assert m.sqnr_db == pytest.approx(10 * math.log10(28 / 0.01), rel=1e-4)
    assert m.max_abs_error == pytest.approx(0.1, rel=1e-5)
    flipped = ref[:, ::-1]
    assert compare_outputs("logits", ref, flipped).top1_agreement == 0.0
    assert compare_outputs("y", ref, np.full_like(ref, np.nan)).sqnr_db == -math.inf


def test_compare_outputs_in_slices(rng, monkeypatch):
    """Float32 sums over slices add up to float64 figures of the whole (numpy's), large outputs and extreme
    values included: a slice whose float32 sums overflow is summed again in float64."""
    ref = rng.standard_normal((2, 300, 1000)).astype(np.float32)
    out = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    r64, o64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    m = compare_outputs("logits", ref, out)
    assert m.sqnr_db == pytest.approx(sqnr_db(ref, out), abs=1e-5)
    assert m.cosine == pytest.approx(np.dot(r64, o64) / np.sqrt(np.dot(r64, r64) * np.dot(o64, o64)), abs=1e-7)
    assert m.max_abs_error == float(np.abs(r64 - o64).max())
    assert m.top1_agreement == float(np.mean(ref.argmax(-1) == out.argmax(-1)))
    monkeypatch.setattr("qonnx.runtime.compare._CHUNK", 7)
    small_ref, small_out = ref[:1, :3, :11], out[:1, :3, :11]
    assert compare_outputs("y", small_ref, small_out).sqnr_db == pytest.approx(sqnr_db(small_ref, small_out), abs=1e-5)
    huge = 1e20 * small_ref  # squares overflow float32
    assert compare_outputs("y", huge, 1e20 * small_out).sqnr_db == pytest.approx(sqnr_db(huge, 1e20 * small_out))
    nan_out = small_out.copy()
    nan_out[0, 2, 10] = np.nan
    assert compare_outputs("y", small_ref, nan_out).sqnr_db == -math.inf
    with pytest.raises(ValueError, match="shape"):
        compare_outputs("logits", ref, out[:1])


def test_made_up_inputs_for_llm_like_graph(tmp_path):
    """input_ids below the vocabulary, attention mask of ones, empty past, position ids counting up."""
    vocab, hidden = 50, 16
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("MatMul", ["hm", "lm"], ["logits"], name="lm_head"),
        helper.make_node("Identity", ["past"], ["present"]),
    ]
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "lm"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_sequence", 8]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]),
        helper.make_tensor_value_info("present", TensorProto.FLOAT, ["batch", 2, "past_sequence", 8]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.save(m, tmp_path / "lm.onnx")
    feeds = make_inputs(make_session(tmp_path / "lm.onnx"))
    assert feeds["input_ids"].shape == (1, 16) and feeds["input_ids"].max() < vocab
    assert np.all(feeds["attention_mask"] == 1) and feeds["past"].shape == (1, 2, 0, 8)
    s = qonnx.quantize(tmp_path / "lm.onnx", qonnx.W8A16(block_size=16), output=tmp_path / "q.onnx")
    by_name = {o.name: o for o in s.verification.outputs}
    assert by_name["logits"].top1_agreement is not None and by_name["logits"].top1_agreement > 0.9


def test_shape_overrides():
    assert parse_shape_overrides(["x=1x3x224x224"]) == {"x": (1, 3, 224, 224)}
    for bad in ("x", "x=", "x=1xq", "=3"):
        with pytest.raises(ValueError):
            parse_shape_overrides([bad])


def test_reference_run_in_background_and_over_budget(tmp_path, rng):
    """The original run ahead in a thread, or batch by batch past its memory budget, gives the same figures,
    and they match numpy's: the original computed by hand against the quantized model in a default session."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    src = matmul_model(tmp_path / "m.onnx", w)
    qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx", verify=False)
    batches = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(3)]
    direct = [m.to_dict() for m in verify_models(src, tmp_path / "q.onnx", feeds=batches)]
    ahead = ReferenceRun(src, feeds=batches).start()
    assert [m.to_dict() for m in verify_models(ahead, tmp_path / "q.onnx")] == direct
    lean = ReferenceRun(src, feeds=batches, budget=0)
    lean.run()
    assert len(lean._outputs) == 1 and lean._session is not None  # the rest run at comparison time
    assert [m.to_dict() for m in verify_models(lean, tmp_path / "q.onnx")] == direct
    refused = ReferenceRun(src, shapes={"x": (2,)}).start()  # ONNX Runtime's error, raised by the waiter
    with pytest.raises(Exception, match="Invalid rank for input: x"):
        refused.wait()
    ref = np.concatenate([b["x"] @ w for b in batches])
    out = np.concatenate([make_session(tmp_path / "q.onnx").run(["y"], b)[0] for b in batches])
    assert direct[0]["sqnr_db"] == pytest.approx(sqnr_db(ref, out), abs=0.01)


def test_verification_sessions_build_fast(tmp_path, rng):
    """No graph optimization, no idle spinning, no arena; the float original is not copied into packed weights."""
    src = matmul_model(tmp_path / "m.onnx", rng.standard_normal((64, 32)).astype(np.float32))
    for prepack in (False, True):
        so = verification_session(src, "cpu", prepack=prepack).get_session_options()
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
        assert not so.enable_cpu_mem_arena
        if prepack:  # the quantized model: MatMulNBits runs far slower unpacked
            with pytest.raises(RuntimeError):
                so.get_session_config_entry("session.disable_prepacking")
        else:
            assert so.get_session_config_entry("session.disable_prepacking") == "1"


def _tied_head_model(path, rng, *, perm=(1, 0), second_reader=False, external=False):
    """x [2, 3, 8] -> MatMul(x, Transpose(E)) with E [16, 8] stored as the tied embedding is."""
    emb = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "emb")
    nodes = [
        helper.make_node("Transpose", ["emb"], ["embT"], perm=list(perm)),
        helper.make_node("MatMul", ["x", "embT"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, 16])]
    if second_reader:
        nodes.append(helper.make_node("Identity", ["embT"], ["embT_out"]))
        outputs.append(helper.make_tensor_value_info("embT_out", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])], outputs, [emb]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path, save_as_external_data=external, location="m.data", size_threshold=0)
    return path


@pytest.mark.parametrize("external", [False, True])
def test_transposed_weights_are_read_in_place(tmp_path, rng, external):
    """MatMul(X, Transpose(W)) of a constant float weight runs as FusedMatMul(transB) in verification sessions:
    the same outputs without a per-run transpose; external data is still found beside the model."""
    src = _tied_head_model(tmp_path / "m.onnx", rng, external=external)
    rewritten = onnx.ModelProto.FromString(verify_module.untranspose_weights(src))
    assert [n.op_type for n in rewritten.graph.node] == ["FusedMatMul"]
    assert rewritten.graph.node[0].input[1] == "emb"
    x = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    emb = numpy_helper.to_array(onnx.load(src).graph.initializer[0])
    out = verification_session(src, "cpu", prepack=False).run(["logits"], x)[0]
    np.testing.assert_allclose(out, x["x"] @ emb.T, rtol=1e-5, atol=1e-5)
    for kwargs in ({"perm": (0, 1)}, {"second_reader": True}):  # not a plain 2-D transpose, or read twice
        other = _tied_head_model(tmp_path / f"o{len(kwargs)}{kwargs.get('perm', '')}.onnx", rng, **kwargs)
        assert verify_module.untranspose_weights(other) is None


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_in_memory_model_runs_like_its_file(tmp_path, rng, fmt):
    """A model run from memory (weights handed over where they lie; int4 and external ones included) gives
    the written file's outputs bit for bit, holds the weights outside its protobuf, and leaves the model as
    it was."""
    src = build_decoder_stack(tmp_path / "in" / "m.onnx", hidden=64, intermediate=128, layers=2, external_data=True)
    config = qonnx.W4A16(block_size=32, format=fmt)
    model = qonnx.quantize(src, config, targets={"re:lm_head": None}, verify=False).model
    model.ir_version = 14  # above what ONNX Runtime accepts: the snapshot is taken at a version it does
    before = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert isinstance(before["lm_head.weight"], ir.ExternalTensor)  # mapped from the input's data file
    snapshot = InMemoryModel.of(model)
    assert model.ir_version == 14 and {v.name: v.const_value for v in model.graph.initializers.values()} == before
    sub_byte = {name for name, t in before.items() if t.dtype in (ir.DataType.INT4, ir.DataType.UINT4)}
    assert bool(sub_byte) == (fmt == "qdq") and not sub_byte & set(snapshot.weights)  # those stay in the proto
    assert "lm_head.weight" in snapshot.weights
    qonnx.save(model, tmp_path / "q.onnx")
    if fmt == "matmulnbits":
        assert len(snapshot.proto) < sum(a.nbytes for a in snapshot.weights.values())
    feeds = {"x": rng.standard_normal((2, 5, 64)).astype(np.float32)}
    from_memory = verification_session(snapshot, "cpu", prepack=True).run(None, feeds)
    from_file = verification_session(tmp_path / "q.onnx", "cpu", prepack=True).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(from_memory, from_file, strict=True))


def test_large_float_weights_are_fed_not_copied(rng):
    """A model run from memory takes its large float weights as inputs fed with every run (ONNX Runtime
    would copy, and prepack, initializers): hidden from get_inputs(), the same outputs. Weights read by an op
    that is not known to take any input (Add here), or by a subgraph, stay initializers; so do small ones."""
    k = 512  # a [512, 512] float32 weight is 1 MiB: just fed
    w, b, small = (rng.standard_normal(s).astype(np.float32) for s in ((k, k), (k, k), (k, 4)))
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["sub_w"], ["r"])], "b", [], [helper.make_tensor_value_info("r", 1, None)]
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("MatMul", ["hb", "small"], ["y"]),
            helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k]), cond],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, 4]), helper.make_tensor_value_info("z", 1, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (small, "small"), (w.copy(), "sub_w"))],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    snapshot = InMemoryModel.of(model)
    rewritten = verify_module.feed_weights(snapshot.proto, snapshot.weights)
    assert rewritten is not None and rewritten[1] == ["w"]
    assert "w" not in {t.name for t in onnx.ModelProto.FromString(rewritten[0]).graph.initializer}
    session = verification_session(snapshot, "cpu", prepack=True)
    assert [i.name for i in session.get_inputs()] == ["x", "c"]
    feeds = {"x": rng.standard_normal((k, k)).astype(np.float32), "c": np.array(True)}
    y, z = session.run(None, feeds)
    np.testing.assert_allclose(y, (feeds["x"] @ w + b) @ small, rtol=1e-4, atol=1e-3)
    assert np.array_equal(z, w)
    assert verify_module.feed_weights(snapshot.proto, {n: a[:1] for n, a in snapshot.weights.items()}) is None

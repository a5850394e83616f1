"""Parallel linear layers merged into one node compute the same outputs (MatMulNBits and MatMul)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import tiny_causal_lm, tiny_tokenizer

import qonnx
from qonnx.passes.merge_linear import MergeParallelLinearPass


def _branchy(tmp_path, dtype=np.float32, opset=21):
    """x -> three MatMuls (N = 24, 8, 8) that are graph outputs, plus a fourth on another input (not merged)."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["batch", 16]))
    y = ir.val("y", ir.DataType.FLOAT, ir.Shape(["batch", 16]))
    outs = []
    graph = ir.Graph([x, y], [], nodes=[], name="g", opset_imports={"": opset})
    for i, (src, n) in enumerate(((x, 24), (x, 8), (x, 8), (y, 8))):
        w = ir.val(f"w{i}", const_value=ir.tensor(rng.standard_normal((16, n)).astype(dtype), name=f"w{i}"))
        graph.register_initializer(w)
        node = ir.node("MatMul", [src, w], name=f"mm{i}")
        node.outputs[0].name = f"out{i}"
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["batch", n])
        graph.append(node)
        outs.append(node.outputs[0])
    graph.outputs.extend(outs)
    model = ir.Model(graph, ir_version=10)
    path = tmp_path / "branchy.onnx"
    ir.save(model, path)
    return path


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.mark.parametrize("scheme", ["float", "w4", "w4-sym", "w4-hqq"])
def test_merged_layers_compute_the_same_outputs(tmp_path, scheme):
    """Packed codes, scales, integer or float (HQQ) zero points are concatenated per output column."""
    path = _branchy(tmp_path)
    if scheme != "float":
        algo = {"algo": "hqq"} if scheme == "w4-hqq" else {}
        config = qonnx.W4A16(block_size=16, symmetric=scheme == "w4-sym", **algo)
        qonnx.quantize(path, config, output=tmp_path / "q.onnx", verify=False)
        path = tmp_path / "q.onnx"
    model = ir.load(path)
    merge = MergeParallelLinearPass()
    merge(model)
    kind = "MatMul" if scheme == "float" else "MatMulNBits"
    assert merge.merged == {kind: 2} and merge.packed_qkv == 0
    ops = [n.op_type for n in model.graph]
    assert ops.count(kind) == 2 and ops.count("Split") == 1  # the merged one and the one on y
    ir.save(model, tmp_path / "merged.onnx")
    feeds = {n: np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32) for n in ("x", "y")}
    before, after = _run(path, feeds), _run(tmp_path / "merged.onnx", feeds)
    assert list(after) == list(before)  # graph outputs and their names kept
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)


def test_layers_with_different_settings_are_not_merged(tmp_path):
    path = _branchy(tmp_path)
    model = ir.load(path)
    for node in model.graph:  # one weight becomes a graph input: not a constant
        if node.name == "mm1":
            node.inputs[1].const_value = None
    merge = MergeParallelLinearPass()
    merge(model)
    assert merge.merged == {"MatMul": 1}  # mm0 and mm2 only


def test_a_shared_weight_is_not_copied(tmp_path):
    """A weight another node also reads (a tied lm_head and its embedding Gather) stays where it is."""
    model = ir.load(_branchy(tmp_path))
    nodes = {n.name: n for n in model.graph}
    weight = nodes["mm1"].inputs[1]
    gather = ir.node("Gather", [weight, ir.val("idx", const_value=ir.tensor(np.array([0], np.int64)))], name="g")
    model.graph.register_initializer(gather.inputs[1])
    model.graph.append(gather)
    model.graph.outputs.append(gather.outputs[0])
    merge = MergeParallelLinearPass()
    merge(model)
    assert merge.merged == {"MatMul": 1} and weight.name in model.graph.initializers  # mm0 and mm2 only


def test_merged_names_do_not_collide(tmp_path):
    """Two groups of unnamed nodes get distinct initializer names."""
    model = ir.load(_branchy(tmp_path))
    y = next(v for v in model.graph.inputs if v.name == "y")
    weight = ir.val("w4", const_value=ir.tensor(np.ones((16, 8), np.float32), name="w4"))
    model.graph.register_initializer(weight)
    extra = ir.node("MatMul", [y, weight])
    extra.outputs[0].name = "out4"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    for node in model.graph:
        node.name = None
    merge = MergeParallelLinearPass()
    merge(model)  # would raise on a duplicate initializer name
    assert merge.merged == {"MatMul": 3}
    ir.save(model, tmp_path / "merged.onnx")
    feeds = {n: np.ones((2, 16), np.float32) for n in ("x", "y")}
    assert set(_run(tmp_path / "merged.onnx", feeds)) == {f"out{i}" for i in range(5)}


@pytest.mark.slow
def test_decoder_qkv_packed_into_group_query_attention(tmp_path):
    """Lowered W4A16 decoder: q/k/v become one MatMulNBits read by GroupQueryAttention as packed QKV."""
    from qonnx.models.export import export_causal_lm
    from qonnx.pipeline.lowering import lower

    export_causal_lm(tiny_causal_lm("llama"), tmp_path / "kv", tokenizer=tiny_tokenizer(), quiet=True, verify=False)
    qonnx.quantize(tmp_path / "kv", qonnx.W4A16(block_size=32), output=tmp_path / "w4", verify=False)
    summary = lower(tmp_path / "w4", tmp_path / "low")  # verified against the input before it is written
    assert summary.fusions["packed_qkv_for_gqa_merged"] == 2 and summary.fusions["merged_linear"] == 4  # CPU
    model = ir.load(tmp_path / "low" / "model.onnx")
    assert not any(n.op_type == "Split" for n in model.graph)  # gate/up stay apart on the CPU
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert node.inputs[0].producer().op_type == "MatMulNBits"
            assert node.inputs[1] is None and node.inputs[2] is None


@pytest.mark.slow
def test_cuda_target_also_merges_gate_and_up(tmp_path):
    """For CUDA gate/up are merged too (with a Split), q/k/v as well where attention stays unfused (float32)."""
    from qonnx.models.export import export_causal_lm
    from qonnx.passes.lower import FuseForOrtPass

    export_causal_lm(tiny_causal_lm("llama"), tmp_path / "kv", tokenizer=tiny_tokenizer(), quiet=True, verify=False)
    model = ir.load(tmp_path / "kv" / "model.onnx")
    fuse = FuseForOrtPass("cuda")
    fuse(model)
    assert fuse.fusions["merged_linear"] == 6 and "packed_qkv_for_gqa_merged" not in fuse.fusions
    assert sum(n.op_type == "Split" for n in model.graph) == 4  # q/k/v and gate/up, 2 layers
    ir.save(model, tmp_path / "cuda.onnx")
    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(tmp_path / "cuda.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": rng.integers(0, 100, (1, 5)), "attention_mask": np.ones((1, 5), np.int64)}
    feeds["position_ids"] = np.arange(5)[None]
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    ref = ort.InferenceSession(str(tmp_path / "kv" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], feeds)[0], ref.run(["logits"], feeds)[0], rtol=1e-4, atol=1e-4)


def test_split_before_opset_13_takes_its_sizes_as_an_attribute(tmp_path):
    """Split's sizes became an input in opset 13: an older model gets the attribute form, and stays valid."""
    path = _branchy(tmp_path, opset=11)
    model = ir.load(path)
    MergeParallelLinearPass()(model)
    split = next(n for n in model.graph if n.op_type == "Split")
    assert len(split.inputs) == 1 and list(split.attributes["split"].as_ints()) == [24, 8, 8]
    ir.save(model, tmp_path / "merged.onnx")
    onnx.checker.check_model(str(tmp_path / "merged.onnx"), full_check=True)
    feeds = {n: np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32) for n in ("x", "y")}
    before, after = _run(path, feeds), _run(tmp_path / "merged.onnx", feeds)
    assert all(np.array_equal(before[k], after[k]) for k in before)

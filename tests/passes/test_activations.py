"""Activation passes: SmoothQuant folding and its alpha search, one shared Q/DQ pair per activation."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

from qonnx.passes.activations import ActivationQParams, InsertActivationQDQPass
from qonnx.passes.smooth_quant import SmoothGroup, factors, fake_quantize_weight, fold, search_alpha


def _norm_mlp(path, rng, k=48, n=64, outlier=40.0):
    """x -> Mul(norm weight) -> {MatMul a, MatMul b}; silu(a) * up -> MatMul down; Reshape -> MatMul o."""
    g = rng.standard_normal
    inits = {
        "norm_w": (1 + 0.1 * g(k)).astype(np.float32),
        "wa": (g((k, n)) / np.sqrt(k)).astype(np.float32),
        "wup": (g((k, n)) / np.sqrt(k)).astype(np.float32),
        "wdown": (g((n, k)) / np.sqrt(n)).astype(np.float32),
        "wo": (g((k, k)) / np.sqrt(k)).astype(np.float32),
        "shape": np.array([0, -1, k], np.int64),
    }
    inits["norm_w"][5] *= outlier  # an outlier channel, as in real LLM activations
    nodes = [
        helper.make_node("Mul", ["x", "norm_w"], ["h"], name="norm"),
        helper.make_node("MatMul", ["h", "wa"], ["a"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "wup"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["a"], ["sig"], name="sig"),
        helper.make_node("Mul", ["a", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["inner"], name="inner"),
        helper.make_node("MatMul", ["inner", "wdown"], ["d"], name="down_proj"),
        helper.make_node("Reshape", ["d", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", k])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _group(model: ir.Model, tensor: str) -> SmoothGroup:
    readers = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[0].name == tensor:
            readers.append((node, node.inputs[1], False))
    return SmoothGroup(tensor, readers)


@pytest.mark.parametrize(
    ("tensor", "where"),
    [("h", "constant 'norm_w'"), ("inner", "weight columns of MatMul 'up_proj'"), ("r", "new Mul")],
)
def test_fold_keeps_float_outputs(tmp_path, rng, tensor, where):
    """Folding X / s into its producer and s into the readers' weights leaves the float model's output unchanged."""
    path = _norm_mlp(tmp_path / "m.onnx", rng)
    x = rng.standard_normal((1, 16, 48)).astype(np.float32)
    (ref,) = run(path, {"x": x})
    model = ir.load(path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    group = _group(model, tensor)
    s = rng.uniform(0.1, 10, group.weight_kn(0).shape[0]).astype(np.float32)
    taken = set(values) | set(model.graph.initializers)
    new, how = fold(model.graph, values[tensor], group, s, taken)
    assert where in how
    assert (new is values[tensor]) == (where != "new Mul")
    out = tmp_path / "folded.onnx"
    ir.save(model, out)
    (got,) = run(out, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_search_alpha_prefers_smoothing_for_outliers(rng):
    """With one huge activation channel, the search smooths (alpha > 0) and beats no smoothing."""
    k, n = 64, 96
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, 7] *= 200
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    value = ir.Value(name="w", const_value=ir.tensor(w))
    node = ir.node("MatMul", [ir.Value(name="x"), value])
    group = SmoothGroup("x", [(node, value, False)])
    absmax = np.abs(x).max(axis=0)

    def act_range(s):
        a = float((absmax / s).max())
        return -a, a

    def fake_act(v, lo, hi):
        scale = max(-lo, hi) / 127
        return np.clip(np.round(v / scale), -127, 127) * scale

    fake_w = fake_quantize_weight(8, None, True)
    alpha, _, err = search_alpha(group, [(x, act_range)], absmax, fake_w, fake_act)
    _, _, err0 = search_alpha(group, [(x, act_range)], absmax, fake_w, fake_act, grid=(0.0,))
    assert alpha > 0 and err < err0 / 4
    assert np.allclose(factors(absmax, np.abs(w).max(axis=1), 0.0), 1)
    # Without outliers there is little to gain: whatever is chosen is no worse than no smoothing.
    x2 = rng.standard_normal((256, k)).astype(np.float32)
    absmax = np.abs(x2).max(axis=0)
    _, _, err2 = search_alpha(group, [(x2, act_range)], absmax, fake_w, fake_act)
    _, _, err20 = search_alpha(group, [(x2, act_range)], absmax, fake_w, fake_act, grid=(0,))
    assert err2 <= err20


def test_insert_qdq_shares_one_pair(tmp_path, rng):
    """One Q/DQ pair per tensor, read by all its quantized readers; other readers keep the float value."""
    path = _norm_mlp(tmp_path / "m.onnx", rng, outlier=1.0)
    model = ir.load(path)
    readers = [(n, 0) for n in model.graph if n.name in ("gate_proj", "up_proj")]
    InsertActivationQDQPass({"h": ActivationQParams(0.05, 128, "uint8", tuple(readers))})(model)
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(qs) == 1 and len(dqs) == 1
    assert all(n.inputs[0] is dqs[0].outputs[0] for n, _ in readers)
    out = tmp_path / "q.onnx"
    ir.save(model, out)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x = rng.standard_normal((1, 8, 48)).astype(np.float32)
    (ref,) = run(path, {"x": x})
    (got,) = run(out, {"x": x})
    assert sqnr_db(ref, got) > 25

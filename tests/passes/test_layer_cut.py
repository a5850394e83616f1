"""LayerCut: a decoder graph cut at its layer boundaries; the pieces, chained, compute what the whole graph does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import matmul_model
from onnx import TensorProto, helper

from qonnx.passes.layer_cut import LayerCut, UncuttableError, node_layer
from qonnx.runtime.session import make_session

EXACT = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion across a layer boundary in the whole graph


def llama_feed(path, seq=12, seed=0):
    """Random tokens for the tiny Llama, with an empty KV cache."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(3, 128, (1, seq)),
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq)[None],
    }
    for i in make_session(path).get_inputs()[3:]:
        feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return feed


def test_pieces_chain_reproduce_the_model(llama):
    """Prefix, one piece per layer, suffix: run in turn on the values handed on, the same logits, bit for bit."""
    cut = LayerCut(onnx.load(llama, load_external_data=False))
    assert cut.layers == [0, 1] and cut.segments == 4
    feed = llama_feed(llama)
    whole = make_session(llama, optimization=EXACT).run(["logits"], feed)[0]
    values = dict(feed)
    for s in range(cut.segments):
        outputs = ["logits"] if s == cut.segments - 1 else cut.handed_on(s)
        piece = cut.piece(s, outputs)
        layers = {
            w.split("layers.")[1].split(".")[0] for w in (t.name for t in piece.graph.initializer) if "layers." in w
        }
        # a layer's piece holds its own weights alone, and ones equal to them that the export stored once (a
        # random model's norm weights are all ones: DeduplicateInitializersPass keeps layer 0's name)
        assert layers <= ({"0", str(s - 1)} if s in (1, 2) else {"0"})
        session = make_session(piece.SerializeToString(), external_data_dir=llama.parent, optimization=EXACT)
        wanted = {i.name for i in session.get_inputs()}
        values.update(zip(outputs, session.run(outputs, {k: v for k, v in values.items() if k in wanted}), strict=True))
    assert np.array_equal(values["logits"], whole)
    hidden = [n for n in cut.handed_on(2) if values[n].shape == (1, 12, 64)]
    assert len(hidden) == 1  # the residual stream alone leaves the last layer


@pytest.mark.parametrize(
    ("name", "layer"),
    [("/model/layers.3/self_attn/q_proj/MatMul", 3), ("layers.12.mlp.down_proj", 12), ("h.2.attn", 2),
     ("players.3.x", None), ("lm_head", None)],
)  # fmt: skip
def test_node_layer_from_names(name, layer):
    assert node_layer(helper.make_node("Relu", ["a"], ["b"], name=name)) == layer


def test_uncuttable_graphs(tmp_path, rng):
    """No layer named, or a layer reading a later layer's value: refused with the reason."""
    plain = matmul_model(tmp_path / "m.onnx", rng.standard_normal((8, 4)).astype(np.float32))
    with pytest.raises(UncuttableError, match="no node names a decoder layer"):
        LayerCut(onnx.load(plain))
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="layers.1.relu"),
        helper.make_node("Relu", ["a"], ["y"], name="layers.0.relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    with pytest.raises(UncuttableError, match="of layer 0 reads a value computed in layer 1"):
        LayerCut(helper.make_model(graph))


def test_weight_computations_run_where_read():
    """A layer-less node computed from weights alone (the transposed tied embedding of an lm_head) runs in the
    segment that reads it, so that it is not handed on per batch from the prefix through every layer."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h0"], name="embed"),
        helper.make_node("Transpose", ["emb"], ["emb_t"], name="lm_head.t"),
        helper.make_node("Relu", ["h0"], ["h1"], name="layers.0.act"),
        helper.make_node("Relu", ["h1"], ["h2"], name="layers.1.act"),
        helper.make_node("MatMul", ["h2", "emb_t"], ["y"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [onnx.numpy_helper.from_array(np.ones((5, 4), np.float32), "emb")],
    )  # fmt: skip
    cut = LayerCut(helper.make_model(graph))
    assert cut.node_segment == [0, 3, 1, 2, 3]
    assert [cut.handed_on(s) for s in range(4)] == [["h0"], ["h1"], ["h2"], []]

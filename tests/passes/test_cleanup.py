"""Cleanup passes: unused initializers and dead weight chains go, in subgraphs too."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qonnx.passes.cleanup import RemoveUnusedInitializersPass, remove_unused_weights


def _subgraph_model(rng):
    v = helper.make_tensor_value_info
    inner = helper.make_graph(
        [helper.make_node("MatMul", ["x", "used"], ["t"])],
        "then",
        [],
        [v("t", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("used", "dead")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [v("e", TensorProto.FLOAT, None)]
    )
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=other)],
        "g",
        [v("x", TensorProto.FLOAT, [2, 4]), v("c", TensorProto.BOOL, []), v("kept_input", TensorProto.FLOAT, [4])],
        [v("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("main_dead", "kept_input")],
    )
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_remove_unused_initializers_in_subgraphs(rng):
    model = _subgraph_model(rng)
    assert RemoveUnusedInitializersPass()(model).modified
    names = {v.name for g in model.graphs() for v in g.initializers.values()}
    assert names == {"used", "kept_input"}  # unused ones gone in both graphs; an initializer-input stays
    assert not RemoveUnusedInitializersPass()(model).modified


def test_remove_unused_weights_takes_chains_and_only_dead_values(rng):
    model = _subgraph_model(rng)
    then = next(g for g in model.graphs() if g.name == "then")
    assert remove_unused_weights([then.node(0).inputs[1]]) == 0  # `used` is still read
    cast = ir.node("Cast", [then.initializers["dead"]], attributes={"to": 1})
    relu = ir.node("Relu", [then.initializers["used"]])
    then.extend([cast, relu])
    assert remove_unused_weights([cast.outputs[0], relu.outputs[0]]) == 2  # Cast and `dead`; Relu is no weight op
    assert set(then.initializers) == {"used"} and relu.graph is then
    kept = model.graph.initializers["kept_input"]
    assert remove_unused_weights([kept]) == 0  # an initializer that is also a graph input can be fed
    assert remove_unused_weights([kept], drop_graph_inputs=True) == 1 and len(model.graph.inputs) == 2

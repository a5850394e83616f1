"""The export's optimizer: onnxscript's ``optimize`` to the node, without its quadratic Slice-pair matching."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
import pytest

from qonnx.models.optimize import optimize


def _slices_model(pairs: int, split: bool) -> ir.Model:
    """``pairs`` blocks: x -> two last-axis Slices -> Add, Sub -> Concat, chained.

    ``split``: the Slices halve x, the upper half first: onnxscript's rule then makes them a Split (it pairs
    each Slice with the first reader of its input, and so a lower half only with an upper half before it).
    """
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    tape = ir.tape.Tape()
    axes = tape.initializer(ir.tensor([-1], dtype=ir.DataType.INT64, name="axes"))
    zero = tape.initializer(ir.tensor([0], dtype=ir.DataType.INT64, name="zero"))
    half = tape.initializer(ir.tensor([4], dtype=ir.DataType.INT64, name="half"))
    end = tape.initializer(ir.tensor([8 if split else 1 << 62], dtype=ir.DataType.INT64, name="end"))
    y = x
    for _ in range(pairs):
        b = tape.op("Slice", [y, half, end, axes])
        a = tape.op("Slice", [y, zero, half, axes])
        y = tape.op("Concat", [tape.op("Add", [a, b]), tape.op("Sub", [a, b])], attributes={"axis": -1})
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def _proto(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.mark.parametrize("split", [True, False])
def test_optimize_matches_onnxscript(split):
    ours, theirs = _slices_model(3, split), _slices_model(3, split)
    optimize(ours)
    onnxscript.optimizer.optimize(theirs)
    assert _proto(ours) == _proto(theirs)
    assert ("Split" in [n.op_type for n in ours.graph]) is split  # the Slice-pair rule did (not) fire


def test_optimize_does_not_scan_the_graph_per_node(monkeypatch):
    # onnxscript's matcher lists the whole graph at every node for the Slice-pair rule: quadratic in size.
    scans = 0
    iterate = ir.Graph.__iter__

    def counting(self):
        nonlocal scans
        scans += 1
        return iterate(self)

    model = _slices_model(60, split=False)
    monkeypatch.setattr(ir.Graph, "__iter__", counting)
    optimize(model)
    assert scans < 60, scans

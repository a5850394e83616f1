"""Made-up inputs at sizes a model can take: image and audio sizes, sizes the model states, sizes tried in turn."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from builders import cnn_zero_at_1x1, detector_with_resize, recurrent_with_state
from onnx import TensorProto, helper

from qonnx.runtime.inputs import IMAGE_SIZES, declared_sizes, make_inputs, size_trials
from qonnx.runtime.session import make_session
from qonnx.runtime.verify import OriginalDidNotRun, ReferenceRun, compare_outputs, degenerate


def _shapes(feeds):
    return {n: a.shape for n, a in feeds.items()}


def test_degenerate_outputs():
    """All zeros, one value everywhere or non-finite values show nothing; an empty output or one value does."""
    assert degenerate(np.zeros((2, 3), np.float32)) == "all zeros"
    assert degenerate(np.zeros((), np.float32)) == "all zeros"
    assert degenerate(np.full((4,), 2.5, np.float32)) == "constant (2.5 everywhere)"
    assert degenerate(np.array([1.0, np.nan], np.float32)).startswith("not finite")
    assert degenerate(np.array([1.0, -np.inf], np.float32)).startswith("not finite")
    assert degenerate(np.zeros((1, 0), np.float32)) is None
    assert degenerate(np.array([3.0], np.float32)) is None
    assert degenerate(np.arange(4, dtype=np.float16)) is None
    # the comparison says so too: zero error on a zero signal is no infinite SQNR worth anything
    m = compare_outputs("y", np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert m.sqnr_db == math.inf and m.degenerate == "all zeros" and m.to_dict()["degenerate"] == "all zeros"
    assert "degenerate" not in compare_outputs("y", np.arange(6.0).reshape(2, 3), np.ones((2, 3))).to_dict()


def test_image_and_audio_dimensions_get_real_sizes(tmp_path):
    """Height and width of an image input start at 224 (never 1), its channels at 3, audio at 16,000 samples, a
    sample rate at 16,000; a KV cache's past length stays 0 even where its head count looks like image channels."""
    feeds = make_inputs(make_session(cnn_zero_at_1x1(tmp_path / "cnn.onnx")))
    assert _shapes(feeds) == {"x": (1, 3, 224, 224)}
    feeds = make_inputs(make_session(recurrent_with_state(tmp_path / "vad.onnx")))
    assert feeds["x"].shape == (1, 16_000) and feeds["sr"].shape == () and feeds["sr"] == 16_000
    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["past_key_values.0.key"], ["present"]),
         helper.make_node("Identity", ["img"], ["o"]),
         helper.make_node("Identity", ["pixel_values"], ["p"])],
        "g",
        [v("past_key_values.0.key", TensorProto.FLOAT, ["batch", 3, "past_sequence_length", 8]),
         v("img", TensorProto.FLOAT, ["batch", "h", "w", 3]),
         v("pixel_values", TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])],
        [v("present", TensorProto.FLOAT, None), v("o", TensorProto.FLOAT, None), v("p", TensorProto.FLOAT, None)],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "g.onnx")
    feeds = make_inputs(make_session(tmp_path / "g.onnx"))
    assert feeds["past_key_values.0.key"].shape == (1, 3, 0, 8) and feeds["img"].shape == (1, 224, 224, 3)
    assert feeds["pixel_values"].shape == (1, 3, 224, 224)  # Optimum's names


def test_size_trials_image_sizes_in_turn(tmp_path):
    """Unnamed image dimensions are tried at each common size, after what the model states."""
    session = make_session(detector_with_resize(tmp_path / "det.onnx"))
    trials = [_shapes(make_inputs(session, dims=t))["x"] for t in size_trials(session)]
    assert trials == [(1, 3, s, s) for s in IMAGE_SIZES]
    trials = size_trials(session, declared={"x:2": 96, "x:3": 128})
    assert [_shapes(make_inputs(session, dims=t))["x"] for t in trials][:2] == [(1, 3, 96, 128), (1, 3, 224, 224)]
    assert size_trials(session, shapes={"x": (1, 3, 8, 8)}) == [{}]  # the caller's shape, nothing to try


def test_declared_sizes_from_metadata_and_value_info(tmp_path):
    """Ultralytics' ``imgsz``, a metadata key named after a dimension, and a static shape in value_info that
    the input reaches through a normalization."""
    path = cnn_zero_at_1x1(tmp_path / "cnn.onnx", metadata={"imgsz": "[640, 480]"})
    assert declared_sizes(onnx.load(path)) == {"height": 640, "width": 480}
    path = cnn_zero_at_1x1(tmp_path / "cnn2.onnx", metadata={"height": "96", "stride": "32"})
    assert declared_sizes(onnx.load(path)) == {"height": 96}
    model = onnx.load(detector_with_resize(tmp_path / "det.onnx"))
    conv = model.graph.node[0]
    conv.input[0] = "xn"
    model.graph.node.insert(0, helper.make_node("Div", ["x", "scale"], ["xn"], name="normalize"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(255, np.float32), "scale"))
    model.graph.value_info.append(helper.make_tensor_value_info("xn", TensorProto.FLOAT, [1, 3, 64, 96]))
    assert declared_sizes(model) == {"batch": 1, "x:2": 64, "x:3": 96}


def test_reference_run_finds_a_size_where_the_output_shows_something(tmp_path):
    """The CNN's output is all zeros on a 1x1 image and the detector's neck runs on none: the reference run
    keeps the sizes where the original runs and its output shows something, and says which."""
    src = cnn_zero_at_1x1(tmp_path / "cnn.onnx")
    one = make_session(src).run(None, {"x": np.ones((1, 3, 1, 1), np.float32)})[0]
    assert degenerate(one) == "all zeros"
    run = ReferenceRun(src)
    run.run()
    assert run.sizes == {"x": [1, 3, 224, 224]} and run.inputs.endswith("x 1x3x224x224") and not run.tried
    assert degenerate(run.outputs(0)[0]) is None
    run = ReferenceRun(src, shapes={"x": (1, 3, 1, 1)})  # the caller's sizes are kept, whatever they show
    run.run()
    assert run.sizes == {} and degenerate(run.outputs(0)[0]) == "all zeros"
    run = ReferenceRun(src, dims={"height": 1, "width": 1})
    run.run()
    assert run.sizes == {"x": [1, 3, 1, 1]} and degenerate(run.outputs(0)[0]) == "all zeros"
    run = ReferenceRun(detector_with_resize(tmp_path / "det.onnx"), dims={"batch": 2})
    run.run()
    assert run.sizes == {"x": [2, 3, 224, 224]} and not run.tried
    run = ReferenceRun(detector_with_resize(tmp_path / "det64.onnx", stride=32))  # needs multiples of 64
    run.run()
    assert run.sizes == {"x": [1, 3, 320, 320]} and degenerate(run.outputs(0)[0]) is None
    assert run.tried == ["x 1x3x224x224: Concat node 'concat': Non concat axis dimensions must match: Axis 2 has "
                         "mismatched dimensions of 7 and 8"]  # fmt: skip
    with pytest.raises(OriginalDidNotRun, match=r"none of the 3 sets of inputs .*Reshape node 'reshape'"):
        ReferenceRun(recurrent_with_state(tmp_path / "vad.onnx")).run()

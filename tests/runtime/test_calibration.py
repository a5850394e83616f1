"""Calibration through ONNX Runtime: the Hessians equal 2/n X^T X of the exposed tensors."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import hessian, run

import qonnx
from qonnx.runtime.calibration import calibration_feeds, collect_hessians


def test_hessians_through_onnxruntime(stack_feeds):
    """The Hessians collected through ONNX Runtime equal 2/n X^T X of the exposed tensors."""
    path, npz, _ = stack_feeds
    model = qonnx.load(path)
    inputs = {n.inputs[0].name: 72 for n in model.graph if n.op_type == "MatMul" and n.inputs[1].shape[0] == 72}
    feeds = calibration_feeds(path, npz, samples=5)
    assert len(feeds) == 5 and feeds[0]["x"].shape == (1, 64, 72)
    got = collect_hessians(path, inputs, feeds)
    proto = onnx.load(path)
    name = next(iter(inputs))
    proto.graph.output.append(onnx.ValueInfoProto(name=name))
    exposed = path.parent / "exposed.onnx"
    onnx.save(proto, exposed)
    xs = np.concatenate([run(exposed, f)[-1].reshape(-1, 72) for f in feeds])
    exposed.unlink()
    np.testing.assert_allclose(got[name], hessian(xs), rtol=1e-4, atol=1e-4 * np.abs(hessian(xs)).max())

"""Calibration through ONNX Runtime: the Hessians equal 2/n X^T X of the exposed tensors."""

from __future__ import annotations

import numpy as np
import onnx
from builders import recurrent_with_state
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


def test_scalar_inputs_in_npz_feeds(tmp_path):
    """A scalar int64 input (a speech model's sample rate) in a .npz of feeds, one value per batch or one 0-d
    array for all: W8A8 calibrates (it stopped with "RuntimeError: Unable to handle object of type
    numpy.int64"), GPTQ collects its Hessians, verification runs on the last batch, analyze measures."""
    path = recurrent_with_state(tmp_path / "vad.onnx")
    rng = np.random.default_rng(0)
    x, state = (
        rng.standard_normal((3, 1, 512)).astype(np.float32),
        rng.standard_normal((3, 2, 1, 64)).astype(np.float32),
    )
    np.savez(tmp_path / "each.npz", x=x, state=state, sr=np.full(3, 16_000, np.int64))
    np.savez(tmp_path / "once.npz", x=x, state=state, sr=np.array(16_000, np.int64))
    for npz in ("each.npz", "once.npz"):
        cal = qonnx.Calibration(data=str(tmp_path / npz), samples=3)
        s = qonnx.quantize(path, qonnx.W8A8(calibration=cal), output=tmp_path / f"w8a8-{npz}.onnx")
        assert s.verification.verified and s.verification.inputs == f"{npz}, its last batch (of 3)"
        feeds = calibration_feeds(path, tmp_path / npz, samples=3)
        assert len(feeds) == 3 and all(isinstance(f["sr"], np.ndarray) and f["sr"].shape == () for f in feeds)
        gptq = qonnx.W4A16(block_size=16, algo=qonnx.GPTQ(calib_data=str(tmp_path / npz), calib_samples=3))
        s = qonnx.quantize(path, gptq, output=tmp_path / "g.onnx")
        assert s.verification.verified and s.verification.inputs == f"{npz}, its last batch (of 3)"
        found = qonnx.analyze(path, qonnx.W4A16(block_size=16), samples=3, data=tmp_path / npz)
        assert [r.node for r in found.layers] == ["fc"]

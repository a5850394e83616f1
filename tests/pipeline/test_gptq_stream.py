"""Layer-streamed GPTQ (GPTQ(stream_layers=True), --stream-layers): the same codes as sequential GPTQ; refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import matmul_model
from helpers import assert_one_line_error, qonnx_cli, run

import qonnx
from qonnx.core.algos import GPTQ
from qonnx.core.errors import ConfigError
from qonnx.passes.layer_cut import UncuttableError
from qonnx.pipeline import gptq_stream
from qonnx.pipeline.gptq_stream import gpu_free_bytes
from qonnx.runtime.session import cuda_usable, make_session


def llama_npz(llama, folder, n=4, seq=16):
    """Calibration feeds for the tiny Llama (random tokens, an empty KV cache) as a .npz file."""
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(3, 128, (n, 1, seq)),
        "attention_mask": np.ones((n, 1, seq), np.int64),
        "position_ids": np.tile(np.arange(seq), (n, 1, 1)),
    }
    for i in make_session(llama).get_inputs()[3:]:
        feeds[i.name] = np.zeros((n, 1, i.shape[1], 0, i.shape[3]), np.float32)
    np.savez(folder / "feeds.npz", **feeds)
    return folder / "feeds.npz"


def codes(path):
    """The 4-bit codes of each MatMulNBits in graph order (tiny Llama: per layer q, k, v, o, gate, up, down)."""
    proto = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.slow
def test_streamed_equals_sequential(llama, tmp_path):
    """Streamed with stages writes the codes sequential GPTQ writes, bit for bit (the same Hessians: each layer's
    inputs come from the quantized earlier layers either way). Streamed by whole layers: layer 0's q/k/v see the
    float model as plain GPTQ's do (same codes), later layers see quantized ones (other codes)."""
    npz = llama_npz(llama, tmp_path)
    out = {}
    for name, kw in {"plain": {}, "seq": {"sequential": True}, "stream": {"sequential": True, "stream_layers": True},
                     "layers": {"stream_layers": True}}.items():  # fmt: skip
        cfg = qonnx.W4A16(block_size=32, algo=GPTQ(calib_data=str(npz), calib_samples=4, **kw))
        summary = qonnx.quantize(llama, cfg, output=tmp_path / name / "model.onnx", verify=False)
        assert ("streamed gptq" in summary.phases) == ("stream_layers" in kw)
        out[name] = codes(tmp_path / name / "model.onnx")
    assert len(out["seq"]) == len(out["stream"]) == len(out["layers"]) == 15  # 2 x 7 and lm_head
    assert all(np.array_equal(a, b) for a, b in zip(out["seq"], out["stream"], strict=True))
    assert all(np.array_equal(out["plain"][i], out["layers"][i]) for i in range(3))  # layer 0's q, k, v
    assert not any(np.array_equal(out["plain"][i], out["layers"][i]) for i in range(7, 15))  # layer 1, lm_head


def test_uncuttable_refused(tmp_path, rng):
    """A graph without decoder layers: refused by the API and, in one line with exit 2, by the CLI."""
    path = matmul_model(tmp_path / "m.onnx", rng.standard_normal((64, 32)).astype(np.float32))
    np.savez(tmp_path / "f.npz", x=rng.standard_normal((2, 8, 64)).astype(np.float32))
    algo = GPTQ(calib_data=str(tmp_path / "f.npz"), calib_samples=2, stream_layers=True)
    with pytest.raises(UncuttableError, match="cannot cut into layers"):
        qonnx.quantize(path, qonnx.W4A16(block_size=32, algo=algo), output=tmp_path / "q.onnx")
    res = qonnx_cli(
        "quantize", path, "-o", tmp_path / "q.onnx", "--algo", "gptq", "--stream-layers", "--calib-data",
        tmp_path / "f.npz", "--calib-samples", "2",
    )  # fmt: skip
    assert_one_line_error(res, "cannot cut into layers: no node names a decoder layer")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--stream-layers")
    assert_one_line_error(res, "--stream-layers applies to --algo gptq only")
    with pytest.raises(ConfigError, match=r"applies to weight-only schemes .*layer-streamed too"):
        qonnx.W8A8(algo=GPTQ(stream_layers=True))


def test_cli_round_trip(llama, tmp_path):
    """qonnx quantize --algo gptq --stream-layers: a streamed run, a model ONNX Runtime runs."""
    npz = llama_npz(llama, tmp_path)
    out = tmp_path / "q" / "model.onnx"
    res = qonnx_cli(
        "quantize", llama, "-o", out, "--algo", "gptq", "--stream-layers", "--calib-data", npz,
        "--calib-samples", "4", "--block-size", "32", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert "streamed gptq" in summary["phases"] and summary["config"]["algo"]["stream_layers"] is True
    feeds = dict(np.load(npz))
    logits = run(out, {k: v[0] for k, v in feeds.items()})[0]
    assert logits.shape == (1, 16, 128) and np.isfinite(logits).all()


def test_streamed_when_the_gpu_is_too_small(llama, tmp_path, rng, monkeypatch, capsys):
    """GPTQ streams on its own when the weights exceed the GPU's free memory (here pretended), and calibrates
    the whole model, with a warning, when the graph cannot be cut; with room, or on the CPU, it does not."""
    npz = llama_npz(llama, tmp_path)
    cfg = qonnx.W4A16(block_size=32, algo=GPTQ(calib_data=str(npz), calib_samples=4))
    if not cuda_usable():
        assert gpu_free_bytes() is None  # on the CPU: never automatic
    monkeypatch.setattr(gptq_stream, "gpu_free_bytes", lambda: 1000)
    summary = qonnx.quantize(llama, cfg, output=tmp_path / "small" / "model.onnx", verify=False)
    assert "streamed gptq" in summary.phases and summary.config["algo"]["stream_layers"] is True
    assert "GPTQ calibrates and solves one decoder layer at a time" in capsys.readouterr().err
    path = matmul_model(tmp_path / "m.onnx", rng.standard_normal((64, 32)).astype(np.float32))
    np.savez(tmp_path / "f.npz", x=rng.standard_normal((2, 8, 64)).astype(np.float32))
    plain = qonnx.W4A16(block_size=32, algo=GPTQ(calib_data=str(tmp_path / "f.npz"), calib_samples=2))
    summary = qonnx.quantize(path, plain, output=tmp_path / "q.onnx", verify=False)
    assert "streamed gptq" not in summary.phases and "cannot cut into layers" in capsys.readouterr().err
    monkeypatch.setattr(gptq_stream, "gpu_free_bytes", lambda: 1 << 40)
    summary = qonnx.quantize(llama, cfg, output=tmp_path / "room" / "model.onnx", verify=False)
    assert "streamed gptq" not in summary.phases

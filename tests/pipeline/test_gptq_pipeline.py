"""GPTQ through qonnx.quantize: .npz feeds, per channel and 3 bits, sequential stages; closer than RTN."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import matmul_model
from helpers import correlated, run, sqnr_db

import qonnx
from qonnx.core.algos import GPTQ
from qonnx.core.config import W3A16, W4A16
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import Targets
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.runtime.calibration import calibration_feeds


def test_pipeline_npz_feeds(stack_feeds, tmp_path):
    """W4A16(algo=GPTQ(...)): a model ONNX Runtime runs, closer to the float model than RTN on unseen inputs."""
    path, npz, test = stack_feeds
    cfg = W4A16(block_size=32, algo=GPTQ(calib_data=str(npz), calib_samples=6))
    summary = qonnx.quantize(path, cfg, output=tmp_path / "gptq.onnx")
    assert summary.verification.ran
    assert len(summary.quantized) == 11 and all("gptq" in r.reason for r in summary.quantized)
    assert {"calibration", "quantization", "writing"} <= set(summary.phases)
    assert summary.to_dict()["phases"]["calibration"] > 0
    out = onnx.load(tmp_path / "gptq.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert json.loads({p.key: p.value for p in out.metadata_props}["qonnx.config"])["algo"]["name"] == "gptq"
    qonnx.quantize(path, W4A16(block_size=32), output=tmp_path / "rtn.onnx")
    feeds = {"x": test}
    ref = run(path, feeds)[0]
    gptq_db, rtn_db = (
        sqnr_db(ref, run(tmp_path / "gptq.onnx", feeds)[0]),
        sqnr_db(ref, run(tmp_path / "rtn.onnx", feeds)[0]),
    )
    assert gptq_db > rtn_db + 1, (gptq_db, rtn_db)


def test_pipeline_refusals(stack_feeds, tmp_path):
    path, npz, _ = stack_feeds
    with pytest.raises(ConfigError, match="no tokenizer beside the model"):
        qonnx.quantize(path, W4A16(algo="gptq"), output=tmp_path / "q.onnx")
    with pytest.raises(ConfigError, match="share one calibration setting"):
        qonnx.quantize(
            path,
            W4A16(algo=GPTQ(calib_data=str(npz))),
            output=tmp_path / "q.onnx",
            targets={"re:mlp": W4A16(algo=GPTQ(calib_data=str(npz), calib_samples=2))},
        )
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 1, 4, 72), np.float32))
    with pytest.raises(ConfigError, match="missing x; unknown y"):
        calibration_feeds(path, tmp_path / "wrong.npz")
    with pytest.raises(ir.passes.PreconditionError, match="needs the Hessian"):
        QuantizeWeightsPass(Targets(W4A16(algo="gptq")))(qonnx.load(path))


@pytest.mark.parametrize(("cfg", "bound"), [(W4A16(block_size=None, format="qdq"), 1), (W3A16(block_size=32), 1)])
def test_pipeline_per_channel_and_three_bits(stack_feeds, tmp_path, cfg, bound):
    """GPTQ through the pipeline with one scale per output channel (QDQ) and with 3-bit codes."""
    path, npz, test = stack_feeds
    gptq_cfg = dataclasses.replace(cfg, algo=GPTQ(calib_data=str(npz), calib_samples=6))
    summary = qonnx.quantize(path, gptq_cfg, output=tmp_path / "gptq.onnx")
    assert len(summary.quantized) == 11 and all("gptq" in r.reason for r in summary.quantized)
    onnx.checker.check_model(onnx.load(tmp_path / "gptq.onnx"), full_check=True)
    qonnx.quantize(path, cfg, output=tmp_path / "rtn.onnx")
    ref = run(path, {"x": test})[0]
    gptq_db = sqnr_db(ref, run(tmp_path / "gptq.onnx", {"x": test})[0])
    rtn_db = sqnr_db(ref, run(tmp_path / "rtn.onnx", {"x": test})[0])
    assert gptq_db > rtn_db + bound, (gptq_db, rtn_db)


@pytest.mark.slow
def test_sequential_stages_and_pipeline(stack_feeds, tmp_path):
    """Sequential GPTQ: stages in true-sequential order; the first stage sees the float model (same codes as
    plain GPTQ), later stages see the quantized earlier layers (other codes); a valid, closer-than-RTN model."""
    from qonnx.passes.weight_plan import hessian_key
    from qonnx.pipeline.gptq_sequential import stages

    path, npz, test = stack_feeds
    model = qonnx.load(path)
    plan = QuantizeWeightsPass(Targets(W4A16(algo=GPTQ(sequential=True)))).plan(model)
    layers = [(c, cfg) for c, cfg, _ in plan if cfg is not None and cfg.gptq is not None]
    cut = [[c.weight_name.split(".")[-2] for c, _ in stage] for stage in stages(model, layers, hessian_key)]
    assert cut[:4] == [["qkv"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] and len(cut) == 9

    def gptq(sequential):
        cfg = W4A16(block_size=32, algo=GPTQ(calib_data=str(npz), calib_samples=6, sequential=sequential))
        out = tmp_path / f"seq{sequential}.onnx"
        return qonnx.quantize(path, cfg, output=out), out

    (plain, plain_path), (seq, seq_path) = gptq(False), gptq(True)
    assert "sequential gptq" in seq.phases and "sequential gptq" not in plain.phases
    onnx.checker.check_model(onnx.load(seq_path), full_check=True)

    def codes(p):
        return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(p).graph.initializer if t.name.endswith("_B")}

    a, b = codes(plain_path), codes(seq_path)
    first = [n for n in a if "layers.0.attn.qkv" in n]
    later = [n for n in a if "layers.1." in n]
    assert first and later and set(a) == set(b)
    assert all(np.array_equal(a[n], b[n]) for n in first)  # nothing quantized before the first stage
    assert not all(np.array_equal(a[n], b[n]) for n in later)
    qonnx.quantize(path, W4A16(block_size=32), output=tmp_path / "rtn.onnx")
    ref = run(path, {"x": test})[0]
    seq_db = sqnr_db(ref, run(seq_path, {"x": test})[0])
    assert seq_db > sqnr_db(ref, run(tmp_path / "rtn.onnx", {"x": test})[0]) + 1


def test_sequential_layer_reading_a_graph_input(rng, tmp_path):
    """A GPTQ layer fed straight by a graph input takes its Hessian from the feeds (no session output of it);
    the first stage has nothing quantized before it, so sequential equals plain GPTQ there."""
    path = matmul_model(tmp_path / "m.onnx", rng.standard_normal((64, 32)).astype(np.float32))
    np.savez(tmp_path / "f.npz", x=correlated(rng, 4 * 8, 64).reshape(4, 8, 64))
    outs = []
    for sequential in (False, True):
        algo = GPTQ(calib_data=str(tmp_path / "f.npz"), calib_samples=4, sequential=sequential)
        out = tmp_path / f"q{sequential}.onnx"
        summary = qonnx.quantize(path, W4A16(block_size=32, algo=algo), output=out)
        assert summary.verification.ran and len(summary.quantized) == 1
        outs.append({t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer})
    assert outs[0].keys() == outs[1].keys() and all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_same_bytes_on_one_and_two_threads(tmp_path):
    """The whole GPTQ run (ONNX Runtime calibration, Hessians, solve, save) writes the same file on 1 and 2 threads."""
    import torch

    from qonnx.models import build_decoder_stack

    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=256, intermediate=512, layers=2, vocab=100)
    x = correlated(np.random.default_rng(3), 8 * 128, 256, rank=16).reshape(8, 1, 128, 256)
    np.savez(tmp_path / "feeds.npz", x=x)
    config = qonnx.W4A16(algo=qonnx.GPTQ(calib_data=str(tmp_path / "feeds.npz"), calib_samples=8))
    before = torch.get_num_threads()
    written = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"q{threads}.onnx"
            qonnx.quantize(path, config, output=out, verify=False)
            written[threads] = out.read_bytes()
    finally:
        torch.set_num_threads(before)
    assert written[1] == written[2]

"""AWQ through qonnx.quantize: scales folded into the float model, awq and awq+gptq closer than RTN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import run, sqnr_db

import qonnx
from qonnx.core import modelfile
from qonnx.core.algos import AWQ, GPTQ
from qonnx.core.config import W4A16
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import Targets
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.passes.weight_plan import hessian_key
from qonnx.pipeline.awq import apply_awq
from qonnx.runtime.calibration import calibration_feeds, collect_hessians


@pytest.fixture
def stack(stack_feeds):
    """The decoder stack (LayerNorm, qkv, o_proj behind a Slice, SwiGLU MLP) and feeds with an outlier feature."""
    path, npz, test = stack_feeds
    return path, npz, {"x": test}


@pytest.mark.slow
@pytest.mark.parametrize("gptq", [None, GPTQ()])
def test_fold_keeps_the_float_model(stack, tmp_path, gptq):
    """Scales folded into the LayerNorms and the up projections: the float model computes the same outputs."""
    path, npz, feeds = stack
    model = qonnx.load(path)
    cfg = W4A16(block_size=32, algo=AWQ(calib_data=str(npz), calib_samples=6, gptq=gptq))
    plan = QuantizeWeightsPass(Targets(cfg)).plan(model)
    inputs = {hessian_key(c): c.k for c, cfg, _ in plan if cfg is not None}
    hessians = collect_hessians(path, inputs, calibration_feeds(path, npz, samples=6))
    before = {name: np.array(h) for name, h in hessians.items()}
    ops = sorted(n.op_type for n in model.graph)
    result = apply_awq(model, plan, hessians)
    assert sorted(n.op_type for n in model.graph) == ops  # no node added
    folded = {name: g for name, g in result.groups.items() if g["alpha"] is not None}
    into = " ".join(g["into"] for g in folded.values())
    assert "LayerNormalization" in into and "up_proj" in into
    assert all(g["alpha"] is None for name, g in result.groups.items() if name.endswith(".v"))  # o_proj: a Slice
    if gptq is None:  # every weight gets its clip ranges; the Hessians are no longer needed
        assert set(result.shrinks) == {c.weight_name for c, cfg, _ in plan if cfg is not None}
        assert not hessians
    else:  # GPTQ chooses its own ranges (clip_search) on the Hessians of X / s: diagonals scaled by 1 / s^2
        assert not result.shrinks and set(hessians) == set(before)
        for name in folded:
            ratio = np.diag(before[name]) / np.diag(hessians[name])
            assert (ratio > 0).all() and not np.allclose(ratio, 1)
    out = tmp_path / "folded.onnx"
    modelfile.save(model, out)
    np.testing.assert_allclose(run(out, feeds)[0], run(path, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_pipeline_npz_feeds(stack, tmp_path, fmt):
    """awq and awq+gptq: valid models closer to the float model than RTN on unseen inputs; records say what AWQ did."""
    path, npz, feeds = stack
    ref = run(path, feeds)[0]
    qonnx.quantize(path, W4A16(block_size=32, format=fmt), output=tmp_path / "rtn.onnx")
    rtn_db = sqnr_db(ref, run(tmp_path / "rtn.onnx", feeds)[0])
    for label, algo in [
        ("awq", AWQ(calib_data=str(npz), calib_samples=6)),
        ("awq+gptq", AWQ(calib_data=str(npz), calib_samples=6, gptq=GPTQ())),
    ]:
        out = tmp_path / f"{label}.onnx"
        summary = qonnx.quantize(path, W4A16(block_size=32, algo=algo, format=fmt), output=out)
        assert summary.verification.ran and len(summary.quantized) == 11
        reasons = [r.reason for r in summary.quantized]
        assert all(f" {label} by default" in r and ("clip search" in r) == (label == "awq") for r in reasons)
        assert any("alpha" in r and "folded into the scale of LayerNormalization" in r for r in reasons)
        assert any("folded into the weight columns of MatMul 'layers.0.mlp.up_proj'" in r for r in reasons)
        assert all("not scaled (nothing before it can absorb a scale)" in r for r in reasons if "o_proj" in r)
        proto = onnx.load(out)
        onnx.checker.check_model(proto, full_check=True)
        config = json.loads({p.key: p.value for p in proto.metadata_props}["qonnx.config"])
        assert config["algo"]["name"] == label
        db = sqnr_db(ref, run(out, feeds)[0])
        assert db > rtn_db + 1, (label, db, rtn_db)


def test_refusals(stack, tmp_path):
    path, npz, _ = stack
    with pytest.raises(ConfigError, match="no tokenizer beside the model"):
        qonnx.quantize(path, W4A16(algo="awq"), output=tmp_path / "q.onnx")
    with pytest.raises(ConfigError, match="share one calibration setting"):
        qonnx.quantize(
            path,
            W4A16(algo=AWQ(calib_data=str(npz))),
            output=tmp_path / "q.onnx",
            targets={"re:mlp": W4A16(algo=GPTQ(calib_data=str(npz), calib_samples=2))},
        )

"""AWQ: the scale and clip searches against round-to-nearest, the fold, and the pipeline end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import run, sqnr_db
from test_cli import assert_one_line_error, qonnx_cli
from test_gptq import correlated, hessian

import qonnx
from qonnx.core import modelfile, quant
from qonnx.core.algos import AWQ, GPTQ
from qonnx.core.config import W4A16
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import Targets
from qonnx.models import build_decoder_stack
from qonnx.passes.awq import Rounding, fake_quantize, scale_factors, scaled_hessian, search_clip, search_scales
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.passes.weight_plan import hessian_key
from qonnx.pipeline.awq import apply_awq
from qonnx.runtime.calibration import calibration_feeds, collect_hessians
from qonnx.runtime.evaluate import perplexity


def outlier_inputs(rng, rows, k, channels=(3, 17, 40), gain=25.0):
    """Activations with a few input channels far larger than the rest (as after an LLM's norms)."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, list(channels)] *= gain
    return x


def output_error(x, w, w_hat):
    return float(((x @ w - x @ w_hat) ** 2).sum())


def awq_weight(w, s, r, shrink=None):
    """The effective weight AWQ stores: ``diag(1/s) Q(diag(s) W)`` with quant's own rounding."""
    scaled = quant.quantize_kn(w * s[:, None], r.bits, r.block_size, r.symmetric, r.scale_dtype, shrink=shrink)
    return scaled.dequantize() / s[:, None]


@pytest.mark.parametrize(
    ("bits", "block_size", "symmetric", "scale_dtype", "k"),
    [(4, 128, False, np.float32, 200), (4, 32, True, np.float16, 96), (8, None, False, np.float32, 72)],
)
def test_fake_quantize_is_quantize_kn(rng, bits, block_size, symmetric, scale_dtype, k):
    """The searches measure exactly what the weight pass stores, with and without shrunk ranges."""
    w = rng.standard_normal((k, 24)).astype(np.float32)
    r = Rounding(bits, block_size, symmetric, scale_dtype)
    shrink = rng.choice([1.0, 0.9, 0.75], size=(quant.num_blocks(k, block_size), 24)).astype(np.float32)
    for f in (None, shrink):
        ref = quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype, shrink=f).dequantize()
        np.testing.assert_array_equal(fake_quantize(torch.from_numpy(w), r, f).numpy(), ref)
    ones = np.ones_like(shrink)
    np.testing.assert_array_equal(
        quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype, shrink=ones).q,
        quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype).q,
    )
    with pytest.raises(ValueError, match="shrink must have shape"):
        quant.quantize_kn(w, bits, block_size, symmetric, shrink=shrink[:, :3])


def test_alpha_zero_is_round_to_nearest(rng):
    """a = 0 gives s = 1, so the stored weight is round-to-nearest's bit for bit."""
    x = np.abs(rng.standard_normal(200)).astype(np.float32) * 10
    s = scale_factors(x, 0.0)
    np.testing.assert_array_equal(s, np.ones(200, np.float32))
    w = rng.standard_normal((200, 16)).astype(np.float32)
    r = Rounding(4, 64, False)
    np.testing.assert_array_equal(awq_weight(w, s, r), quant.quantize_kn(w, 4, 64, False).dequantize())
    # data whose channels are all alike: nothing to protect, the search keeps round-to-nearest's error
    flat = rng.standard_normal((2048, 200)).astype(np.float32)
    found = search_scales([(w, r)], hessian(flat), grid=10, device="cpu")
    assert found.error <= found.rtn_error
    if found.alpha is None:
        np.testing.assert_array_equal(found.s, np.ones(200, np.float32))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("duo", [False, True])
def test_scales_lower_output_error_with_outlier_channels(rng, symmetric, duo):
    """Two layers reading one input with outlier channels: the chosen s beats RTN, also on unseen rows."""
    k = 320  # ragged with block 128
    calib, test = outlier_inputs(rng, 4096, k), outlier_inputs(np.random.default_rng(1), 4096, k)
    w1 = rng.standard_normal((k, 48)).astype(np.float32)
    w2 = 0.1 * rng.standard_normal((k, 32)).astype(np.float32)
    r = Rounding(4, 128, symmetric)
    found = search_scales([(w1, r), (w2, r)], hessian(calib), grid=20, duo=duo, device="cpu")
    assert found.alpha is not None and 0 <= found.alpha < 1
    assert found.s.shape == (k,) and found.s.dtype == np.float32
    assert found.s[[3, 17, 40]].min() > np.median(found.s)  # the outlier channels are scaled up
    assert found.error < 0.7 * found.rtn_error
    for w in (w1, w2):
        rtn = quant.quantize_kn(w, 4, 128, symmetric).dequantize()
        assert output_error(test, w, awq_weight(w, found.s, r)) < 0.8 * output_error(test, w, rtn)
    # the relative errors reported are those of the stored weights
    energy = sum(output_error(calib, w, 0 * w) for w in (w1, w2))
    stored = sum(output_error(calib, w, awq_weight(w, found.s, r)) for w in (w1, w2)) / energy
    assert stored == pytest.approx(found.error, rel=1e-3)


def test_clip_search_by_output_error(rng):
    """Shrunk ranges chosen per block and column never raise the output error, and here lower it."""
    k = 200
    x = correlated(rng, 4096, k)
    h = hessian(x)
    w = rng.standard_normal((k, 40)).astype(np.float32)
    w[5, :] *= 6  # weight outliers that a full range would spend its steps on
    r = Rounding(4, 64, False)
    shrink = search_clip(w, h, r, device="cpu")
    assert shrink.shape == (quant.num_blocks(k, 64), 40) and shrink.dtype == np.float32
    assert shrink.min() >= 0.5 and shrink.max() <= 1.0 and shrink.min() < 1.0
    clipped = quant.quantize_kn(w, 4, 64, False, shrink=shrink).dequantize()
    rtn = quant.quantize_kn(w, 4, 64, False).dequantize()
    assert output_error(x, w, clipped) < 0.95 * output_error(x, w, rtn)
    # only the unshrunk range on the grid: round-to-nearest exactly
    np.testing.assert_array_equal(search_clip(w, h, r, shrinks=(1.0,), device="cpu"), np.ones_like(shrink))


def test_scaled_hessian(rng):
    x = correlated(rng, 512, 24)
    s = np.abs(rng.standard_normal(24)).astype(np.float32) + 0.5
    np.testing.assert_allclose(scaled_hessian(hessian(x), s), hessian(x / s), rtol=1e-4, atol=1e-4)


@pytest.fixture
def stack(tmp_path):
    """A decoder stack (LayerNorm, qkv, o_proj behind a Slice, SwiGLU MLP) and feeds with an outlier feature."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=72, intermediate=200, layers=2, vocab=100)
    x = correlated(np.random.default_rng(3), 6 * 64, 72, rank=8).reshape(6, 1, 64, 72)
    np.savez(tmp_path / "feeds.npz", x=x)
    test = correlated(np.random.default_rng(4), 4 * 64, 72, rank=8).reshape(4, 64, 72)
    return path, tmp_path / "feeds.npz", {"x": test}


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


def test_config_and_refusals(stack, tmp_path):
    path, npz, _ = stack
    assert W4A16(algo="awq").awq == AWQ() and W4A16(algo="awq").gptq is None
    both = W4A16(algo="awq+gptq")
    assert both.gptq == GPTQ() and both.calibrated == AWQ(gptq=GPTQ())
    assert json.dumps(both.to_dict()) and both.to_dict()["algo"]["name"] == "awq+gptq"
    for bad in [dict(grid=0), dict(clip_search=1), dict(calib_samples=0), dict(gptq="gptq")]:
        with pytest.raises(ConfigError, match="awq"):
            AWQ(**bad)
    with pytest.raises(ConfigError, match="no tokenizer beside the model"):
        qonnx.quantize(path, W4A16(algo="awq"), output=tmp_path / "q.onnx")
    with pytest.raises(ConfigError, match="share one calibration setting"):
        qonnx.quantize(
            path,
            W4A16(algo=AWQ(calib_data=str(npz))),
            output=tmp_path / "q.onnx",
            targets={"re:mlp": W4A16(algo=GPTQ(calib_data=str(npz), calib_samples=2))},
        )
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "awq")
    assert_one_line_error(res, "no tokenizer", ".npz")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "rtn", "--calib-data", str(npz))
    assert_one_line_error(res, "--calib-data applies to --algo gptq, awq and awq+gptq only")


def test_cli_on_exported_llama(tmp_path):
    """A Llama export (RMSNorm as Mul, SwiGLU, attention output behind Reshape): --algo awq+gptq from the CLI."""
    pytest.importorskip("transformers")
    from test_export import tiny_model, tiny_tokenizer

    from qonnx.models.export import export_causal_lm

    src = export_causal_lm(
        tiny_model("llama"), tmp_path / "src", tokenizer=tiny_tokenizer(), quiet=True, verify=False
    ).parent
    for algo in ("awq", "awq+gptq"):
        out = tmp_path / algo
        res = qonnx_cli(
            "quantize", src, "-o", out, "--algo", algo, "--block-size", "32", "--calib-samples", "3",
            "--calib-seq-len", "32", "--json",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["config"]["algo"]["name"] == algo and summary["config"]["algo"]["calib_samples"] == 3
        quantized = [r for r in summary["layers"] if r["quantized"]]
        assert len(quantized) == 15 and all(f"{algo} by default" in r["reason"] for r in quantized)
        assert any("folded into the constant" in r["reason"] for r in quantized)  # the RMSNorm weight (a Mul)
        assert summary["verification"]["ran"]
        assert np.isfinite(perplexity(out, seq_len=32, windows=2, progress=False)["perplexity"])

"""GPTQ: the solve against numpy references, the Hessians through ONNX Runtime, and the pipeline end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import matmul_model, run, sqnr_db
from test_cli import assert_one_line_error, qonnx_cli

import qonnx
from qonnx.core import numerics, packing, quant
from qonnx.core.algos import GPTQ
from qonnx.core.config import W3A16, W4A16
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import Targets
from qonnx.models import build_decoder_stack
from qonnx.passes.gptq import gptq_quantize, gptq_quantize_many
from qonnx.passes.hessian import HessianAccumulator
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.runtime.calibration import calibration_feeds, collect_hessians
from qonnx.runtime.evaluate import perplexity

PLAIN = {"act_order": False, "clip_search": False}


def correlated(rng, rows, k, rank=None, seed=0):
    """Inputs whose features are strongly correlated (a few directions dominate), as LLM activations are.

    The directions depend on ``seed`` only: samples drawn with other ``rng`` come from the same distribution.
    """
    rank = rank or k // 4
    mix = np.random.default_rng(seed).standard_normal((rank, k))
    x = rng.standard_normal((rows, rank)) @ mix + 0.1 * rng.standard_normal((rows, k))
    x[:, 3] *= 8  # an outlier feature
    return x.astype(np.float32)


def hessian(x):
    return (2.0 / len(x) * x.astype(np.float64).T @ x).astype(np.float32)


def output_error(x, w, qm):
    return float(((x @ w - x @ qm.dequantize()) ** 2).sum())


def reference_gptq(w, h, bits, block_size, symmetric, damp=0.01):
    """GPTQ without lazy batches or act-order, in float64 numpy: one row at a time, the whole rest updated."""
    k = w.shape[0]
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h[np.diag(h) == 0, np.diag(h) == 0] = 1
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    deq = np.zeros_like(w)
    for i in range(k):
        if i % block_size == 0:
            blk = w[i : i + block_size].astype(np.float32)
            scale, zp = numerics.IntGrid(bits, symmetric).qparams(blk.min(0), blk.max(0))
        v = w[i].astype(np.float32) * (1 / scale) + (zp + (1 << (bits - 1) if symmetric else 0)).astype(np.float32)
        q = np.clip(np.floor(v + 0.5), *(np.array(numerics.qrange(bits, symmetric)) + (8 if symmetric else 0)))
        deq[i] = (q - (8 if symmetric else 0) - zp) * scale
        err = (w[i] - deq[i]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return deq


@pytest.mark.parametrize(
    ("bits", "block_size", "symmetric", "scale_dtype", "k"),
    [
        (4, 128, False, np.float32, 576),  # ragged: the last block holds 64 rows
        (4, 32, True, np.float16, 200),
        (8, 64, False, np.float32, 96),
        (4, None, False, np.float32, 72),  # one block per column
        (4, 256, True, np.float32, 300),  # blocks longer than the lazy batch
    ],
)
@pytest.mark.parametrize("options", [PLAIN, {"act_order": True, "clip_search": False}])
def test_identity_hessian_is_round_to_nearest(rng, bits, block_size, symmetric, scale_dtype, k, options):
    """Without correlations there is nothing to compensate: codes, scales and zero points equal RTN's."""
    w = rng.standard_normal((k, 24)).astype(np.float32)
    got = gptq_quantize(
        w,
        np.eye(k, dtype=np.float32),
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
        device="cpu",
        **options,
    )
    ref = quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype)
    assert got.q.dtype == ref.q.dtype and got.scale.dtype == ref.scale.dtype
    np.testing.assert_array_equal(got.q, ref.q)
    np.testing.assert_array_equal(got.scale, ref.scale)
    np.testing.assert_array_equal(got.zero_point, ref.zero_point)
    assert got.block_size == ref.block_size


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_unbatched_numpy_reference(rng, symmetric):
    """Lazy batches (block 128 over K = 200, groups of 32) give the numbers of the row-by-row algorithm."""
    k, n = 200, 40
    x = correlated(rng, 2048, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = hessian(x)
    got = gptq_quantize(w, h, bits=4, block_size=32, symmetric=symmetric, device="cpu", **PLAIN).dequantize()
    ref = reference_gptq(w, h, 4, 32, symmetric)
    step = np.abs(ref).max() / 7
    # float32 against float64 may flip a rounding now and then; the rest must agree exactly
    assert np.mean(np.abs(got - ref) < 1e-3 * step) > 0.98
    assert ((x @ w - x @ got) ** 2).sum() == pytest.approx(((x @ w - x @ ref) ** 2).sum(), rel=0.05)


@pytest.mark.parametrize(
    "options", [PLAIN, {"act_order": True, "clip_search": False}, {"act_order": True, "clip_search": True}]
)
@pytest.mark.parametrize(("bits", "block_size", "symmetric"), [(4, 128, False), (4, 32, True), (8, 64, False)])
def test_lower_output_error_than_rtn(rng, options, bits, block_size, symmetric):
    """||XW - XW'||^2 on correlated inputs, measured on inputs the Hessian did not see."""
    k, n = 320, 64  # ragged with 128
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    acc = HessianAccumulator(k, device="cpu")
    for chunk in np.array_split(calib.reshape(8, 512, k), 3):
        acc.add_batch(chunk)  # [batches, tokens, K], rows counted across calls
    qm = gptq_quantize(
        w, acc.finalize(), bits=bits, block_size=block_size, symmetric=symmetric, device="cpu", **options
    )
    rtn = quant.quantize_kn(w, bits, block_size, symmetric)
    assert output_error(test, w, qm) < 0.8 * output_error(test, w, rtn)
    # a valid QuantizedMatrix in qonnx's conventions
    qmin, qmax = numerics.qrange(bits, symmetric)
    assert qm.q.min() >= qmin and qm.q.max() <= qmax and qm.q.shape == (k, n)
    assert qm.scale.shape == qm.zero_point.shape == (quant.num_blocks(k, block_size), n)
    if symmetric:
        assert not qm.zero_point.any()
    # the codes and the dequantized weights agree with the MatMulNBits packing round trip
    packed = packing.pack_matmulnbits(qm)
    codes = packing.unpack_nbits_matmulnbits(packed, bits, block_size).reshape(n, -1)[:, :k].T
    np.testing.assert_array_equal(codes, qm.unsigned()[0])


def test_accumulator_and_dead_inputs(rng):
    k = 48
    x = correlated(rng, 300, k)
    x[:, [5, 17]] = 0  # inputs calibration never exercises
    acc = HessianAccumulator(k, device="cpu")
    for part in np.array_split(x, 4):
        acc.add_batch(part.astype(np.float16))
    h = acc.finalize()
    np.testing.assert_allclose(h, hessian(x.astype(np.float16).astype(np.float32)), rtol=1e-4, atol=1e-3)
    w = rng.standard_normal((k, 16)).astype(np.float32)
    qm = gptq_quantize(w, h, bits=4, block_size=16, symmetric=False, device="cpu")
    deq = qm.dequantize()
    assert np.isfinite(deq).all()
    # dead rows keep their weights (rounded), they are not zeroed as in the reference implementation
    step = (qm.scale[[0, 1]]).max(axis=0)
    assert (np.abs(deq[[5, 17]] - w[[5, 17]]) <= step + 1e-6).all()
    with pytest.raises(ValueError, match="no calibration rows"):
        HessianAccumulator(4, device="cpu").finalize()


def test_config():
    cfg = W4A16(algo="gptq")
    assert cfg.gptq == GPTQ() and W4A16().gptq is None
    assert cfg.to_dict()["algo"]["name"] == "gptq" and json.dumps(cfg.to_dict())
    assert hash(cfg) == hash(W4A16(algo=GPTQ()))
    for bad in [dict(algo="smoothquant"), dict(algo=GPTQ)]:
        with pytest.raises(ConfigError, match="algo"):
            W4A16(**bad)
    for bad in [dict(damp=0), dict(calib_samples=0), dict(calib_seq_len=1), dict(block=0), dict(act_order=1)]:
        with pytest.raises(ConfigError, match="gptq"):
            GPTQ(**bad)


@pytest.fixture
def stack_feeds(tmp_path):
    """A decoder stack and calibration feeds for it: correlated features, one array per input."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=72, intermediate=200, layers=2, vocab=100)
    rng = np.random.default_rng(3)
    x = correlated(rng, 6 * 64, 72, rank=8).reshape(6, 1, 64, 72)
    np.savez(tmp_path / "feeds.npz", x=x)
    return path, tmp_path / "feeds.npz", correlated(np.random.default_rng(4), 4 * 64, 72, rank=8).reshape(4, 64, 72)


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
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--calib-samples", "4")
    assert_one_line_error(res, "--calib-samples applies to --algo gptq, awq and awq+gptq only")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "gptq")
    assert_one_line_error(res, "no tokenizer", ".npz")


def test_cli_on_exported_llm(tmp_path):
    """A causal LM folder: feeds from its tokenizer and the pydoc corpus; the CLI options reach the config."""
    pytest.importorskip("transformers")
    from test_export import tiny_model, tiny_tokenizer

    from qonnx.models.export import export_causal_lm

    src = export_causal_lm(
        tiny_model("llama"), tmp_path / "src", tokenizer=tiny_tokenizer(), quiet=True, verify=False
    ).parent
    res = qonnx_cli(
        "quantize",
        src,
        "-o",
        tmp_path / "out",
        "--algo",
        "gptq",
        "--block-size",
        "32",
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "32",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["algo"]["calib_samples"] == 3
    quantized = [r for r in summary["layers"] if r["quantized"]]
    assert len(quantized) == 15 and all("gptq" in r["reason"] for r in quantized)  # lm_head is not tied here
    assert summary["verification"]["ran"]
    ppl = perplexity(tmp_path / "out", seq_len=32, windows=2, progress=False)
    assert np.isfinite(ppl["perplexity"])


@pytest.mark.parametrize(("block_size", "symmetric"), [(128, False), (32, True), (None, False)])
def test_three_bits(rng, block_size, symmetric):
    """GPTQ at 3 bits: identity Hessian = round to nearest; correlated inputs: less output error, codes in range."""
    k, n = 320, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    plain = gptq_quantize(w, np.eye(k, dtype=np.float32), bits=3, block_size=block_size, symmetric=symmetric, **PLAIN)
    rtn = quant.quantize_kn(w, 3, block_size, symmetric)
    np.testing.assert_array_equal(plain.q, rtn.q)
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    qm = gptq_quantize(
        w, hessian(calib), bits=3, block_size=block_size, symmetric=symmetric, act_order=True, clip_search=True
    )
    assert output_error(test, w, qm) < 0.8 * output_error(test, w, rtn)
    qmin, qmax = numerics.qrange(3, symmetric)
    assert qm.q.min() >= qmin and qm.q.max() <= qmax and qm.zero_point.max() <= qmax


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


@pytest.mark.parametrize(
    "options", [PLAIN, {"act_order": True, "clip_search": False}, {"act_order": True, "clip_search": True}]
)
@pytest.mark.parametrize(("bits", "block_size", "symmetric"), [(4, 128, False), (3, None, True)])
def test_batched_solve_equals_one_at_a_time(rng, options, bits, block_size, symmetric):
    """Weights of one shape solved together, each with its own Hessian, give each one's own result exactly."""
    k, n = 200, 24  # ragged with 128
    ws = [rng.standard_normal((k, n)).astype(np.float32) for _ in range(3)]
    hs = [hessian(correlated(rng, 1024, k, seed=s)) for s in range(3)]
    hs[1][:, 7] = hs[1][7, :] = 0  # a dead input in one matrix only
    kw = dict(grid=numerics.IntGrid(bits, symmetric), block_size=block_size, device="cpu", **options)
    together = gptq_quantize_many(ws, hs, **kw)
    for w, h, got in zip(ws, hs, together, strict=True):
        alone = gptq_quantize(w, h, bits=bits, symmetric=symmetric, block_size=block_size, device="cpu", **options)
        np.testing.assert_array_equal(got.q, alone.q)
        np.testing.assert_array_equal(got.scale, alone.scale)
        np.testing.assert_array_equal(got.zero_point, alone.zero_point)
    assert not np.array_equal(together[0].q, together[2].q)
    with pytest.raises(ValueError, match="share one shape"):
        gptq_quantize_many([ws[0], ws[0][:100]], [*hs[:1], hs[0][:100, :100]], **kw)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_float8(rng, scale_dtype):
    """float8 E4M3 GPTQ (one scale per column): identity Hessian = quantize_fp8_kn bit for bit; correlated
    inputs: less output error than rounding to nearest, codes and scales in quantize_fp8_kn's layout."""
    import ml_dtypes

    k, n = 256, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 5] *= 40  # a column with a large range
    kw = dict(grid=numerics.FLOAT8, block_size=None, scale_dtype=scale_dtype, device="cpu")
    (sm,) = gptq_quantize_many([w], [np.eye(k, dtype=np.float32)], **kw)
    codes, scale = sm.codes, sm.scale.reshape(n)
    ref = quant.quantize_fp8_kn(w, scale_dtype=scale_dtype)
    ref_codes, ref_scale = ref.codes, ref.scale.reshape(n)
    assert codes.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == scale_dtype
    np.testing.assert_array_equal(codes.astype(np.float32), ref_codes.astype(np.float32))
    np.testing.assert_array_equal(scale, ref_scale)
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    for options in ({"act_order": False}, {"act_order": True, "clip_search": True}):
        (sm,) = gptq_quantize_many([w], [hessian(calib)], **kw, **options)
        codes, scale = sm.codes, sm.scale.reshape(n)
        deq = codes.astype(np.float32) * scale.astype(np.float32)
        rtn = ref_codes.astype(np.float32) * ref_scale.astype(np.float32)
        err, rtn_err = ((test @ w - test @ deq) ** 2).sum(), ((test @ w - test @ rtn) ** 2).sum()
        assert err < 0.8 * rtn_err, (options, err, rtn_err)
        assert np.isfinite(deq).all() and np.abs(codes.astype(np.float32)).max() <= numerics.FP8_MAX


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


def test_sequential_refusals(stack_feeds, tmp_path):
    from qonnx.core.config import AWQ
    from qonnx.core.config_activations import W4A8

    with pytest.raises(ConfigError, match="sequential GPTQ applies to algo 'gptq' alone"):
        AWQ(gptq=GPTQ(sequential=True))
    with pytest.raises(ConfigError, match="sequential GPTQ applies to weight-only schemes"):
        W4A8(algo=GPTQ(sequential=True))
    with pytest.raises(ConfigError, match="sequential must be True or False"):
        GPTQ(sequential=1)
    path, _, _ = stack_feeds
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--sequential")
    assert_one_line_error(res, "--sequential applies to --algo gptq only")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--scheme", "w8a8", "--sequential")
    assert_one_line_error(res, "--sequential applies to weight-only schemes")


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

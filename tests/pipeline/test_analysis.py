"""Sensitivity analysis and mixed precision: fake-quantized weights fed, layers ranked, budgets kept."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from builders import OUTLIER, matmul_model, outlier_stack, tiny_causal_lm, tiny_tokenizer
from onnx import helper, numpy_helper

import qonnx
from qonnx.core import formats, quant
from qonnx.core.errors import ConfigError
from qonnx.models import build_decoder_stack
from qonnx.pipeline.fake_quant import FakeQuantModel, to_stored
from qonnx.pipeline.mixed_precision import Budget, eight_bit, mixed_precision, parse_percent
from qonnx.runtime.session import make_session

FLOAT = ir.DataType.FLOAT


def feeds_of(path, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, 6, 64)).astype(np.float32)}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_arrays_match_the_codes(rng, symmetric, bits):
    w = rng.standard_normal((80, 24)).astype(np.float32)  # K = 80: a ragged last block of 32
    qm = quant.quantize_kn(w, bits, 32, symmetric)
    ref = qm.dequantize()
    np.testing.assert_array_equal(formats.matmulnbits_arrays(qm, np.float32).dequantize(), ref)
    np.testing.assert_array_equal(formats.dequantize_arrays(qm, np.float32).dequantize(), ref)
    per_channel = quant.quantize_kn(w, bits, None, symmetric)
    np.testing.assert_array_equal(
        formats.dequantize_arrays(per_channel, np.float32).dequantize(), per_channel.dequantize()
    )


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_fed_weight_equals_the_quantized_model(tmp_path, fmt):
    """Feeding a layer's fake-quantized weight gives the outputs of a model with that layer quantized."""
    path = outlier_stack(tmp_path)
    cfg = qonnx.W4A16(block_size=32, format=fmt)
    ctx = FakeQuantModel(path, cfg, None, samples=1, seq_len=8, data="pydoc", device="cpu", progress=False)
    try:
        names = [layer.name for layer in ctx.layers]
        assert len(names) == 11 and not ctx.skipped
        feed = feeds_of(path)
        float_out = ctx.session.session.run(None, feed)[0]
        for name in (OUTLIER, "layers.0.attn.o_proj.weight"):
            i = names.index(name)
            fed = ctx.session.session.run(None, {**feed, name: ctx.fake(i)})[0]
            node = ctx.layers[i].cand.node.name
            q = qonnx.quantize(
                path, cfg, output=tmp_path / f"{fmt}-{i}.onnx", targets={"MatMul": None, node: cfg}, verify=False
            )
            assert len(q.quantized) == 1
            ref = make_session(q.outputs[0], "cpu").run(None, feed)[0]
            scale = np.abs(ref).max()
            np.testing.assert_allclose(fed, ref, atol=2e-5 * scale, rtol=0)
            assert np.abs(fed - float_out).max() > 1e-3 * scale  # the feed did replace the weight
    finally:
        ctx.close()


def test_fed_weight_through_gemm_and_transpose(tmp_path, rng):
    """The stored layout is restored through Gemm's transB and a Transpose chain."""
    w = rng.standard_normal((48, 64)).astype(np.float32)  # stored [N, K]
    v = rng.standard_normal((48, 40)).astype(np.float32)  # stored transposed: the MatMul reads Transpose(vt)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g"], name="gemm", transB=1),
        helper.make_node("Transpose", ["vt"], ["v"], name="t"),
        helper.make_node("MatMul", ["g", "v"], ["y"], name="mm"),
    ]
    path = matmul_model(
        tmp_path / "g.onnx",
        w,
        nodes=nodes,
        initializers=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(v.T.copy(), "vt")],
        k=64,
    )
    cfg = qonnx.W4A16(block_size=16)
    ctx = FakeQuantModel(path, cfg, None, samples=1, seq_len=8, data="pydoc", device="cpu", progress=False)
    try:
        x = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
        for i, layer in enumerate(ctx.layers):
            np.testing.assert_array_equal(to_stored(layer.cand, layer.cand.matrix()), layer.cand.tensor().numpy())
            q = qonnx.quantize(
                path, cfg, output=tmp_path / f"q{i}.onnx", targets={"Gemm": None, "MatMul": None, layer.name: cfg}
            )
            ref = make_session(q.outputs[0], "cpu").run(None, x)[0]
            fed = ctx.session.session.run(None, {**x, layer.name: ctx.fake(i)})[0]
            np.testing.assert_allclose(fed, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    finally:
        ctx.close()


def test_outlier_layer_ranks_first(tmp_path):
    path = outlier_stack(tmp_path)
    result = qonnx.analyze(path, qonnx.W4A16(block_size=32), samples=2)
    assert result.layers[0].weight == OUTLIER
    assert not result.causal_lm and result.layers[0].kl is None
    assert result.layers[0].sqnr_db < min(r.sqnr_db for r in result.layers[1:]) - 6
    assert sorted(r.index for r in result.layers) == list(range(11))
    assert result.all_quantized.sqnr_db < result.layers[0].sqnr_db + 0.5  # everything at once is no better
    d = result.to_dict()
    assert d["layers"][0]["weight"] == OUTLIER and d["layers"][0]["params"] == 64 * 128
    # without outliers the same layer is unremarkable
    plain = qonnx.analyze(
        build_decoder_stack(tmp_path / "plain.onnx", hidden=64, intermediate=128, layers=2, vocab=96),
        qonnx.W4A16(block_size=32),
        samples=2,
    )
    assert plain.layers[0].weight != OUTLIER


def test_target_bits_stays_within_budget_and_promotes_the_outlier_first(tmp_path):
    path = outlier_stack(tmp_path)
    cfg = qonnx.W4A16(block_size=32)
    base = mixed_precision(path, cfg, Budget(target_bits=32))
    everything = base.bits["mixed"]
    assert base.bits["scheme"] < 5.2 < 9 < everything <= 9.25 and len(base.promoted) == 11  # fp32 scales per 32
    target = base.bits["scheme"] + 0.6  # room for about one MLP weight in 8 bits
    mixed = mixed_precision(path, cfg, Budget(target_bits=target))
    assert mixed.promoted and mixed.promoted[0]["weight"] == OUTLIER and mixed.promoted[0]["rank"] == 1
    assert mixed.bits["scheme"] < mixed.bits["mixed"] <= target
    assert mixed.targets[OUTLIER] == eight_bit(cfg)
    summary = qonnx.quantize(path, cfg, output=tmp_path / "out.onnx", budget=Budget(target_bits=target))
    info = summary.mixed_precision
    assert info is not None and info["bits_per_weight"]["output"] <= target
    assert abs(info["bits_per_weight"]["output"] - mixed.bits["mixed"]) < 1e-3  # the same bytes as measured
    record = next(r for r in summary.layers if r.weight == OUTLIER)
    assert record.quantized and "promoted to w8a16 by the mixed-precision budget" in record.reason
    gate = next(r for r in summary.layers if r.weight == "layers.1.mlp.gate_proj.weight")
    assert record.bytes_after > 1.5 * gate.bytes_after and gate.reason == "w4a16 by default"
    meta = {p.key: p.value for p in onnx.load(str(summary.outputs[0]), load_external_data=False).metadata_props}
    assert json.loads(meta["qonnx.mixed_precision"])["promoted"][0]["weight"] == OUTLIER
    with pytest.raises(ConfigError, match="below what the scheme itself stores"):
        mixed_precision(path, cfg, Budget(target_bits=3.0))
    with pytest.raises(ConfigError, match="causal LM"):
        mixed_precision(path, cfg, Budget(max_ppl_increase=0.05))


def test_budget_validation():
    with pytest.raises(ConfigError, match="exactly one"):
        Budget()
    with pytest.raises(ConfigError, match="exactly one"):
        Budget(target_bits=4.5, max_ppl_increase=0.05)
    with pytest.raises(ConfigError, match="target_bits"):
        Budget(target_bits=0)
    assert parse_percent("5%") == pytest.approx(0.05) and parse_percent("0.05") == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="percentage"):
        parse_percent("five")
    with pytest.raises(ConfigError, match="weight-only"):
        qonnx.analyze("unused.onnx", qonnx.W8A8())


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny Llama export with confident predictions (a scaled lm_head) and the outlier trick in layer 1's up_proj."""
    from qonnx.models.export import export_causal_lm

    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.lm_head.weight *= 20
        model.model.layers[1].post_attention_layernorm.weight[::16] = 0
        model.model.layers[1].mlp.up_proj.weight[:, ::16] *= 200
    out = tmp_path_factory.mktemp("llm") / "src"
    return export_causal_lm(model, out, tokenizer=tiny_tokenizer(), quiet=True, verify=False).parent


def test_causal_lm_kl_ranking_and_ppl_budget(tiny_llm):
    cfg = qonnx.W4A16(block_size=16)
    result = qonnx.analyze(tiny_llm, cfg, samples=2, seq_len=64)
    assert result.causal_lm and len(result.layers) == 15
    assert result.layers[0].module.endswith("layers.1.mlp.up_proj"), result.table()
    kls = [r.kl for r in result.layers]
    assert all(k is not None and k >= 0 for k in kls) and kls == sorted(kls, reverse=True)
    assert result.float_nll is not None and result.all_quantized.nll is not None
    allowed = 0.25 * math.expm1(result.all_quantized.nll - result.float_nll)  # a quarter of the full increase
    assert allowed > 0
    mixed = mixed_precision(tiny_llm, cfg, Budget(max_ppl_increase=allowed, samples=2, seq_len=64))
    ppl = mixed.calibration
    assert ppl["mixed"] <= ppl["float"] * (1 + allowed) + 1e-9 < ppl["scheme"]
    assert mixed.promoted and {p["to"] for p in mixed.promoted} <= {"w8a16", "float"}
    ranks = [p["rank"] for p in mixed.promoted]
    assert ranks == list(range(1, len(ranks) + 1))  # a prefix of the ranking


def test_ppl_search_keeps_float_when_8_bit_is_not_enough():
    """The search on a made-up model: layer 0 costs 1.0 nats at 4 bits, 0.5 at 8; the others 0.01 and 0."""
    from types import SimpleNamespace

    from qonnx.pipeline.mixed_precision import _by_ppl, _smallest
    from qonnx.runtime.sensitivity import Measurement

    cfg = qonnx.W4A16()
    layers = [SimpleNamespace(cfg=cfg) for _ in range(12)]
    calls = []

    def measure(configs):
        calls.append(configs)
        nll = 2.0
        for i in range(12):
            c = configs.get(i)
            cost = (1.0, 0.5) if i == 0 else (0.01, 0.0)
            nll += 0.0 if c is None else cost[0] if c.bits == 4 else cost[1]
        return Measurement(30.0, nll)

    ctx = SimpleNamespace(layers=layers, measure=measure, session=SimpleNamespace(float_nll=2.0))
    order = [0, *range(1, 12)]
    choice = _by_ppl(ctx, order, 0.05, measure({i: cfg for i in range(12)}), progress=False)
    assert choice[0] is None  # float: 8 bits still cost 0.5
    eights = [i for i, c in choice.items() if c is not None]
    assert all(choice[i] == eight_bit(cfg) for i in eights)
    assert 0.01 * (11 - len(eights)) <= 0.05 < 0.01 * (12 - len(eights))  # the fewest 8-bit layers that fit
    assert _smallest(lambda k: k >= 37, 0, 100) == 37 and _smallest(lambda k: True, 0, 5) == 1
    assert _smallest(lambda k: k >= 5, 0, 5) == 5 and _smallest(lambda k: False, 0, 9) is None
    asked = []
    assert _smallest(lambda k: asked.append(k) or k >= 3, 0, 200) == 3 and max(asked) == 4  # never asks 200


@pytest.mark.slow
def test_gptq_budget_collects_hessians_once(tiny_llm, tmp_path, monkeypatch):
    import qonnx.pipeline.calibrate
    import qonnx.pipeline.fake_quant
    import qonnx.pipeline.quantize

    calls = []
    real = qonnx.pipeline.calibrate.layer_hessians
    for module in (qonnx.pipeline.quantize, qonnx.pipeline.fake_quant):  # the two callers: quantize, the budget
        monkeypatch.setattr(module, "layer_hessians", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = qonnx.W4A16(block_size=16, algo=qonnx.GPTQ(calib_samples=2, calib_seq_len=32))
    summary = qonnx.quantize(
        tiny_llm, cfg, output=tmp_path / "out", budget=Budget(target_bits=7.0, samples=2, seq_len=64), verify=False
    )
    assert len(calls) == 1
    info = summary.mixed_precision
    assert info is not None and info["promoted"] and info["bits_per_weight"]["output"] <= 7.0
    promoted = {p["weight"] for p in info["promoted"]}
    assert info["promoted"][0]["module"].endswith("layers.1.mlp.up_proj")
    for r in summary.layers:
        if r.weight in promoted:
            assert r.quantized and "w8a16 gptq" in r.reason and "promoted to w8a16" in r.reason

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from qonnx.cli import main
from qonnx.models.export import export_causal_lm
from qonnx.passes.lower import FuseForOrtPass, RopeAnglesAsMatMul
from qonnx.runtime.session import make_session

transformers = pytest.importorskip("transformers")

_SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _export(tmp_path_factory, arch: str, dtype: str = "fp32", **overrides):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, **{**_SMALL, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = tmp_path_factory.mktemp(f"{arch}-{dtype}")
    return export_causal_lm(model, out, dtype=dtype, verify=False, quiet=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with grouped KV heads (4 query heads, 2 KV heads) and a KV cache."""
    return _export(tmp_path_factory, "llama")


def _lower(path, out_path, **options):
    model = ir.load(path)
    fuse = FuseForOrtPass(**options)
    fuse(model)
    ir.save(model, out_path)
    return fuse


def _run_both(a, b, *, batch=2, seq=7, seed=0):
    """Prefill then one decoding step on both models: the outputs of each, side by side."""
    sa, sb = make_session(a), make_session(b)
    inputs = sa.get_inputs()
    vocab = sa.get_outputs()[0].shape[-1]
    rng = np.random.default_rng(seed)
    dtype = np.float16 if inputs[-1].type == "tensor(float16)" else np.float32
    feed = {
        "input_ids": rng.integers(0, vocab, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.arange(seq)[None].repeat(batch, 0),
    }
    feed.update({i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype) for i in inputs[3:]})
    pairs = [(sa.run(None, feed), sb.run(None, feed))]
    step = {
        "input_ids": rng.integers(0, vocab, (batch, 1)),
        "attention_mask": np.ones((batch, seq + 1), np.int64),
        "position_ids": np.full((batch, 1), seq),
    }
    step.update({i.name: v for i, v in zip(inputs[3:], pairs[0][0][1:], strict=True)})
    pairs.append((sa.run(None, step), sb.run(None, step)))
    return pairs


def _assert_close(pairs, atol):
    for ref, out in pairs:
        assert len(ref) == len(out)
        for r, o in zip(ref, out, strict=True):
            assert r.shape == o.shape
            np.testing.assert_allclose(o.astype(np.float32), r.astype(np.float32), atol=atol, rtol=0)


def _io(path):
    m = onnx.load(str(path), load_external_data=False)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return [(v.name, dims(v)) for v in m.graph.input], [(v.name, dims(v)) for v in m.graph.output]


def test_llama_fuses_norms_rotary_and_gqa_with_the_same_outputs(llama, tmp_path):
    out = tmp_path / "lowered.onnx"
    fuse = _lower(llama, out)
    assert fuse.fused == {
        "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 4,
        "GroupQueryAttention": 2,
    }
    assert fuse.fusions["rope_angles_as_matmul"] == 1 and fuse.fusions["cos_sin_cache"] == 4
    assert fuse.nodes_after < fuse.nodes_before / 3
    assert not fuse.notes
    assert _io(out) == _io(llama)  # the KV cache interface is kept
    _assert_close(_run_both(llama, out), atol=1e-5)


def test_rope_angles_rewrite_keeps_the_values(llama, tmp_path):
    model = ir.load(llama)
    count = sum(1 for n in model.graph if n.op_type == "Mul")
    from onnxscript.rewriter import pattern

    assert pattern.RewriteRuleSet([RopeAnglesAsMatMul.rule()]).apply_to_model(model) == 1
    ir_count = sum(1 for n in model.graph if n.op_type == "Mul")
    assert ir_count == count - 1
    assert any(n.op_type == "MatMul" and n.inputs[0].const_value is not None for n in model.graph)
    out = tmp_path / "rope.onnx"
    ir.save(model, out)
    _assert_close(_run_both(llama, out), atol=0)


def test_cuda_target_leaves_float32_attention_unfused(llama, tmp_path):
    """CUDA's GroupQueryAttention takes float16 only, and its MultiHeadAttention is slow: nothing is fused."""
    out = tmp_path / "cuda.onnx"
    fuse = _lower(llama, out, target="cuda")
    assert "GroupQueryAttention" not in fuse.fused and "MultiHeadAttention" not in fuse.fused
    assert fuse.fused["RotaryEmbedding"] == 4
    assert fuse.notes == [
        "GroupQueryAttention not fused: ONNX Runtime's CUDA kernel takes float16/bfloat16 only",
        "attention left unfused: MultiHeadAttention measured 10x slower than the plain ops on CUDA",
    ]
    _assert_close(_run_both(llama, out), atol=1e-5)  # the CUDA-shaped graph runs on the CPU provider too


def test_without_attention(llama, tmp_path):
    fuse = _lower(llama, tmp_path / "norms.onnx", attention=False)
    assert set(fuse.fused) == {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"}
    _assert_close(_run_both(llama, tmp_path / "norms.onnx"), atol=1e-5)


def test_sliding_window_mask_is_not_dropped(tmp_path_factory, tmp_path):
    """onnxscript's GQA rule does not look at the mask; a sliding window must keep MultiHeadAttention."""
    path = _export(tmp_path_factory, "mistral", sliding_window=4)
    fuse = _lower(path, tmp_path / "mistral.onnx")
    assert "GroupQueryAttention" not in fuse.fused and fuse.fused["MultiHeadAttention"] == 2
    assert "not causal" in fuse.notes[0]
    _assert_close(_run_both(path, tmp_path / "mistral.onnx", seq=9), atol=1e-5)  # 9 tokens > the window


def test_gpt2_attention_output_reshaped_to_2d_is_not_fused_wrongly(tmp_path_factory, tmp_path):
    """GPT-2 reshapes the attention output to [batch * sequence, hidden] for a Gemm: it must still load."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = export_causal_lm(model, tmp_path_factory.mktemp("gpt2"), verify=False, quiet=True)
    fuse = _lower(path, tmp_path / "gpt2.onnx")
    assert fuse.fused["SkipLayerNormalization"] == 5 and fuse.fused["MultiHeadAttention"] == 2
    _assert_close(_run_both(path, tmp_path / "gpt2.onnx"), atol=1e-5)


def test_quantize_then_lower_equals_lower_then_quantize(llama, tmp_path):
    import qonnx

    scheme = qonnx.W4A16(block_size=32)
    qonnx.quantize(llama, scheme, output=tmp_path / "w4.onnx", verify=False)
    fuse = _lower(tmp_path / "w4.onnx", tmp_path / "w4-lowered.onnx")
    assert fuse.fused["GroupQueryAttention"] == 2
    ops = [n.op_type for n in ir.load(tmp_path / "w4-lowered.onnx").graph]
    # 5 per layer (q/k/v merged into GroupQueryAttention's packed input, o, gate, up, down) and the lm_head; gate/up
    # are merged for CUDA only
    assert ops.count("MatMulNBits") == 11 and fuse.fusions["merged_linear"] == 4
    assert ops.count("MatMul") == 1  # positions x inv_freq, for the rotary cos/sin cache

    _lower(llama, tmp_path / "lowered.onnx")
    summary = qonnx.quantize(tmp_path / "lowered.onnx", scheme, output=tmp_path / "lowered-w4.onnx", verify=False)
    assert sum(1 for r in summary.layers if r.quantized) == 11
    _assert_close(_run_both(tmp_path / "w4-lowered.onnx", tmp_path / "lowered-w4.onnx"), atol=0)
    _assert_close(_run_both(tmp_path / "w4.onnx", tmp_path / "w4-lowered.onnx"), atol=1e-5)


def test_lowered_model_with_external_data_loads_and_quantizes(llama, tmp_path):
    """onnx's checker does not know SimplifiedLayerNormalization (ORT keeps it in the default domain)."""
    import qonnx
    from qonnx.core.modelfile import load, save

    model = ir.load(llama)
    FuseForOrtPass()(model)
    path = tmp_path / "sub" / "lowered.onnx"
    save(model, path, external_data=True)
    assert (tmp_path / "sub" / "lowered.onnx.data").is_file()
    loaded = load(path)  # checked with the default-domain contrib op set aside, external data beside the file
    assert sum(1 for n in loaded.graph if n.op_type == "SimplifiedLayerNormalization") == 1
    summary = qonnx.quantize(path, qonnx.W4A16(block_size=32), output=tmp_path / "w4.onnx", verify=False)
    assert sum(1 for r in summary.layers if r.quantized) == 11  # q/k/v merged by the lowering


def test_cli_lower_writes_a_verified_folder(llama, tmp_path, capsys):
    src = llama.parent
    (src / "tokenizer.json").write_text("{}")  # stands for the files beside the model
    out = tmp_path / "low"
    assert main(["lower", str(src), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fused"]["GroupQueryAttention"] == 2
    assert summary["top1_agreement"] == 1.0 and summary["max_abs_diff"]["logits"] < 1e-4
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["qonnx.lowered"])["target"] == "cpu"
    from qonnx.core.modelfile import load

    assert any(n.op_type == "SimplifiedLayerNormalization" for n in load(out).graph)  # our loader accepts it

    # Lowering again, writing over the input, or a bad target: one line, exit 2.
    assert main(["lower", str(out), "-o", str(tmp_path / "again")]) == 2
    assert "already holds fused ops" in capsys.readouterr().err
    assert main(["lower", str(src), "-o", str(src)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert main(["lower", str(src), "-o", str(tmp_path / "x"), "--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_lower_refuses_a_model_that_computes_other_numbers(llama, tmp_path, capsys, monkeypatch):
    import qonnx.pipeline.lowering

    monkeypatch.setattr(qonnx.pipeline.lowering, "TOLERANCE", {"tensor(float)": -1.0})
    out = tmp_path / "low"
    assert main(["lower", str(llama.parent), "-o", str(out)]) == 3
    assert "differs from the input" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()


@pytest.fixture(scope="module")
def llama_w8a8(llama, tmp_path_factory):
    """The tiny Llama in W8A8 (QuantizeLinear/DequantizeLinear on int8 activations), calibrated on random tokens."""
    import qonnx

    tmp = tmp_path_factory.mktemp("llama-w8a8")
    rng, n, seq = np.random.default_rng(1), 4, 16
    feeds = {
        "input_ids": rng.integers(3, 128, (n, 1, seq)),
        "attention_mask": np.ones((n, 1, seq), np.int64),
        "position_ids": np.tile(np.arange(seq), (n, 1, 1)),
    }
    for i in make_session(llama).get_inputs()[3:]:
        feeds[i.name] = np.zeros((n, 1, i.shape[1], 0, i.shape[3]), np.float32)
    np.savez(tmp / "feeds.npz", **feeds)
    config = qonnx.W8A8(calibration=qonnx.Calibration(data=str(tmp / "feeds.npz"), samples=n))
    return qonnx.quantize(llama, config, output=tmp / "model.onnx", verify=False).outputs[0]


def _count(path, op):
    return sum(1 for n in ir.load(path).graph if n.op_type == op)


def test_w8a8_lowers_checked_with_its_rounding_pinned(llama_w8a8, tmp_path):
    from qonnx.pipeline.lowering import lower

    summary = lower(llama_w8a8, tmp_path / "low.onnx")
    assert summary.fused["GroupQueryAttention"] == 2 and summary.fused["SkipSimplifiedLayerNormalization"] == 4
    quantized = _count(llama_w8a8, "QuantizeLinear")
    assert summary.pinned == quantized == _count(tmp_path / "low.onnx", "QuantizeLinear") > 0
    assert summary.max_abs_diff["logits"] < 1e-4 and summary.top1_agreement == 1.0
    assert any("codes carried over" in note for note in summary.notes)


def _nudged(path, out, ops, eps=1e-4):
    """``path`` with the float input of every ``ops`` node scaled by 1 + eps: float-order noise, within tolerance."""
    model = ir.load(path)
    for node in [n for n in model.graph if n.op_type in ops]:
        x = node.inputs[0]
        factor = ir.val(f"{node.name}_nudge", const_value=ir.tensor(np.array(1 + eps, np.float32)))
        model.graph.register_initializer(factor)
        mul = ir.node("Mul", [x, factor])
        mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
        model.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
    ir.save(model, out)
    return out


@pytest.mark.parametrize("scheme", ["w8a8", "dynamic"])
def test_rounding_flips_are_not_a_mismatch(llama, llama_w8a8, tmp_path, scheme):
    """Activations 1e-4 off land on other int8 codes, and the outputs move by more than float tolerance; with the
    input's rounding pinned (QuantizeLinear codes carried over, MatMulNBits on float activations) they agree."""
    import qonnx
    from qonnx.pipeline.lowering import _mismatches, compare_outputs

    if scheme == "w8a8":
        path, ops = llama_w8a8, ("QuantizeLinear",)
    else:  # MatMulNBits quantizing its activations to int8 inside the kernel (accuracy level 4)
        path, ops = (
            qonnx.quantize(llama, qonnx.Dynamic(), output=tmp_path / "dyn.onnx", verify=False).outputs[0],
            ("MatMulNBits",),
        )
    nudged = _nudged(path, tmp_path / "nudged.onnx", ops)
    free = compare_outputs(path, nudged, pin_rounding=False)
    assert _mismatches(free) and _mismatches(free)[0].startswith("logits")
    pinned = compare_outputs(path, nudged)
    assert not _mismatches(pinned), _mismatches(pinned)
    assert pinned["pinned"] == (_count(path, "QuantizeLinear") if scheme == "w8a8" else 0)
    assert pinned["float_matmulnbits"] == (0 if scheme == "w8a8" else _count(path, "MatMulNBits"))


def _scale_first_norm(model):
    """A wrong fused RMSNorm: its weight 1% off (its output only feeds a QuantizeLinear)."""
    node = next(n for n in model.graph if n.op_type == "SimplifiedLayerNormalization")
    weight = ir.val("wrong_weight", const_value=ir.tensor(node.inputs[1].const_value.numpy() * 1.01))
    model.graph.register_initializer(weight)
    node.replace_input_with(1, weight)


def _bypass_first_qdq(model):
    """A fusion across a quantize/dequantize pair: its readers take the float tensor, the pair is dropped."""
    quant = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    dequant = next(iter(quant.outputs[0].uses())).node
    ir.convenience.replace_all_uses_with(dequant.outputs[0], quant.inputs[0])
    model.graph.remove([dequant, quant], safe=True)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_scale_first_norm, "(read by QuantizeLinear"), (_bypass_first_qdq, "the lowered model lost QuantizeLinear")],
)
def test_cli_lower_refuses_a_wrong_fusion_of_a_quantized_model(
    llama_w8a8, tmp_path, capsys, monkeypatch, corrupt, message
):
    fused = FuseForOrtPass.call

    def call(self, model):
        result = fused(self, model)
        corrupt(model)
        return result

    monkeypatch.setattr(FuseForOrtPass, "call", call)
    out = tmp_path / "low.onnx"
    assert main(["lower", str(llama_w8a8), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("dtype", "overrides", "target"),
    [
        ("fp16", {}, "cuda"),  # the 1B shape: fewer KV heads
        ("fp16", {"num_key_value_heads": 4}, "cuda"),  # as many KV heads as query heads (Llama-2-7B shape)
        ("fp32", {"num_key_value_heads": 4}, "cpu"),
        # head size 32: a float16 export rounds 1/sqrt(32) to 0.17674; still the default scale
        ("fp16", {"hidden_size": 128, "num_key_value_heads": 4}, "cuda"),
    ],
)
def test_group_query_attention_for_other_shapes(tmp_path_factory, tmp_path, dtype, overrides, target):
    path = _export(tmp_path_factory, "llama", dtype=dtype, **overrides)
    fuse = _lower(path, tmp_path / "lowered.onnx", target=target)
    assert fuse.fused["GroupQueryAttention"] == 2 and "MultiHeadAttention" not in fuse.fused, fuse.notes
    assert fuse.nodes_after < fuse.nodes_before / 3
    _assert_close(_run_both(path, tmp_path / "lowered.onnx"), atol=2e-3 if dtype == "fp16" else 1e-5)


def _as_expanded_inv_freq(path, out):
    """The rotary angles rewritten the way transformers < 5.20 exports a model cast to float16 after construction:
    ``Transpose(MatMul(Cast(Expand(inv_freq_fp16[1,E,1], [B,1,1]), float), Cast(Unsqueeze(position_ids, 1))))``."""
    model = ir.load(path)
    mul = next(
        n
        for n in model.graph
        if n.op_type == "Mul"
        and any(i is not None and i.const_value is not None and i.const_value.shape.rank() == 1 for i in n.inputs)
    )
    inv = next(i for i in mul.inputs if i is not None and i.const_value is not None)
    pos = next(v for v in model.graph.inputs if v.name == "position_ids")
    column = inv.const_value.numpy().astype(np.float16).reshape(1, -1, 1)
    const = ir.val("inv_freq_fp16", const_value=ir.tensor(column))
    batch = ir.node("Shape", [pos], attributes={"start": 0, "end": 1})
    ones = ir.val("ones_2", const_value=ir.tensor(np.array([1, 1], np.int64)))
    shape = ir.node("Concat", [batch.outputs[0], ones], attributes={"axis": 0})
    expand = ir.node("Expand", [const, shape.outputs[0]])
    cast = ir.node("Cast", [expand.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    axes = ir.val("axes_1", const_value=ir.tensor(np.array([1], np.int64)))
    unsq = ir.node("Unsqueeze", [pos, axes])
    pcast = ir.node("Cast", [unsq.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    mm = ir.node("MatMul", [cast.outputs[0], pcast.outputs[0]])
    tr = ir.node("Transpose", [mm.outputs[0]], attributes={"perm": [0, 2, 1]})
    for v in (const, ones, axes):
        model.graph.register_initializer(v)
    model.graph.insert_before(mul, [batch, shape, expand, cast, unsq, pcast, mm, tr])
    tr.outputs[0].dtype = ir.DataType.FLOAT
    ir.convenience.replace_all_uses_with(mul.outputs[0], tr.outputs[0])
    common = __import__("onnx_ir.passes.common", fromlist=["RemoveUnusedNodesPass"])
    common.RemoveUnusedNodesPass()(model)
    ir.save(model, out)
    return out


def test_expanded_float16_inv_freq_still_fuses_rotary_and_gqa(tmp_path_factory, tmp_path):
    """transformers < 5.20 (the GPU machine's 5.17) expands a float16 inv_freq per batch: GQA must still apply."""
    path = _export(tmp_path_factory, "llama", dtype="fp16")
    old = _as_expanded_inv_freq(path, tmp_path / "old.onnx")
    _assert_close(_run_both(path, old), atol=2e-3)  # the rewritten export computes what the original does
    fuse = _lower(old, tmp_path / "lowered.onnx", target="cuda")
    assert fuse.fused["GroupQueryAttention"] == 2, fuse.notes
    assert fuse.fusions["rope_angles_as_matmul"] == 1
    _assert_close(_run_both(old, tmp_path / "lowered.onnx"), atol=2e-3)

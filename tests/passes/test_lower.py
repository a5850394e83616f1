"""FuseForOrtPass: norms, rotary and attention fused into ONNX Runtime's contrib ops with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers
from builders import export_tiny_causal_lm

from qonnx.models.export import export_causal_lm
from qonnx.passes.lower import FuseForOrtPass, RopeAnglesAsMatMul
from qonnx.runtime.session import make_session


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


@pytest.mark.slow
def test_sliding_window_mask_is_not_dropped(tmp_path_factory, tmp_path):
    """onnxscript's GQA rule does not look at the mask; a sliding window must keep MultiHeadAttention."""
    path = export_tiny_causal_lm(tmp_path_factory, "mistral", sliding_window=4)
    fuse = _lower(path, tmp_path / "mistral.onnx")
    assert "GroupQueryAttention" not in fuse.fused and fuse.fused["MultiHeadAttention"] == 2
    assert "not causal" in fuse.notes[0]
    _assert_close(_run_both(path, tmp_path / "mistral.onnx", seq=9), atol=1e-5)  # 9 tokens > the window


@pytest.mark.slow
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


@pytest.mark.slow
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
    path = export_tiny_causal_lm(tmp_path_factory, "llama", dtype=dtype, **overrides)
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


@pytest.mark.slow
def test_expanded_float16_inv_freq_still_fuses_rotary_and_gqa(tmp_path_factory, tmp_path):
    """transformers < 5.20 (the GPU machine's 5.17) expands a float16 inv_freq per batch: GQA must still apply."""
    path = export_tiny_causal_lm(tmp_path_factory, "llama", dtype="fp16")
    old = _as_expanded_inv_freq(path, tmp_path / "old.onnx")
    _assert_close(_run_both(path, old), atol=2e-3)  # the rewritten export computes what the original does
    fuse = _lower(old, tmp_path / "lowered.onnx", target="cuda")
    assert fuse.fused["GroupQueryAttention"] == 2, fuse.notes
    assert fuse.fusions["rope_angles_as_matmul"] == 1
    _assert_close(_run_both(old, tmp_path / "lowered.onnx"), atol=2e-3)

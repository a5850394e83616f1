"""Generation through ONNX Runtime with the KV cache equals PyTorch's greedy decoding, also with one KV buffer
shared by past and present (GroupQueryAttention) and with fixed shapes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qonnx.runtime.generate import Generator


def test_greedy_with_cache_equals_torch(generation_llama):
    model, root = generation_llama
    gen = Generator(root / "kv")
    result = gen.generate("the quick brown fox", max_new_tokens=12, chat=False)
    ids = torch.tensor([gen.tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = ref[0, ids.shape[1] :].tolist()
    assert result.tokens == expected[: len(result.tokens)] and len(result.tokens) >= 1
    no_cache = Generator(root / "nokv").generate("the quick brown fox", max_new_tokens=12, chat=False)
    assert no_cache.tokens == result.tokens
    assert result.prefill_seconds > 0


def test_shared_kv_buffer_gives_the_same_tokens_and_is_written_in_place(
    generation_llama, generation_llama_gqa, monkeypatch
):
    model, _ = generation_llama
    prompt, new = "the quick brown fox", 12
    separate = Generator(generation_llama_gqa, shared_kv=False)
    shared = Generator(generation_llama_gqa)
    assert shared.shared_kv and not separate.shared_kv

    # Every forward must bind each present output to its past input's buffer (no new present allocated).
    bound: list[list[tuple[int, tuple[int, ...]]]] = []
    run = shared.session.run_with_iobinding

    def spy(io, *args, **kwargs):
        run(io, *args, **kwargs)
        bound.append([(v.data_ptr(), tuple(v.shape())) for v in io.get_outputs()[1:]])

    monkeypatch.setattr(shared.session, "run_with_iobinding", spy)
    monkeypatch.setattr(shared.session, "run", lambda *a, **k: pytest.fail("separate-buffer run taken"))
    result = shared.generate(prompt, max_new_tokens=new, chat=False)
    expected = separate.generate(prompt, max_new_tokens=new, chat=False).tokens
    assert result.tokens == expected and len(result.tokens) >= 2

    ids = torch.tensor([shared.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result.tokens == ref[0, ids.shape[1] :].tolist()[: len(result.tokens)]

    max_len = result.prompt_tokens + new
    buffers = [(shared.kv_buffers[n].data_ptr(), (1, 2, max_len, 16)) for n in shared.past_names]
    assert len(bound) == len(result.tokens) and all(b == buffers for b in bound)
    filled = result.prompt_tokens + len(result.tokens) - 1  # the last token is never fed
    for name in shared.past_names:
        cache = shared.kv_buffers[name].numpy()
        assert np.abs(cache[:, :, :filled]).max(axis=-1).min() > 0 and not cache[:, :, filled:].any()

    a = shared.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    assert a.tokens == separate.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False).tokens


def test_shared_kv_buffer_only_for_group_query_attention(generation_llama):
    _, root = generation_llama
    assert not Generator(root / "kv").shared_kv
    with pytest.raises(ValueError, match="GroupQueryAttention"):
        Generator(root / "kv", shared_kv=True)


def test_fixed_shape_decoding_gives_the_same_tokens_with_one_set_of_buffers(
    generation_llama, generation_llama_gqa, monkeypatch
):
    """The CUDA-graph-ready loop (fixed mask and buffers, run here without capture) decodes what PyTorch does."""
    model, _ = generation_llama
    prompt, new = "the quick brown fox", 12
    fixed = Generator(generation_llama_gqa, fixed_shapes=True)
    assert fixed.fixed_shapes and not Generator(generation_llama_gqa).fixed_shapes  # on by default only on CUDA
    assert fixed.max_positions == model.config.max_position_embeddings  # the constant rotary cache

    seen: list[tuple[tuple[int, ...], ...]] = []
    run = fixed.session.run_with_iobinding

    def spy(io, *args, **kwargs):
        run(io, *args, **kwargs)
        seen.append(tuple(tuple(v.shape()) for v in io.get_outputs()))

    monkeypatch.setattr(fixed.session, "run_with_iobinding", spy)
    result = fixed.generate(prompt, max_new_tokens=new, chat=False)
    ids = torch.tensor([fixed.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result.tokens == ref[0, ids.shape[1] :].tolist()[: len(result.tokens)] and len(result.tokens) >= 2
    steps = seen[1:]  # after the prompt: every step has the same shapes (logits [1, 1, vocab], full buffers)
    assert len(set(steps)) == 1 and steps[0][0][:2] == (1, 1) and steps[0][1][2] == min(256, fixed.max_positions)
    decoder = fixed._decoder
    a = fixed.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    assert fixed._decoder is decoder  # buffers (and on CUDA the captured graph) kept between calls
    assert (
        a.tokens
        == Generator(generation_llama_gqa, shared_kv=False)
        .generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
        .tokens
    )


def test_fixed_shape_decoder_checks_its_buffers(generation_llama_gqa):
    from qonnx.runtime.decode import FixedShapeDecoder, fixed_shape_decodable
    from qonnx.runtime.session import make_session

    decoder = FixedShapeDecoder(make_session(generation_llama_gqa), 2, 6)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step(np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"\[2, length\]"):
        decoder.prefill(np.zeros((1, 3)))
    decoder.prefill(np.ones((2, 5), np.int64))
    decoder.step(np.ones((2, 1)))
    with pytest.raises(ValueError, match="full"):
        decoder.step(np.ones((2, 1)))

    assert fixed_shape_decodable(ir.load(generation_llama_gqa / "model.onnx"))


def test_fixed_shapes_refused_for_a_model_without_group_query_attention(generation_llama):
    _, root = generation_llama
    with pytest.raises(ValueError, match="fixed_shapes=True"):
        Generator(root / "kv", fixed_shapes=True)


def test_top_k_is_seeded(generation_llama):
    _, root = generation_llama
    gen = Generator(root / "kv")
    a = gen.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    b = gen.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    assert a.tokens == b.tokens

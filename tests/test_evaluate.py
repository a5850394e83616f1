from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_export import tiny_model, tiny_tokenizer

from qonnx.core.errors import ConfigError, ModelLoadError
from qonnx.models.export import export_causal_lm
from qonnx.runtime.data import (
    CALIBRATION_START,
    calibration_windows,
    corpus_tokens,
    evaluation_windows,
    pydoc_text,
    read_text,
    tokenize,
)
from qonnx.runtime.evaluate import perplexity, perplexity_torch, token_nlls

TEXT = "the quick brown fox jumps over the lazy dog; def f(x): return x + 1\n" * 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama exported with and without the KV cache, with its tokenizer, and the torch model."""
    model = tiny_model("llama", seed=3)
    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("ppl")
    dirs = {
        kv: export_causal_lm(model, root / f"kv{kv}", kv_cache=kv, tokenizer=tokenizer, quiet=True, verify=False).parent
        for kv in (True, False)
    }
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return model, tokenizer, dirs, corpus


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
def test_perplexity_matches_reference(exported, kv):
    model, tokenizer, dirs, corpus = exported
    tokens = tokenize(TEXT, tokenizer)
    result = perplexity(dirs[kv], data=str(corpus), seq_len=16, windows=5, progress=False)
    expected = _reference_ppl(model, tokens, 16, 5)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 5 * 15
    assert result["windows"] == 5 and result["seq_len"] == 16
    assert result["mean_nll"] == pytest.approx(math.log(result["perplexity"]))
    assert perplexity_torch(model, evaluation_windows(tokens, 16, 5)) == pytest.approx(expected, rel=1e-6)


def test_perplexity_on_pydoc_and_model_file(exported):
    _, _, dirs, _ = exported
    by_dir = perplexity(dirs[True], seq_len=32, windows=2, progress=False)
    by_file = perplexity(dirs[True] / "model.onnx", data="pydoc", seq_len=32, windows=2, progress=False)
    assert by_dir["perplexity"] == pytest.approx(by_file["perplexity"])
    assert by_dir["data"] == "pydoc" and math.isfinite(by_dir["perplexity"])


def test_perplexity_errors(exported, tmp_path):
    _, _, dirs, corpus = exported
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


def test_windows_are_consecutive_slices():
    tokens = np.arange(100)
    w = evaluation_windows(tokens, 10, 3)
    assert w.shape == (3, 10)
    np.testing.assert_array_equal(w.ravel(), np.arange(30))
    assert evaluation_windows(tokens, 30, None).shape == (3, 30)
    with pytest.raises(ConfigError, match="10 evaluation windows of 10 tokens fit"):
        evaluation_windows(tokens, 10, 11)
    with pytest.raises(ConfigError, match="at least 2"):
        evaluation_windows(tokens, 1, 3)
    c = calibration_windows(np.arange(CALIBRATION_START + 50), 20, 2)
    np.testing.assert_array_equal(c[0, :3], CALIBRATION_START + np.arange(3))
    assert c.shape == (2, 20)
    with pytest.raises(ConfigError, match="calibration"):
        calibration_windows(np.arange(CALIBRATION_START + 50), 20, 3)
    np.testing.assert_array_equal(calibration_windows(tokens, 5, 2, start=7).ravel(), np.arange(7, 17))


def test_pydoc_corpus_is_the_sorted_topics():
    from pydoc_data.topics import topics

    text = pydoc_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(topics) - 1)
    assert read_text("pydoc") == text


def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert read_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: .*'text' field"):
        read_text(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.jsonl:1: not JSON"):
        read_text(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        read_text(tmp_path / "e.csv")
    with pytest.raises(ConfigError, match="no such file"):
        read_text(tmp_path / "missing.txt")


def test_corpus_is_tokenized_once(exported, tmp_path):
    _, tokenizer, dirs, corpus = exported
    a = corpus_tokens(dirs[True], corpus)
    assert corpus_tokens(dirs[True] / "model.onnx", str(corpus)) is a
    np.testing.assert_array_equal(a, tokenize(TEXT, tokenizer))
    assert not a.flags.writeable
    with pytest.raises(ModelLoadError, match="tokenizer"):
        corpus_tokens(tmp_path, corpus)


def test_cli_eval_json(exported):
    from qonnx.cli.models import eval_command

    _, _, dirs, corpus = exported
    args = [
        str(dirs[False]),
        "--task",
        "perplexity",
        "--data",
        str(corpus),
        "--seq-len",
        "16",
        "--windows",
        "3",
        "--json",
        "--no-progress",
    ]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["perplexity"] == pytest.approx(
        perplexity(dirs[False], data=str(corpus), seq_len=16, windows=3, progress=False)["perplexity"]
    )
    text = CliRunner().invoke(eval_command, [*args[:-2], "--no-progress"])
    assert text.exit_code == 0 and text.stdout.startswith("perplexity ")


@pytest.mark.slow
def test_reference_perplexity(tmp_path):
    """The fp32 export of SmolLM2-135M-Instruct scores 14.20 on pydoc (24 x 512), as PyTorch does."""
    from qonnx.models.hf import load_causal_lm, reference_model_path

    try:
        gguf = reference_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    model, tokenizer = load_causal_lm(gguf)
    out = export_causal_lm(model, tmp_path, tokenizer=tokenizer, quiet=True, verify=False).parent
    onnx_ppl = perplexity(out, progress=False)["perplexity"]
    torch_ppl = perplexity_torch(model, evaluation_windows(corpus_tokens(out), 512, 24))
    assert torch_ppl == pytest.approx(14.202, abs=0.005)
    assert onnx_ppl == pytest.approx(torch_ppl, abs=0.01)

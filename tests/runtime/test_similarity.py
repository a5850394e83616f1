"""Encoder similarity: cosine to a reference, mean pooling as torch computes it, text chunks, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from builders import SENTENCES, tiny_causal_lm, tiny_encoder, tiny_wordpiece

from qonnx.core.errors import ConfigError, ModelLoadError
from qonnx.models.export import export_model
from qonnx.runtime.evaluate import perplexity, similarity, text_chunks


def test_quantized_encoder_keeps_its_embeddings(bert_encoders):
    fp32, w8, data = bert_encoders
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(w8 / "model.onnx")).graph.node)
    r = similarity(w8, reference=fp32, data=data, max_length=32, progress=False)
    assert r["mean_cosine"] > 0.99 and r["min_cosine"] > 0.98
    assert r["min_cosine"] <= r["p5_cosine"] <= r["mean_cosine"] <= 1.0
    assert r["samples"] == len(SENTENCES)  # the blank line and the repeated one are not chunks
    assert 0.0 <= r["top1_agreement"] <= 1.0
    r = similarity(w8, reference=fp32, samples=24, max_length=64, progress=False)  # pydoc paragraphs
    assert r["samples"] == 24 and r["mean_cosine"] > 0.99 and r["top1_agreement"] > 0.8


def test_similarity_with_itself_is_exactly_one(bert_encoders):
    fp32, _, data = bert_encoders
    r = similarity(fp32, reference=fp32 / "model.onnx", data=data, progress=False)
    assert r["mean_cosine"] == 1.0 and r["min_cosine"] == 1.0 and r["p5_cosine"] == 1.0
    assert r["top1_agreement"] == 1.0


def test_similarity_matches_torch_mean_pooling(bert_encoders):
    fp32, _, data = bert_encoders
    model = tiny_encoder("bert", seed=5)
    tokenizer = tiny_wordpiece()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"][..., None].double()
    e = ((hidden.double() * mask).sum(1) / mask.sum(1)).numpy()
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    n = len(SENTENCES)
    r = similarity(fp32, data=data, progress=False)
    assert r["reference"] is None and r["mean_cosine"] is None and r["top1_agreement"] is None
    assert r["pairwise_cosine_mean"] == pytest.approx(((u @ u.T).sum() - n) / (n * (n - 1)), abs=1e-6)
    assert r["norm_mean"] == pytest.approx(np.linalg.norm(e, axis=1).mean(), rel=1e-5)
    assert r["tokens"] == int(enc["attention_mask"].sum())


def test_text_chunks(tmp_path):
    chunks = text_chunks("pydoc", 10)
    assert len(chunks) == 10 and all(len(c.split()) >= 8 and "\n" not in c for c in chunks)
    assert text_chunks("pydoc", 5) == chunks[:5]
    (tmp_path / "a.jsonl").write_text('{"text": "one two"}\n{"text": "three\\n\\nfour"}\n', encoding="utf-8")
    assert text_chunks(tmp_path / "a.jsonl") == ["one two", "three", "four"]
    (tmp_path / "b.txt").write_text("only one line\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least 2"):
        text_chunks(tmp_path / "b.txt")


@pytest.mark.slow
def test_similarity_errors(bert_encoders, tmp_path):
    fp32, _, data = bert_encoders
    with pytest.raises(ModelLoadError, match="encoder export"):
        similarity(export_model(tiny_causal_lm("llama"), tmp_path / "lm", quiet=True, verify=False), data=data)
    with pytest.raises(ModelLoadError, match="use --task similarity"):
        perplexity(fp32, data=data, seq_len=8, windows=1, progress=False)
    with pytest.raises(ConfigError, match="exceeds the 128 positions"):
        similarity(fp32, data=data, max_length=512, progress=False)

"""Fixtures shared across the test folders; the builders and helpers they use live in builders.py and helpers.py.

The exported models are session-scoped: each is built once per run and only read by the tests that take it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("helpers", "builders")

from builders import (  # noqa: E402
    SENTENCES,
    TEXT,
    export_tiny_causal_lm,
    text_feeds,
    tiny_causal_lm,
    tiny_encoder,
    tiny_tokenizer,
    tiny_wordpiece,
)
from helpers import correlated  # noqa: E402

import qonnx  # noqa: E402
from qonnx.models import build_decoder_stack  # noqa: E402
from qonnx.models.encoder import export_encoder  # noqa: E402
from qonnx.models.export import export_causal_lm  # noqa: E402
from qonnx.pipeline.lowering import lower  # noqa: E402
from qonnx.pipeline.verification import VerifyOptions  # noqa: E402
from qonnx.runtime.session import make_session  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A decoder-shaped model whose K (72, 200) is not a multiple of the block sizes used."""
    return build_decoder_stack(tmp_path / "tiny.onnx", hidden=72, intermediate=200, layers=2, vocab=100)


@pytest.fixture
def tiny_input(rng):
    return {"x": rng.standard_normal((2, 5, 72)).astype(np.float32)}


@pytest.fixture
def stack_feeds(tmp_path):
    """A decoder stack and calibration feeds for it: correlated features, one array per input."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=72, intermediate=200, layers=2, vocab=100)
    rng = np.random.default_rng(3)
    x = correlated(rng, 6 * 64, 72, rank=8).reshape(6, 1, 64, 72)
    np.savez(tmp_path / "feeds.npz", x=x)
    return path, tmp_path / "feeds.npz", correlated(np.random.default_rng(4), 4 * 64, 72, rank=8).reshape(4, 64, 72)


@pytest.fixture
def activation_stack(tmp_path, rng):
    """A decoder stack, .npz calibration feeds with outlier channels, and separate test inputs."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=64, intermediate=160, layers=2, vocab=96)

    def inputs(seed, batches):
        r = np.random.default_rng(seed)
        x = r.standard_normal((batches, 1, 32, 64)).astype(np.float32)
        x[..., [3, 40]] *= 30  # residual-stream outliers, as LLMs have
        return x

    np.savez(tmp_path / "feeds.npz", x=inputs(1, 6))
    return path, tmp_path / "feeds.npz", inputs(2, 3)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny Llama with grouped KV heads (4 query heads, 2 KV heads) and a KV cache."""
    return export_tiny_causal_lm(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def llama_w8a8(llama, tmp_path_factory):
    """The tiny Llama in W8A8 (QuantizeLinear/DequantizeLinear on int8 activations), calibrated on random tokens."""
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


@pytest.fixture(scope="session")
def perplexity_llama(tmp_path_factory):
    """A tiny Llama exported with and without the KV cache, with its tokenizer, and the torch model."""
    model = tiny_causal_lm("llama", seed=3)
    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("ppl")
    dirs = {
        kv: export_causal_lm(model, root / f"kv{kv}", kv_cache=kv, tokenizer=tokenizer, quiet=True, verify=False).parent
        for kv in (True, False)
    }
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return model, tokenizer, dirs, corpus


@pytest.fixture(scope="session")
def bert_encoders(tmp_path_factory):
    """A tiny BERT exported in fp32 and quantized to W8A16 (block 16), and a data file of sentences."""
    root = tmp_path_factory.mktemp("sim")
    tokenizer = tiny_wordpiece()
    fp32 = export_encoder(tiny_encoder("bert", seed=5), root / "fp32", tokenizer=tokenizer, quiet=True).parent
    feeds = [text_feeds(tokenizer, ["input_ids", "attention_mask", "token_type_ids"], SENTENCES)]
    w8 = root / "w8"
    qonnx.quantize(fp32, qonnx.W8A16(block_size=16), output=w8, verify=VerifyOptions(feeds=feeds))
    data = root / "sentences.txt"
    data.write_text("\n".join([*SENTENCES, "", SENTENCES[0]]) + "\n", encoding="utf-8")
    return fp32, w8, data


@pytest.fixture(scope="session")
def generation_llama(tmp_path_factory):
    """A tiny Llama and its exports with its tokenizer: ``root / "kv"`` (KV cache) and ``root / "nokv"``."""
    root = tmp_path_factory.mktemp("gen")
    model = tiny_causal_lm("llama")
    tok = tiny_tokenizer()
    export_causal_lm(model, root / "kv", tokenizer=tok, quiet=True, verify=False)
    export_causal_lm(model, root / "nokv", tokenizer=tok, kv_cache=False, quiet=True, verify=False)
    return model, root


@pytest.fixture(scope="session")
def generation_llama_gqa(generation_llama):
    """The KV-cache export lowered for the CPU with GroupQueryAttention (4 query heads, 2 KV heads)."""
    _, root = generation_llama
    summary = lower(root / "kv", root / "gqa", verify=False)
    assert summary.fused["GroupQueryAttention"] == 2
    return root / "gqa"

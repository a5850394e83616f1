"""Generation through ONNX Runtime with the KV cache equals PyTorch's greedy decoding; the CLI works."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_export import tiny_model, tiny_tokenizer

import qonnx
from qonnx.cli import cli
from qonnx.models.export import export_causal_lm
from qonnx.runtime.generate import Generator


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    export_causal_lm(model, root / "kv", tokenizer=tok, quiet=True, verify=False)
    export_causal_lm(model, root / "nokv", tokenizer=tok, kv_cache=False, quiet=True, verify=False)
    return model, root


def test_greedy_with_cache_equals_torch(folders):
    model, root = folders
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


def test_top_k_is_seeded(folders):
    _, root = folders
    gen = Generator(root / "kv")
    a = gen.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    b = gen.generate("hello", max_new_tokens=8, top_k=5, seed=3, chat=False)
    assert a.tokens == b.tokens


def test_cli_generate_on_quantized_model(folders, tmp_path):
    _, root = folders
    qonnx.quantize(root / "kv", qonnx.W8A16(block_size=16), output=tmp_path / "q")
    res = CliRunner().invoke(
        cli, ["generate", str(tmp_path / "q"), "--prompt", "the fox", "--raw", "--max-new-tokens", "5", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert 1 <= len(out["tokens"]) <= 5

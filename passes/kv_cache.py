"""A quantized KV cache: GroupQueryAttention's int8 / int4 past and present, with calibrated scales.

ONNX Runtime 1.31's ``com.microsoft.GroupQueryAttention`` keeps its past and present keys and values in int8
(``kv_cache_bit_width=8``, cache type int8) or int4 (``kv_cache_bit_width=4``, two codes a byte in uint8, the low
nibble first, code + 8), with ``k_quant_type`` / ``v_quant_type`` "PER_TENSOR" (scale [1]) or "PER_CHANNEL"
(scale [1, kv_heads, 1, head_size]) and float32 ``k_scale`` / ``v_scale`` inputs (12 and 13). Codes are
``clip(rint(x / scale), -2^(b-1), 2^(b-1) - 1)``, symmetric; every read of the cache (the prompt's own keys and
values included) is dequantized (checked against numpy on the CPU provider, tests/passes/test_kv_cache.py).
Its CPU kernel refuses different quant types for keys and values, so both are per channel here: keys need it
(a few channels carry outliers, after the rotary embedding as before it) and values lose nothing by it.

:func:`kv_cache_layers` finds the attentions (a lowered model: every ``past_key_values.*`` input read by one
GroupQueryAttention alone); :class:`QuantizeKVCachePass` rewrites them given each layer's largest |key| and
|value| per KV head and channel (measured by :func:`qonnx.runtime.calibration.kv_cache_ranges`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qonnx.core.errors import ConfigError, escape_name

__all__ = ["KV_CACHE_FORMATS", "KVCacheFormat", "KVLayer", "QuantizeKVCachePass", "kv_cache_layers", "kv_scales"]


@dataclasses.dataclass(frozen=True)
class KVCacheFormat:
    """How one cache width is stored: element type, bits and the largest code magnitude."""

    dtype: ir.DataType
    bits: int
    qmax: int

    def width(self, head_size: int) -> int:
        """Elements per position and head in the cache tensor (two int4 codes share a byte)."""
        return head_size if self.bits == 8 else head_size // 2


KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    "int8": KVCacheFormat(ir.DataType.INT8, 8, 127),
    "int4": KVCacheFormat(ir.DataType.UINT8, 4, 7),
}


@dataclasses.dataclass
class KVLayer:
    """One attention whose cache is a graph input and output: the node and its past/present values."""

    node: ir.Node
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    kv_heads: int
    head_size: int


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"


def kv_cache_layers(model: ir.Model) -> list[KVLayer]:
    """The attentions whose KV cache can be quantized, in graph order.

    Raises:
        ConfigError: the model has no GroupQueryAttention reading its ``past_key_values`` inputs (not lowered),
            a cache input read by anything else, a cache already quantized, or a head size int4 cannot pack.
    """
    past = [v for v in model.graph.inputs if v.name and v.name.startswith("past_key_values.")]
    nodes = [n for n in model.graph if _is_gqa(n)]
    if not past or not nodes:
        raise ConfigError(
            "a quantized KV cache needs a model lowered with GroupQueryAttention and a KV cache "
            "(qonnx lower first, with attention)"
        )
    layers = []
    for node in nodes:
        if len(node.inputs) < 5 or len(node.outputs) < 3:
            continue
        pk, pv = node.inputs[3], node.inputs[4]
        if pk is None or pv is None or not pk.is_graph_input() or not pv.is_graph_input():
            continue
        present_k, present_v = node.outputs[1], node.outputs[2]
        if not present_k.is_graph_output() or not present_v.is_graph_output():
            raise ConfigError(f"the present key/value of attention {escape_name(node.name)} are not graph outputs")
        if pk.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            raise ConfigError(f"the KV cache of attention {escape_name(node.name)} is {pk.dtype}: already quantized")
        heads = node.attributes.get("kv_num_heads")
        shape = pk.shape
        if heads is None or shape is None or shape.rank() != 4 or not isinstance(shape[3], int):
            raise ConfigError(f"input {escape_name(pk.name)} has no fixed head size: {shape}")
        layers.append(KVLayer(node, pk, pv, present_k, present_v, heads.as_int(), shape[3]))
    read = {id(v) for layer in layers for v in (layer.past_key, layer.past_value)}
    stray = [v.name for v in past if id(v) not in read or len(list(v.uses())) != 1]
    if stray:
        raise ConfigError(
            f"cache input {escape_name(stray[0])} is not read by one GroupQueryAttention alone; "
            "a quantized KV cache needs a model lowered with attention (qonnx lower)"
        )
    return layers


def kv_scales(absmax: np.ndarray, fmt: KVCacheFormat) -> np.ndarray:
    """Per-channel scales [1, kv_heads, 1, head_size] (float32) from the largest magnitudes [kv_heads, head_size].

    A channel that never left zero gets the smallest normal float scale (its codes stay 0).
    """
    amax = np.asarray(absmax, dtype=np.float64)
    scale = np.maximum(amax / fmt.qmax, np.finfo(np.float32).tiny)
    return scale.astype(np.float32)[None, :, None, :]


class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Store every GroupQueryAttention's past and present in ``kv_cache`` ("int8" or "int4"), per-channel scales.

    Args:
        kv_cache: the cache format, a key of :data:`KV_CACHE_FORMATS`.
        ranges: by past key/value input name, the largest magnitude [kv_heads, head_size] seen in calibration.

    After the pass, :attr:`layers` counts the attentions changed and :attr:`cache_bytes_per_token` gives the
    bytes one position takes in all layers' caches (batch 1).
    """

    def __init__(self, kv_cache: str, ranges: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        if kv_cache not in KV_CACHE_FORMATS:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHE_FORMATS)}, not {kv_cache!r}")
        self.kv_cache = kv_cache
        self.format = KV_CACHE_FORMATS[kv_cache]
        self.ranges = dict(ranges)
        self.layers = 0
        self.cache_bytes_per_token = 0

    def requires(self, model: ir.Model) -> None:
        """Every cache input must have its measured range, of its head count and size."""
        try:
            layers = kv_cache_layers(model)
        except ConfigError as e:
            raise ir.passes.PreconditionError(str(e)) from None
        for layer in layers:
            if self.format.bits == 4 and layer.head_size % 2:
                raise ir.passes.PreconditionError(f"int4 packs two codes a byte; head size {layer.head_size} is odd")
            for value in (layer.past_key, layer.past_value):
                found = self.ranges.get(value.name or "")
                if found is None or np.shape(found) != (layer.kv_heads, layer.head_size):
                    raise ir.passes.PreconditionError(
                        f"no range [{layer.kv_heads}, {layer.head_size}] for {escape_name(value.name)}"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Retype the caches, add the scales and the node's quantization attributes."""
        fmt = self.format
        self.layers = self.cache_bytes_per_token = 0
        for layer in kv_cache_layers(model):
            node = layer.node
            width = fmt.width(layer.head_size)
            scales = []
            for value in (layer.past_key, layer.past_value):
                name = f"{value.name}_scale"
                array = kv_scales(self.ranges[value.name or ""], fmt)
                scale = ir.val(name, const_value=ir.tensor(array, name=name))
                model.graph.register_initializer(scale)
                scales.append(scale)
            if len(node.inputs) < 14:
                node.resize_inputs(14)
            node.replace_input_with(12, scales[0])
            node.replace_input_with(13, scales[1])
            for value in (layer.past_key, layer.past_value, layer.present_key, layer.present_value):
                value.dtype = fmt.dtype
                if value.shape is not None and value.shape.rank() == 4:
                    dims = list(value.shape)
                    dims[3] = width
                    value.shape = ir.Shape(dims)
            node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", "PER_CHANNEL")
            node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", "PER_CHANNEL")
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", fmt.bits)
            self.layers += 1
            self.cache_bytes_per_token += 2 * layer.kv_heads * width
        return ir.passes.PassResult(model, modified=bool(self.layers))

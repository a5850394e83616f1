"""What ONNX Runtime's GroupQueryAttention needs of the graph around an attention, for :mod:`qonnx.passes.lower`.

Its default scale (:func:`default_scale`), a KV repeat to replace when there are as many KV heads as query heads
(:func:`expose_kv_repeat`), and its sequence lengths computed from ``attention_mask`` (:func:`lengths_from_mask`).
Whether the attention mask is causal is decided in :mod:`qonnx.passes._attention_mask`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from qonnx.passes.fusion_rules import FUSION_DOMAIN

__all__ = ["SCALE_TOLERANCE", "default_scale", "expose_kv_repeat", "lengths_from_mask"]

#: Relative difference from 1/sqrt(head size) still taken as the default scale: a float16 export rounds the
#: scale it multiplies by (1/sqrt(32) becomes 0.17674, 2e-4 off); GroupQueryAttention uses the exact value.
SCALE_TOLERANCE = 1e-3


def default_scale(node: ir.Node) -> bool:
    """Whether an SDPA node's scale is 1/sqrt(head size), up to the rounding of a float16 export."""
    attr = node.attributes.get("scale")
    if attr is None:
        return True
    query = node.inputs[0]
    head = query.shape[-1] if query is not None and query.shape is not None and query.shape.rank() else None
    if not isinstance(head, int) or head <= 0:
        return False
    return abs(float(attr.as_float()) * head**0.5 - 1.0) <= SCALE_TOLERANCE


def expose_kv_repeat(model: ir.Model) -> int:
    """Give attentions with as many KV heads as query heads the KV repeat GroupQueryAttention's rule expects.

    transformers repeats K and V across the query heads that share them (Unsqueeze, Expand, Reshape) only
    when there are fewer KV heads; with equal counts (Llama-2-7B) the rule finds no repeat and the attention
    would become MultiHeadAttention, measured 10x slower on CUDA. An identity repeat (Expand to the same
    shape) is inserted between the concatenated cache and the attention; GroupQueryAttention with
    kv_num_heads == num_heads replaces it, and if nothing does, it computes the same values. Returns the
    attentions changed.
    """
    changed = 0
    for node in list(model.graph):
        if node.domain != FUSION_DOMAIN or node.op_type != "SDPA" or len(node.inputs) < 3:
            continue
        query, key, value = node.inputs[:3]
        heads = [
            v.shape[1] if v is not None and v.shape is not None and v.shape.rank() == 4 else None
            for v in (query, key, value)
        ]
        if None in heads or not isinstance(heads[0], int) or len(set(heads)) != 1:
            continue
        if any(v is None or v.producer() is None or v.producer().op_type == "Reshape" for v in (key, value)):  # type: ignore[union-attr]
            continue  # already repeated (fewer KV heads), or not the cache layout the rule knows
        head_size = key.shape[3] if key is not None and key.shape is not None else None  # type: ignore[union-attr]
        if not isinstance(head_size, int):
            continue
        for index, kv in ((1, key), (2, value)):
            assert kv is not None
            tag = f"{node.name or 'sdpa'}_kv{index}"
            unsq = ir.node("Unsqueeze", [kv, ir.val(f"{tag}_axes", const_value=ir.tensor([2], ir.DataType.INT64))])
            ones = ir.val(f"{tag}_ones", const_value=ir.tensor([1, 1, 1, 1, 1], ir.DataType.INT64))
            expand = ir.node("Expand", [unsq.outputs[0], ones])
            target = ir.val(f"{tag}_shape", const_value=ir.tensor([0, 0, -1, head_size], ir.DataType.INT64))
            reshape = ir.node("Reshape", [expand.outputs[0], target])
            for const in (unsq.inputs[1], ones, target):
                model.graph.register_initializer(const)  # type: ignore[arg-type]
            model.graph.insert_before(node, [unsq, expand, reshape])
            reshape.outputs[0].shape = kv.shape
            reshape.outputs[0].dtype = kv.dtype  # type: ignore[assignment]
            node.replace_input_with(index, reshape.outputs[0])
        changed += 1
    return changed


def lengths_from_mask(model: ir.Model) -> int:
    """Feed every GroupQueryAttention its lengths from ``attention_mask``, not from position_ids.

    onnxscript's rule computes ``seqlens_k`` and ``total_sequence_length`` with ReduceMax over the values of
    ``position_ids``. On ONNX Runtime 1.31's CUDA provider those run on the GPU, and the kernel, which reads
    ``total_sequence_length`` as a CPU input, then sees a wrong value: a prompt of more than one token fails
    ("total sequence length must be positive") and a decoding step's present KV cache does not grow (measured
    on an H100). Here, as onnxruntime-genai's models do: ``total_sequence_length`` = the mask's second
    dimension (``Shape``: a CPU value, no copy from the device) and ``seqlens_k`` = the number of ones in each
    mask row, minus one (ReduceSum in int32: computed where the mask is, so a model on CUDA has no host/device
    copy in it and ONNX Runtime can capture its decode step in a CUDA graph). With a mask of ones (qonnx's
    evaluation and generation) both equal the previous ``Shape``-only lengths. A decode loop with a fixed-size
    KV buffer may pass a fixed-size mask, ones for the positions filled so far and zeros after: the lengths
    then say how much of the buffer is real, and every shape stays the same from step to step.
    Returns the nodes changed.
    """
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    if not nodes or mask is None:
        return 0

    def const(name: str, array: Any) -> ir.Value:
        value = ir.val(name, const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        return value

    shape = ir.node("Shape", [mask])
    total64 = ir.node("Gather", [shape.outputs[0], const("gqa_axis_1", np.array(1, np.int64))], attributes={"axis": 0})
    total = ir.node("Cast", [total64.outputs[0]], attributes={"to": ir.DataType.INT32})
    mask32 = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32})
    if model.opset_imports.get("", 13) >= 13:
        count = ir.node(
            "ReduceSum", [mask32.outputs[0], const("gqa_axes_1", np.array([1], np.int64))], attributes={"keepdims": 0}
        )
    else:
        count = ir.node("ReduceSum", [mask32.outputs[0]], attributes={"axes": [1], "keepdims": 0})
    seqlens = ir.node("Sub", [count.outputs[0], const("gqa_one_i32", np.array(1, np.int32))])
    total.outputs[0].name, seqlens.outputs[0].name = "gqa_total_sequence_length", "gqa_seqlens_k"
    total.outputs[0].dtype = seqlens.outputs[0].dtype = ir.DataType.INT32
    total.outputs[0].shape = ir.Shape([])
    model.graph.insert_before(nodes[0], [shape, total64, total, mask32, count, seqlens])
    for node in nodes:
        node.replace_input_with(5, seqlens.outputs[0])
        node.replace_input_with(6, total.outputs[0])
    return len(nodes)

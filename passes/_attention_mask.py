"""Decide whether an attention mask is the plain causal mask, by running the graph that computes it.

ONNX Runtime's GroupQueryAttention masks causally from the sequence lengths it is given and takes no mask
input, so a model may only be fused into it when every attention's mask is exactly causal: no sliding
window, nothing else. Exporters build that mask in many different ways, so it is checked by value, not by
shape of graph: the nodes that compute it are copied into a small model, which ONNX Runtime runs for a few
batch, sequence and past lengths (one past much longer than any common sliding window), with an all-ones
``attention_mask`` and ``position_ids`` that continue the past. Anything the copy cannot run counts as
"not causal", so an unrecognised mask only costs a fusion.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["causal_mask_problem"]

#: (batch, new tokens, past tokens) to evaluate; the last past is longer than common sliding windows (4096).
_CASES = ((2, 5, 0), (1, 3, 4), (1, 1, (1 << 15) - 1))
#: A masked-out score must be at most this (a float16 mask uses -65504, a float32 one -3.4e38 or -inf).
_MASKED = -1e4
#: Constants that the mask computation reads must be small; a large one means this is no mask computation.
_MAX_CONSTANT_BYTES = 1 << 20


def _nodes_behind(value: ir.Value) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]] | str:
    """(nodes in graph order, graph inputs, initializers) that ``value`` is computed from, or why not."""
    nodes: set[ir.Node] = set()
    inputs: list[ir.Value] = []
    constants: list[ir.Value] = []
    stack = [value]
    seen: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs.append(v)
            elif v.const_value is not None and v.const_value.nbytes <= _MAX_CONSTANT_BYTES:
                constants.append(v)
            else:
                return f"the mask depends on {v.name!r}, neither a model input nor a small constant"
            continue
        if node.graph is not value.graph or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return "the mask is computed in a subgraph"
        nodes.add(node)
        stack.extend(i for i in node.inputs if i is not None)
    graph = value.graph
    if graph is None:
        return "the mask is not in a graph"
    return [n for n in graph if n in nodes], inputs, constants


def _mask_model(model: ir.Model, mask: ir.Value) -> tuple[bytes, list[ir.Value]] | str:
    """A serialized model that computes ``mask`` from the model inputs it depends on, or why there is none."""
    found = _nodes_behind(mask)
    if isinstance(found, str):
        return found
    nodes, inputs, constants = found
    graph_inputs = []
    for v in inputs:
        if v.dtype is None or v.shape is None:
            return f"input {v.name!r} has no declared type and rank"
        # Every dimension free: the past is fed as [batch, 1, past, 1] whatever its heads and head size.
        graph_inputs.append(onnx.helper.make_tensor_value_info(v.name or "", v.dtype.value, [None] * v.shape.rank()))
    inits = []
    for v in constants:
        proto = ir.serde.serialize_tensor(v.const_value)  # type: ignore[arg-type]
        proto.name = v.name or ""
        inits.append(proto)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "attention_mask",
        graph_inputs,
        [onnx.helper.make_tensor_value_info(mask.name or "", mask.dtype.value if mask.dtype else 0, None)],
        inits,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = min(model.ir_version or 8, 10)
    return proto.SerializeToString(), inputs


def _feed(value: ir.Value, batch: int, new: int, past: int) -> np.ndarray | None:
    """The input a decoder gets at this step, with an all-ones attention mask; None for an unknown input."""
    name = value.name or ""
    dtype = value.dtype.numpy() if value.dtype is not None else np.int64
    if name == "input_ids":
        return np.zeros((batch, new), dtype)
    if name == "attention_mask":
        return np.ones((batch, past + new), dtype)
    if name == "position_ids":
        return np.broadcast_to(np.arange(past, past + new, dtype=dtype), (batch, new)).copy()
    if name.startswith("past_key_values.") and value.shape is not None and value.shape.rank() == 4:
        return np.zeros((batch, 1, past, 1), dtype)
    return None


def causal_mask_problem(model: ir.Model, mask: ir.Value) -> str | None:
    """None when ``mask`` (an additive attention mask) is the causal mask for every evaluated step, else why not.

    Causal: a query at position ``past + i`` may see every key at positions ``0 .. past + i`` (score added
    0) and no later one (a large negative score).
    """
    built = _mask_model(model, mask)
    if isinstance(built, str):
        return built
    serialized, inputs = built
    if not any((v.name or "").startswith("past_key_values.") for v in inputs):
        return "the mask does not depend on a past input (no KV cache), so a sliding window cannot be ruled out"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(serialized, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # any failure to build means "not a mask we understand"
        return f"the mask computation does not run on its own: {str(e).splitlines()[0][:200]}"
    for batch, new, past in _CASES:
        feeds = {}
        for v in inputs:
            arr = _feed(v, batch, new, past)
            if arr is None:
                return f"the mask depends on input {v.name!r}"
            feeds[v.name or ""] = arr
        try:
            (got,) = session.run(None, feeds)
        except Exception as e:
            return f"the mask computation fails for {new} new and {past} past tokens: {str(e).splitlines()[0][:200]}"
        total = past + new
        if got.ndim != 4 or got.shape[-2:] != (new, total) or got.shape[0] not in (1, batch):
            return f"the mask has shape {got.shape} for batch {batch}, {new} new and {past} past tokens"
        allowed = np.arange(total)[None, :] <= past + np.arange(new)[:, None]
        values = np.broadcast_to(got, (got.shape[0], got.shape[1], new, total))
        if np.any(values[..., allowed] != 0) or np.any(values[..., ~allowed] > _MASKED):
            return f"the mask is not causal for {new} new and {past} past tokens (a sliding window?)"
    return None

"""A decode loop whose every step has the same shapes and buffers, so that ONNX Runtime can replay it as a CUDA graph.

A decode step of a lowered model (``qonnx lower --target cuda``: GroupQueryAttention) is ~435 small kernels for a
7B Llama; launched one by one from the host they cost more than the weights take to read. ONNX Runtime's CUDA
provider can capture a run into a CUDA graph (provider option ``enable_cuda_graph``) and replay it with one launch,
but only when every input and output stays at the same device address with the same shape from run to run and no
node copies between host and device. This loop gives it that:

- each layer's past and present are bound to ONE preallocated buffer of ``max_len`` positions
  (GroupQueryAttention's past_present_share_buffer writes each new position in place);
- ``attention_mask`` is ``[batch, max_len]``: ones for the positions filled so far, zeros after. The lowered model
  takes GroupQueryAttention's lengths from it (``seqlens_k`` = ones - 1, computed on the device;
  ``total_sequence_length`` = ``max_len`` from its shape, a constant), so the step's shapes never change;
- ``input_ids``, ``position_ids``, the mask and the logits live in fixed OrtValues, updated in place.

The prompt (prefill) runs outside the graph (run option ``gpu_graph_id`` = -1) with a mask of its own length; each
step after it replays the graph captured on the first steps. Every row of a batch has the same length (no padding).
On the CPU the same loop runs without capture (what the tests check: its logits equal the growing-mask loop's).

Which models qualify (:func:`fixed_shape_decodable`): every past input feeds GroupQueryAttention alone (see
:func:`kv_buffer_shareable`), its lengths come from ReduceSum over ``attention_mask`` and its
rotary cos/sin caches are constants (``qonnx lower`` writes both since 2026-11-24; models lowered before compute
them from ``Shape(attention_mask)`` and ``position_ids`` and do not qualify).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["KV_DTYPES", "FixedShapeDecoder", "fixed_shape_decodable", "kv_buffer_shareable", "rotary_cache_positions"]

#: KV cache types (also qonnx generate's and bench's); int8 and uint8 (int4 codes, two a byte): a quantized cache
#: (qonnx.passes.kv_cache).
KV_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}
_graph_ids = itertools.count(1)  # one CUDA graph per decoder; ids are per session but unique anywhere is simpler


def _gqa_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _reads_mask_sum(value: ir.Value | None, depth: int = 4) -> bool:
    """Whether ``value`` is computed (within a few nodes) by a ReduceSum over ``attention_mask``."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    if node.op_type == "ReduceSum":
        source = node.inputs[0]
        while source is not None and source.producer() is not None and source.producer().op_type == "Cast":  # type: ignore[union-attr]
            source = source.producer().inputs[0]  # type: ignore[union-attr]
        return source is not None and source.name == "attention_mask" and source.is_graph_input()
    return any(_reads_mask_sum(v, depth - 1) for v in node.inputs)


def rotary_cache_positions(model: ir.Model) -> int | None:
    """The fewest positions the rotary caches of the model's GroupQueryAttention nodes hold.

    None: no GroupQueryAttention with rotary, or a cache computed at run time.
    """
    sizes = []
    for node in _gqa_nodes(model):
        cos = node.inputs[7] if len(node.inputs) > 7 else None
        if cos is None:
            continue
        if not _is_constant(cos) or cos.shape is None or not isinstance(cos.shape[0], int):
            return None
        sizes.append(cos.shape[0])
    return min(sizes) if sizes else None


def kv_buffer_shareable(model: ir.Model) -> bool:
    """True when past and present can share one buffer per cache input.

    That needs every ``past_key_values.{i}.key|value`` input read by a GroupQueryAttention node alone (as its
    past_key / past_value) whose present_key / present_value is the graph output ``present.{i}.key|value``:
    that node then writes the new positions into the bound buffer, and nothing else sees its full length.
    """
    outputs = {v.name for v in model.graph.outputs}
    past = [v for v in model.graph.inputs if v.name and v.name.startswith("past_key_values.")]
    for value in past:
        uses = list(value.uses())
        if len(uses) != 1:
            return False
        node, index = uses[0]
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or index not in (3, 4):
            return False
        present = node.outputs[index - 2] if len(node.outputs) > index - 2 else None
        want = (value.name or "").replace("past_key_values.", "present.")
        if present is None or present.name != want or want not in outputs or list(present.uses()):
            return False
    return bool(past)


def fixed_shape_decodable(model: ir.Model) -> bool:
    """Whether :class:`FixedShapeDecoder` can run ``model`` (see the module docstring)."""
    nodes = _gqa_nodes(model)
    if not nodes or not kv_buffer_shareable(model):
        return False
    for node in nodes:
        if len(node.inputs) < 7 or not _reads_mask_sum(node.inputs[5]):
            return False
        rotary = node.attributes.get("do_rotary")
        if (
            rotary is not None
            and rotary.as_int()
            and (len(node.inputs) < 9 or not all(map(_is_constant, node.inputs[7:9])))
        ):
            return False
    return True


class FixedShapeDecoder:
    """Prefill, then decode one token per row per step, with fixed shapes and buffers (see the module docstring).

    Args:
        session: an InferenceSession of a model :func:`fixed_shape_decodable` accepts; made with
            ``make_session(..., cuda_graph=True)`` for CUDA graph capture.
        batch: rows decoded together.
        max_len: positions in the KV buffers: prompt + new tokens must fit (and the rotary cache must hold them).
        cuda_graph: replay the decode step as a CUDA graph (the session must have been made for it).
    """

    def __init__(self, session: Any, batch: int, max_len: int, *, cuda_graph: bool = False) -> None:
        self.session = session
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self.batch, self.max_len = batch, max_len
        self.cuda_graph = cuda_graph and self.device == "cuda"
        inputs = {i.name: i for i in session.get_inputs()}
        self.inputs = inputs
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        if not self.past or "attention_mask" not in inputs:
            raise ValueError("the model has no KV cache inputs or no attention_mask: nothing to decode with")
        self.kv = {}
        for name in self.past:
            info = inputs[name]
            shape = (batch, info.shape[1], max_len, info.shape[3])
            # zeros, not uninitialized memory: positions past the lengths are masked, but a NaN left there by
            # chance could still reach a masked product
            self.kv[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, KV_DTYPES[info.type]), self.device, 0)
        self.mask = np.zeros((batch, max_len), np.int64)
        self.length = 0  # positions filled in every row
        self._step_io: Any = None
        self._values: dict[str, Any] = {}
        self.graph_id = next(_graph_ids)
        self._prefill_options = ort.RunOptions()
        self._step_options = ort.RunOptions()
        if self.cuda_graph:
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")
            self._step_options.add_run_config_entry("gpu_graph_id", str(self.graph_id))

    def _ortvalue(self, array: np.ndarray) -> Any:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _feeds(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
        if "position_ids" in self.inputs:
            positions = np.arange(self.length, self.length + ids.shape[1], dtype=np.int64)
            feeds["position_ids"] = np.repeat(positions[None], ids.shape[0], 0)
        return feeds

    def _bind_kv(self, io: Any) -> None:
        for past, present in zip(self.past, self.present, strict=True):
            io.bind_ortvalue_input(past, self.kv[past])
            io.bind_ortvalue_output(present, self.kv[past])

    def prefill(self, ids: np.ndarray) -> Any:
        """Run the prompt ``ids`` [batch, P] from position 0 (earlier contents are forgotten).

        Returns its logits [batch, P, vocab] as an OrtValue on the device.
        """
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"prompt must be [{self.batch}, length], not {list(ids.shape)}")
        if ids.shape[1] >= self.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens leaves no room in {self.max_len} positions")
        self.length = 0
        io = self.session.io_binding()
        feeds = self._feeds(ids, np.ones(ids.shape, np.int64))
        for name, array in feeds.items():
            io.bind_ortvalue_input(name, self._ortvalue(array))
        io.bind_output("logits", self.device)
        self._bind_kv(io)
        io.synchronize_inputs()
        self.session.run_with_iobinding(io, self._prefill_options)
        io.synchronize_outputs()
        self.length = ids.shape[1]
        self.mask[:] = 0
        self.mask[:, : self.length] = 1
        return io.get_outputs()[0]

    def step(self, ids: np.ndarray) -> Any:
        """Feed one token per row (``ids`` [batch, 1]) after what is there.

        Returns its logits [batch, 1, vocab]: an OrtValue on the device, overwritten by the next step.
        """
        if self.length == 0:
            raise RuntimeError("prefill() first")
        if self.length >= self.max_len:
            raise ValueError(f"the KV buffers are full ({self.max_len} positions)")
        ids = np.asarray(ids, dtype=np.int64).reshape(self.batch, 1)
        self.mask[:, self.length] = 1
        feeds = self._feeds(ids, self.mask)
        if self._step_io is None:
            io = self.session.io_binding()
            # copies: on the CPU an OrtValue wraps its array, and self.mask changes between steps
            self._values = {name: self._ortvalue(np.array(array)) for name, array in feeds.items()}
            for name, value in self._values.items():
                io.bind_ortvalue_input(name, value)
            logits = next(o for o in self.session.get_outputs() if o.name == "logits")
            vocab, dtype = logits.shape[-1], KV_DTYPES[logits.type]
            if not isinstance(vocab, int):
                raise ValueError("the model's logits have no fixed vocabulary size")
            self._values["logits"] = ort.OrtValue.ortvalue_from_shape_and_type(
                (self.batch, 1, vocab), dtype, self.device, 0
            )
            io.bind_ortvalue_output("logits", self._values["logits"])
            self._bind_kv(io)
            self._step_io = io
        else:
            for name, array in feeds.items():
                self._values[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self._step_io, self._step_options)
        self._step_io.synchronize_outputs()
        self.length += 1
        return self._values["logits"]

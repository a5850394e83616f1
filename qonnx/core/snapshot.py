"""A model taken as it is: its graph as protobuf bytes, its large tensors as arrays; written to one file.

Light to import (numpy only; the IR and onnx load when used): ONNX Runtime sessions built from memory
(``qonnx.runtime.session.InMemoryModel``) start from it before the IR is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from qonnx.core.errors import ModelLoadError

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "MAX_RUNTIME_IR_VERSION",
    "SNAPSHOT_LOCATION",
    "Snapshot",
    "iter_tensors",
    "make_runtime_compatible",
    "write_snapshot",
]

#: The newest ONNX IR version ONNX Runtime 1.31 loads.
MAX_RUNTIME_IR_VERSION = 13
#: Sub-byte element types (they need IR version 10).
_SUB_BYTE = {"INT4", "UINT4", "FLOAT4E2M1"}

#: Element types that ONNX Runtime takes from numpy arrays as they are (no sub-byte, float8 or bfloat16 types).
_NUMPY_TYPES = frozenset(
    {"FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL"}
)
#: Where a :class:`Snapshot`'s protobuf says its large tensors lie (they are in ``Snapshot.weights``).
SNAPSHOT_LOCATION = "qonnx-in-memory"

_S = TypeVar("_S", bound="Snapshot")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A model as it was when taken: its graph as protobuf bytes, its large tensors as arrays beside it.

    Tensors of the main graph's initializers of numpy's types and ``min_bytes`` or more are placeholders in
    ``proto`` (external data at :data:`SNAPSHOT_LOCATION`) and lie in ``weights`` by name, as they are (a
    weight memory-mapped from the input's data file stays mapped). Other tensors (int4, float8, bfloat16,
    those of subgraphs) are serialized inside ``proto``. One snapshot serves both ``qonnx.core.modelfile.save`` (one
    file, :func:`write_snapshot`) and a session built from memory (``qonnx.runtime.session.InMemoryModel``).
    """

    proto: bytes
    weights: Mapping[str, np.ndarray]

    @classmethod
    def of(cls: type[_S], model: ir.Model, *, min_bytes: int = 1024) -> _S:
        """Take ``model`` as it is now (at an IR version ONNX Runtime accepts); the model is left unchanged.

        Not thread-safe: while it serializes, the model's large tensors are swapped for placeholders.
        """
        import onnx_ir as ir  # deferred: keeps this module light (an ONNX Runtime session starts from it first)

        main = set(model.graph.initializers.values())
        weights: dict[str, np.ndarray] = {}
        swapped = []
        for value, tensor in iter_tensors(model):
            stub: ir.TensorProtocol
            if value in main and tensor.dtype.name in _NUMPY_TYPES and tensor.nbytes >= min_bytes and value.name:
                weights[value.name] = np.ascontiguousarray(tensor.numpy())
                shape = ir.Shape(tensor.shape.numpy())
                stub = ir.ExternalTensor(
                    SNAPSHOT_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=shape, name=value.name
                )
            elif isinstance(tensor, ir.ExternalTensor):  # its file is beside the model, which bytes do not know
                stub = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
            else:
                continue
            swapped.append((value, tensor))
            value.const_value = stub
        version = model.ir_version
        try:
            make_runtime_compatible(model)
            proto = ir.serde.serialize_model(model).SerializeToString()
        finally:
            model.ir_version = version
            for value, tensor in swapped:
                value.const_value = tensor
        return cls(proto, weights)


def iter_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.TensorProtocol]]:
    """Yield (value, tensor) for every initializer of every graph, subgraphs included."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value


def _uses_dtypes(model: ir.Model) -> set[str]:
    dtypes = {t.dtype.name for _, t in iter_tensors(model)}
    for graph in model.graphs():
        for v in [*graph.inputs, *graph.outputs]:
            if v.dtype is not None:
                dtypes.add(v.dtype.name)
    return dtypes


def make_runtime_compatible(model: ir.Model) -> None:
    """Set the IR version to one ONNX Runtime accepts and that covers the model's opsets and types.

    The version is the smallest that holds what the model uses, but never lower than the input's
    own (capped at :data:`MAX_RUNTIME_IR_VERSION`).

    Raises:
        ModelLoadError: the model needs an IR version newer than ONNX Runtime accepts.
    """
    import onnx  # deferred: keeps this module light (an ONNX Runtime session starts from it before onnx loads)

    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    if _uses_dtypes(model) & _SUB_BYTE:
        needed = max(needed, 10)
    version = max(needed, min(model.ir_version or needed, MAX_RUNTIME_IR_VERSION))
    if version > MAX_RUNTIME_IR_VERSION:
        raise ModelLoadError(
            f"the model needs ONNX IR version {version}, newer than ONNX Runtime accepts "
            f"({MAX_RUNTIME_IR_VERSION}); lower its opset first"
        )
    model.ir_version = version


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field: int, size: int) -> bytes:
    """A protobuf field's key (wire type 2) and the length of its ``size`` bytes of payload."""
    return _varint(field << 3 | 2) + _varint(size)


def _split(message: Any, field: int) -> tuple[bytes, bytes]:
    """``message`` serialized as its fields numbered below ``field`` and as those above it."""
    before, after = type(message)(), type(message)()
    before.CopyFrom(message)
    after.CopyFrom(message)
    for desc, _ in message.ListFields():
        if desc.number >= field:
            before.ClearField(desc.name)
        if desc.number <= field:
            after.ClearField(desc.name)
    return before.SerializeToString(), after.SerializeToString()


def write_snapshot(snapshot: Snapshot, path: str | os.PathLike) -> None:
    """Write ``snapshot`` as one .onnx file, its weights inside: the bytes serializing the whole model gives.

    Protobuf's wire format is written by hand around the arrays (a key and a length before each tensor's
    data): the weights go from where they lie to the file, without the two serialized copies that serializing
    the whole model takes, nor its single call holding the interpreter lock for 0.1-0.2 s per 180 MB (which
    stalled the verification thread's ONNX Runtime build beside it).
    """
    import onnx  # deferred: keeps this module light (an ONNX Runtime session starts from it before onnx loads)

    proto = onnx.ModelProto.FromString(snapshot.proto)
    graph = proto.graph
    parts: list[Any] = []  # the initializers, in order: bytes, or (header, array, trailer)
    for tensor in graph.initializer:
        array = snapshot.weights.get(tensor.name)
        if array is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
            parts.append(tensor.SerializeToString())
            continue
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")
        head, tail = _split(tensor, 9)  # TensorProto.raw_data
        parts.append((head, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")), tail))
    graph.ClearField("initializer")
    graph_head, graph_tail = _split(graph, 5)  # GraphProto.initializer
    proto.ClearField("graph")
    model_head, model_tail = _split(proto, 7)  # ModelProto.graph

    def tensor_size(part: Any) -> int:
        if isinstance(part, bytes):
            return len(part)
        head, array, tail = part
        return len(head) + len(_length_delimited(9, array.nbytes)) + array.nbytes + len(tail)

    sizes = [tensor_size(part) for part in parts]
    graph_size = len(graph_head) + len(graph_tail) + sum(len(_length_delimited(5, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(model_head + _length_delimited(7, graph_size) + graph_head)
        for part, size in zip(parts, sizes, strict=True):
            f.write(_length_delimited(5, size))
            if isinstance(part, bytes):
                f.write(part)
                continue
            head, array, tail = part
            f.write(head + _length_delimited(9, array.nbytes))
            f.write(memoryview(array.reshape(-1)).cast("B"))
            f.write(tail)
        f.write(graph_tail + model_tail)

"""Where a model says its external tensors lie, checked before anything reads them or builds a session.

Every tensor stored outside the .onnx file names a ``location`` (relative to the model's folder), an
``offset`` and a ``length``; its shape and type say how many bytes it takes. A location that holds a NUL
byte, is too long for the file system, goes through a missing folder or points outside the model's folder,
and a tensor that declares more bytes than its file holds (10^12 elements over a 512 KiB file), are refused
here in one line, before onnx_ir maps the file or ONNX Runtime tries to allocate the tensor.

Works on the ``onnx`` protobuf (no IR): ONNX Runtime sessions check a file with it before they are built.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from qonnx.core.errors import ModelLoadError, escape_name

__all__ = ["check_external_data", "check_external_tensor", "graph_tensors", "tensor_nbytes"]

#: Bits per element of the types numpy has no exact size for (packed two or four to a byte).
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def tensor_nbytes(data_type: int, dims: list[int] | tuple[int, ...]) -> int | None:
    """Bytes a tensor of ``data_type`` and shape ``dims`` takes when stored (None: strings, unknown types)."""
    numel = math.prod(int(d) for d in dims)
    bits = _PACKED_BITS.get(data_type)
    if bits is None:
        if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            return None
        try:
            bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return None
    return (numel * bits + 7) // 8


def check_external_tensor(
    model_path: Path, name: str, location: str, offset: int, length: int | None, nbytes: int | None
) -> None:
    """Refuse one external tensor whose data cannot be where the model says.

    Args:
        model_path: the .onnx file; ``location`` is relative to its folder.
        name: the tensor's name (for the message).
        location: the file, as the model's ``external_data`` entries give it.
        offset: where the tensor starts in it.
        length: its bytes, as the entries give them (None: absent).
        nbytes: the bytes its shape and type take (None: unknown).

    Raises:
        ModelLoadError: NUL byte, absolute or escaping path, name too long, missing file or folder, a
            declared length that disagrees with the shape, or a file shorter than the tensor's end.
    """
    where = f"{model_path}: external data file '{escape_name(location)}' of tensor '{escape_name(name)}'"
    if "\0" in location:
        raise ModelLoadError(f"{where}: the location holds a NUL byte; refusing it")
    base = model_path.parent.resolve()
    literal = base / location
    try:
        target = literal.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a symlink loop
        raise ModelLoadError(f"{where}: unusable path: {_reason(e)}") from None
    if os.path.isabs(location) or not target.is_relative_to(base):
        raise ModelLoadError(f"{where} points outside the model's folder; refusing to read it")
    try:
        st = os.stat(literal)  # as given: "missing/../w.bin" goes through a folder that must exist
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ModelLoadError(f"{where}: the file is missing (no file at {escape_name(literal)})") from None
        raise ModelLoadError(f"{where}: unusable path: {_reason(e)}") from None
    if not os.path.isfile(literal):
        raise ModelLoadError(f"{where}: not a file")
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{where}: negative offset or length ({offset}, {length})")
    if nbytes is not None and length is not None and length != nbytes:
        raise ModelLoadError(f"{where}: its shape and type take {nbytes} bytes, its external data entry says {length}")
    size = nbytes if nbytes is not None else length
    end = offset + (size or 0)
    if st.st_size < end:
        raise ModelLoadError(
            f"{where}: the file is truncated: the tensor needs bytes up to {end}, the file has {st.st_size}"
        )


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``graph`` and its subgraphs, each of which can keep its bytes in an external file.

    Initializers (sparse ones' values and indices too) and tensor attributes (Constant's value).
    """
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for g in attr.graphs:
                yield from graph_tensors(g)


def check_external_data(proto: onnx.ModelProto, model_path: str | os.PathLike) -> None:
    """:func:`check_external_tensor` for every external tensor of ``proto``, read from ``model_path``.

    Raises:
        ModelLoadError: see :func:`check_external_tensor`; also an offset or length that is not a number.
    """
    path = Path(model_path)
    for tensor in graph_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        try:
            offset = int(entries.get("offset") or 0)
            length = int(entries["length"]) if entries.get("length") else None
        except ValueError:
            raise ModelLoadError(
                f"{path}: tensor '{escape_name(tensor.name)}': its external data offset or length is not a number"
            ) from None
        if any(d < 0 for d in tensor.dims):
            name = escape_name(tensor.name)
            raise ModelLoadError(f"{path}: tensor '{name}' has a negative dimension {list(tensor.dims)}")
        nbytes = tensor_nbytes(tensor.data_type, tensor.dims)
        check_external_tensor(path, tensor.name, entries.get("location", ""), offset, length, nbytes)

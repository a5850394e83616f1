"""Load and save ONNX models: lazy external data, runtime-compatible versions, atomic writes.

Loading never reads weights: external tensors are memory-mapped by onnx_ir on first access and can be
released after use. Saving always goes through :func:`save`, which writes to temporary files beside
the destination, syncs them and renames them into place, so a reader never sees a half-written model
(:mod:`qonnx.core.outputs` says how a model and its data file replace a previous pair).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from qonnx.core import outputs
from qonnx.core.errors import ModelLoadError, OutputPathError, quiet_logger
from qonnx.core.external_data import check_external_data
from qonnx.core.paths import MODEL_FILENAME, resolve_model_path
from qonnx.core.snapshot import (
    MAX_RUNTIME_IR_VERSION,
    Snapshot,
    iter_tensors,
    make_runtime_compatible,
    write_snapshot,
)

__all__ = [
    "MODEL_FILENAME",
    "MAX_RUNTIME_IR_VERSION",
    "resolve_model_path",
    "load",
    "save",
    "model_files",
    "iter_tensors",
    "make_runtime_compatible",
    "Snapshot",
    "write_snapshot",
    "writes_one_file",
    "to_bytes",
]

#: The newest IR version that the ONNX Runtime releases we target accept (1.31 refuses 14).
#: Above this many bytes of weights, a model is saved with external data (a protobuf is built in memory).
EXTERNAL_DATA_THRESHOLD = 256 << 20
#: Tensors up to this size stay inside the protobuf even when weights go to external data.
_INLINE_BYTES = 1024

#: Contrib ops that ONNX Runtime registers in the default domain (onnx's checker rejects them there).
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model lazily: structure now, weights on first access (memory-mapped).

    Args:
        path: a .onnx file, or a folder holding ``model.onnx``.

    Raises:
        ModelLoadError: missing file, not ONNX, truncated, or unusable external data.
    """
    model_path = resolve_model_path(path)
    try:
        proto = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError by version
        raise ModelLoadError(
            f"{model_path}: not a readable ONNX model (truncated or not ONNX): {_first_line(e)}"
        ) from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(f"{model_path}: not a readable ONNX model (no graph; truncated or not ONNX)")
    check_external_data(proto, model_path)
    try:
        with quiet_logger("onnx_ir"):  # its warnings on an invalid graph: the checker says it in a line
            model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelLoadError(f"{model_path}: invalid ONNX model: {_first_line(e)}") from None
    ir.external_data.set_base_dir(model.graph, os.fspath(model_path.parent))
    # From the path, so that external data resolves beside it; a model lowered for ONNX Runtime is checked
    # from its protobuf with the contrib ops that ORT keeps in the default domain moved out of it.
    target: str | onnx.ModelProto = _without_ort_default_domain_ops(proto) or os.fspath(model_path)
    del proto
    try:
        onnx.checker.check_model(target)
    except Exception as e:
        raise ModelLoadError(f"{model_path}: invalid ONNX model: {_first_line(e)}") from None
    return model


def _without_ort_default_domain_ops(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``proto`` to check in place of the file, or None to check the file (the usual case).

    ONNX Runtime registers SimplifiedLayerNormalization (fused RMSNorm) in the default domain, where onnx's
    checker does not know it; it leaves ops of other domains alone, so the copy has them in com.microsoft.
    Checked from a protobuf, external data would be looked for beside the working directory: the copy
    declares external initializers as graph inputs instead (their files were checked by
    :func:`~qonnx.core.external_data.check_external_data`).
    """
    if not any(n.op_type in _ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in proto.graph.node):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type in _ORT_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.add(domain="com.microsoft", version=1)
    graph = copy.graph
    inputs = {i.name for i in graph.input}
    inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.initializer[:]
    graph.initializer.extend(inline)
    return copy


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def model_files(model: ir.Model, model_path: str | os.PathLike) -> list[Path]:
    """The files a loaded model reads: the .onnx file and every external data file."""
    files = [Path(model_path).resolve()]
    for _, tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            p = Path(tensor.path).resolve()
            if p not in files:
                files.append(p)
    return files


def _weight_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for _, t in iter_tensors(model))


def writes_one_file(model: ir.Model, external_data: bool | None = None) -> bool:
    """Whether :func:`save` with this ``external_data`` writes ``model`` as one file (weights inside)."""
    return not external_data if external_data is not None else _weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: Iterable[str | os.PathLike] = (),
    external_data: bool | None = None,
    finalize: Callable[[Path], dict[str, str]] | None = None,
    snapshot: Snapshot | None = None,
) -> list[Path]:
    """Save ``model`` to ``path`` atomically, with versions ONNX Runtime accepts.

    Files are first written to a temporary folder beside ``path``, synced to disk, and renamed into place,
    the external data file before the model file, so a reader never sees a partial model, and a crash
    between the renames leaves the previous model and its data file as they were (see
    :mod:`qonnx.core.outputs`). No file but the previous ``path`` and its own data file is replaced or
    removed; a failed write leaves no file and no folder behind. The same model and options always give the
    same bytes.

    Args:
        model: the model; it is not changed, except its IR version (see make_runtime_compatible).
        path: the .onnx file to write; external data goes to ``<name>.data`` beside it (``<name>.1.data``,
            ... where that name holds other bytes that something else, or the previous output, reads).
        protect: files that must not be overwritten (the input model and its data files).
        external_data: True to always write weights to a separate file, False never, None (default)
            when the weights exceed 256 MiB (a protobuf file cannot exceed 2 GB).
        finalize: called with the written model's temporary path before it is moved into place; it may
            raise to abandon the write (nothing is left behind) and returns metadata_props to add.
        snapshot: :meth:`Snapshot.of` the model as it is now, when the caller took one already: a model
            written as one file is written from it (:func:`write_snapshot`) instead of from a new one.

    Returns:
        The files written.

    Raises:
        OutputPathError: the output would overwrite a protected file, or cannot be written (a full disk
            included: nothing is left behind).
    """
    out = Path(path)
    if out.suffix != ".onnx":
        raise OutputPathError(f"{out}: output model file must end in .onnx")
    protected = [Path(p) for p in protect]
    for p in protected:
        if _same_file(out, p):
            raise OutputPathError(f"{out}: output would overwrite the input file {p}")
    if out.is_dir():
        raise OutputPathError(f"{out}: is a folder")
    parent = out.parent if str(out.parent) else Path(".")
    created = outputs.make_folder(parent)
    try:
        outputs.remove_stale_temps(parent)
        make_runtime_compatible(model)
        if external_data is None:
            external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
        data_name = out.name + ".data"
        with outputs.staging(parent, out.name) as tmp:
            tmp_model = tmp / out.name
            if external_data:
                # Tensors that stay inside the protobuf but still live in the input's data file must be read in,
                # or the output would point at the input's file. Restored afterwards: the model is not changed.
                with _inlined(model, _INLINE_BYTES):
                    ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=_INLINE_BYTES)
            else:  # a snapshot holds no reference to the input's files
                write_snapshot(snapshot if snapshot is not None else Snapshot.of(model), tmp_model)
            if finalize is not None:
                _add_metadata(tmp_model, finalize(tmp_model), written=model.metadata_props.keys())
            tmp_data = tmp / data_name
            return outputs.commit(tmp_model, tmp_data if tmp_data.exists() else None, out, protected)
    except OSError as e:  # disk full, quota, permissions: the temporary files go, the old output stays
        outputs.remove_folders(created)
        raise OutputPathError(f"{out}: cannot write it: {e.strerror or e}") from None
    except BaseException:
        outputs.remove_folders(created)
        raise


def _add_metadata(model_path: Path, props: dict[str, str], written: Collection[str] = ()) -> None:
    """Set ``metadata_props`` in a saved model file (its external data is not touched).

    Keys not among those ``written`` in the file are appended to it: a protobuf parser merges concatenated
    messages, repeated fields by appending, so a file that ends in a ModelProto holding only the new entries
    reads as the model with them. That spares re-reading and re-writing a model whose weights are inside the
    file (up to 256 MiB). Replacing existing keys rewrites the file.
    """
    if not props:
        return
    if not any(key in written for key in props):
        extra = onnx.ModelProto()
        for key, value in props.items():
            extra.metadata_props.add(key=key, value=value)
        with open(model_path, "ab") as f:
            f.write(extra.SerializeToString())
        return
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, os.fspath(model_path))


@contextlib.contextmanager
def _inlined(model: ir.Model, max_bytes: int | None) -> Iterator[None]:
    """Within the block, external tensors (up to ``max_bytes`` each; all when None) are held in memory."""
    inline = [
        (v, t)
        for v, t in iter_tensors(model)
        if isinstance(t, ir.ExternalTensor) and (max_bytes is None or t.nbytes <= max_bytes)
    ]
    try:
        for v, t in inline:
            v.const_value = ir.Tensor(t.numpy(), name=t.name)
        yield
    finally:
        for v, t in inline:
            v.const_value = t


def to_bytes(model: ir.Model) -> bytes:
    """The whole model, weights included, as one serialized protobuf (for models under 2 GB)."""
    with _inlined(model, None):
        return ir.serde.serialize_model(model).SerializeToString()

"""ONNX Runtime sessions built for a single run, as fast to build as ONNX Runtime allows (verification's).

The model is run as written (no graph optimization) from where its weights lie: constant float weights read
through a Transpose are read transposed in place (:func:`untranspose_weights`), the large float weights of a model
in memory are fed with each run instead of being copied into the session (:func:`feed_weights`), and node
metadata is dropped. The protobuf rewrites work on the model's ``onnx`` protobuf without its external data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qonnx.core.external_data import check_external_data
from qonnx.core.paths import resolve_model_path  # not qonnx.core.modelfile: the IR's import would delay the build
from qonnx.runtime.session import PRECISE_QDQ, QUIET_LOG_SEVERITY, InMemoryModel, resolve_device

__all__ = ["FEED_MIN_BYTES", "feed_weights", "untranspose_weights", "verification_session"]


def verification_session(
    model: str | os.PathLike | bytes | InMemoryModel, device: str, *, prepack: bool, threads: int = 0
) -> ort.InferenceSession:
    """A session built for a single comparison run, as fast to build as ONNX Runtime allows.

    No graph optimization (the model's own ops as written, except that constant float weights read through a
    Transpose are read transposed in place: :func:`untranspose_weights`). Without ``prepack`` weights are used
    where they lie (external data stays memory-mapped) instead of being copied into packed layouts: that
    saves the float original most of its build time and memory, at a slower run. The quantized model keeps
    prepacking: its 4-bit MatMulNBits kernels run far slower unpacked than the packing costs. Idle threads
    do not spin: they would take the cores from quantization and from the comparison. No memory arena: the
    original's activations are returned before the quantized model's are allocated (about 120 MB less at
    the peak on SmolLM2-135M, at the same speed). An :class:`InMemoryModel` is built from memory: its large
    float weights are fed with each run (:func:`feed_weights`), the others handed over as initializers.
    ``threads``: ONNX Runtime's intra-op threads (0: its default, one per core).
    """
    device = resolve_device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = QUIET_LOG_SEVERITY
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", PRECISE_QDQ)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the cores
    so.enable_cpu_mem_arena = False  # no arena: its memory is returned as soon as a run's tensors go
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    fed: dict[str, np.ndarray] = {}
    keep: list[ort.OrtValue] = []
    if isinstance(model, InMemoryModel):
        proto = onnx.ModelProto.FromString(model.proto)
        fed = {n: model.weights[n] for n in _for_one_run(proto, model.weights)[1]}
        keep = model.add_to(so, exclude=fed)
        model = proto.SerializeToString()
    elif not isinstance(model, bytes):
        path = resolve_model_path(model)
        model = os.fspath(path)
        try:
            proto = onnx.load(model, load_external_data=False)
        except Exception:  # ONNX Runtime says what is wrong with the file
            proto = None
        if proto is not None:  # where it says its weights lie, before ONNX Runtime allocates them
            check_external_data(proto, path)
        untransposed = proto is not None and _for_one_run(proto)[0]
        if untransposed or (proto is not None and path.stat().st_size <= _REWRITE_MAX_BYTES):
            model = proto.SerializeToString()  # external data paths are relative to the model's folder:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = _FedSession(model, so, providers, fed)
    session._qonnx_weights = keep  # type: ignore[attr-defined]  # ONNX Runtime reads them where they lie
    return session


class _FedSession(ort.InferenceSession):
    """A session some of whose weights are graph inputs: fed with every run and left out of ``get_inputs()``."""

    def __init__(
        self, model: str | bytes, options: ort.SessionOptions, providers: list[str], fed: Mapping[str, np.ndarray]
    ) -> None:
        super().__init__(model, options, providers=providers)
        self._fed = dict(fed)

    def get_inputs(self) -> list[ort.NodeArg]:
        return [i for i in super().get_inputs() if i.name not in self._fed]

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        return super().run(output_names, {**input_feed, **self._fed}, run_options)


#: Ops that read a float weight like any input (none needs it constant): such weights can be fed.
_FEEDABLE_READERS = frozenset(
    {
        ("", "MatMul"),
        ("", "Gemm"),
        ("", "Gather"),
        ("", "Conv"),
        ("", "ConvTranspose"),
        ("com.microsoft", "FusedMatMul"),
    }
)
#: Float weights from this size on are fed rather than handed over (:func:`feed_weights`).
FEED_MIN_BYTES = 1 << 20


def feed_weights(model: bytes, weights: Mapping[str, np.ndarray]) -> tuple[bytes, list[str]] | None:
    """The model with its large float ``weights`` made graph inputs, and their names; None if there are none.

    ONNX Runtime copies an initializer it is handed from memory (0.06 s for the 113 MB table below, without
    prepacking), and prepacks those that a MatMul reads as its second input: work that one run does not pay
    back (a MatMul packs its weight as it goes). Fed as inputs they are used where they lie. On the tied
    lm_head of SmolLM2-135M W4A16 (the [49152, 576] float table read by Gather and, through
    :func:`untranspose_weights`, FusedMatMul) the quantized model's session built in 0.16 s instead of 0.36 s,
    and ran 128 tokens in the same 0.18 s (2 cores). Only weights of the main graph that every reader takes
    as an ordinary input (``_FEEDABLE_READERS``) and no subgraph reads; integer weights (quantized, prepacked
    by their kernels) are never fed.
    """
    proto = onnx.ModelProto.FromString(model)
    names = _feed(proto, weights)
    return (proto.SerializeToString(), names) if names else None


def _feed(proto: Any, weights: Mapping[str, np.ndarray]) -> list[str]:
    """:func:`feed_weights` on a ModelProto, in place; the names fed."""
    graph = proto.graph
    declared = {i.name for i in graph.input} | {o.name for o in graph.output}
    candidates = {
        t.name
        for t in graph.initializer
        if t.name in weights
        and t.name not in declared
        and weights[t.name].dtype.kind == "f"
        and weights[t.name].nbytes >= FEED_MIN_BYTES
    }
    for node in graph.node:
        if (node.domain if node.domain != "ai.onnx" else "", node.op_type) not in _FEEDABLE_READERS:
            candidates.difference_update(node.input)
        for attr in node.attribute:  # a subgraph may read any name of the graphs around it
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                candidates.difference_update(_names_read(sub))
    if not candidates:
        return []
    kept = [t for t in graph.initializer if t.name not in candidates]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    names = sorted(candidates)
    for name in names:
        w = weights[name]
        graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape))
        )
    return names


#: A model file above this size is handed to ONNX Runtime as it is unless a weight is untransposed: stripping
#: its metadata would not pay for serializing it again.
_REWRITE_MAX_BYTES = 64 << 20


def _for_one_run(proto: Any, weights: Mapping[str, np.ndarray] | None = None) -> tuple[bool, list[str]]:
    """Rewrite a ModelProto in place for a session built for one run.

    Returns whether a weight is now read untransposed and the names of the weights to feed.

    Node metadata goes (torch's exporter writes about 3.9 of SmolLM2's 4.4 MB of graph there; ONNX Runtime
    reads none of it and built the quantized model 0.03 s faster without it; shapes in ``value_info`` stay:
    without them the build took 1.0 s instead of 0.2), weights read through a Transpose are read in place
    (:func:`untranspose_weights`), and large float ``weights`` are fed (:func:`feed_weights`).
    """
    for node in proto.graph.node:
        node.ClearField("metadata_props")
    return _untranspose(proto), _feed(proto, weights) if weights else []


def _names_read(graph: Any) -> set[str]:
    """Every name the nodes of ``graph`` (a GraphProto) and of its subgraphs read."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub)
    return names


def untranspose_weights(model: bytes | Path) -> bytes | None:
    """The model with ``MatMul(X, Transpose(W))`` of a float32 2-D initializer ``W`` read as ``W`` transposed.

    Without graph optimization ONNX Runtime would transpose such a weight on every run: a tied ``lm_head``
    reads the [vocab, hidden] embedding table that way (113 MB, about 0.15 CPU-seconds per run on
    SmolLM2-135M, in both models). ``com.microsoft.FusedMatMul`` with ``transB=1`` computes the same product
    from ``W`` as it lies (the same logits bit for bit on SmolLM2). Only the main graph is rewritten; None when
    there is nothing to rewrite (or a file cannot be read), so the model is used as it is. A file is read
    without its external data.
    """
    try:
        proto = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, Path) else None
        if proto is None:
            proto = onnx.ModelProto.FromString(model)  # type: ignore[arg-type]
    except Exception:
        return None
    return proto.SerializeToString() if _untranspose(proto) else None


def _untranspose(proto: Any) -> bool:
    """:func:`untranspose_weights` on a ModelProto, in place; whether anything changed."""
    graph = proto.graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or t.input[0] not in floats:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if (perm and perm[0] != [1, 0]) or readers.get(t.output[0]) != 1 or t.output[0] in outputs:
            continue
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        node.input[1] = t.input[0]
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
        dropped.add(id(t))
    if not dropped:
        return False
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return True

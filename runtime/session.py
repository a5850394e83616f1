"""ONNX Runtime sessions with a provider that really works on this machine.

onnxruntime-gpu lists CUDAExecutionProvider even where no GPU exists, and asking for it there logs a
loud load error before falling back to CPU. We look for a GPU first and only then ask for CUDA.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
from collections.abc import Collection, Mapping

import onnx
import onnxruntime as ort

from qonnx.core.external_data import check_external_data
from qonnx.core.paths import resolve_model_path
from qonnx.core.snapshot import Snapshot

__all__ = ["cuda_usable", "resolve_device", "make_session", "InMemoryModel", "PRECISE_QDQ", "QUIET_LOG_SEVERITY"]

#: ONNX Runtime's log level for qonnx's sessions: fatal only. Its errors (a failed allocation, a bad model) come
#: back as the exception that qonnx reports in one line; logged too, they would print coloured lines before it.
QUIET_LOG_SEVERITY = 4

#: ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits and, by default, computes it with
#: activations quantized to int8 (accuracy level 4). That changes the numbers a QDQ model stands for;
#: sessions made here keep the model's own precision unless asked otherwise.
PRECISE_QDQ = "0"


@functools.cache
def cuda_usable() -> bool:
    """True when the CUDA provider is installed and an NVIDIA GPU is present."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.isdir("/proc/driver/nvidia/gpus")):
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()  # CUDA libraries that come with torch's wheels
        except Exception:
            pass
    return True


def resolve_device(device: str = "auto", *, quiet: bool = False) -> str:
    """Map "auto" / "cpu" / "cuda" to the device to use, falling back to CPU with a one-line note."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if device == "cuda" and not quiet:
        print("qonnx: CUDA is not usable here (no GPU or no CUDA provider); running on CPU", file=sys.stderr)
    return "cpu"


def make_session(
    model_path: str | os.PathLike | bytes,
    device: str = "cpu",
    *,
    threads: int | None = None,
    qdq_accuracy_level: str | None = PRECISE_QDQ,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    external_data_dir: str | os.PathLike | None = None,
    lean: bool = False,
    cuda_graph: bool = False,
    config_entries: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession on ``device`` ("cpu", "cuda" or "auto").

    Args:
        model_path: the .onnx file, a folder holding model.onnx, or serialized model bytes.
        device: where to run; CUDA falls back to CPU when no GPU is usable.
        threads: intra-op threads (default: ONNX Runtime's choice).
        qdq_accuracy_level: value for ``session.qdq_matmulnbits_accuracy_level`` (see PRECISE_QDQ);
            None leaves ONNX Runtime's default.
        optimization: graph optimization level.
        external_data_dir: for model bytes, the folder their external data paths are relative to.
        lean: for a few runs that hand over large outputs (calibration): weights used as stored (no
            prepacked copies) and no CPU memory arena, so that memory is returned after each run.
        cuda_graph: on CUDA, let runs be captured and replayed as CUDA graphs (provider option
            ``enable_cuda_graph``; see :mod:`qonnx.runtime.decode`). Ignored on the CPU.
        config_entries: more session config entries (e.g. a kernel switch a model's target asks for).
    """
    device = resolve_device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization
    so.log_severity_level = QUIET_LOG_SEVERITY
    if threads:
        so.intra_op_num_threads = threads
    if external_data_dir is not None:
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", os.fspath(external_data_dir)
        )
    if lean:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
    if qdq_accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", qdq_accuracy_level)
    for key, value in (config_entries or {}).items():
        so.add_session_config_entry(key, value)
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if device == "cuda":
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if cuda_graph else "CUDAExecutionProvider"
        providers.insert(0, cuda)
    if isinstance(model_path, bytes):
        model: str | bytes = model_path
        header: str | bytes | onnx.ModelProto = model
    else:
        model = os.fspath(resolve_model_path(model_path))  # a folder means its model.onnx
        header = _header(model) or model
        if isinstance(header, onnx.ModelProto):  # where it says its weights lie, before ONNX Runtime reads them
            check_external_data(header, model)
    if has_float8_qdq(header):
        so.add_session_config_entry(*FLOAT8_SESSION_CONFIG)
    return ort.InferenceSession(model, so, providers=providers)


#: ONNX Runtime 1.31's QDQ graph transformers move float8 QuantizeLinear across Slice/Reshape and pair them
#: up into nodes that have no float8 kernels, and the session then refuses the model ("Type
#: 'tensor(float8e4m3fn)' ... is invalid"). Models with float8 Q/DQ load with them off (no float8 kernel
#: exists on the CPU and CUDA providers to fuse into anyway); qonnx records this in the model's metadata.
FLOAT8_SESSION_CONFIG = ("session.disable_quant_qdq", "1")


def _header(path: str) -> onnx.ModelProto | None:
    """The protobuf of a model file below 256 MiB, without its external data (None: larger, or unreadable)."""
    try:
        if os.path.getsize(path) >= (256 << 20):  # a big single-file model is not parsed twice
            return None
        return onnx.load(path, load_external_data=False)
    except Exception:  # ONNX Runtime says what is wrong with the file
        return None


def has_float8_qdq(model: str | bytes | onnx.ModelProto) -> bool:
    """Whether a model (file path, bytes or protobuf) holds float8 QuantizeLinear/DequantizeLinear nodes."""
    if isinstance(model, onnx.ModelProto):
        proto: onnx.ModelProto | None = model
    elif isinstance(model, bytes):
        if b"QuantizeLinear" not in model:
            return False
        proto = onnx.load_from_string(model) if len(model) < (256 << 20) else None
    elif os.path.getsize(model) < (256 << 20):  # a big single-file model is not parsed twice for this
        proto = onnx.load(model, load_external_data=False)
    else:
        proto = None
    if proto is None:
        return False
    f8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2}
    f8_names = {t.name for t in proto.graph.initializer if t.data_type in f8}
    return any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") and any(i in f8_names for i in n.input)
        for n in proto.graph.node
    )


class InMemoryModel(Snapshot):
    """A model for ONNX Runtime straight from memory: a :class:`~qonnx.core.snapshot.Snapshot` of it.

    The weights are handed over as external initializers (``SessionOptions.add_external_initializers``):
    no serialized copy of the weights, no file to write or read back. Weights of types numpy cannot hold for
    ONNX Runtime (int4, float8, bfloat16) and those of subgraphs are serialized inside ``proto``.
    """

    def add_to(self, options: ort.SessionOptions, *, exclude: Collection[str] = ()) -> list[ort.OrtValue]:
        """Hand the weights but those in ``exclude`` to a session's options; keep the result alive with it."""
        names = [n for n in self.weights if n not in exclude]
        values = [ort.OrtValue.ortvalue_from_numpy(self.weights[n]) for n in names]
        if values:
            options.add_external_initializers(names, values)
        return values

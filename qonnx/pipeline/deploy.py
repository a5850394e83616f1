"""What a deployment needs besides the model: the session options its target's fast kernel wants.

A weight-only model stored for a target with such a kernel (:class:`qonnx.core.targets.WeightOnlyForm`) carries
the entries in its ``qonnx.session_config`` metadata and in ``<model>.session_options.json`` beside it, so that a
user's own ONNX Runtime gets the fast path too::

    so = onnxruntime.SessionOptions()
    for key, value in json.load(open("model.session_options.json"))["session_config_entries"].items():
        so.add_session_config_entry(key, value)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qonnx.core import __version__, outputs
from qonnx.core.config import SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import OutputPathError
from qonnx.core.targets import TARGETS, weight_only_form

__all__ = ["METADATA_KEY", "session_options", "sidecar_path", "write_sidecar"]

#: The metadata key holding the JSON of :func:`session_options`.
METADATA_KEY = "qonnx.session_config"

#: ONNX Runtime reads these environment variables where a session option cannot be set (the same switch).
_ENVIRONMENT = {"ep.cuda.fpa_intb_gemm": "ORT_FPA_INTB_GEMM"}


def session_options(config: SchemeConfig) -> dict[str, Any] | None:
    """The session options a model of ``config`` wants on its target, or None when it wants none."""
    weights = config.weight_config()
    if not isinstance(weights, WeightOnlyConfig) or not weights.session_config:
        return None
    form = weight_only_form(weights.target, weights.bits, weights.format)
    assert form is not None  # session_config is non-empty only for a target's form
    entries = weights.session_config
    return {
        "provider": TARGETS[weights.target].provider,
        "session_config_entries": entries,
        "environment": {_ENVIRONMENT[k]: v for k, v in entries.items() if k in _ENVIRONMENT},
        "use_when": form.use_when,
        "measured": form.measured,
        "written_by": f"qonnx {__version__}",
    }


def sidecar_path(model_path: Path) -> Path:
    """``<stem>.session_options.json`` beside the model file."""
    return model_path.with_name(model_path.stem + ".session_options.json")


def write_sidecar(options: dict[str, Any], model_path: Path) -> Path:
    """Write ``options`` beside ``model_path`` atomically (a temporary file renamed over it); its path."""
    path = sidecar_path(model_path)
    tmp = None
    try:  # named as qonnx's other temporary files, so that a next run cleans one a killed run left
        fd, tmp = tempfile.mkstemp(prefix=outputs.temp_prefix(path.name), dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(options, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write it: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path

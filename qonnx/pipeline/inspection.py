"""What a model holds: ops, opsets, weights by type, and which layers a weight-only scheme can quantize."""

from __future__ import annotations

import collections
import os
from typing import Any

import onnx_ir as ir

from qonnx.core import modelfile
from qonnx.core.config import W4A16
from qonnx.core.schemes import Targets
from qonnx.passes.weight_plan import plan_weights

__all__ = ["DEFAULT_SCHEME", "inspect_model"]

#: The scheme the quantizable layers are counted for: ``qonnx quantize``'s default, so that the count is
#: what quantize quantizes (tied heads, layers too small to gain and K the blocks do not fit are left out).
DEFAULT_SCHEME = W4A16()


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Describe the model at ``path`` (a .onnx file or a folder holding model.onnx) without reading weights.

    A layer is quantizable when ``qonnx quantize`` with its default scheme (:data:`DEFAULT_SCHEME`) would
    quantize it; ``reason`` says why another is not, ``plan`` what quantize would do.
    """
    model_path = modelfile.resolve_model_path(path)
    model = modelfile.load(model_path)
    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    weights: collections.Counter[str] = collections.Counter()
    count = 0
    for _, t in modelfile.iter_tensors(model):
        weights[str(t.dtype.name).lower()] += int(t.nbytes)
        count += 1
    layers = []
    for cand, cfg, why in plan_weights(model, Targets(DEFAULT_SCHEME, None)):  # as `qonnx quantize` plans them
        layers.append(
            {
                "node": cand.node.name or "",
                "op_type": cand.node.op_type,
                "weight": cand.weight_name,
                "module": cand.module,
                "shape": [cand.k, cand.n] if cand.k else None,
                "quantizable": cfg is not None,
                "reason": None if cfg is not None else why,
                "plan": why,
            }
        )
    files = modelfile.model_files(model, model_path)
    return {
        "path": str(model_path),
        "ir_version": model.ir_version,
        "opsets": dict(sorted(model.opset_imports.items())),
        "producer": model.producer_name,
        "inputs": [_io(v) for v in model.graph.inputs],
        "outputs": [_io(v) for v in model.graph.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "initializers": count,
        "weight_bytes_by_type": dict(weights.most_common()),
        "file_bytes": sum(p.stat().st_size for p in files),
        "files": [str(p) for p in files],
        "quantizable_layers": sum(1 for layer in layers if layer["quantizable"]),
        "quantizable_by": DEFAULT_SCHEME.name,
        "layers": layers,
    }


def _io(v: ir.Value) -> dict[str, Any]:
    shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
    return {"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None, "shape": shape}

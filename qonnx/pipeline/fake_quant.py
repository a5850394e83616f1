"""Fake quantization for measuring: a layer's weight quantized as ``qonnx.quantize`` stores it, then dequantized.

:class:`FakeQuantModel` plans the layers a scheme quantizes (the same plan as :func:`qonnx.quantize`), groups
them by stored weight (one feed per weight, shared weights once), quantizes each on demand (cached), and
feeds the dequantized weights, in their stored layout, into one
:class:`qonnx.runtime.sensitivity.WeightSwapSession` of the float model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qonnx.core.config import W4A16, SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import ConfigError, NothingToQuantizeError
from qonnx.core.formats import QuantizedWeight
from qonnx.core.schemes import Targets
from qonnx.passes.weight_only import QuantizeWeightsPass, quantize_weight
from qonnx.passes.weight_plan import Plan, act_dtype, float_reader, hessian_key
from qonnx.passes.weights import WeightCandidate
from qonnx.pipeline.calibrate import layer_hessians, load_model, runtime_file
from qonnx.runtime.sensitivity import Measurement, WeightSwapSession, sensitivity_feeds

__all__ = ["FakeQuantModel", "SwapLayer", "plan_layers", "to_stored"]


@dataclasses.dataclass
class SwapLayer:
    """A stored weight to analyse: the planned nodes that read it (one quantized weight) and its config."""

    cand: WeightCandidate
    cfg: WeightOnlyConfig
    nodes: list[str]

    @property
    def name(self) -> str:
        """The stored weight's name: the graph input that replaces it."""
        return self.cand.weight_name

    @property
    def params(self) -> int:
        """Weights in the layer."""
        return int(self.cand.tensor().size)


def to_stored(cand: WeightCandidate, w: np.ndarray) -> np.ndarray:
    """``w`` (the weight as the node reads it) in the layout and dtype of the stored tensor: the chain undone."""
    node = cand.node
    if node.op_type == "Gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        if alpha != 1.0:
            w = w / np.float32(alpha)
        if node.attributes.get_int("transB", 0):
            w = w.T
    for link in reversed(cand.chain):
        if link.op_type == "Transpose":
            perm = link.attributes.get_ints("perm", None)
            w = np.transpose(w, np.argsort(perm)) if perm is not None else w.T
    return np.ascontiguousarray(w, dtype=cand.tensor().dtype.numpy())


def plan_layers(model: ir.Model, plan: Plan) -> tuple[list[SwapLayer], list[tuple[str, str]]]:
    """Group the planned nodes by stored weight; say why a weight cannot be fed on its own."""
    chosen = {id(c.node) for c, cfg, _ in plan if cfg is not None}
    groups: dict[int, list[tuple[WeightCandidate, WeightOnlyConfig]]] = {}
    for cand, cfg, _ in plan:
        if cfg is not None:
            groups.setdefault(id(cand.source), []).append((cand, cfg))
    layers, skipped = [], []
    for group in groups.values():
        cand, cfg = group[0]
        src = cand.source
        assert src is not None
        why = None
        if not src.is_initializer() or src.graph is not model.graph:
            why = "its weight is not an initializer of the main graph (a Constant, or in a subgraph): it cannot be fed"
        elif len({(c.key, g) for c, g in group}) > 1:
            why = "its weight is read through different Transpose/Cast chains or configs"
        elif (reader := float_reader(src, chosen)) is not None:
            why = f"its float weight is also read by {reader}"
        if why is not None:
            skipped.append((cand.module or cand.node.name or cand.weight_name, why))
            continue
        layers.append(SwapLayer(cand, cfg, [c.node.name or "" for c, _ in group]))
    return layers, skipped


class FakeQuantModel:
    """A model, its analysable layers, their quantized weights (cached) and the session that measures them.

    ``measure({layer index: config})`` runs the model with those layers fake-quantized, the others float.
    """

    def __init__(
        self,
        model: Any,
        config: SchemeConfig | None,
        targets: Mapping[str, SchemeConfig | None] | None,
        *,
        samples: int,
        seq_len: int,
        data: str | os.PathLike,
        device: str,
        progress: bool,
    ) -> None:
        config = W4A16() if config is None else config
        if not isinstance(config, WeightOnlyConfig):
            raise ConfigError(
                f"sensitivity analysis measures weight-only schemes (w4a16, w8a16), not {type(config).__name__}"
            )
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="qonnx-analyze-")
        self.model, source = load_model(model)
        self.path = runtime_file(self.model, source, self._tmp.name)
        self.plan = QuantizeWeightsPass(Targets(config, targets)).plan(self.model)
        for cand, cfg, _ in self.plan:
            if cfg is not None and cfg.awq is not None:
                raise ConfigError(
                    f"{cand.node.op_type} '{cand.node.name}': AWQ folds scales into other layers, so its layers "
                    "cannot be measured alone; analyse with algo rtn, gptq or hqq"
                )
        self.layers, self.skipped = plan_layers(self.model, self.plan)
        if not self.layers:
            reasons = "; ".join(sorted({why for _, why in self.skipped})[:3]) or "no MatMul or Gemm layer to quantize"
            raise NothingToQuantizeError(f"nothing to analyse in the model ({reasons})")
        self._source, self._progress = source, progress
        self._data, self._samples, self._seq_len, self._device = data, samples, seq_len, device
        self._session: WeightSwapSession | None = None
        self._hessians: dict[str, np.ndarray] | None = None
        self._cache: dict[tuple[int, WeightOnlyConfig], QuantizedWeight] = {}

    @property
    def session(self) -> WeightSwapSession:
        """The measuring session, built (and the float model run) on first use."""
        if self._session is None:
            feeds, causal_lm = sensitivity_feeds(self.path, self._data, samples=self._samples, seq_len=self._seq_len)
            self._session = WeightSwapSession(
                self.path, [layer.name for layer in self.layers], feeds, causal_lm=causal_lm, device=self._device
            )
        return self._session

    @property
    def seq_len(self) -> int | None:
        """Tokens per window when the model is measured on text (causal LMs), else None."""
        return self._seq_len if self.session.causal_lm else None

    @property
    def hessians(self) -> dict[str, np.ndarray]:
        """GPTQ's calibration Hessians, collected on first use (empty when no layer uses GPTQ)."""
        if self._hessians is None:
            self._hessians = {}
            if any(cfg.gptq is not None for _, cfg, _ in self.plan if cfg is not None):
                self._hessians = layer_hessians(self.model, self._source, self.plan, self._progress)
        return self._hessians

    def quantized(self, i: int, cfg: WeightOnlyConfig | None = None) -> QuantizedWeight:
        """Layer ``i``'s weight quantized by ``cfg`` (default: its planned config), as quantize would store it."""
        layer = self.layers[i]
        cfg = layer.cfg if cfg is None else cfg
        key = (i, cfg)
        if key not in self._cache:
            cand = layer.cand
            hessian = None
            if cfg.gptq is not None:
                hessian = np.asarray(self.hessians[hessian_key(cand)])
            self._cache[key] = quantize_weight(cand, cfg, act_dtype(cand), hessian)
            cand.release()
        return self._cache[key]

    def fake(self, i: int, cfg: WeightOnlyConfig | None = None) -> np.ndarray:
        """Layer ``i``'s weight quantized then dequantized, in its stored layout (a feed for the session)."""
        return to_stored(self.layers[i].cand, self.quantized(i, cfg).dequantize())

    def measure(self, configs: Mapping[int, WeightOnlyConfig]) -> Measurement:
        """The model with the layers in ``configs`` fake-quantized by their configs, the others float."""
        return self.session.measure({self.layers[i].name: self.fake(i, cfg) for i, cfg in configs.items()})

    def close(self) -> None:
        """Drop the session and temporary files."""
        self._session = None
        self._cache.clear()
        self._tmp.cleanup()

"""The scheme registry and per-layer targeting: which scheme a name means, and which scheme each layer gets.

Every scheme config (:mod:`qonnx.core.config`, :mod:`qonnx.core.config_activations`) is registered here by its
CLI name, so that the command line and ``scheme_from_name`` offer exactly the schemes that exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qonnx.core.config import FP4, NF4, W2A16, W3A16, W4A16, W8A16, SchemeConfig
from qonnx.core.config_activations import FP8, W4A8, W8A8, Dynamic
from qonnx.core.errors import ConfigError

__all__ = ["SCHEMES", "Targets", "scheme_from_name"]

#: Every scheme by its CLI name.
SCHEMES: dict[str, type[SchemeConfig]] = {
    scheme.name: scheme for scheme in (W4A16, W8A16, W3A16, W2A16, NF4, FP4, W8A8, W4A8, FP8, Dynamic)
}


def scheme_from_name(name: str, **options: Any) -> SchemeConfig:
    """Build a scheme config from its CLI name and options (activation schemes: see config_activations)."""
    try:
        cls = SCHEMES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from None


class Targets:
    """Which config each layer gets: exact name, then ``re:`` regex (in order), then op type, then default.

    Keys are matched against the node name, the weight's name and the source module path that torch.onnx
    recorded (``model.layers.3.mlp.down_proj``). A value of ``None`` keeps the layer
    in floating point. Example: ``Targets(W4A16(), {"lm_head": None, "re:.*mlp.*": W8A16()})``.
    """

    def __init__(
        self, default: SchemeConfig | None, overrides: Mapping[str, SchemeConfig | None] | None = None
    ) -> None:
        self.default = default
        self.exact: dict[str, SchemeConfig | None] = {}
        self.patterns: list[tuple[str, re.Pattern[str], SchemeConfig | None]] = []
        self.op_types: dict[str, SchemeConfig | None] = {}
        for key, cfg in (overrides or {}).items():
            if cfg is not None and not isinstance(cfg, SchemeConfig):
                raise ConfigError(f"target {key!r}: expected a scheme config or None, got {type(cfg).__name__}")
            if key.startswith("re:"):
                try:
                    self.patterns.append((key, re.compile(key[3:]), cfg))
                except re.error as e:
                    raise ConfigError(f"target {key!r}: bad regular expression: {e}") from None
            elif key in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                self.op_types[key] = cfg
            else:
                self.exact[key] = cfg

    def resolve(self, op_type: str, names: tuple[str, ...]) -> tuple[SchemeConfig | None, str]:
        """Return (config or None, the rule that chose it)."""
        for n in names:
            if n in self.exact:
                return self.exact[n], f"name {n!r}"
        for key, pattern, cfg in self.patterns:
            for n in names:
                if pattern.search(n):
                    return cfg, f"pattern {key!r}"
        if op_type in self.op_types:
            return self.op_types[op_type], f"op type {op_type}"
        return self.default, "default"

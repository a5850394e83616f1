"""Scheme configurations: one frozen dataclass per scheme, validated on construction.

A config says *how* to quantize a layer. *Which* layers get which config is a :class:`Targets` map
from exact node/weight name, ``re:`` regular expression or op type to a config (or ``None`` to keep
the layer in floating point), in the spirit of torchao's ``FqnToConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from qonnx.core import numerics
from qonnx.core.algos import ALGOS, AWQ, GPTQ, HQQ, Algo, algo_from_name
from qonnx.core.errors import ConfigError
from qonnx.core.formats import FORMATS
from qonnx.core.hadamard import check_rotation
from qonnx.core.targets import TARGETS, weight_only_form

__all__ = [
    "KV_CACHES",
    "SchemeConfig",
    "WeightOnlyConfig",
    "W2A16",
    "W3A16",
    "W4A16",
    "W8A16",
    "NF4",
    "FP4",
]

#: Grids weights can be rounded to: integer codes, or a scale-only grid (:mod:`qonnx.core.numerics`).
GRIDS: dict[str, numerics.Float8Grid | numerics.LookupGrid | None] = {
    "int": None,
    "fp8": numerics.FLOAT8,
    "nf4": numerics.NF4,
    "fp4": numerics.FP4,
}

#: KV cache formats a lowered model's GroupQueryAttention can keep (:mod:`qonnx.passes.kv_cache`).
KV_CACHES = ("int8", "int4")


def rotation(scheme: str, rotate: object) -> None:
    """Refuse a ``rotate`` value that is not one of :data:`qonnx.core.hadamard.ROTATIONS`."""
    try:
        check_rotation(scheme, rotate)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class SchemeConfig:
    """Base of every scheme config (weight-only and weight+activation); ``name`` is the CLI name."""

    name: ClassVar[str] = "scheme"
    rotate: str = "none"  # overridden by a field in each config (see WeightOnlyConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        raise NotImplementedError

    def weight_config(self) -> WeightOnlyConfig:
        """The weight-only config that stores this scheme's weights."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig(SchemeConfig):
    """Weight-only quantization: weights stored in ``bits`` bits, activations stay floating point.

    Attributes:
        bits: code width: 2, 3, 4 or 8 (7, in int8 containers with format ``"qdq"``: the int8 weights of
            activation schemes for CPUs without VNNI, see ``ActivationConfig.weight_range``). 3-bit codes are
            stored in 4-bit containers (no ONNX Runtime kernel reads 3-bit codes); 2-bit codes in MatMulNBits
            bits=2, and in 4-bit containers for DequantizeLinear.
        block_size: weights per scale along the reduction axis K; ``None`` means one scale per output
            channel (only with ``format="qdq"``; MatMulNBits needs blocks of 16..256).
        symmetric: signed codes and no zero point; otherwise unsigned codes with a zero point per block.
        format: ``"matmulnbits"`` (ONNX Runtime's com.microsoft MatMulNBits, fastest there) or ``"qdq"``
            (standard opset-21 blocked DequantizeLinear + MatMul, portable to any runtime).
        accuracy_level: MatMulNBits compute type hint (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).
        algo: how codes are chosen: ``"rtn"`` (round to nearest) or GPTQ (``"gptq"`` or a :class:`GPTQ` with
            options), which needs calibration data and applies to MatMul/Gemm weights of the main graph.
        grid: ``"int"`` (integer codes) or a scale-only grid: ``"fp8"`` (float8 E4M3, one scale per output
            channel, DequantizeLinear opset 19; needs ``bits=8``, ``symmetric=True``, ``block_size=None``,
            ``format="qdq"``); the format must store it (:data:`qonnx.core.formats.FORMATS`).
        target: the runtime the model is for (:data:`qonnx.core.targets.TARGETS`); :meth:`for_target` gives the
            storage that target's fast kernel needs. The session options that kernel wants are written with
            the model.
        strict: refuse (instead of a warning) a scheme measured slower than floating point on ``target``.
        kv_cache: ``"int8"`` or ``"int4"``: also keep the KV cache quantized (:data:`KV_CACHES`; a model lowered
            with GroupQueryAttention only), with per-channel scales from a calibration pass of the float model
            (:mod:`qonnx.passes.kv_cache`); ``None`` (default): the cache stays floating point.

        embeddings: bits (4 or 8) of the embedding tables that Gather nodes read, stored for ONNX Runtime's
            GatherBlockQuantized in MatMulNBits' layout, so that a tied lm_head's MatMulNBits reads the same
            codes and scales (one copy of the table); rounded to nearest, blocks of ``block_size`` along the
            hidden axis. None keeps the tables (and a tied lm_head) in floating point.
        rotate: rotate the residual stream before quantizing (QuaRot-style, exact in floating point; see
            :mod:`qonnx.passes.rotate`): ``"hadamard"`` (a randomized Hadamard matrix), ``"random"`` (a random
            orthogonal one) or ``"none"``. Decoders with RMSNorm only; the whole model, from the default config.
    """

    name: ClassVar[str] = "weight-only"
    bits: int = 4
    block_size: int | None = 128
    symmetric: bool = False
    format: str = "matmulnbits"
    accuracy_level: int | None = None
    algo: Algo = "rtn"
    grid: str = "int"
    target: str = "generic"
    strict: bool = False
    kv_cache: str | None = None
    embeddings: int | None = None
    rotate: str = "none"

    def __post_init__(self) -> None:
        rotation(self.name, self.rotate)
        if self.kv_cache is not None and self.kv_cache not in KV_CACHES:
            raise ConfigError(
                f"{self.name}: kv_cache must be one of {', '.join(KV_CACHES)} or None, got {self.kv_cache!r}"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"{self.name}: target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if isinstance(self.algo, str):
            object.__setattr__(self, "algo", algo_from_name(self.algo))
        elif not isinstance(self.algo, (GPTQ, AWQ, HQQ)):
            raise ConfigError(
                f"{self.name}: algo must be one of {', '.join(ALGOS)} or a GPTQ/AWQ/HQQ(...) config, got {self.algo!r}"
            )
        if self.bits not in (2, 3, 4, 7, 8) or (self.bits == 7 and self.format != "qdq"):
            raise ConfigError(f"{self.name}: bits must be 2, 3, 4 or 8, got {self.bits}")
        if isinstance(self.algo, HQQ) and self.grid != "int":
            raise ConfigError(f"{self.name}: hqq optimises integer zero points; {self.grid} has none (use rtn or gptq)")
        if isinstance(self.algo, HQQ) and self.symmetric:
            raise ConfigError(
                f"{self.name}: hqq optimises zero points, which symmetric codes do not have; drop symmetric"
            )
        if self.format not in FORMATS:
            raise ConfigError(
                f"{self.name}: format must be one of {', '.join(map(repr, FORMATS))}, got {self.format!r}"
            )
        if self.grid not in GRIDS:
            raise ConfigError(f"{self.name}: grid must be one of {', '.join(map(repr, GRIDS))}, got {self.grid!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 2):
            raise ConfigError(f"{self.name}: block_size must be an integer >= 2, got {self.block_size!r}")
        refused = FORMATS[self.format].refuses(self.grid, self.bits, self.block_size, self.symmetric)
        if refused:
            raise ConfigError(f"{self.name}: {refused}")
        scaled = GRIDS[self.grid]
        if scaled is not None and (self.bits != scaled.bits or not self.symmetric):
            raise ConfigError(f"{self.name}: {self.grid} weights need bits={scaled.bits} and symmetric=True")
        if self.accuracy_level is not None:
            if self.format != "matmulnbits":
                raise ConfigError(f"{self.name}: accuracy_level applies to format='matmulnbits' only")
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ConfigError(f"{self.name}: accuracy_level must be 0..4, got {self.accuracy_level}")
        self._check_embeddings()

    def _check_embeddings(self) -> None:
        if self.embeddings is None:
            return
        if self.embeddings not in (4, 8) or isinstance(self.embeddings, bool):
            raise ConfigError(f"{self.name}: embeddings must be 4, 8 or None (floating point), got {self.embeddings!r}")
        if self.format != "matmulnbits" or self.grid != "int":
            raise ConfigError(
                f"{self.name}: embeddings are stored for GatherBlockQuantized in MatMulNBits' layout: they need "
                f"format='matmulnbits' and integer codes, not format={self.format!r}, grid={self.grid!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        out = {"scheme": self.name, **dataclasses.asdict(self)}
        if not isinstance(self.algo, str):
            out["algo"] = self.algo.to_dict()
        grid = out.pop("grid")
        out["float8"] = grid == "fp8"  # the key qonnx 0.1's metadata has for the two grids it knew
        if grid not in ("int", "fp8"):
            out["grid"] = grid
        defaults = (
            ("target", "generic"),
            ("strict", False),
            ("kv_cache", None),
            ("embeddings", None),
            ("rotate", "none"),
        )
        for key, default in defaults:  # metadata as before for the defaults
            if out[key] == default:
                del out[key]
        return out

    def for_target(self, target: str, *, keep: frozenset[str] = frozenset()) -> WeightOnlyConfig:
        """This scheme for ``target``: the storage its fast kernel needs, but for the fields named in ``keep``.

        On a target without such a kernel (or for another format or width) only ``target`` changes.
        """
        form = weight_only_form(target, self.bits, self.format)
        if form is None or self.grid != "int":
            return dataclasses.replace(self, target=target)
        if self.hqq is not None and "symmetric" not in keep:
            raise ConfigError(
                f"{self.name}: target {target}'s fast kernel takes symmetric weights, and hqq optimises zero "
                "points; use rtn, gptq or awq there, or leave the target out"
            )
        wanted: dict[str, Any] = {"symmetric": form.symmetric, "block_size": form.block_size}
        return dataclasses.replace(self, target=target, **{k: v for k, v in wanted.items() if k not in keep})

    @property
    def session_config(self) -> dict[str, str]:
        """The session config entries the target's kernel wants for this storage, or {} (none, or not met)."""
        form = weight_only_form(self.target, self.bits, self.format)
        if form is None or self.grid != "int" or (self.symmetric, self.block_size) != (form.symmetric, form.block_size):
            return {}
        return dict(form.session_config)

    @property
    def weight_grid(self) -> numerics.IntGrid | numerics.Float8Grid | numerics.LookupGrid:
        """The grid the weights are rounded to."""
        scaled = GRIDS[self.grid]
        return numerics.IntGrid(self.bits, self.symmetric) if scaled is None else scaled

    def weight_config(self) -> WeightOnlyConfig:
        """Itself: a weight-only scheme stores weights as it says."""
        return self

    @property
    def gptq(self) -> GPTQ | None:
        """The GPTQ options when the weights are rounded by GPTQ (``algo`` GPTQ or AWQ+GPTQ), else None."""
        if isinstance(self.algo, AWQ):
            return self.algo.gptq
        return self.algo if isinstance(self.algo, GPTQ) else None

    @property
    def awq(self) -> AWQ | None:
        """The AWQ options when ``algo`` is AWQ (with or without GPTQ), else None."""
        return self.algo if isinstance(self.algo, AWQ) else None

    @property
    def hqq(self) -> HQQ | None:
        """The HQQ options when ``algo`` is HQQ, else None."""
        return self.algo if isinstance(self.algo, HQQ) else None

    @property
    def calibrated(self) -> GPTQ | AWQ | None:
        """The algorithm config that needs calibration Hessians (GPTQ or AWQ), else None."""
        return self.algo if isinstance(self.algo, (GPTQ, AWQ)) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class W4A16(WeightOnlyConfig):
    """4-bit weights in blocks along K, floating-point activations."""

    name: ClassVar[str] = "w4a16"
    bits: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A16(WeightOnlyConfig):
    """8-bit weights in blocks along K, floating-point activations."""

    name: ClassVar[str] = "w8a16"
    bits: int = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class W3A16(WeightOnlyConfig):
    """3-bit weights in blocks along K, stored in 4-bit containers: the accuracy of 3 bits, the size of 4.

    No ONNX Runtime kernel reads 3-bit codes; MatMulNBits (bits=4) and int4/uint4 DequantizeLinear hold
    codes in the 3-bit range. Use it with GPTQ (``algo="gptq"``): round-to-nearest loses too much at 3 bits.
    """

    name: ClassVar[str] = "w3a16"
    bits: int = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class W2A16(WeightOnlyConfig):
    """2-bit weights in blocks along K: MatMulNBits bits=2 (ONNX Runtime's CPU kernel), 4-bit containers in QDQ.

    ONNX Runtime 1.31 runs 2-bit MatMulNBits with float activations far slower than 4-bit ones on the CPU
    (SmolLM2-135M decode: 1.4 vs 18 tokens/s); ``accuracy_level=4`` (int8 activations at run time) runs fast.
    """

    name: ClassVar[str] = "w2a16"
    bits: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4(WeightOnlyConfig):
    """bitsandbytes' 4-bit NormalFloat weights (16 normal quantiles, one absmax per block), as MatMulBnb4.

    ONNX Runtime's com.microsoft MatMulBnb4 runs them on its CPU and CUDA providers; its blocks run along the
    flattened transposed weight, so a layer whose K is not a multiple of ``block_size`` stays in floating
    point (SmolLM2's K = 576 and 1536 take block sizes up to 64). ``algo`` "rtn" or "gptq".
    """

    name: ClassVar[str] = "nf4"
    bits: int = 4
    block_size: int | None = 64
    symmetric: bool = True
    format: str = "bnb4"
    grid: str = "nf4"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4(NF4):
    """bitsandbytes' FP4 weights (a 4-bit float grid, one absmax per block), as MatMulBnb4 (see :class:`NF4`)."""

    name: ClassVar[str] = "fp4"
    grid: str = "fp4"

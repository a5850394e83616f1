"""Scheme configurations: one frozen dataclass per scheme, validated on construction.

A config says *how* to quantize a layer. *Which* layers get which config is a :class:`Targets` map
from exact node/weight name, ``re:`` regular expression or op type to a config (or ``None`` to keep
the layer in floating point), in the spirit of torchao's ``FqnToConfig``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from qonnx.core import numerics
from qonnx.core.errors import ConfigError
from qonnx.core.formats import FORMATS

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "SchemeConfig",
    "WeightOnlyConfig",
    "W2A16",
    "W3A16",
    "W4A16",
    "W8A16",
    "NF4",
    "FP4",
    "Targets",
    "scheme_from_name",
    "SCHEMES",
]

Format = Literal["matmulnbits", "qdq", "bnb4"]
#: Grids weights can be rounded to: integer codes, or a scale-only grid (:mod:`qonnx.core.numerics`).
GRIDS: dict[str, numerics.Float8Grid | numerics.LookupGrid | None] = {
    "int": None,
    "fp8": numerics.FLOAT8,
    "nf4": numerics.NF4,
    "fp4": numerics.FP4,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ:
    """GPTQ (Frantar et al., 2022): round weights so that the layer's outputs, not its weights, stay close.

    A weight is rounded one K row at a time and each row's rounding error is folded into the rows not yet
    rounded, weighted by the inverse Hessian ``H = 2/n X^T X`` of the layer's input. The Hessians come from
    calibration data run through ONNX Runtime on the *float* model, all layers at once (the "non-sequential"
    mode), or with ``sequential`` stage by stage on the partly quantized model.

    Attributes:
        damp: fraction of the mean Hessian diagonal added to the diagonal (percdamp) before inverting.
        block: rows per lazy batch update; a speed knob that does not change the result much.
        calib_samples: calibration windows (sequences).
        calib_seq_len: tokens per window.
        calib_data: ``"pydoc"`` (the standard corpus, from token 60,000: disjoint from evaluation),
            a ``.txt`` / ``.jsonl`` file tokenized with the model folder's tokenizer, or a ``.npz`` file of
            feeds (one array per model input, the first axis indexing batches) for a model without one.
        act_order: round the rows of K in order of decreasing Hessian diagonal (the inputs with the most
            energy first). Blocks stay contiguous along K ("static groups": their scales and zero points are
            chosen from the original weight), so the stored format and the kernels are unchanged.
        clip_search: choose each block's range among shrunk ranges (x1.00 .. x0.80) for the lowest weight
            error (the reference's ``Quantizer(mse=True)``); else the block's full range.
        sequential: take each layer's Hessian from the model whose earlier layers are already quantized, stage
            by stage (:mod:`qonnx.pipeline.gptq_sequential`; one calibration pass per stage) instead of all from the
            float model in one pass.
    """

    name: ClassVar[str] = "gptq"
    damp: float = 0.01
    block: int = 128
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_data: str = "pydoc"
    act_order: bool = True
    clip_search: bool = True
    sequential: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"gptq: block must be a positive integer, got {self.block!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"gptq: calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not isinstance(self.calib_seq_len, int) or self.calib_seq_len < 2:
            raise ConfigError(f"gptq: calib_seq_len must be an integer >= 2, got {self.calib_seq_len!r}")
        for flag in ("act_order", "clip_search", "sequential"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"gptq: {flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ:
    """AWQ (Lin et al., 2023): scale each weight's input channels by ``s = rms(x)^a`` before rounding.

    The inputs that carry the most activation energy get finer weight grids; ``1/s`` is folded into what
    produces the input (the preceding RMSNorm/LayerNorm weight, or the preceding linear's columns: the up
    projection under SwiGLU); layers whose input nothing can absorb keep ``s = 1``. ``a`` is searched per group
    of layers that read the same input, and each block's range is then shrunk (clip search), both for the
    least output error on calibration data, computed exactly from the Hessians GPTQ uses (one calibration
    pass). With ``gptq`` set the scaled weights are then rounded by GPTQ ("awq+gptq"), which chooses its own
    ranges (its ``clip_search``). See :mod:`qonnx.passes.awq`.

    Attributes:
        grid: values of ``a`` tried in [0, 1) (``grid`` evenly spaced points, searched coarse to fine).
        clip_search: search each block's range shrink for the least output error (awq; GPTQ's own with gptq).
        calib_samples, calib_seq_len, calib_data: calibration data, as for :class:`GPTQ`.
        gptq: round the scaled weights with GPTQ instead of to nearest.
    """

    name: ClassVar[str] = "awq"
    grid: int = 20
    clip_search: bool = True
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_data: str = "pydoc"
    gptq: GPTQ | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"awq: grid must be a positive integer, got {self.grid!r}")
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"awq: clip_search must be True or False, got {self.clip_search!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"awq: calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not isinstance(self.calib_seq_len, int) or self.calib_seq_len < 2:
            raise ConfigError(f"awq: calib_seq_len must be an integer >= 2, got {self.calib_seq_len!r}")
        if self.gptq is not None:
            if not isinstance(self.gptq, GPTQ):
                raise ConfigError(f"awq: gptq must be a GPTQ(...) config or None, got {self.gptq!r}")
            if self.gptq.sequential:
                raise ConfigError("awq: sequential GPTQ applies to algo 'gptq' alone, not after AWQ's scaling")
            # one calibration run serves both: GPTQ uses AWQ's data
            object.__setattr__(
                self,
                "gptq",
                dataclasses.replace(
                    self.gptq,
                    calib_samples=self.calib_samples,
                    calib_seq_len=self.calib_seq_len,
                    calib_data=self.calib_data,
                ),
            )

    @property
    def label(self) -> str:
        """The label "awq+gptq" when GPTQ rounds the scaled weights, else "awq"."""
        return "awq+gptq" if self.gptq is not None else "awq"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        out = {"name": self.label, **dataclasses.asdict(self)}
        out["gptq"] = None if self.gptq is None else self.gptq.to_dict()
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class HQQ:
    """HQQ (Badri & Shaji, 2023): half-quadratic optimisation of each block's zero point, no data needed.

    Minimises ``|| W - dequant(quant(W)) ||_p`` (``p`` < 1 favours fitting most weights exactly and
    letting outliers go) by alternating a shrinkage step on the error with a closed-form zero-point update
    (see :mod:`qonnx.passes.hqq`). Asymmetric codes only (symmetric ones have no zero point). Zero points
    stay fractional in MatMulNBits (2- and 4-bit codes: ONNX Runtime runs those far slower on the CPU than
    packed integer ones); DequantizeLinear and 8-bit MatMulNBits take integers, where HQQ's zero points are
    rounded and give about round-to-nearest.

    Attributes:
        iterations: optimisation steps per weight.
        lp_norm: ``p`` of the error norm.
        beta: initial weight of the quadratic penalty; multiplied by ``kappa`` every step.
        kappa: growth of ``beta`` per step.
    """

    name: ClassVar[str] = "hqq"
    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"hqq: iterations must be a positive integer, got {self.iterations!r}")
        if not isinstance(self.lp_norm, (int, float)) or not 0 < self.lp_norm <= 2:
            raise ConfigError(f"hqq: lp_norm must be in (0, 2], got {self.lp_norm!r}")
        if not isinstance(self.beta, (int, float)) or self.beta <= 0:
            raise ConfigError(f"hqq: beta must be positive, got {self.beta!r}")
        if not isinstance(self.kappa, (int, float)) or self.kappa < 1:
            raise ConfigError(f"hqq: kappa must be >= 1, got {self.kappa!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        return {"name": self.name, **dataclasses.asdict(self)}


#: ``algo=`` strings and the configs they stand for.
ALGOS = ("rtn", "gptq", "awq", "awq+gptq", "hqq")
Algo = Literal["rtn"] | GPTQ | AWQ | HQQ


def algo_from_name(name: str) -> Algo:
    """The default config of an algorithm named on the command line (``rtn`` stays a string)."""
    table: dict[str, Any] = {
        "rtn": "rtn",
        "gptq": GPTQ(),
        "awq": AWQ(),
        "awq+gptq": AWQ(gptq=GPTQ()),
        "hqq": HQQ(),
    }
    try:
        return table[name.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown algo {name!r}; choose one of {', '.join(ALGOS)}") from None


class SchemeConfig:
    """Base of every scheme config (weight-only and weight+activation); ``name`` is the CLI name."""

    name: ClassVar[str] = "scheme"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        raise NotImplementedError

    def weight_config(self) -> WeightOnlyConfig:
        """The weight-only config that stores this scheme's weights."""
        raise NotImplementedError


#: Block sizes that ONNX Runtime's MatMulNBits kernels accept.
MATMULNBITS_BLOCK_SIZES = FORMATS["matmulnbits"].block_sizes or ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig(SchemeConfig):
    """Weight-only quantization: weights stored in ``bits`` bits, activations stay floating point.

    Attributes:
        bits: code width: 2, 3, 4 or 8. 3-bit codes are stored in 4-bit containers (no ONNX Runtime kernel
            reads 3-bit codes); 2-bit codes in MatMulNBits bits=2, and in 4-bit containers for DequantizeLinear.
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
    """

    name: ClassVar[str] = "weight-only"
    bits: int = 4
    block_size: int | None = 128
    symmetric: bool = False
    format: Format = "matmulnbits"
    accuracy_level: int | None = None
    algo: Algo = "rtn"
    grid: str = "int"

    def __post_init__(self) -> None:
        if isinstance(self.algo, str):
            object.__setattr__(self, "algo", algo_from_name(self.algo))
        elif not isinstance(self.algo, (GPTQ, AWQ, HQQ)):
            raise ConfigError(
                f"{self.name}: algo must be one of {', '.join(ALGOS)} or a GPTQ/AWQ/HQQ(...) config, got {self.algo!r}"
            )
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"{self.name}: bits must be 2, 3, 4 or 8, got {self.bits}")
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        out = {"scheme": self.name, **dataclasses.asdict(self)}
        if not isinstance(self.algo, str):
            out["algo"] = self.algo.to_dict()
        grid = out.pop("grid")
        out["float8"] = grid == "fp8"  # the key qonnx 0.1's metadata has for the two grids it knew
        if grid not in ("int", "fp8"):
            out["grid"] = grid
        return out

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
    format: Format = "bnb4"
    grid: str = "nf4"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4(NF4):
    """bitsandbytes' FP4 weights (a 4-bit float grid, one absmax per block), as MatMulBnb4 (see :class:`NF4`)."""

    name: ClassVar[str] = "fp4"
    grid: str = "fp4"


SCHEMES: dict[str, type[SchemeConfig]] = {
    "w4a16": W4A16,
    "w8a16": W8A16,
    "w3a16": W3A16,
    "w2a16": W2A16,
    "nf4": NF4,
    "fp4": FP4,
}


def scheme_from_name(name: str, **options: Any) -> SchemeConfig:
    """Build a scheme config from its CLI name and options (activation schemes: see config_activations)."""
    import qonnx.core.config_activations  # noqa: F401  (registers w8a8, w4a8, fp8, dynamic)

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

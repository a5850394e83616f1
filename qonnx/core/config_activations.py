"""Weight+activation scheme configs: W8A8, W4A8, FP8 (static, calibrated) and Dynamic (ranges at run time).

A static scheme quantizes the activation entering each quantized MatMul/Gemm/Conv with a fixed scale
found by running calibration data through ONNX Runtime (:class:`Calibration`), and its weight as a
weight-only scheme would (:meth:`ActivationConfig.weight_config`). SmoothQuant (``smooth_quant``) moves
the activation outliers of each layer into its weights before calibration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, get_args

from qonnx.core.algos import GPTQ
from qonnx.core.config import SchemeConfig, WeightOnlyConfig, rotation
from qonnx.core.errors import ConfigError
from qonnx.core.targets import TARGETS, WeightForm, weight_form

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "ActivationConfig",
    "W8A8",
    "W4A8",
    "FP8",
    "Dynamic",
]

Method = Literal["minmax", "percentile", "entropy", "mse"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(Method)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """How activation ranges are measured.

    Attributes:
        method: ``"minmax"`` (the observed range), ``"percentile"`` (``percentile`` of |x|), ``"entropy"``
            (KL-divergence threshold, as TensorRT) or ``"mse"`` (the clipping threshold of least squared error).
        percentile: for ``"percentile"``.
        samples: calibration windows (sequences) or ``.npz`` batches.
        seq_len: tokens per window.
        data: ``"pydoc"`` (the standard corpus from token 60,000, disjoint from evaluation), a ``.txt`` /
            ``.jsonl`` file tokenized with the model's tokenizer, or a ``.npz`` file of input feeds.
        cache: a ``.npz`` file that keeps the statistics for a later run on the same model and data
            (written when missing or stale; a cache of another model or data is refused, not reused).
        device: where ONNX Runtime runs calibration: ``"auto"`` (CUDA when a GPU is usable), ``"cpu"``, ``"cuda"``.
    """

    method: Method = "mse"
    percentile: float = 99.999
    samples: int = 8
    seq_len: int = 512
    data: str = "pydoc"
    cache: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}"
            )
        if not isinstance(self.percentile, (int, float)) or not 50 < self.percentile <= 100:
            raise ConfigError(f"calibration percentile must be in (50, 100], got {self.percentile!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"calibration samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"calibration seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"calibration device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def data_key(self) -> dict[str, Any]:
        """What the statistics depend on besides the model (a cache is valid only for the same)."""
        return {"data": self.data, "samples": self.samples, "seq_len": self.seq_len}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationConfig(SchemeConfig):
    """Static weight+activation quantization: QuantizeLinear/DequantizeLinear on activations, quantized weights.

    Attributes:
        weight_bits: 8 (int8 weights) or 4 (int4 weights in blocks along K).
        block_size: weights per scale along K; ``None``: one scale per output channel.
        weight_symmetric: signed weight codes, zero point 0.
        act_symmetric: int8 activations with zero point 0 (TensorRT needs it); otherwise uint8 with a zero
            point (ONNX Runtime's CPU kernels prefer it: post-SiLU and softmax values are lopsided).
        act_type: ``"int8"`` or ``"fp8"`` (float8 E4M3, weights too; opset 19+).
        smooth_quant: SmoothQuant's migration strength alpha in [0, 1] (default 0.5, the paper's), ``"auto"``
            to choose it per tensor by the quantized output error on held-out calibration rows, or ``None``.
            On SmolLM2 (8 windows): none 19+, auto 15.58, 0.5 15.94; with keep_float="auto", 0.5 gives 15.33.
        calibration: how activation ranges are measured.
        attention: also quantize MatMuls between two activations (attention scores and context).
        keep_float: activation tensors that stay in floating point (16-bit on a 16-bit model), ranked by the
            rounding noise their quantization adds to the outputs of the layers reading them (from each
            tensor's histogram and the weights): a number, or ``"auto"`` for those whose noise is over a tenth
            of the largest, at most 5% of the tensors. Their layers keep the weight quantization. The cheap
            remedy for a few layers with massive activations (SmolLM2: the down projections of layers 11,
            28 and 29).
        algo: how weights are rounded: ``"rtn"`` or GPTQ (``"gptq"`` or :class:`~qonnx.core.algos.GPTQ`), with
            Hessians from the same calibration data, transformed by the smoothing factors (``"gptq"`` takes
            the calibration's data, samples and seq_len). Default ``"rtn"``; ``"gptq"`` for :class:`FP8`.
        target: the runtime to lower for (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or ``"generic"`` QDQ);
            a scheme that measured slower than floating point there gets a warning (``strict``: an error).
        strict: refuse a scheme that is slower than floating point on the target.
        weight_range: int8 weights in ``"full"`` [-127, 127] or ``"7bit"`` [-64, 63]; ``"auto"`` (default): 7 bits
            where the target may be an x86 CPU without VNNI (``cpu``, ``generic``), whose ONNX Runtime kernels
            saturate on full-range weights (see :class:`qonnx.core.targets.Target`); full on ``cuda`` and
            ``tensorrt``. Use ``"full"`` for CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) or ARM.
        rotate: rotate the residual stream first (:attr:`qonnx.core.config.WeightOnlyConfig.rotate`).
    """

    name: ClassVar[str] = "activations"
    weight_bits: int = 8
    block_size: int | None = None
    weight_symmetric: bool = True
    act_symmetric: bool = False
    act_type: Literal["int8", "fp8"] = "int8"
    smooth_quant: float | Literal["auto"] | None = 0.5
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    attention: bool = False
    keep_float: int | Literal["auto"] = "auto"
    algo: Literal["rtn", "gptq"] | GPTQ = "rtn"
    target: str = "generic"  # a key of qonnx.core.targets.TARGETS
    strict: bool = False
    weight_range: Literal["auto", "full", "7bit"] = "auto"
    rotate: str = "none"

    def __post_init__(self) -> None:
        rotation(self.name, self.rotate)
        if self.weight_range not in ("auto", "full", "7bit"):
            raise ConfigError(f"{self.name}: weight_range must be 'auto', 'full' or '7bit', got {self.weight_range!r}")
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"{self.name}: weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if self.act_type not in ("int8", "fp8"):
            raise ConfigError(f"{self.name}: act_type must be 'int8' or 'fp8', got {self.act_type!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 2):
            raise ConfigError(f"{self.name}: block_size must be an integer >= 2 or None, got {self.block_size!r}")
        if self.act_type == "fp8" and (self.weight_bits != 8 or self.block_size is not None):
            raise ConfigError(f"{self.name}: fp8 weights are per output channel (weight_bits=8, block_size=None)")
        sq = self.smooth_quant
        if not (
            sq is None or sq == "auto" or (isinstance(sq, (int, float)) and not isinstance(sq, bool) and 0 <= sq <= 1)
        ):
            raise ConfigError(f"{self.name}: smooth_quant must be a number in [0, 1], 'auto' or None, got {sq!r}")
        if not isinstance(self.calibration, Calibration):
            raise ConfigError(f"{self.name}: calibration must be a Calibration(...), got {self.calibration!r}")
        kf = self.keep_float
        if kf != "auto" and (not isinstance(kf, int) or isinstance(kf, bool) or kf < 0):
            raise ConfigError(f"{self.name}: keep_float must be a non-negative integer or 'auto', got {kf!r}")
        if not (self.algo in ("rtn", "gptq") or isinstance(self.algo, GPTQ)):
            raise ConfigError(f"{self.name}: algo must be 'rtn', 'gptq' or a GPTQ(...) config, got {self.algo!r}")
        if isinstance(self.algo, GPTQ) and (self.algo.sequential or self.algo.stream_layers):
            raise ConfigError(
                f"{self.name}: sequential GPTQ applies to weight-only schemes (w4a16, w8a16, ...), layer-streamed too"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"{self.name}: target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if TARGETS[self.target].symmetric_activations:
            if not (self.act_symmetric or self.act_type == "fp8"):
                object.__setattr__(self, "act_symmetric", True)  # TensorRT takes symmetric int8 only
            if not self.weight_symmetric:
                raise ConfigError(f"{self.name}: {self.target} needs symmetric weights (weight_symmetric=True)")

    @property
    def form(self) -> WeightForm:
        """How this scheme's layers are emitted on its target (:func:`qonnx.core.targets.weight_form`)."""
        return weight_form(self.target, self.act_type, self.weight_bits, self.block_size)

    @property
    def weight_code_bits(self) -> int:
        """Bits of the weight codes: 7 (held in int8) where ``weight_range`` keeps int8 weights to [-64, 63]."""
        int8 = self.weight_bits == 8 and self.act_type == "int8" and self.weight_symmetric
        auto = self.weight_range == "auto" and TARGETS[self.target].int8_weights_7bit
        return 7 if int8 and (self.weight_range == "7bit" or auto) else self.weight_bits

    @property
    def weight_algo(self) -> Literal["rtn"] | GPTQ:
        """How the weights are rounded; ``"gptq"`` is GPTQ on this config's calibration data.

        Resolved when read, not stored, so that ``dataclasses.replace(cfg, calibration=...)`` carries the
        new data to GPTQ's Hessians too.
        """
        if self.algo == "gptq":
            c = self.calibration
            return GPTQ(calib_data=c.data, calib_samples=c.samples, calib_seq_len=c.seq_len)
        return "rtn" if self.algo == "rtn" else self.algo

    def weight_config(self) -> WeightOnlyConfig:
        """The weight-only config that quantizes this scheme's weights (as DequantizeLinear)."""
        algo, form = self.weight_algo, self.form
        if not form.static_activations:
            return WeightOnlyConfig(
                bits=self.weight_bits,
                block_size=self.block_size,
                symmetric=self.weight_symmetric,
                format=form.format,
                accuracy_level=form.accuracy_level,
                algo=algo,
            )
        return WeightOnlyConfig(
            bits=self.weight_code_bits,
            block_size=self.block_size,
            symmetric=self.weight_symmetric,
            format="qdq",
            grid="fp8" if self.act_type == "fp8" else "int",
            algo=algo,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        out = {"scheme": self.name, **dataclasses.asdict(self)}
        algo = self.weight_algo
        if isinstance(algo, GPTQ):
            out["algo"] = algo.to_dict()
        if not self.form.static_activations:  # what was really done: no calibration, no smoothing, no activation Q/DQ
            out["emitted_as"] = self.form.note
            for unused in ("smooth_quant", "calibration", "keep_float", "act_symmetric"):
                out.pop(unused, None)
        if out["rotate"] == "none":  # metadata as before for the default
            del out["rotate"]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8(ActivationConfig):
    """int8 weights (one scale per output channel) and int8 activations (one scale per tensor)."""

    name: ClassVar[str] = "w8a8"
    weight_bits: int = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class W4A8(ActivationConfig):
    """int4 weights in blocks of 128 along K and int8 activations (one scale per tensor)."""

    name: ClassVar[str] = "w4a8"
    weight_bits: int = 4
    block_size: int | None = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(ActivationConfig):
    """float8 E4M3 weights (one scale per output channel) and activations (one scale per tensor).

    The weights are rounded by GPTQ on the E4M3 grid by default (``algo="gptq"``, Hessians from the
    calibration data, which FP8 needs anyway): on SmolLM2-135M perplexity 14.47 against round-to-nearest's
    14.83 (fp32 14.20), for twice the quantize time (71 s against 34 s on 2 cores: a pass of the float model
    for the Hessians, then the solve). ``algo="rtn"`` rounds to nearest.
    """

    name: ClassVar[str] = "fp8"
    act_type: Literal["int8", "fp8"] = "fp8"
    act_symmetric: bool = True
    smooth_quant: float | Literal["auto"] | None = None
    calibration: Calibration = dataclasses.field(default_factory=lambda: Calibration(method="minmax"))
    algo: Literal["rtn", "gptq"] | GPTQ = "gptq"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dynamic(SchemeConfig):
    """int8 weights and int8 activations whose ranges are measured at run time, per token and block of K.

    Emitted as ONNX Runtime's MatMulNBits with 8-bit weights and ``accuracy_level=4`` (its kernel quantizes
    each row of activations to int8 in blocks along K as it runs); no calibration data is needed.

    Attributes:
        block_size: weights (and activations) per scale along K.
        rotate: rotate the residual stream first (:attr:`qonnx.core.config.WeightOnlyConfig.rotate`).
    """

    name: ClassVar[str] = "dynamic"
    block_size: int = 32
    rotate: str = "none"

    def __post_init__(self) -> None:
        rotation(self.name, self.rotate)
        WeightOnlyConfig(bits=8, block_size=self.block_size)  # validates the block size for MatMulNBits

    def weight_config(self) -> WeightOnlyConfig:
        """The weight-only config that emits it."""
        return WeightOnlyConfig(bits=8, block_size=self.block_size, accuracy_level=4)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the scheme name."""
        out = {"scheme": self.name, **dataclasses.asdict(self)}
        if out["rotate"] == "none":
            del out["rotate"]
        return out

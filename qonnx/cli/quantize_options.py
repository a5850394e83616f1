"""The options of ``qonnx quantize``, and how they become a scheme config, a budget and verification options.

:func:`options` declares them all (the shared ones come from :mod:`qonnx.cli.options`); the command hands
what it receives to :class:`QuantizeOptions`, whose methods refuse options the scheme does not use
(``click.UsageError``: one line, exit 2) before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from qonnx.cli import options as opt
from qonnx.core.algos import AWQ, GPTQ, algo_from_name
from qonnx.core.config import SchemeConfig, WeightOnlyConfig
from qonnx.core.config_activations import CALIBRATION_METHODS, ActivationConfig, Calibration
from qonnx.core.errors import ConfigError
from qonnx.core.schemes import SCHEMES, scheme_from_name
from qonnx.core.targets import TARGETS
from qonnx.pipeline.verification import VerifyOptions
from qonnx.runtime.data import PYDOC
from qonnx.runtime.verify import parse_shape_overrides

if TYPE_CHECKING:
    from qonnx.pipeline.mixed_precision import Budget

__all__ = ["ACTIVATION_SCHEMES", "QuantizeOptions", "options"]

F = TypeVar("F", bound=Callable[..., Any])

#: The schemes that quantize activations too (the rest are weight-only).
ACTIVATION_SCHEMES = tuple(name for name, cls in SCHEMES.items() if not issubclass(cls, WeightOnlyConfig))


def options(f: F) -> F:
    """Every option of ``qonnx quantize`` but ``--output``, ``--json`` and ``--progress``."""
    return opt.together(
        opt.scheme(SCHEMES),
        opt.block_size,
        opt.rotate,
        opt.storage,
        click.option(
            "--accuracy-level",
            type=click.IntRange(0, 4),
            default=None,
            help="MatMulNBits compute hint: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default: unset, the "
            "activations' own float type).",
        ),
        click.option(
            "--embeddings",
            type=click.Choice(["4", "8", "float"]),
            default=None,
            help="Embedding tables (Gather) in 4 or 8 bits as GatherBlockQuantized, a tied lm_head as MatMulNBits "
            "on the same codes (one copy), or float (default: float).",
        ),
        opt.algo(opt.ALGOS),
        click.option(
            "--sequential",
            is_flag=True,
            help="--algo gptq: take each layer's Hessian from the model whose earlier layers are already quantized, "
            "stage by stage (one calibration pass per stage: slower, usually more accurate).",
        ),
        click.option(
            "--stream-layers",
            is_flag=True,
            help="--algo gptq: cut the model at its decoder layers and calibrate and solve one layer at a time, "
            "each fed the quantized earlier layers (one pass; ONNX Runtime holds one layer's weights). With "
            "--sequential, the stages within each layer too.",
        ),
        opt.calibration(),
        _ACTIVATIONS,
        opt.exclude("kept in floating point"),
        opt.kv_cache,
        _BUDGET,
        opt.external_data,
        opt.verify,
        _CHECKS,
    )(f)


_ACTIVATIONS = opt.together(
    click.option(
        "--calib-method",
        type=click.Choice(CALIBRATION_METHODS),
        default=None,
        help="Activation ranges (w8a8, w4a8, fp8): observed min/max, a percentile of |x|, KL divergence "
        "(TensorRT's), or least squared error (default: mse; fp8: minmax).",
    ),
    click.option(
        "--smooth-quant",
        default=None,
        metavar="ALPHA|auto|none",
        help="SmoothQuant (w8a8, w4a8, fp8): migration strength ALPHA in [0, 1], 'auto' to search it per layer, "
        "or 'none' (default: 0.5; fp8: none).",
    ),
    click.option(
        "--calib-cache",
        default=None,
        metavar="PATH.npz",
        help="Keep activation statistics in PATH.npz and reuse them on the next run of the same model and data "
        "(default: no cache).",
    ),
    click.option(
        "--target",
        type=click.Choice(list(TARGETS)),
        default=None,
        help="Runtime the model is for (default: generic). Weight-only 4-bit on cuda: symmetric blocks of 32 (the "
        "storage ONNX Runtime's fpA_intB kernel takes; its session option is written beside the model); "
        "w8a8/w4a8/fp8: the form that target runs (tensorrt: symmetric int8 activations). A scheme measured "
        "slower than floating point there gets a warning.",
    ),
    click.option("--strict", is_flag=True, help="Refuse (exit 2) a scheme measured slower than float on --target."),
    click.option(
        "--weight-range",
        type=click.Choice(["auto", "full", "7bit"]),
        default=None,
        help="int8 weights of w8a8 in [-127, 127] (full) or [-64, 63] (7bit). auto (default): 7bit for --target "
        "cpu and generic, as x86 CPUs without VNNI saturate ONNX Runtime's int8 kernels on full-range weights "
        "(SmolLM2 W8A8 on such a CPU: perplexity 20.97 full, 14.8 7-bit); full for cuda and tensorrt. Give full "
        "for CPUs with VNNI or AMX, or ARM.",
    ),
    opt.device(" calibration (w8a8, w4a8, fp8)"),
    click.option(
        "--keep-float",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="Keep the N activation tensors whose quantization adds the most output noise in floating point "
        "(w8a8, w4a8, fp8; default: those over a tenth of the worst, at most 5%); their layers keep weight "
        "quantization. 0 quantizes every activation.",
    ),
    click.option(
        "--attention",
        is_flag=True,
        help="Also quantize the activation x activation MatMuls (attention scores and context).",
    ),
)

_BUDGET = opt.together(
    click.option(
        "--target-bits",
        type=click.FloatRange(min=0, min_open=True, max=32),
        default=None,
        metavar="B",
        help="Mixed precision (w4a16): keep the layers that hurt most (measured alone on calibration windows) in "
        "8 bits while the average stored bits per weight, scales and zero points included, stays <= B "
        "(default: off).",
    ),
    click.option(
        "--max-ppl-increase",
        default=None,
        metavar="P%",
        help="Mixed precision (w4a16, causal LMs): promote the most sensitive layers to 8 bits, then floating "
        "point, until the calibration perplexity is within P% of the float model's (default: off).",
    ),
    click.option(
        "--sensitivity",
        default=None,
        metavar="PATH.json",
        help="With --target-bits / --max-ppl-increase: rank layers by this 'qonnx analyze --json' output of the "
        "same model and scheme instead of measuring them again (default: measure).",
    ),
)

_CHECKS = opt.together(
    click.option(
        "--min-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help="Refuse to write the output (exit 3; nothing is written) when any output's SQNR is below DB, a finite "
        "number; verifies whatever the model's size, and cannot go with --no-verify (default: write it).",
    ),
    click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=DxD",
        help="Shape of a verification input with dynamic dimensions, e.g. pixel_values=1x3x224x224 (default: "
        "from the model's declared shapes).",
    ),
    click.option(
        "--dim",
        "dims",
        multiple=True,
        metavar="NAME=N",
        help="Size of a named dynamic dimension for verification inputs, e.g. sequence=64 (default: qonnx's "
        "choice per dimension).",
    ),
)


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """The values of :func:`options` as given on the command line (None: not given)."""

    scheme: str
    block_size: int | None
    rotate: str | None
    symmetric: bool
    fmt: str | None
    accuracy_level: int | None
    embeddings: str | None
    algo: str | None
    sequential: bool
    stream_layers: bool
    calib_samples: int | None
    calib_seq_len: int | None
    calib_data: str | None
    calib_method: str | None
    smooth_quant: str | None
    calib_cache: str | None
    target: str | None
    strict: bool
    weight_range: str | None
    device: str | None
    keep_float: int | None
    attention: bool
    exclude: tuple[str, ...]
    kv_cache: str | None
    target_bits: float | None
    max_ppl_increase: str | None
    sensitivity: str | None
    external_data: bool | None
    verify: bool | None
    min_sqnr: float | None
    input_shapes: tuple[str, ...]
    dims: tuple[str, ...]

    @classmethod
    def given(cls, values: dict[str, Any]) -> QuantizeOptions:
        """From the command's keyword arguments; ``--device`` counts only when typed (auto is the default)."""
        if click.get_current_context().get_parameter_source("device") is ParameterSource.DEFAULT:
            values = {**values, "device": None}
        return cls(**values)

    @property
    def activations(self) -> bool:
        """Whether the scheme quantizes activations too."""
        return self.scheme.lower() in ACTIVATION_SCHEMES

    def _calib(self) -> dict[str, Any]:
        given = {
            "calib_samples": self.calib_samples,
            "calib_seq_len": self.calib_seq_len,
            "calib_data": self.calib_data,
        }
        return {k: v for k, v in given.items() if v is not None}

    def _act(self) -> dict[str, Any]:
        """The activation-only options by flag name (None: not given)."""
        return {
            "calib-method": self.calib_method,
            "smooth-quant": self.smooth_quant,
            "calib-cache": self.calib_cache,
            "target": self.target,
            "strict": self.strict or None,
            "weight-range": self.weight_range,
            "device": self.device,
            "attention": self.attention or None,
            "keep-float": self.keep_float,
        }

    def config(self) -> SchemeConfig:
        """The scheme config these options ask for."""
        if self.activations:
            for flag in ("sequential", "stream_layers"):
                if getattr(self, flag):
                    name = flag.replace("_", "-")
                    raise click.UsageError(f"--{name} applies to weight-only schemes with --algo gptq")
            if self.kv_cache is not None:
                raise click.UsageError("--kv-cache applies to weight-only schemes (w4a16, w8a16, ...)")
            return self._activation_config()
        for name, value in self._act().items():
            if value is not None and name not in ("target", "strict"):
                raise click.UsageError(f"--{name} applies to --scheme {'/'.join(ACTIVATION_SCHEMES)} only")
        given = {"symmetric": self.symmetric or None, "format": self.fmt, "accuracy_level": self.accuracy_level}
        options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # else the scheme's own
        if self.embeddings is not None:
            options["embeddings"] = None if self.embeddings == "float" else int(self.embeddings)

        if self.rotate is not None:
            options["rotate"] = self.rotate
        if self.block_size is not None:
            options["block_size"] = None if self.block_size == 0 else self.block_size
        options["algo"] = algo_from_name(self.algo or "rtn")
        if self.kv_cache is not None:
            options["kv_cache"] = self.kv_cache
        for flag in ("sequential", "stream_layers"):
            if getattr(self, flag) and not isinstance(options["algo"], GPTQ):
                raise click.UsageError(f"--{flag.replace('_', '-')} applies to --algo gptq only")
        calib = self._calib()
        if isinstance(options["algo"], (GPTQ, AWQ)):
            options["algo"] = dataclasses.replace(options["algo"], **calib)
        elif calib:
            raise click.UsageError(
                f"--{next(iter(calib)).replace('_', '-')} applies to --algo gptq, awq and awq+gptq only"
            )
        if self.sequential or self.stream_layers:
            options["algo"] = dataclasses.replace(
                options["algo"], sequential=self.sequential, stream_layers=self.stream_layers
            )
        config = scheme_from_name(self.scheme, **options)
        if self.strict and self.target is None:
            raise click.UsageError("--strict applies with --target")
        if self.target is not None and isinstance(config, WeightOnlyConfig):  # storage its kernel wants, unless given
            config = config.for_target(self.target, keep=frozenset(k for k in options if k != "algo"))
            config = dataclasses.replace(config, strict=self.strict)
        return config

    def _activation_config(self) -> SchemeConfig:
        """The config of a weight+activation scheme (weight-only options refused)."""
        if self.fmt is not None or self.accuracy_level is not None or self.embeddings is not None:
            raise click.UsageError(
                "--format, --accuracy-level and --embeddings apply to weight-only schemes (w4a16, w8a16)"
            )
        act, calib = self._act(), self._calib()
        if self.scheme.lower() == "dynamic":
            used = [k for k, v in {**act, "symmetric": self.symmetric or None, **calib}.items() if v is not None]
            if self.algo not in (None, "rtn"):
                used.insert(0, "algo")
            if used:
                raise click.UsageError(
                    f"--{used[0].replace('_', '-')} does not apply to --scheme dynamic (no calibration)"
                )
            dyn = {} if self.block_size is None else {"block_size": self.block_size}
            return scheme_from_name(self.scheme, **dyn, **({} if self.rotate is None else {"rotate": self.rotate}))
        options: dict[str, Any] = {} if self.algo is None else {"algo": self.algo}  # None: the scheme's default
        if self.rotate is not None:
            options["rotate"] = self.rotate
        if self.block_size is not None:
            options["block_size"] = None if self.block_size == 0 else self.block_size
        if self.symmetric:
            options["act_symmetric"] = True
        cal: dict[str, Any] = {
            {"calib_samples": "samples", "calib_seq_len": "seq_len", "calib_data": "data"}[k]: v
            for k, v in calib.items()
        }
        for flag, key in (("calib-method", "method"), ("calib-cache", "cache"), ("device", "device")):
            if act[flag] is not None:
                cal[key] = act[flag]
        if cal:
            if self.scheme.lower() == "fp8" and "method" not in cal:
                cal["method"] = "minmax"
            options["calibration"] = Calibration(**cal)
        if self.smooth_quant is not None:
            options["smooth_quant"] = _smooth_quant(self.smooth_quant)
        for key in ("target", "strict", "attention", "keep-float", "weight-range"):
            if act[key] is not None:
                options[key.replace("-", "_")] = act[key]
        config = scheme_from_name(self.scheme, **options)
        if isinstance(config, ActivationConfig) and not config.form.static_activations:
            unused = [
                f"--{k}"
                for k in ("calib-method", "smooth-quant", "calib-cache", "keep-float", "weight-range")
                if act[k] is not None
            ]
            unused += ["--symmetric"] if self.symmetric else []
            if unused:
                click.echo(
                    f"qonnx: WARNING: {', '.join(unused)} ignored: --target cpu emits w4a8 as MatMulNBits with int8 "
                    "activations quantized at run time (no calibration, no smoothing)",
                    err=True,
                )
        return config

    def budget(self) -> Budget | None:
        """The mixed-precision Budget from --target-bits / --max-ppl-increase (and --sensitivity), or None."""
        if self.target_bits is None and self.max_ppl_increase is None:
            if self.sensitivity is not None:
                raise click.UsageError("--sensitivity applies with --target-bits or --max-ppl-increase")
            return None
        if self.target_bits is not None and self.max_ppl_increase is not None:
            raise click.UsageError("give --target-bits or --max-ppl-increase, not both")
        if self.activations:
            raise click.UsageError("--target-bits and --max-ppl-increase apply to weight-only schemes (w4a16, w8a16)")
        import qonnx.pipeline.mixed_precision as mp  # deferred: onnx_ir/onnxscript load ~1 s; only a budget needs them

        if self.max_ppl_increase is not None:
            try:
                increase = mp.parse_percent(self.max_ppl_increase)
            except ConfigError as e:
                raise click.BadParameter(str(e), param_hint="--max-ppl-increase") from None
            return mp.Budget(max_ppl_increase=increase, sensitivity=self.sensitivity)
        return mp.Budget(target_bits=self.target_bits, sensitivity=self.sensitivity)

    def targets(self) -> dict[str, None]:
        """The ``targets`` map: every ``--exclude`` pattern kept in floating point."""
        return {f"re:{r}": None for r in self.exclude}

    def checks(self) -> VerifyOptions:
        """The verification options (``--min-sqnr`` turns verification on; with ``--no-verify`` it is refused)."""
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise click.BadParameter(f"{self.min_sqnr} is not a finite number of dB", param_hint="--min-sqnr")
        if self.min_sqnr is not None and self.verify is False:
            raise click.UsageError("--min-sqnr needs the verification that --no-verify turns off; drop one of them")
        try:
            shapes = parse_shape_overrides(self.input_shapes)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--input-shape") from None
        return VerifyOptions(
            enabled=True if self.min_sqnr is not None else self.verify,
            min_sqnr=self.min_sqnr,
            shapes=shapes,
            dims=_parse_dims(self.dims),
            data=self.calib_data if self.calib_data not in (None, PYDOC) else None,  # verified on the calibration data
        )


def _smooth_quant(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise click.UsageError(f"--smooth-quant takes a number in [0, 1], 'auto' or 'none', not {text!r}") from None


def _parse_dims(items: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise click.BadParameter(f"{item!r}; expected NAME=N, e.g. sequence=64", param_hint="--dim")
        out[name] = int(value)
    return out

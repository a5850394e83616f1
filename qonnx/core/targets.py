"""The targets table: what each runtime target runs fast, and the speed measured there against floating point.

One row per ``--target``: the execution provider it stands for, what lowering does for it, and how schemes
whose default form is slow there are emitted instead (:func:`weight_form`). The speed figures come from
benchmark scripts in ``benchmarks/`` and are recorded in ``benchmarks/RESULTS.md``; :func:`warn_if_slow`
consults them. Adding a target is one :class:`Target` row here (and its measurements).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qonnx.core.errors import ConfigError, warn
from qonnx.core.formats import FORMATS

__all__ = [
    "MEASURED",
    "TARGETS",
    "Target",
    "WeightForm",
    "WeightOnlyForm",
    "lowering_targets",
    "warn_if_slow",
    "weight_form",
    "weight_only_form",
]


@dataclasses.dataclass(frozen=True)
class WeightForm:
    """How a weight+activation scheme's layers are emitted on a target.

    Attributes:
        format: the weight format (:data:`qonnx.core.formats.FORMATS`).
        accuracy_level: MatMulNBits' compute hint (4: int8 activations quantized by the kernel at run time).
        static_activations: activation Q/DQ with calibrated ranges; False when the kernel quantizes them itself.
        note: what the layer records and ``--json`` say about the form, when it is not the scheme's default.
    """

    format: str = "qdq"
    accuracy_level: int | None = None
    static_activations: bool = True
    note: str = ""


@dataclasses.dataclass(frozen=True)
class WeightOnlyForm:
    """How a weight-only scheme is stored for a target whose fast kernel wants a particular layout.

    Attributes:
        symmetric, block_size: the storage the kernel needs (options the user did not give take these).
        session_config: ONNX Runtime session config entries that turn the kernel on, for the target's provider;
            recorded in the model's ``qonnx.session_config`` metadata and in ``session_options.json`` beside it.
        use_when: the workloads where those entries win (and where to leave them off), as measured.
        measured: what the form measured against floating point, for the run's note and ``--json``.
    """

    symmetric: bool
    block_size: int
    session_config: tuple[tuple[str, str], ...] = ()
    use_when: str = ""
    measured: str = ""


@dataclasses.dataclass(frozen=True)
class Target:
    """One runtime a model can be emitted and lowered for.

    Attributes:
        name: the ``--target`` value.
        provider: the ONNX Runtime execution provider it stands for (None: any runtime).
        lowers: ``qonnx lower`` can fuse a model for it (contrib ops of that provider).
        merge_gate_up: lowering also merges gate/up projections into one node + Split (measured faster on CUDA,
            4% slower for a CPU prefill).
        half_attention_only: GroupQueryAttention only for float16/bfloat16 models (the provider's kernel).
        symmetric_activations: int8 activations must be symmetric (TensorRT).
        forms: (activation type, weight bits) -> the form emitted instead of plain QDQ, where that is slow there.
        weight_only: weight bits -> the MatMulNBits storage of weight-only schemes on this target.
        int8_weights_7bit: int8 weights of activation schemes keep to [-64, 63] (``weight_range="auto"``): ONNX
            Runtime's x86 CPU kernels without VNNI add uint8 x int8 products in pairs in int16 with saturation
            (VPMADDUBSW), which 7-bit weights cannot reach (2 x 255 x 64 < 32768). ONNX Runtime's own
            quantizer calls this ``reduce_range``. Measured on SmolLM2 W8A8, AMD EPYC (AVX2, no VNNI), default
            session options: full range perplexity 20.97, the model's own numbers 14.82.
    """

    name: str
    provider: str | None
    lowers: bool = False
    merge_gate_up: bool = False
    half_attention_only: bool = False
    symmetric_activations: bool = False
    forms: tuple[tuple[tuple[str, int], WeightForm], ...] = ()
    weight_only: tuple[tuple[int, WeightOnlyForm], ...] = ()
    int8_weights_7bit: bool = False


# The CUDA provider's MatMulNBits has two kernels for 4-bit weights: its default one (a GEMV, then dequantize +
# cuBLAS for larger M) and, with ``ep.cuda.fpa_intb_gemm=1``, CUTLASS' fpA_intB GEMM, which this build of
# ONNX Runtime (1.31.1's wheel) runs only for symmetric weights in blocks of 32. Symmetric block 32 serves
# both: the option is a session setting, chosen per deployment. 7B Llama shape, H100, lowered, KV cache shared,
# CUDA graphs (benchmarks/device_best_forms.py, RESULTS.md "Weight-only forms on the CUDA provider").
_W4_CUDA = WeightOnlyForm(
    symmetric=True,
    block_size=32,
    session_config=(("ep.cuda.fpa_intb_gemm", "1"),),
    use_when="batched decode (2 to 64 sequences) and prompts up to ~256 tokens; leave it off for batch-1 decode "
    "and long prompts",
    measured="7B decode vs the best fp16 form: 2.05x at batch 1 (option off), 1.76/1.73/1.39/1.29/1.06/0.99x at "
    "batch 2/4/8/16/32/64 (option on); prefill 0.81x at 128 tokens (on), 0.71x at 512 and 0.90x at 2048 (off)",
)
_W4A8_CPU = WeightForm(
    "matmulnbits",
    accuracy_level=4,
    static_activations=False,
    note="MatMulNBits accuracy_level 4 (int8 activations at run time)",
)

#: Every target, by name. "generic" is plain QDQ for any runtime.
TARGETS: dict[str, Target] = {
    # ONNX Runtime 1.31 leaves a blocked int4 weight DequantizeLinear unfused when the activation is also Q/DQ'd
    # and dequantizes the whole weight on every call (0.03x fp32 on a 4096 layer, bench_targets); its
    # MatMulNBits kernel with accuracy_level=4 quantizes each row of activations to int8 per block as it runs.
    "cpu": Target(
        "cpu", "CPUExecutionProvider", lowers=True, forms=((("int8", 4), _W4A8_CPU),), int8_weights_7bit=True
    ),
    "cuda": Target(
        "cuda",
        "CUDAExecutionProvider",
        lowers=True,
        merge_gate_up=True,
        half_attention_only=True,
        weight_only=((4, _W4_CUDA),),
    ),
    "tensorrt": Target("tensorrt", "TensorrtExecutionProvider", symmetric_activations=True),
    "generic": Target("generic", None, int8_weights_7bit=True),  # may run on any CPU
}


def lowering_targets() -> tuple[str, ...]:
    """The targets ``qonnx lower`` fuses for."""
    return tuple(name for name, t in TARGETS.items() if t.lowers)


def weight_form(target: str, act_type: str, weight_bits: int, block_size: int | None) -> WeightForm:
    """The form a weight+activation scheme's layers take on ``target``: the row's form, else plain QDQ.

    A block size the row's format does not take keeps plain QDQ.
    """
    row = TARGETS.get(target)
    form = dict(row.forms).get((act_type, weight_bits)) if row is not None else None
    if form is None or FORMATS[form.format].refuses("int", weight_bits, block_size, True) is not None:
        return WeightForm()
    return form


def weight_only_form(target: str, bits: int, fmt: str) -> WeightOnlyForm | None:
    """The storage a weight-only scheme of ``bits`` in format ``fmt`` takes on ``target``, or None (as given)."""
    row = TARGETS.get(target)
    if row is None or fmt != "matmulnbits":
        return None
    return dict(row.weight_only).get(bits)


#: (scheme name, target) -> (ratio vs float, what was measured, where)
MEASURED: dict[tuple[str, str], tuple[float, str, str]] = {
    # benchmarks/bench_targets.py (RESULTS.md sections bench_targets_cpu16 / bench_targets_cuda): one 4096x4096
    # layer, the smaller ratio of M=16 (batched decode) and M=256 (prefill); CPU: the 16-core host, fp32;
    # CUDA: an H100, fp16, per layer of 8 chained; ONNX Runtime 1.31.1.
    ("w8a8", "cpu"): (2.43, "W8A8 QDQ layer (MatMulIntegerToFloat) vs fp32, CPU provider, 16 cores", "bench_targets"),
    # W4A8 for the CPU is emitted as MatMulNBits with accuracy_level 4 (as QDQ it ran 0.03x: bench_targets);
    # that kernel ran 0.93x fp32 at M=64 and 1.08x at M=1 on a 4096 layer (16 cores, ../shared/device/README.md).
    ("w4a8", "cpu"): (0.93, "W4A8 as MatMulNBits accuracy_level 4 vs fp32 at M=64, CPU provider", "device README"),
    ("fp8", "cpu"): (0.5, "FP8 QDQ layer vs fp32, CPU provider: no float8 kernel, Q/DQ simulated", "bench_targets"),
    ("w8a8", "cuda"): (0.26, "W8A8 QDQ layer vs fp16, CUDA provider, H100", "bench_targets"),
    ("w4a8", "cuda"): (0.2, "W4A8 QDQ layer vs fp16, CUDA provider, H100", "bench_targets"),
    ("fp8", "cuda"): (0.63, "FP8 QDQ layer vs fp16, CUDA provider, H100 (GemmFloat8: 0.07-0.22x)", "bench_targets"),
    # device_best_forms: 7B, lowered, the form above; the smallest ratio over prefill 128/512/2048 tokens with
    # the better setting of the option for each (decode: 0.99x at batch 64 and above 1x below it).
    ("w4a16", "cuda"): (0.71, "W4A16 prefill of 512 tokens vs the best fp16 form, 7B, H100", "device_best_forms"),
}


def warn_if_slow(config: Any) -> None:
    """Warn (or raise with ``config.strict``) when the scheme measured slower than floating point on its target."""
    target = getattr(config, "target", "generic")
    row = MEASURED.get((getattr(config, "name", ""), target))
    if row is None or row[0] >= 1.0:
        return
    ratio, what, where = row
    message = (
        f"{config.name} on target {target} measured {ratio:.2f}x the speed of floating point ({what}; {where}): "
        "the model gets smaller but slower there"
    )
    if getattr(config, "strict", False):
        raise ConfigError(f"{message}; refusing (strict)")
    warn(message)

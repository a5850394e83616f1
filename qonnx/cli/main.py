"""Command line: ``qonnx quantize`` and ``qonnx inspect``.

Every problem with the user's input prints one line on stderr and exits with code 2; no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import click

from qonnx.core import __version__
from qonnx.core.algos import AWQ, GPTQ, algo_from_name
from qonnx.core.config_activations import ActivationConfig
from qonnx.core.errors import QonnxError
from qonnx.core.schemes import SCHEMES, scheme_from_name
from qonnx.pipeline.verification import VerificationError, VerifyOptions, start_reference_early

__all__ = ["main", "cli"]

EXIT_USAGE = 2
EXIT_VERIFY = 3


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qonnx")
def cli() -> None:
    """Quantize ONNX models into smaller, faster ONNX models for ONNX Runtime."""


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    help="Output .onnx file, or folder (a folder input is mirrored there).",
)
@click.option(
    "--scheme",
    type=click.Choice(sorted(SCHEMES), case_sensitive=False),
    default="w4a16",
    show_default=True,
    help="Quantization scheme.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=0),
    default=None,
    help="Weights per scale along K (default 128); 0 for one scale per output channel (qdq only).",
)
@click.option("--symmetric", is_flag=True, help="Signed codes without zero points (default: asymmetric).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["matmulnbits", "qdq"]),
    default="matmulnbits",
    show_default=True,
    help="MatMulNBits (ONNX Runtime) or opset-21 DequantizeLinear + MatMul.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits compute hint: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.",
)
@click.option(
    "--algo",
    type=click.Choice(["rtn", "gptq", "awq", "awq+gptq", "hqq"]),
    default=None,
    help="Default rtn (gptq for --scheme fp8). rtn: round to nearest. gptq: GPTQ (act-order with static "
    "blocks, clip search) with Hessians from calibration runs of the float model in ONNX Runtime (all layers "
    "at once, not layer by layer). awq: activation-aware scales folded into the norms / up projections, and "
    "clipping, both chosen by output error on the same Hessians. awq+gptq: AWQ's scales and clipping, then "
    "GPTQ. These need a tokenizer beside the model or --calib-data. hqq: half-quadratic zero points, no data "
    "(float zero points in MatMulNBits).",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="--algo gptq: take each layer's Hessian from the model whose earlier layers are already quantized, "
    "stage by stage (one calibration pass per stage: slower, usually more accurate).",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(min=1),
    default=None,
    help="GPTQ/AWQ calibration windows (default 16).",
)
@click.option(
    "--calib-seq-len",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens per GPTQ/AWQ calibration window (default 512).",
)
@click.option(
    "--calib-data",
    default=None,
    metavar="PATH",
    help="GPTQ/AWQ calibration data: 'pydoc' (default, from token 60,000), a .txt or .jsonl file, or a .npz of feeds "
    "(arrays named after the model inputs, first axis = batch index) for a model without tokenizer.",
)
@click.option(
    "--calib-method",
    type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
    default=None,
    help="Activation ranges (w8a8, w4a8, fp8): observed min/max, a percentile of |x|, KL divergence "
    "(TensorRT's), or least squared error (default; fp8: minmax).",
)
@click.option(
    "--smooth-quant",
    default=None,
    metavar="ALPHA|auto|none",
    help="SmoothQuant (w8a8, w4a8, fp8): migration strength in [0, 1], 'auto' to search it per layer "
    "(default for int8), or 'none'.",
)
@click.option(
    "--calib-cache",
    default=None,
    metavar="PATH.npz",
    help="Keep activation statistics in PATH.npz and reuse them on the next run of the same model and data.",
)
@click.option(
    "--target",
    type=click.Choice(["cpu", "cuda", "tensorrt", "generic"]),
    default=None,
    help="Runtime to lower for (w8a8, w4a8, fp8; default generic QDQ): tensorrt forces symmetric int8 "
    "activations; a scheme measured slower than floating point there gets a warning.",
)
@click.option("--strict", is_flag=True, help="Refuse (exit 2) a scheme measured slower than float on --target.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where ONNX Runtime runs calibration (default auto: CUDA when a GPU is usable).",
)
@click.option(
    "--keep-float",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Keep the N activation tensors whose quantization adds the most output noise in floating point "
    "(w8a8, w4a8, fp8; default: those over a tenth of the worst, at most 5%); their layers keep weight "
    "quantization. 0 quantizes every activation.",
)
@click.option(
    "--attention",
    is_flag=True,
    help="Also quantize the activation x activation MatMuls (attention scores and context).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="REGEX",
    help="Keep layers whose node name, weight name or module path (model.layers.3.mlp.down_proj) matches "
    "REGEX in floating point (repeatable).",
)
@click.option(
    "--target-bits",
    type=click.FloatRange(min=0, min_open=True, max=32),
    default=None,
    metavar="B",
    help="Mixed precision (w4a16): keep the layers that hurt most (measured alone on calibration windows) in "
    "8 bits while the average stored bits per weight, scales and zero points included, stays <= B.",
)
@click.option(
    "--max-ppl-increase",
    default=None,
    metavar="P%",
    help="Mixed precision (w4a16, causal LMs): promote the most sensitive layers to 8 bits, then floating point, "
    "until the calibration perplexity is within P% of the float model's.",
)
@click.option(
    "--sensitivity",
    default=None,
    metavar="PATH.json",
    help="With --target-bits / --max-ppl-increase: rank layers by this 'qonnx analyze --json' output of the same "
    "model and scheme instead of measuring them again.",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force weights into a separate .data file, or into the .onnx file (default: above 256 MiB).",
)
@click.option(
    "--verify/--no-verify",
    default=None,
    help="Compare outputs with the original before writing (default: on for models up to 2 GiB).",
)
@click.option(
    "--min-sqnr",
    type=float,
    default=None,
    metavar="DB",
    help="Refuse to write the output (exit 3) when any output's SQNR is below DB.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=DxD",
    help="Shape of a verification input with dynamic dimensions, e.g. pixel_values=1x3x224x224.",
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=N",
    help="Size of a named dynamic dimension for verification inputs, e.g. sequence=64.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def quantize(
    model: str,
    output: str,
    scheme: str,
    block_size: int | None,
    symmetric: bool,
    fmt: str,
    accuracy_level: int | None,
    algo: str | None,
    sequential: bool,
    calib_samples: int | None,
    calib_seq_len: int | None,
    calib_data: str | None,
    calib_method: str | None,
    smooth_quant: str | None,
    calib_cache: str | None,
    target: str | None,
    strict: bool,
    device: str | None,
    attention: bool,
    keep_float: int | None,
    exclude: tuple[str, ...],
    target_bits: float | None,
    max_ppl_increase: str | None,
    sensitivity: str | None,
    external_data: bool | None,
    verify: bool | None,
    min_sqnr: float | None,
    input_shapes: tuple[str, ...],
    dims: tuple[str, ...],
    as_json: bool,
    progress: bool | None,
) -> None:
    """Quantize MODEL (a .onnx file or a folder holding model.onnx) into OUTPUT."""
    given: dict[str, Any] = {"calib_samples": calib_samples, "calib_seq_len": calib_seq_len, "calib_data": calib_data}
    calib = {k: v for k, v in given.items() if v is not None}
    act_options = {
        "calib-method": calib_method,
        "smooth-quant": smooth_quant,
        "calib-cache": calib_cache,
        "target": target,
        "strict": strict or None,
        "device": device,
        "attention": attention or None,
        "keep-float": keep_float,
    }
    if scheme.lower() in ACTIVATION_SCHEMES:
        if sequential:
            raise click.UsageError("--sequential applies to weight-only schemes with --algo gptq")
        config = _activation_config(scheme, block_size, symmetric, calib, act_options, fmt, accuracy_level, algo)
    else:
        for name, value in act_options.items():
            if value is not None:
                raise click.UsageError(f"--{name} applies to --scheme {'/'.join(ACTIVATION_SCHEMES)} only")
        options: dict[str, Any] = {"symmetric": symmetric, "format": fmt, "accuracy_level": accuracy_level}
        if block_size is not None:
            options["block_size"] = None if block_size == 0 else block_size
        options["algo"] = algo_from_name(algo or "rtn")
        if sequential and not isinstance(options["algo"], GPTQ):
            raise click.UsageError("--sequential applies to --algo gptq only")
        if isinstance(options["algo"], (GPTQ, AWQ)):
            options["algo"] = dataclasses.replace(options["algo"], **calib)
        elif calib:
            raise click.UsageError(
                f"--{next(iter(calib)).replace('_', '-')} applies to --algo gptq, awq and awq+gptq only"
            )
        if sequential:
            options["algo"] = dataclasses.replace(options["algo"], sequential=True)
        config = scheme_from_name(scheme, **options)
    targets = {f"re:{r}": None for r in exclude}
    budget = _budget(target_bits, max_ppl_increase, sensitivity, scheme)
    show = sys.stderr.isatty() if progress is None else progress
    from qonnx.runtime.data import PYDOC

    checks = VerifyOptions(
        enabled=True if (min_sqnr is not None and verify is None) else verify,
        min_sqnr=min_sqnr,
        shapes=_parse_shapes(input_shapes),
        dims=_parse_dims(dims),
        data=calib_data if calib_data not in (None, PYDOC) else None,  # verified on the calibration data
    )
    start_reference_early(model, checks)  # the original runs in ONNX Runtime while the rest loads
    from qonnx.pipeline.quantize import quantize as run_quantize

    summary = run_quantize(
        model,
        config,
        output=output,
        targets=targets,
        progress=show,
        external_data=external_data,
        verify=checks,
        budget=budget,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    ratio = summary.bytes_before / summary.bytes_after if summary.bytes_after else float("nan")
    click.echo(
        f"{config.name}: quantized {len(summary.quantized)} layers, skipped {len(summary.skipped)} "
        f"in {summary.seconds:.1f} s{_phases(summary.phases)}"
    )
    for reason, names in _group_reasons(summary.skipped):
        who = names[0] if len(names) == 1 else f"{len(names)} layers (e.g. {names[0]})"
        click.echo(f"  skipped {who}: {reason}")
    if summary.mixed_precision is not None:
        _echo_mixed_precision(summary.mixed_precision)
    click.echo(
        f"size: {_human_bytes(summary.bytes_before)} -> {_human_bytes(summary.bytes_after)} ({ratio:.2f}x smaller)"
    )
    check = summary.verification
    if check.ran:
        shown = _outputs_to_show(check.outputs)
        if check.inputs:
            click.echo(f"verified on {check.inputs}:")
        for m in shown:
            top1 = "" if m.top1_agreement is None else f", top-1 agreement {m.top1_agreement:.1%}"
            click.echo(
                f"verified {m.name}: SQNR {m.sqnr_db:.1f} dB, cosine {m.cosine:.4f}, "
                f"max abs error {m.max_abs_error:.3g}{top1}"
            )
        if len(shown) < len(check.outputs):
            click.echo(f"  ({len(check.outputs) - len(shown)} more outputs, such as the KV cache, in --json)")
    else:
        click.echo(check.note)
    click.echo(f"wrote {', '.join(str(p) for p in summary.outputs)}")


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable description on stdout.")
def inspect(model: str, as_json: bool) -> None:
    """Describe MODEL: opsets, op histogram, weights, quantizable layers."""
    from qonnx.pipeline.inspection import inspect_model

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"{info['path']}: IR {info['ir_version']}, opsets {info['opsets']}, {info['nodes']} nodes, "
        f"{_human_bytes(info['file_bytes'])} on disk"
    )
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            click.echo(f"  {kind[:-1]} {v['name']}: {v['dtype']} {v['shape']}")
    click.echo("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    click.echo("weights: " + ", ".join(f"{k} {_human_bytes(v)}" for k, v in info["weight_bytes_by_type"].items()))
    layers = info["layers"]
    click.echo(f"quantizable layers: {info['quantizable_layers']} of {len(layers)} weight-holding nodes")
    for layer in layers:
        if not layer["quantizable"]:
            click.echo(f"  not quantizable {layer['node'] or layer['weight']}: {layer['reason']}")


@cli.command()
@click.option(
    "--work-dir",
    default="qonnx-demo",
    show_default=True,
    type=click.Path(path_type=str),
    help="Folder for the models the demo writes.",
)
@click.option(
    "--windows",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Perplexity windows of 512 tokens (the full protocol uses 24).",
)
@click.option("--synthetic", is_flag=True, help="A seconds-long run on a random model built in code instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout.")
def demo(work_dir: str, windows: int, synthetic: bool, as_json: bool) -> None:
    """Export, quantize (W4A16) and measure the embedded reference model, SmolLM2-135M-Instruct, offline."""
    from qonnx.cli.demo import format_table, run_demo, run_synthetic_demo

    result = run_synthetic_demo(work_dir) if synthetic else run_demo(work_dir, windows=windows)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


ACTIVATION_SCHEMES = ("w8a8", "w4a8", "fp8", "dynamic")


def _activation_config(
    scheme: str,
    block_size: int | None,
    symmetric: bool,
    calib: dict[str, Any],
    act: dict[str, Any],
    fmt: str,
    accuracy_level: int | None,
    algo: str | None,
) -> Any:
    """The config of a weight+activation scheme from the CLI options (weight-only options refused)."""
    from qonnx.core.config_activations import Calibration

    if fmt != "matmulnbits" or accuracy_level is not None:
        raise click.UsageError("--format and --accuracy-level apply to weight-only schemes (w4a16, w8a16)")
    if scheme.lower() == "dynamic":
        used = [k for k, v in {**act, "symmetric": symmetric or None, **calib}.items() if v is not None]
        if algo not in (None, "rtn"):
            used.insert(0, "algo")
        if used:
            raise click.UsageError(f"--{used[0].replace('_', '-')} does not apply to --scheme dynamic (no calibration)")
        return scheme_from_name(scheme, **({} if block_size is None else {"block_size": block_size}))
    options: dict[str, Any] = {} if algo is None else {"algo": algo}  # None: the scheme's default
    if block_size is not None:
        options["block_size"] = None if block_size == 0 else block_size
    if symmetric:
        options["act_symmetric"] = True
    cal: dict[str, Any] = {
        {"calib_samples": "samples", "calib_seq_len": "seq_len", "calib_data": "data"}[k]: v for k, v in calib.items()
    }
    if act["calib-method"] is not None:
        cal["method"] = act["calib-method"]
    if act["calib-cache"] is not None:
        cal["cache"] = act["calib-cache"]
    if act["device"] is not None:
        cal["device"] = act["device"]
    if cal:
        if scheme.lower() == "fp8" and "method" not in cal:
            cal["method"] = "minmax"
        options["calibration"] = Calibration(**cal)
    sq = act["smooth-quant"]
    if sq is not None:
        if sq.lower() in ("auto", "none"):
            options["smooth_quant"] = None if sq.lower() == "none" else "auto"
        else:
            try:
                options["smooth_quant"] = float(sq)
            except ValueError:
                raise click.UsageError(
                    f"--smooth-quant takes a number in [0, 1], 'auto' or 'none', not {sq!r}"
                ) from None
    for key in ("target", "strict", "attention", "keep-float"):
        if act[key] is not None:
            options[key.replace("-", "_")] = act[key]
    config = scheme_from_name(scheme, **options)
    if isinstance(config, ActivationConfig) and not config.form.static_activations:
        unused = [f"--{k}" for k in ("calib-method", "smooth-quant", "calib-cache", "keep-float") if act[k] is not None]
        unused += ["--symmetric"] if symmetric else []
        if unused:
            click.echo(
                f"qonnx: WARNING: {', '.join(unused)} ignored: --target cpu emits w4a8 as MatMulNBits with int8 "
                "activations quantized at run time (no calibration, no smoothing)",
                err=True,
            )
    return config


def _budget(target_bits: float | None, max_ppl_increase: str | None, sensitivity: str | None, scheme: str) -> Any:
    """The mixed-precision Budget from --target-bits / --max-ppl-increase (and --sensitivity), or None."""
    if target_bits is None and max_ppl_increase is None:
        if sensitivity is not None:
            raise click.UsageError("--sensitivity applies with --target-bits or --max-ppl-increase")
        return None
    if target_bits is not None and max_ppl_increase is not None:
        raise click.UsageError("give --target-bits or --max-ppl-increase, not both")
    if scheme.lower() in ACTIVATION_SCHEMES:
        raise click.UsageError("--target-bits and --max-ppl-increase apply to weight-only schemes (w4a16, w8a16)")
    from qonnx.pipeline.mixed_precision import Budget, parse_percent

    if max_ppl_increase is not None:
        return Budget(max_ppl_increase=parse_percent(max_ppl_increase), sensitivity=sensitivity)
    return Budget(target_bits=target_bits, sensitivity=sensitivity)


def _echo_mixed_precision(info: dict[str, Any]) -> None:
    promoted = info["promoted"]
    bits = info["bits_per_weight"]
    ppl = info["calibration_ppl"]
    kinds: dict[str, int] = {}
    for p in promoted:
        kinds[p["to"]] = kinds.get(p["to"], 0) + 1
    what = ", ".join(f"{n} to {k}" for k, n in kinds.items()) or "none"
    after = bits["output"] or bits["mixed"]
    click.echo(
        f"mixed precision: promoted {what}; bits per weight {bits['scheme']:.3f} -> {after:.3f}"
        + (
            f"; calibration ppl float {ppl['float']:.3f}, scheme {ppl['scheme']:.3f}, mixed {ppl['mixed']:.3f}"
            if ppl.get("float") is not None
            else ""
        )
    )
    for p in promoted[:8]:
        click.echo(f"  {p['to']}: {p['module'] or p['node'] or p['weight']} (rank {p['rank']})")
    if len(promoted) > 8:
        click.echo(f"  ({len(promoted) - 8} more in --json)")


def _outputs_to_show(outputs: list[Any]) -> list[Any]:
    """All outputs of a small model; else those not named like a KV cache, plus the worst one."""
    if len(outputs) <= 4:
        return outputs
    main = [m for m in outputs if not m.name.startswith(("present", "past"))]
    worst = min(outputs, key=lambda m: m.sqnr_db)
    return main + ([worst] if worst not in main else [])


def _group_reasons(records: list[Any]) -> list[tuple[str, list[str]]]:
    """Skipped layers grouped by reason, names in quotes generalised (an LLM has dozens of attention MatMuls)."""
    import re

    groups: dict[str, tuple[str, list[str]]] = {}
    for r in records:
        key = re.sub(r"'[^']*'", "'…'", r.reason)
        groups.setdefault(key, (r.reason, []))[1].append(r.node or r.weight)
    return [(first if len(names) == 1 else key, names) for key, (first, names) in groups.items()]


def _register_model_commands() -> None:
    """``export`` and ``eval`` live in qonnx.cli.models (they import torch/transformers only when run)."""
    from qonnx.cli.analyze import analyze_command
    from qonnx.cli.models import eval_command, export_command, generate_command, lower_command, report_command

    cli.add_command(analyze_command)
    cli.add_command(export_command)
    cli.add_command(eval_command)
    cli.add_command(generate_command)
    cli.add_command(report_command)
    cli.add_command(lower_command)


_register_model_commands()


def _parse_shapes(items: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from qonnx.runtime.verify import parse_shape_overrides

    try:
        return parse_shape_overrides(items)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--input-shape") from None


def _parse_dims(items: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise click.BadParameter(f"{item!r}; expected NAME=N, e.g. sequence=64", param_hint="--dim")
        out[name] = int(value)
    return out


def _phases(phases: dict[str, float]) -> str:
    """The phases that took a second or more, e.g. ' (calibration 35.3 s, quantization 22.3 s)'; else ''."""
    long = {k: v for k, v in phases.items() if v >= 1.0}
    return f" ({', '.join(f'{k} {v:.1f} s' for k, v in long.items())})" if long else ""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line on stderr and return 2."""
    try:
        cli.main(args=argv, prog_name="qonnx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # type: ignore[attr-defined]
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return EXIT_USAGE
    except VerificationError as e:
        click.echo(f"qonnx: error: {e}", err=True)
        return EXIT_VERIFY
    except click.UsageError as e:
        click.echo(f"qonnx: error: {e.format_message()}", err=True)
        return EXIT_USAGE
    except (QonnxError, click.ClickException) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"qonnx: error: {msg}", err=True)
        return EXIT_USAGE
    except click.Abort:
        click.echo("qonnx: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("qonnx: interrupted", err=True)
        return 130
    except Exception as e:  # a bug in qonnx: still one line, the traceback on request
        if os.environ.get("QONNX_DEBUG"):
            raise
        click.echo(
            f"qonnx: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(set QONNX_DEBUG=1 for the traceback and please report it)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

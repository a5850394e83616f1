"""Command line: ``qonnx analyze`` (which layers hurt most when quantized alone)."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from qonnx.cli import options as opt
from qonnx.core.schemes import scheme_from_name
from qonnx.pipeline.analysis import analyze

__all__ = ["analyze_command"]


@click.command("analyze", cls=opt.SchemeCommand)
@opt.model_argument
@opt.scheme(["w4a16", "w8a16"], "Weight-only scheme to measure each layer with")
@opt.block_size
@opt.storage
@opt.algo(["rtn", "gptq"], default="rtn")
@opt.calibration(samples=4, seq_len=256, what=" each layer is measured on")
@opt.exclude("left out")
@opt.device(" the measurements")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="PATH.png",
    help="Write the per-layer plot (graph order) here (default: none).",
)
@click.option("--top", type=click.IntRange(min=1), default=20, help="Rows of the table.")
@opt.json_flag("every layer")
@opt.progress
def analyze_command(
    model: str,
    scheme: str,
    block_size: int | None,
    symmetric: bool,
    fmt: str | None,
    algo: str,
    calib_samples: int,
    calib_seq_len: int,
    calib_data: str,
    exclude: tuple[str, ...],
    device: str,
    output: str | None,
    top: int,
    as_json: bool,
    progress: bool,
) -> None:
    """Rank the layers of MODEL by the error each causes when quantized alone (output SQNR, perplexity change).

    --algo gptq first collects its Hessians (16 x 512 calibration tokens). A model without tokenizer and no
    .npz of feeds runs made-up inputs (output SQNR only).
    """
    options: dict[str, Any] = {"algo": algo}  # options not given: the scheme's own defaults
    if symmetric:
        options["symmetric"] = True
    if fmt is not None:
        options["format"] = fmt
    if block_size is not None:
        options["block_size"] = block_size or None
    config = scheme_from_name(scheme, **options)
    result = analyze(
        model,
        config,
        targets={f"re:{r}": None for r in exclude},
        samples=calib_samples,
        seq_len=calib_seq_len,
        data=calib_data,
        device=device,
        progress=progress,
    )
    if output:
        opt.echo(f"wrote {result.plot(output)}", err=as_json)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    measured = f"{result.feeds} x {result.seq_len} calibration tokens" if result.causal_lm else f"{result.feeds} feeds"
    click.echo(
        f"{config.name}: {len(result.layers)} layers, each quantized alone, on {measured} ({result.seconds:.1f} s)"
    )
    click.echo(result.table(top))
    if len(result.layers) > top:
        click.echo(f"      ({len(result.layers) - top} more layers; --json for all)")
    everything = result.all_quantized
    line = f"all {len(result.layers)} quantized: SQNR {everything.sqnr_db:.2f} dB"
    if result.float_nll is not None and everything.nll is not None:
        line += f", ppl {math.exp(result.float_nll):.3f} -> {math.exp(everything.nll):.3f}"
    opt.echo(line)
    for name, why in result.skipped:
        opt.echo(f"  not analysed {opt.escape_name(name)}: {why}")

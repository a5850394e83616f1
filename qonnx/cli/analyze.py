"""Command line: ``qonnx analyze`` (which layers hurt most when quantized alone).

The main CLI registers this command; user errors are raised as QonnxError subclasses, which it prints
as one line on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["analyze_command"]


@click.command("analyze")
@click.argument("model", type=click.Path(path_type=str))
@click.option(
    "--scheme",
    type=click.Choice(["w4a16", "w8a16"], case_sensitive=False),
    default="w4a16",
    show_default=True,
    help="Weight-only scheme to measure each layer with.",
)
@click.option("--block-size", type=click.IntRange(min=0), default=None, help="Weights per scale along K (default 128).")
@click.option("--symmetric", is_flag=True, help="Signed codes without zero points (default: asymmetric).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["matmulnbits", "qdq"]),
    default="matmulnbits",
    show_default=True,
    help="Stored form (the numbers are the same; qdq allows per-channel blocks).",
)
@click.option(
    "--algo",
    type=click.Choice(["rtn", "gptq"]),
    default="rtn",
    show_default=True,
    help="How codes are chosen; gptq first collects its Hessians (16 x 512 calibration tokens).",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Calibration windows each layer is measured on (pydoc from token 60,000; never the evaluation windows).",
)
@click.option("--calib-seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per window.")
@click.option(
    "--calib-data",
    default="pydoc",
    show_default=True,
    metavar="PATH",
    help="'pydoc', a .txt/.jsonl file (models with a tokenizer), or a .npz of feeds; a model without tokenizer "
    "and no .npz runs made-up inputs (output SQNR only).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="REGEX",
    help="Leave out layers whose node name, weight name or module path matches REGEX (repeatable).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where ONNX Runtime runs the measurements.",
)
@click.option("-o", "--output", default=None, metavar="PATH.png", help="Write the per-layer plot (graph order) here.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows of the table.")
@click.option("--json", "as_json", is_flag=True, help="Print every layer as JSON on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def analyze_command(
    model: str,
    scheme: str,
    block_size: int | None,
    symmetric: bool,
    fmt: str,
    algo: str,
    calib_samples: int,
    calib_seq_len: int,
    calib_data: str,
    exclude: tuple[str, ...],
    device: str,
    output: str | None,
    top: int,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Rank the layers of MODEL by the error each causes when quantized alone (output SQNR, perplexity change)."""
    from qonnx.core.schemes import scheme_from_name
    from qonnx.pipeline.analysis import analyze

    options: dict[str, Any] = {"symmetric": symmetric, "format": fmt, "algo": algo}
    if block_size is not None:
        options["block_size"] = None if block_size == 0 else block_size
    config = scheme_from_name(scheme, **options)
    result = analyze(
        model,
        config,
        targets={f"re:{r}": None for r in exclude},
        samples=calib_samples,
        seq_len=calib_seq_len,
        data=calib_data,
        device=device,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    if output:
        click.echo(f"wrote {result.plot(output)}", err=as_json)
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
        import math

        line += f", ppl {math.exp(result.float_nll):.3f} -> {math.exp(everything.nll):.3f}"
    click.echo(line)
    for name, why in result.skipped:
        click.echo(f"  not analysed {name}: {why}")

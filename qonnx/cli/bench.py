"""Command line: ``qonnx bench``: prefill and decode speed of a causal LM against its original, here."""

from __future__ import annotations

import json

import click

from qonnx.cli import options as opt
from qonnx.pipeline.bench import bench

__all__ = ["bench_command"]


def _batches(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        out = [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of batch sizes, got {value!r}") from None
    if not out or any(b < 1 or b > 4096 for b in out):
        raise click.BadParameter(f"batch sizes from 1 to 4096, got {value!r}")
    return out


@click.command("bench", epilog="Example: qonnx bench smol-w4/ --baseline smol/ --batches 1,4,16 --plot speed.png")
@opt.model_argument
@click.option(
    "--baseline",
    type=click.Path(path_type=str),
    default=None,
    help="The floating-point original to compare with (measured the same way; default: none).",
)
@click.option("--batches", default="1,4,16", callback=_batches, help="Batch sizes to decode at.")
@click.option("--prompt-len", type=click.IntRange(min=1, max=32768), default=128, help="Prompt tokens per row.")
@click.option("--new-tokens", type=click.IntRange(min=1, max=4096), default=16, help="Decode steps per batch.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: ONNX Runtime's).")
@click.option(
    "--plot", type=click.Path(path_type=str), default=None, help="Plot decode tokens/s to this PNG (default: none)."
)
@opt.device()
@opt.json_flag("the measurements")
def bench_command(
    model: str,
    baseline: str | None,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    threads: int | None,
    plot: str | None,
    device: str,
    as_json: bool,
) -> None:
    """Prefill latency and decode tokens/s of MODEL at each batch size, against --baseline.

    MODEL is an exported or quantized causal LM with a KV cache. A model that carries session options for its
    target (--target cuda) is measured with them off and on.
    """
    report = bench(
        model,
        baseline=baseline,
        device=device,
        batches=batches,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        threads=threads,
    )
    if plot:
        report.plot(plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        opt.echo(f"{report.device}, prompt {prompt_len} tokens, {new_tokens} decode steps (median step)")
        for line in report.table().splitlines():
            opt.echo(line)
        if plot:
            opt.echo(f"wrote {plot}")

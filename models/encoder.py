"""Export a Hugging Face encoder (BERT-like) to an ONNX folder laid out the way Hugging Face Optimum lays one out.

The folder holds ``model.onnx``, the tokenizer and ``config.json``, as a causal-LM export does. The
graph's interface is Optimum's feature-extraction one::

    inputs:  input_ids, attention_mask [+ token_type_ids]   int64 [batch_size, sequence_length]
    outputs: last_hidden_state [+ pooler_output]            [batch_size, sequence_length, hidden], [batch_size, hidden]

``token_type_ids`` is an input when the model takes them and has more than one type (BERT, not RoBERTa);
``pooler_output`` is an output when the model has a pooler. The export runs
``torch.onnx.export(dynamo=True)``, then onnxscript's optimizer, and saves through
:func:`qonnx.core.modelfile.save`; afterwards ONNX Runtime's outputs are compared with PyTorch's on a padded batch.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from qonnx.core.errors import ConfigError, OutputPathError, escape_name
from qonnx.core.modelfile import MODEL_FILENAME, save
from qonnx.models.export_common import (
    DTYPES,
    Stages,
    cpu_session,
    max_diff,
    quiet_torch,
    report_export,
    save_hf_files,
    torch_to_onnx,
)
from qonnx.models.hf import load_encoder, source_name

__all__ = ["export_encoder", "verify_encoder_export", "encoder_io"]

#: Above this max |output| difference (fp32 export) the export prints a warning.
_FP32_TOLERANCE = 1e-3
_FP16_TOLERANCE = 0.1


def encoder_io(model: Any) -> tuple[list[str], list[str]]:
    """The graph's input and output names for ``model`` (see the module docstring)."""
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    types = takes_types and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1
    pooler = getattr(model, "pooler", None) is not None
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    return inputs, ["last_hidden_state"] + (["pooler_output"] if pooler else [])


def _make_wrapper(model: Any, outputs: list[str]) -> Any:
    """An nn.Module with flat tensor inputs and outputs around ``model``."""

    class EncoderWithFlatOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, *token_type_ids: Any) -> Any:
            kwargs = {"token_type_ids": token_type_ids[0]} if token_type_ids else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return tuple(getattr(out, name) for name in outputs)

    return EncoderWithFlatOutputs().eval()


def _feeds(batch: int, seq: int, vocab: int, inputs: list[str], seed: int) -> tuple[Any, ...]:
    """Random ids, a mask whose last row is padded at the end, and zero token types."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones((batch, seq), dtype=torch.long)
    if batch > 1:
        mask[-1, max(seq // 2, 1) :] = 0
    types = [torch.zeros_like(ids)] if "token_type_ids" in inputs else []
    return (ids, mask, *types)


def _to_onnx(model: Any, opset: int | None, stages: Stages) -> Any:
    """Export with torch.onnx (dynamo) and optimize with onnxscript; returns an onnx_ir Model."""
    inputs, outputs = encoder_io(model)
    args = _feeds(2, 5, model.config.vocab_size, inputs, 0)
    axes = {0: torch.export.Dim("batch_size"), 1: torch.export.Dim("sequence_length")}
    dynamic: dict[str, Any] = {"input_ids": axes, "attention_mask": axes, "token_type_ids": (axes,)}
    if "token_type_ids" not in inputs:
        del dynamic["token_type_ids"]
    return torch_to_onnx(
        _make_wrapper(model, outputs),
        args,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset=opset,
        stages=stages,
    )


def export_encoder(
    source: str | os.PathLike | Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    tokenizer: Any | None = None,
    opset: int | None = None,
    verify: bool = True,
    quiet: bool = False,
    progress: bool = True,
) -> Path:
    """Export an encoder to ``out_dir/model.onnx`` plus its tokenizer and config files.

    Args:
        source: a Hugging Face model folder, ``"minilm"`` (the reference encoder), or a loaded
            ``transformers`` model such as ``AutoModel.from_config(...)`` (left unchanged).
        out_dir: the folder to write; created when missing. It must not be the source folder.
        dtype: "fp32" or "fp16" (weights and activations).
        tokenizer: the tokenizer to save (default: the one beside the source, if any).
        opset: ONNX opset (default: the exporter's).
        verify: compare ONNX Runtime's outputs with PyTorch's and print the max difference on stderr.
        quiet: print nothing.
        progress: say each stage on stderr with the seconds so far (loading, tracing, ..., checking).

    Returns:
        The path of the written ``model.onnx``.

    Raises:
        ConfigError: unknown dtype.
        ModelLoadError: the source cannot be loaded.
        OutputPathError: ``out_dir`` is the source folder or cannot be written.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    stages = Stages(quiet or not progress)
    out = Path(out_dir)
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if out.exists() and src.is_dir() and out.resolve() == src.resolve():
            raise OutputPathError(f"{out}: is the source folder; choose another output folder")
        stages(f"loading {escape_name(source_name(source))}")
        with quiet_torch():
            model, found_tokenizer = load_encoder(source)
        tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    else:
        model = source
    model.eval()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    # An fp16 export converts a copy: the fp32 model stays the reference that verification compares with.
    exported = model if dtype == "fp32" else copy.deepcopy(model).to(getattr(torch, DTYPES[dtype]))
    onnx_model = _to_onnx(exported, opset, stages)
    path = out / MODEL_FILENAME
    stages(f"saving {escape_name(str(path))}")
    save(onnx_model, path)
    del onnx_model, exported
    save_hf_files(out, model, tokenizer, dtype, None)
    if verify:
        stages("checking against PyTorch")
    report_export(
        path,
        stages.elapsed(),
        dtype=dtype,
        quiet=quiet,
        what="hidden states",
        check=(lambda: verify_encoder_export(path, model)) if verify else None,
        tolerance=_FP32_TOLERANCE if dtype == "fp32" else _FP16_TOLERANCE,
    )
    return path


def verify_encoder_export(
    model_path: str | os.PathLike, model: Any, *, batch: int = 2, seq: int = 8, seed: int = 1
) -> float:
    """Max |output| difference between ONNX Runtime (CPU) and PyTorch over every output, on random tokens.

    The last row of the batch is padded at the end, so the attention mask is checked too.
    """
    session = cpu_session(model_path)
    names = [i.name for i in session.get_inputs()]
    inputs, outputs = encoder_io(model)
    if names != inputs:
        raise RuntimeError(f"{model_path}: inputs {names}, expected {inputs} for this model")
    args = _feeds(batch, seq, model.config.vocab_size, inputs, seed)
    onnx_out = session.run(outputs, {n: t.numpy() for n, t in zip(names, args, strict=True)})
    with torch.no_grad():
        ref = _make_wrapper(model, outputs)(*args)
    return max(max_diff(o, r) for o, r in zip(onnx_out, ref, strict=True))

"""Export a Hugging Face causal LM to an ONNX folder laid out the way Hugging Face Optimum lays one out.

The folder holds ``model.onnx`` (with ``model.onnx.data`` above 1 GiB of weights), the tokenizer, and
``config.json`` / ``generation_config.json``. The graph's interface is Optimum's::

    inputs:  input_ids, attention_mask, position_ids  [+ past_key_values.{i}.key / .value]
    outputs: logits                                    [+ present.{i}.key / .value]

with dynamic batch, sequence and past lengths. The export runs ``torch.onnx.export(dynamo=True)``, then
onnxscript's optimizer, and saves through :func:`qonnx.core.modelfile.save`. transformers' ``DynamicCache`` is
not a graph input type, so a small wrapper takes the past as flat tensors, builds the cache, and returns
the present as flat tensors. After saving, ONNX Runtime's logits are compared with PyTorch's.

Encoders (BERT-like) are exported by :mod:`qonnx.models.encoder`; :func:`export_model` picks one of the two
from the model's config.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from transformers import DynamicCache

from qonnx.core.errors import ConfigError, OutputPathError, escape_name
from qonnx.core.modelfile import MODEL_FILENAME, save
from qonnx.models.encoder import export_encoder
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
from qonnx.models.hf import load_causal_lm, reference_model_path, source_is_encoder, source_name

__all__ = ["DTYPES", "export_model", "export_causal_lm", "verify_export", "reference_model_path"]

#: Above this max |logits| difference (fp32 export) the export prints a warning.
_FP32_TOLERANCE = 1e-2
_FP16_TOLERANCE = 0.5
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _make_wrapper(model: Any, kv_cache: bool) -> Any:
    """An nn.Module with flat tensor inputs and outputs around ``model`` (see the module docstring)."""

    class CausalLMWithFlatCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            if not kv_cache:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
                return out.logits
            # Without a config every layer is a plain DynamicLayer: the present holds the whole past,
            # and sliding-window layers still mask by absolute position.
            cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return CausalLMWithFlatCache().eval()


def _cache_shapes(model: Any) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read from one tiny forward pass."""
    with torch.no_grad(), quiet_torch():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in out.past_key_values.layers]


def _io_names(num_layers: int, kv_cache: bool) -> tuple[list[str], list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] if kv_cache else []
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] if kv_cache else []
    return ["input_ids", "attention_mask", "position_ids"], past, ["logits", *present]


def _feeds(
    batch: int,
    seq: int,
    past_len: int,
    vocab: int,
    shapes: list[tuple[int, int]],
    dtype: Any,
    seed: int,
    kv_cache: bool,
) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones((batch, past_len + seq), dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past: list[Any] = []
    if kv_cache:
        for heads, dim in shapes:
            past += [torch.randn((batch, heads, past_len, dim), generator=gen).to(dtype) for _ in range(2)]
    return (ids, mask, pos, *past)


def _to_onnx(model: Any, kv_cache: bool, opset: int | None, stages: Stages) -> Any:
    """Export with torch.onnx (dynamo) and optimize with onnxscript; returns an onnx_ir Model."""
    shapes = _cache_shapes(model)
    inputs, past, outputs = _io_names(len(shapes), kv_cache)
    dtype = next(model.parameters()).dtype
    # Distinct example sizes, so that no two dynamic dimensions are unified by coincidence.
    args = _feeds(2, 5, 3 if kv_cache else 0, model.config.vocab_size, shapes, dtype, 0, kv_cache)
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length")
    total = torch.export.Dim("total_sequence_length")
    dynamic: dict[str, Any] = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total if kv_cache else seq},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: torch.export.Dim("past_sequence_length")} for _ in past),
    }
    if not kv_cache:
        del dynamic["past"]
    onnx_model = torch_to_onnx(
        _make_wrapper(model, kv_cache),
        args,
        input_names=inputs + past,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset=opset,
        stages=stages,
    )
    if kv_cache:  # Optimum's name for the mask length; the present outputs already carry it
        mask = onnx_model.graph.inputs[1]
        mask.shape = ir.Shape(["batch_size", "past_sequence_length + sequence_length"])
    return onnx_model


def export_model(
    source: str | os.PathLike | Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    kv_cache: bool = True,
    opset: int | None = None,
    verify: bool = True,
    quiet: bool = False,
    progress: bool = True,
) -> Path:
    """Export ``source`` as an encoder or as a causal LM, as its config says (see :mod:`qonnx.models.hf`).

    Encoders go to :func:`qonnx.models.encoder.export_encoder` (``kv_cache`` does not apply), everything
    else to :func:`export_causal_lm`. The arguments are theirs.
    """
    if source_is_encoder(source):
        return export_encoder(source, out_dir, dtype=dtype, opset=opset, verify=verify, quiet=quiet, progress=progress)
    return export_causal_lm(
        source, out_dir, dtype=dtype, kv_cache=kv_cache, opset=opset, verify=verify, quiet=quiet, progress=progress
    )


def export_causal_lm(
    source: str | os.PathLike | Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    kv_cache: bool = True,
    tokenizer: Any | None = None,
    opset: int | None = None,
    verify: bool = True,
    quiet: bool = False,
    progress: bool = True,
) -> Path:
    """Export a causal LM to ``out_dir/model.onnx`` plus its tokenizer and config files.

    Args:
        source: a Hugging Face model folder, a ``.gguf`` file, ``"smollm2"`` (the reference model), or a
            loaded ``transformers`` PreTrainedModel (left unchanged).
        out_dir: the folder to write; created when missing. It must not be the source folder.
        dtype: "fp32" or "fp16" (weights and activations).
        kv_cache: give the graph past / present inputs and outputs for incremental decoding.
        tokenizer: the tokenizer to save (default: the one beside the source, if any).
        opset: ONNX opset (default: the exporter's).
        verify: compare ONNX Runtime's logits with PyTorch's and print the max difference on stderr.
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
        src_dir = src if src.is_dir() else src.parent
        if out.exists() and src_dir.exists() and out.resolve() == src_dir.resolve():
            raise OutputPathError(f"{out}: is the source folder; choose another output folder")
        stages(f"loading {escape_name(source_name(source))}")
        with quiet_torch():
            model, found_tokenizer = load_causal_lm(source)
        tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    else:
        model = source
    model.eval()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    # An fp16 export converts a copy: the fp32 model stays the reference that verification compares with.
    exported = model if dtype == "fp32" else copy.deepcopy(model).to(getattr(torch, DTYPES[dtype]))
    onnx_model = _to_onnx(exported, kv_cache, opset, stages)
    path = out / MODEL_FILENAME
    stages(f"saving {escape_name(str(path))}")
    save(onnx_model, path)
    del onnx_model, exported
    save_hf_files(out, model, tokenizer, dtype, kv_cache)
    if verify:
        stages("checking against PyTorch")
    report_export(
        path,
        stages.elapsed(),
        dtype=dtype,
        quiet=quiet,
        what="logits",
        check=(lambda: verify_export(path, model)) if verify else None,
        tolerance=_FP32_TOLERANCE if dtype == "fp32" else _FP16_TOLERANCE,
    )
    return path


def verify_export(model_path: str | os.PathLike, model: Any, *, batch: int = 2, seq: int = 8, seed: int = 1) -> float:
    """Max |logits| difference between ONNX Runtime (CPU) and PyTorch on the same random tokens.

    Models with a KV cache are checked twice: a prefill of ``seq`` tokens with an empty past, then one
    decoding step that feeds the prefill's present back as its past.
    """
    session = cpu_session(model_path)
    names = [i.name for i in session.get_inputs()]
    kv_cache = any(n.startswith("past_key_values.") for n in names)
    shapes = _cache_shapes(model)
    dtype = next(model.parameters()).dtype
    ids, mask, pos, *past = _feeds(batch, seq, 0, model.config.vocab_size, shapes, dtype, seed, kv_cache)
    arrays = [t.numpy() for t in (ids, mask, pos)]
    # The past is empty here; take its dtype from the graph, so an fp16 graph checks against an fp32 model.
    arrays += [t.numpy().astype(_ORT_TYPES[i.type]) for t, i in zip(past, session.get_inputs()[3:], strict=True)]
    feed = dict(zip(names, arrays, strict=True))
    onnx_out = session.run(None, feed)
    with torch.no_grad(), quiet_torch():  # transformers deprecates its own past_key_values argument
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=kv_cache)
    diff = max_diff(onnx_out[0], ref.logits)
    if not kv_cache:
        return diff
    gen = torch.Generator().manual_seed(seed + 1)
    next_ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
    mask = torch.ones((batch, seq + 1), dtype=torch.long)
    pos = torch.full((batch, 1), seq, dtype=torch.long)
    feed = dict(zip(names, [next_ids.numpy(), mask.numpy(), pos.numpy(), *onnx_out[1:]], strict=True))
    onnx_step = session.run(None, feed)
    with torch.no_grad(), quiet_torch():  # transformers deprecates its own past_key_values argument
        ref_step = model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=ref.past_key_values,
            use_cache=True,
        )
    return max(diff, max_diff(onnx_step[0], ref_step.logits))

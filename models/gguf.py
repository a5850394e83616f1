"""Read a GGUF file's quantized weights as their own codes (``qonnx export X.gguf --keep-quantization``).

transformers dequantizes every GGUF tensor to float on load, then its architecture's tensor processor may
move rows (Llama's q/k projections: the reverse of llama.cpp's rotary permutation). The kept codes are
moved the same way: the processor is run on a probe holding each row's index, and a tensor is kept only
when what comes back is a pure row permutation (whole rows move, blocks along K stay intact: exact).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint

from qonnx.core.errors import ModelLoadError, escape_name, quiet_logger
from qonnx.core.ggml import KEPT_TYPES, KeptMatrix, decode_blocks

__all__ = ["GGUFWeights", "read_kept_weights"]


@dataclasses.dataclass
class GGUFWeights:
    """A GGUF file's weights: those kept as codes (in the loader's row order), and the others with why not."""

    kept: dict[str, KeptMatrix]
    other: dict[str, str]  # tensor name -> why it is not kept (its type)
    types: dict[str, str]  # tensor name -> GGML type name, every tensor


def _row_order(processor: TensorProcessor, name: str, n: int, parsed: dict) -> np.ndarray | None:
    """The row order transformers' processor gives a [N, K] tensor named ``name``, or None if not a permutation."""
    probe = np.arange(n, dtype=np.float64)[:, None]
    result = processor.process(weights=probe, name=name, tensor_key_mapping={}, parsed_parameters=parsed)
    moved = np.asarray(result.weights)
    if moved.shape != probe.shape or not np.array_equal(np.sort(moved[:, 0]), probe[:, 0]):
        return None
    return moved[:, 0].astype(np.int64)


def read_kept_weights(path: str | os.PathLike) -> GGUFWeights:
    """The 2-D Q8_0 / Q4_0 / Q4_1 tensors of a GGUF file as codes, rows in the order transformers loads them.

    Raises:
        ModelLoadError: the file cannot be read as GGUF.
    """
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
        with quiet_logger("transformers.modeling_gguf_pytorch_utils"):
            parsed = load_gguf_checkpoint(os.fspath(path), return_tensors=False)
    except Exception as e:  # the file is input: a damaged header fails anywhere in the reader
        raise ModelLoadError(f"{path}: cannot read its GGUF tensors ({type(e).__name__})") from None
    arch = parsed.get("config", {}).get("model_type", "")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    kept: dict[str, KeptMatrix] = {}
    other: dict[str, str] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        types[t.name] = type_name
        if type_name not in KEPT_TYPES:
            other[t.name] = (
                type_name if type_name in ("F32", "F16", "BF16") else f"{type_name} (no exact MatMulNBits form)"
            )
            continue
        if len(t.shape) != 2:
            other[t.name] = f"{type_name} with {len(t.shape)} dimensions"
            continue
        n, k = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        order = _row_order(processor, t.name, n, parsed)
        if order is None:
            other[t.name] = f"{type_name} (transformers' loader transforms it beyond moving rows)"
            continue
        try:
            matrix = decode_blocks(np.asarray(t.data), type_name, (n, k))
        except ValueError as e:
            raise ModelLoadError(f"{path}: tensor {escape_name(t.name)}: {e}") from None
        kept[t.name] = matrix if np.array_equal(order, np.arange(n)) else matrix.rows(order)
    return GGUFWeights(kept, other, types)

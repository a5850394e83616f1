"""Tiny models, tokenizers and graphs built in code for the tests: no download, each built in seconds."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import onnx
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from qonnx.models import build_decoder_stack
from qonnx.models.export import export_causal_lm


def matmul_model(
    path: Path,
    w: np.ndarray,
    *,
    opset: int = 17,
    elem=TensorProto.FLOAT,
    nodes=None,
    initializers=None,
    inputs=None,
    k=None,
    weight_name="w",
) -> Path:
    """x [batch, K] @ w -> y, or a custom node list."""
    k = k if k is not None else w.shape[0]
    inits = [numpy_helper.from_array(w, weight_name)] if initializers is None else initializers
    nodes = nodes or [helper.make_node("MatMul", ["x", weight_name], ["y"], name="mm")]
    g = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", elem, ["batch", k])],
        [helper.make_tensor_value_info("y", elem, ["batch", "n"])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


# -- Hugging Face causal LMs ----------------------------------------------------------------------------------

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_CONFIGS = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": {**_COMMON, "head_dim": 16},
    "phi3": _COMMON,
    "mistral": {**_COMMON, "sliding_window": 4},  # a window shorter than the test sequences
    "gemma": {**_COMMON, "head_dim": 16},
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
}


def tiny_causal_lm(arch: str, seed: int = 0, **overrides):
    """A randomly initialized causal LM of ``arch`` (2 layers, hidden 64, 4 query and 2 KV heads)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer():
    """A BPE tokenizer of 100 tokens trained on three sentences."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["the quick brown fox jumps over the lazy dog", "import os; print(os.getcwd())", "def f(x): return x"]
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def export_tiny_causal_lm(tmp_path_factory, arch: str, dtype: str = "fp32", **overrides) -> Path:
    """``tiny_causal_lm(arch)`` exported with its KV cache (no tokenizer) into a new folder: its model.onnx."""
    model = tiny_causal_lm(arch, **overrides)
    out = tmp_path_factory.mktemp(f"{arch}-{dtype}")
    return export_causal_lm(model, out, dtype=dtype, verify=False, quiet=True)


#: A small text corpus for perplexity tests.
TEXT = "the quick brown fox jumps over the lazy dog; def f(x): return x + 1\n" * 40


# -- Hugging Face encoders ------------------------------------------------------------------------------------

BERT_LIKE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
)
TINY_ENCODERS = {
    "bert": BERT_LIKE,
    "roberta": {**BERT_LIKE, "type_vocab_size": 1, "pad_token_id": 1},  # as roberta-base: no token types
    "distilbert": dict(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=128),
}
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a lazy dog sleeps in the sun all day",
    "import os and print the current working directory",
    "def f(x): return x + 1",
    "lists, tuples and dicts are python containers",
    "the fox and the dog are friends now",
    "numbers like 42 and 3.14 are literals",
    "exceptions are raised with the raise statement",
]


def tiny_encoder(arch: str, seed: int = 0, *, pooler: bool = True):
    """A randomly initialized encoder of ``arch`` (2 layers, hidden 64), with or without its pooler."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(arch, **TINY_ENCODERS[arch])
    kwargs = {} if pooler or arch == "distilbert" else {"add_pooling_layer": False}
    return transformers.AutoModel.from_config(config, **kwargs).eval()


def tiny_wordpiece():
    """A BERT-style tokenizer ([CLS] ... [SEP], lowercase) over single characters and ##characters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits
    vocab = {t: i for i, t in enumerate([*specials, *chars, *string.punctuation, *("##" + c for c in chars)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def text_feeds(tokenizer, names, texts):
    """Encoder feeds for ``texts``, padded, restricted to the model's input ``names``."""
    enc = tokenizer(texts, padding=True, return_tensors="np")
    values = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    values["token_type_ids"] = np.zeros_like(values["input_ids"])
    return {n: values[n].astype(np.int64) for n in names}


# -- Graphs with a known sensitive layer ----------------------------------------------------------------------

OUTLIER = "layers.1.mlp.up_proj.weight"


def outlier_stack(tmp_path, weight=OUTLIER, scale=200.0):
    """A decoder stack whose ``weight`` holds huge rows where its input is zero (the norm's channels cut).

    They change nothing in float, but every 4-bit block holds one: the block's scale follows the outlier and
    all other weights round to (nearly) zero, so the layer's output is lost when it is quantized.
    """
    path = build_decoder_stack(tmp_path / "stack.onnx", hidden=64, intermediate=128, layers=2, vocab=96)
    model = onnx.load(str(path))
    norm = "layers.1.ln2"  # what the MLP of layer 1 reads
    for i, t in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(t).copy()
        if t.name == weight:
            w[::16] *= scale
        elif t.name in (f"{norm}.weight", f"{norm}.bias"):
            w[::16] = 0.0
        else:
            continue
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(model, str(path))
    return path


# -- hostile inputs -------------------------------------------------------------------------------------------


def external_model(folder: Path, location: str, dims=(64, 32), length: int | None = None, data_bytes=None) -> Path:
    """``folder/model.onnx``: x [batch, K] @ w -> y, w stored outside at ``location``; ``w.bin`` (ones) beside it.

    ``location``, ``dims`` and ``length`` are written as given, hostile or not (a NUL byte, 10^12 elements).
    """
    folder.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims), data_location=TensorProto.EXTERNAL)
    entries = [("location", location), ("offset", "0")] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[1]])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    size = data_bytes if data_bytes is not None else 4 * dims[0] * dims[1]
    (folder / "w.bin").write_bytes(np.ones(size // 4, np.float32).tobytes())
    return path

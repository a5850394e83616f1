"""Tiny models, tokenizers and graphs built in code for the tests: no download, each built in seconds."""

from __future__ import annotations

import json
import string
from pathlib import Path

import gguf
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


#: Special tokens and BOS rules of three model families, for :func:`styled_tokenizer`.
TOKENIZER_STYLES = {
    # Gemma: <bos> from the post-processor and add_bos_token in tokenizer_config.json; a chat template that
    # writes the BOS itself; a turn ends with <end_of_turn>
    "gemma": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        add_bos=True,
        template="{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
    # Llama 3: <|begin_of_text|> from the post-processor alone (no add_bos_token); no chat template here
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        add_bos=None,
        template=None,
    ),
    # SmolLM2: names <|im_start|> its BOS and adds none
    "smollm2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>",
        eos="<|im_end|>",
        add_bos=False,
        template=None,
    ),
}


def styled_tokenizer(style: str):
    """A BPE tokenizer of 100 tokens with the special tokens and BOS rules of ``style`` (TOKENIZER_STYLES)."""
    spec = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE(unk_token=spec["specials"][0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["the quick brown fox jumps over the lazy dog", "import os; print(os.getcwd())", "def f(x): return x"]
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=spec["specials"]))
    bos = spec["specials"].index(spec["bos"])
    if spec["add_bos"] is not False:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A $B", special_tokens=[(spec["bos"], bos)]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], unk_token=spec["specials"][0]
    )
    if spec["template"]:
        fast.chat_template = spec["template"]
    return fast


def save_styled_tokenizer(tokenizer, folder: Path, style: str) -> Path:
    """Write ``tokenizer`` into ``folder`` as the family's repositories have it (Gemma's add_bos_token)."""
    tokenizer.save_pretrained(folder)
    add_bos = TOKENIZER_STYLES[style]["add_bos"]
    if add_bos is not None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**config, "add_bos_token": add_bos}, indent=2), encoding="utf-8")
    return folder


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


# -- Graphs whose inputs have sizes to find: images, audio, recurrent state -----------------------------------


def _graph_model(path: Path, nodes, inputs, outputs, inits, *, opset: int = 17, metadata=None) -> Path:
    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    m.ir_version = 8
    for key, value in (metadata or {}).items():
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, path)
    return path


def cnn_zero_at_1x1(path: Path, *, seed: int = 0, metadata=None) -> Path:
    """An image classifier x [1, 3, height, width] -> y [1, 10] whose output is all zeros on a 1x1 image.

    A strided 3x3 Conv (padding 1) whose centre taps are zero and whose bias is -1, then ReLU: on one pixel it
    sees padding and its centre tap only, so every activation is cut to 0; then global average pooling and a
    MatMul [64, 10] without bias. On a 64x64 image about a third of the activations are positive.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)
    w[:, :, 1, 1] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(64, -1.0, np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "fc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "height", "width"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])]
    return _graph_model(path, nodes, inputs, outputs, inits, metadata=metadata)


def detector_with_resize(path: Path, *, seed: int = 0, stride: int = 2) -> Path:
    """A YOLO-like neck on x [batch, 3, H, W] (no names on the dynamic dimensions) that runs on no 1x1 image.

    Two Convs (strides ``stride`` and 2: H -> ceil(H/stride) -> ceil(H/2/stride)), the second upsampled x2 by a
    Resize whose scales are computed in the graph, concatenated with the first: the sizes agree only where H and
    W are multiples of 2 * stride (stride 32: 320 and 640, not 224). Then global average pooling and a MatMul
    [32, 8] -> y.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[stride, stride]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Mul", ["two", "factor"], ["scales"], name="scales"),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], name="upsample", mode="nearest"),
        helper.make_node("Concat", ["up", "r1"], ["cat"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "two"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "factor"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "fc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None, None])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])]
    return _graph_model(path, nodes, inputs, outputs, inits)


def recurrent_with_state(path: Path, *, seed: int = 0) -> Path:
    """A VAD-like step: audio chunk x [batch, samples], state [?, ?, ?] (128 values in truth), sr (int64 scalar).

    The state is reshaped to [2, 64]: no sizes qonnx invents fit it, so the original runs on none of them.
    y = tanh((mean(x) + state[0]) @ w) [batch, 64]; new_state = the state as it came.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Reshape", ["state", "shape"], ["s"], name="reshape"),
        helper.make_node("Gather", ["s", "zero"], ["s0"], name="first", axis=0),
        helper.make_node("Add", ["m", "s0"], ["h"], name="add"),
        helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["h", "srf"], ["hs"], name="div"),
        helper.make_node("MatMul", ["hs", "w"], ["z"], name="fc"),
        helper.make_node("Tanh", ["z"], ["y"], name="tanh"),
        helper.make_node("Identity", ["state"], ["new_state"], name="keep"),
    ]
    inits = [
        numpy_helper.from_array(np.array([2, 64], np.int64), "shape"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 1000, "w"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [None, None, None]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64]),
        helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [None, None, None]),
    ]
    return _graph_model(path, nodes, inputs, outputs, inits)


def always_zero(path: Path, *, seed: int = 0) -> Path:
    """y = relu(-|x|) @ w: all zeros on every input, however large (a model nothing can be verified on)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Neg", ["a"], ["n"], name="neg"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="fc"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])]
    return _graph_model(path, nodes, inputs, outputs, inits)


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


# -- A language model as an exporter writes one: a KV cache, a tied head -------------------------------------


def tiny_llm_graph(path: Path, *, layers: int = 4, hidden: int = 64, intermediate: int = 128, vocab: int = 96) -> Path:
    """A causal LM graph built with onnx.helper (no torch): ``input_ids``, ``past_key_values.{i}.key/value`` in,
    ``logits`` and ``present.{i}.key/value`` out; per layer q/k/v/o and gate/up/down projections named as
    Hugging Face names them, two attention MatMuls of run-time tensors, and an lm_head tied to the embedding
    (a Transpose of the table the Gather reads). Runs in ONNX Runtime.
    """
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "model.embed_tokens.weight")
    ]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "one")]
    inits += [numpy_helper.from_array(np.ones(hidden, np.float32), "norm.weight")]
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h0"], name="embed")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", vocab])]
    h = "h0"
    projections = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden)}
    projections |= {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in projections.items():
            where = "mlp" if name in ("gate", "up", "down") else "self_attn"
            w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"{p}.{where}.{name}_proj.weight"))

        def linear(x, name, out, p=p):
            where = "mlp" if name in ("gate", "up", "down") else "self_attn"
            return helper.make_node(
                "MatMul", [x, f"{p}.{where}.{name}_proj.weight"], [out], name=f"{p}.{where}.{name}_proj"
            )

        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, ["batch", 1, "past", hidden]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, ["batch", 1, "past + seq", hidden]))
        nodes += [
            helper.make_node("LayerNormalization", [h, "norm.weight"], [f"{p}.n1"], axis=-1),
            linear(f"{p}.n1", "q", f"{p}.q"),
            linear(f"{p}.n1", "k", f"{p}.k"),
            linear(f"{p}.n1", "v", f"{p}.v"),
            helper.make_node("Unsqueeze", [f"{p}.k", "one"], [f"{p}.k1"]),
            helper.make_node("Unsqueeze", [f"{p}.v", "one"], [f"{p}.v1"]),
            helper.make_node("Concat", [f"past_key_values.{i}.key", f"{p}.k1"], [f"present.{i}.key"], axis=2),
            helper.make_node("Concat", [f"past_key_values.{i}.value", f"{p}.v1"], [f"present.{i}.value"], axis=2),
            helper.make_node("Transpose", [f"{p}.k"], [f"{p}.kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}.q", f"{p}.kt"], [f"{p}.scores"], name=f"{p}.self_attn.scores"),
            helper.make_node("Softmax", [f"{p}.scores"], [f"{p}.probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", f"{p}.v"], [f"{p}.attn"], name=f"{p}.self_attn.mix"),
            linear(f"{p}.attn", "o", f"{p}.o"),
            helper.make_node("Add", [h, f"{p}.o"], [f"{p}.h1"]),
            helper.make_node("LayerNormalization", [f"{p}.h1", "norm.weight"], [f"{p}.n2"], axis=-1),
            linear(f"{p}.n2", "gate", f"{p}.gate"),
            linear(f"{p}.n2", "up", f"{p}.up"),
            helper.make_node("Sigmoid", [f"{p}.gate"], [f"{p}.sig"]),
            helper.make_node("Mul", [f"{p}.gate", f"{p}.sig"], [f"{p}.silu"]),
            helper.make_node("Mul", [f"{p}.silu", f"{p}.up"], [f"{p}.act"]),
            linear(f"{p}.act", "down", f"{p}.down"),
            helper.make_node("Add", [f"{p}.h1", f"{p}.down"], [f"{p}.h2"]),
        ]
        h = f"{p}.h2"
    nodes += [
        helper.make_node("Transpose", ["model.embed_tokens.weight"], ["lm_head.weight_t"], perm=[1, 0], name="tie"),
        helper.make_node("LayerNormalization", [h, "norm.weight"], ["final"], axis=-1),
        helper.make_node("MatMul", ["final", "lm_head.weight_t"], ["logits"], name="lm_head"),
    ]
    return _graph_model(path, nodes, inputs, outputs, inits)


def _gguf_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_gguf(
    path: Path, linear: str = "Q4_0", embedding: str = "Q8_0", *, seed: int = 0, tied: bool = True
) -> Path:
    """A random tiny Llama (2 layers, hidden 64, MLP 128, 4 query / 2 KV heads, vocab 128) written as GGUF.

    Linear weights are quantized to ``linear``, the embedding (and the lm_head when untied) to ``embedding``
    with gguf-py's own quantizer; norms stay F32. transformers loads it as a LlamaForCausalLM.
    """
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv, vocab, layers = 64, 128, 4, 2, 128, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // heads)

    def add(name: str, w: np.ndarray, qtype: str) -> None:
        t = gguf.GGMLQuantizationType[qtype]
        data = w.astype(np.float32) if qtype == "F32" else gguf.quants.quantize(w.astype(np.float32), t)
        writer.add_tensor(name, data, raw_dtype=None if qtype == "F32" else t)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    add("token_embd.weight", rand(vocab, hidden), embedding)
    if not tied:
        add("output.weight", rand(vocab, hidden), embedding)
    add("output_norm.weight", 1 + rand(hidden), "F32")
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", 1 + rand(hidden), "F32")
        add(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden), "F32")
        add(f"blk.{i}.attn_q.weight", _gguf_permute(rand(hidden, hidden), heads), linear)
        add(f"blk.{i}.attn_k.weight", _gguf_permute(rand(kv * hidden // heads, hidden), kv), linear)
        add(f"blk.{i}.attn_v.weight", rand(kv * hidden // heads, hidden), linear)
        add(f"blk.{i}.attn_output.weight", rand(hidden, hidden), linear)
        add(f"blk.{i}.ffn_gate.weight", rand(inter, hidden), linear)
        add(f"blk.{i}.ffn_up.weight", rand(inter, hidden), linear)
        add(f"blk.{i}.ffn_down.weight", rand(hidden, inter), linear)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tie_lm_head(path: Path) -> Path:
    """Tie an exported LM's head to its embedding table in place, as SmolLM2's export is tied.

    torch.onnx writes a tiny tied model's head as a transposed copy of the table; here the head's MatMul reads
    the Gather's table through a Transpose node instead, and the copy is dropped (one stored table).
    """
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    table = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits)
    rows = numpy_helper.to_array(inits[table])
    heads = [
        n
        for n in graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and np.array_equal(numpy_helper.to_array(inits[n.input[1]]), rows.T)
    ]
    if len(heads) != 1:
        raise ValueError(f"{len(heads)} MatMuls read the transposed table")
    head = heads[0]
    graph.initializer.remove(inits[head.input[1]])
    head.input[1] = f"{table}_T"
    graph.node.insert(list(graph.node).index(head), helper.make_node("Transpose", [table], [f"{table}_T"], perm=[1, 0]))
    onnx.save(model, str(path))
    return path


#: Rows of the tables of :func:`lookup_model`.
EMBEDDING_ROWS = V = 256


def lookup_model(path, h, *, tied, extra_reader=False, seed=0, dtype=np.float32):
    """ids -> Gather(table [V, h]) -> MatMul(w [h, h]) -> (tied: MatMul(table.T); untied: MatMul(head)) -> logits."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, h)).astype(dtype)
    w = (rng.standard_normal((h, h)) / 8).astype(dtype)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
        helper.make_node("MatMul", ["emb", "w"], ["hid"], name="mlp"),
    ]
    if tied:
        nodes += [
            helper.make_node("Transpose", ["table"], ["table_t"], name="t", perm=[1, 0]),
            helper.make_node("MatMul", ["hid", "table_t"], ["logits"], name="lm_head"),
        ]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((h, V)).astype(dtype), "head"))
        nodes.append(helper.make_node("MatMul", ["hid", "head"], ["logits"], name="lm_head"))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outputs = [helper.make_tensor_value_info("logits", elem, ["b", "s", V])]
    if extra_reader:  # the float table also leaves the graph: it must stay
        nodes.append(helper.make_node("Identity", ["table"], ["table_out"], name="keep"))
        outputs.append(helper.make_tensor_value_info("table_out", elem, [V, h]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, table

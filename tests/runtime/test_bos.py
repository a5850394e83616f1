"""LLM runs follow the tokenizer: a BOS before every text where it asks for one (Gemma, Llama 3), none where it
does not (SmolLM2), through evaluation, generation, calibration and verification."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from builders import TEXT, save_styled_tokenizer, styled_tokenizer, tiny_causal_lm
from click.testing import CliRunner

from qonnx.cli.models import generate_command
from qonnx.core.tokenizer import bos_token_id, tokenizer_bos_token_id
from qonnx.models.export import export_causal_lm
from qonnx.runtime.calibration import calibration_feeds
from qonnx.runtime.data import evaluation_windows, tokenize, with_bos
from qonnx.runtime.evaluate import perplexity, perplexity_torch
from qonnx.runtime.generate import Generator
from qonnx.runtime.verify import ReferenceRun, text_token_ids

#: BOS id of each style's tokenizer (None: it adds none)
BOS = {"gemma": 2, "llama3": 0, "smollm2": None}


@pytest.fixture(scope="module")
def styled_llms(tmp_path_factory):
    """A tiny Llama exported with a Gemma-style tokenizer (BOS asked for) and a SmolLM2-style one (none)."""
    root = tmp_path_factory.mktemp("bos")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    found = {}
    for style, ids in (
        ("gemma", dict(bos_token_id=2, eos_token_id=1)),
        ("smollm2", dict(bos_token_id=1, eos_token_id=2)),
    ):
        model = tiny_causal_lm("llama", seed=3, **ids)
        tokenizer = styled_tokenizer(style)
        out = export_causal_lm(model, root / style, tokenizer=tokenizer, quiet=True, verify=False).parent
        save_styled_tokenizer(tokenizer, out, style)
        found[style] = (model, tokenizer, out)
    return found, corpus


@pytest.mark.parametrize("style", BOS)
def test_bos_token_id_follows_the_tokenizer(tmp_path, style):
    """add_bos_token where tokenizer_config.json says it, else the post-processor, when it puts the BOS first."""
    tokenizer = styled_tokenizer(style)
    folder = save_styled_tokenizer(tokenizer, tmp_path, style)
    assert bos_token_id(folder) == BOS[style] == tokenizer_bos_token_id(tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert bos_token_id(folder) is None  # the model's own flag wins over the post-processor


def test_no_tokenizer_no_bos(tmp_path):
    assert bos_token_id(tmp_path) is None


def test_perplexity_reads_each_window_after_bos(styled_llms):
    """Gemma-style: every window is read after BOS and all its tokens are scored, as PyTorch scores the same
    windows (within 0.1%; here 1e-5); SmolLM2-style: the windows as they were, first token unscored."""
    found, corpus = styled_llms
    for style, (model, tokenizer, folder) in found.items():
        result = perplexity(folder, data=str(corpus), seq_len=16, windows=4, progress=False)
        windows = evaluation_windows(tokenize(TEXT, tokenizer), 16, 4)
        bos = BOS[style]
        read = with_bos(windows, bos)
        assert read.shape == ((4, 17) if bos is not None else (4, 16)) and result["bos"] is (bos is not None)
        assert result["tokens"] == (4 * 16 if bos is not None else 4 * 15)
        with torch.no_grad():  # the protocol written out: each window after BOS, every token but the first read
            nll = []
            for ids in read:
                x = torch.as_tensor(ids)[None]
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
                nll.append(-logp[:-1].gather(1, x[0, 1:, None])[:, 0])
        expected = math.exp(torch.cat(nll).mean().item())
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(perplexity_torch(model, read), rel=1e-3)


def test_generation_starts_with_bos_when_asked(styled_llms):
    """The prompt's ids start with one BOS where the tokenizer asks (the chat template writes it: not twice),
    none otherwise; the tokens equal PyTorch's greedy continuation of those ids. A model without a chat
    template runs the prompt as plain text and says so."""
    found, _ = styled_llms
    for style, (model, tokenizer, folder) in found.items():
        gen = Generator(folder)
        plain = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
        result = gen.generate("the quick brown fox", max_new_tokens=6, chat=False)
        bos = BOS[style]
        assert result.prompt_ids == ([bos] if bos is not None else []) + plain
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([result.prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert result.tokens == ref[0, len(result.prompt_ids) :].tolist()[: len(result.tokens)]
        chat = gen.generate("the quick brown fox", max_new_tokens=2)
        assert chat.chat_template is (style == "gemma")
        if style == "gemma":
            assert chat.prompt_ids[0] == bos and chat.prompt_ids.count(bos) == 1
        else:
            assert chat.prompt_ids == result.prompt_ids
    res = CliRunner().invoke(generate_command, [str(found["smollm2"][2]), "--prompt", "hi", "--max-new-tokens", "2"])
    assert res.exit_code == 0 and "no chat template: the prompt is used as plain text" in res.stderr


def test_calibration_and_verification_windows_start_with_bos_when_asked(styled_llms):
    found, corpus = styled_llms
    for style, (_, tokenizer, folder) in found.items():
        bos = BOS[style]
        feeds = calibration_feeds(folder, corpus, samples=2, seq_len=16)
        stream = tokenize(TEXT, tokenizer)
        expected = with_bos(stream[:32].reshape(2, 16), bos)  # a text file's windows start at token 0
        np.testing.assert_array_equal(np.stack([f["input_ids"][0] for f in feeds]), expected)
        ids = text_token_ids(folder, data=corpus)
        assert ids.tolist() == [([bos] if bos is not None else []) + stream[-128:].tolist()]
        run = ReferenceRun(folder / "model.onnx", data=corpus)
        run.run()
        assert run.inputs == "corpus.txt, its last 128 tokens" + (" after BOS" if bos is not None else "")

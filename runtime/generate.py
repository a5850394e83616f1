"""Text generation with an exported causal LM in ONNX Runtime: greedy or top-k, with the KV cache.

The model follows the layout ``qonnx export`` writes (Hugging Face Optimum's): inputs ``input_ids``,
``attention_mask``, ``position_ids`` and optionally ``past_key_values.{i}.key|value``; outputs ``logits``
and ``present.{i}.key|value``. Models without cache inputs are run on the whole sequence each step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from qonnx.runtime.session import make_session

__all__ = ["Generator", "GenerationResult"]

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass
class GenerationResult:
    """Generated tokens and how long each phase took."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


class Generator:
    """Greedy or top-k generation from an ONNX causal-LM folder (model.onnx + tokenizer files)."""

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "cpu", tokenizer: Any = None) -> None:
        from qonnx.modelfile import resolve_model_path

        path = resolve_model_path(model_dir)
        self.session = make_session(path, device)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(Path(path).parent)
        self.tokenizer = tokenizer
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        outputs = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise ValueError(f"model has past inputs but no outputs {missing[:2]}")

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.past_names:
            info = self.inputs[name]
            dims = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(info.shape)]
            dims[2] = 0
            feeds[name] = np.zeros(dims, dtype=_NP.get(info.type, np.float32))
        return feeds

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, start: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = mask.astype(np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, start + ids.shape[1], dtype=np.int64)[None].repeat(ids.shape[0], 0)
        return feeds

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        top_k: int = 1,
        temperature: float = 1.0,
        seed: int = 0,
        chat: bool = True,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (top_k=1 is greedy)."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        rng = np.random.default_rng(seed)
        eos = tok.eos_token_id
        out_tokens: list[int] = []
        t0 = time.perf_counter()
        prefill = decode = 0.0
        past = self._empty_past(1) if self.past_names else {}
        seq = ids
        step_ids = ids
        for step in range(max_new_tokens):
            if self.past_names:
                past_len = next(iter(past.values())).shape[2] if past else 0
                feeds = self._feeds(step_ids, np.ones((1, past_len + step_ids.shape[1])), past_len)
                feeds.update(past)
                results = self.session.run(["logits", *self.present_names], feeds)
                past = dict(zip(self.past_names, results[1:], strict=True))
            else:
                results = self.session.run(["logits"], self._feeds(seq, np.ones(seq.shape), 0))
            logits = results[0][0, -1].astype(np.float64)
            if top_k <= 1:
                nxt = int(logits.argmax())
            else:
                top = np.argpartition(-logits, top_k)[:top_k]
                p = np.exp((logits[top] - logits[top].max()) / max(temperature, 1e-6))
                nxt = int(rng.choice(top, p=p / p.sum()))
            now = time.perf_counter()
            if step == 0:
                prefill = now - t0
            else:
                decode += now - t0
            t0 = now
            out_tokens.append(nxt)
            if eos is not None and nxt == eos:
                break
            step_ids = np.array([[nxt]], dtype=np.int64)
            seq = np.concatenate([seq, step_ids], axis=1)
        text_out = tok.decode(out_tokens, skip_special_tokens=True)
        return GenerationResult(text_out, out_tokens, int(ids.shape[1]), prefill, decode)

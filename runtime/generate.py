"""Text generation with an exported causal LM in ONNX Runtime: greedy or top-k, with the KV cache.

The model follows the layout ``qonnx export`` writes (Hugging Face Optimum's): inputs ``input_ids``,
``attention_mask``, ``position_ids`` and optionally ``past_key_values.{i}.key|value``; outputs ``logits``
and ``present.{i}.key|value``. Models without cache inputs are run on the whole sequence each step.

When every cache input is read by a GroupQueryAttention node (``qonnx lower --attention``), each layer's past
and present are bound (IOBinding) to ONE preallocated buffer of prompt + max_new_tokens positions: ONNX
Runtime's past_present_share_buffer then writes each new position in place instead of copying the whole cache
into a new present every step (7B fp16 on an H100: 66 -> 7.2 ms a step, benchmarks/RESULTS.md). The lengths
still come from ``attention_mask``: on the CPU the tokens equal the separate-buffer loop's (tests/test_generate.py);
on CUDA the 7B logits differed by up to 0.042 (fp16), with the same top-1. ``shared_kv=False`` keeps the old loop.

On CUDA, a model lowered by this version (GroupQueryAttention lengths from the mask's sum, a constant rotary cache)
is decoded with fixed shapes (:mod:`qonnx.runtime.decode`): each step replays one captured CUDA graph instead of
launching every kernel from the host. ``fixed_shapes=False`` turns that off; ``True`` also runs the fixed-shape loop
on the CPU (no graph there: it is how the tests check it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qonnx.core.errors import ConfigError, ModelLoadError, escape_name
from qonnx.core.modelfile import resolve_model_path
from qonnx.core.tokenizer import bos_token_id, load_tokenizer, tokenizer_bos_token_id
from qonnx.runtime.decode import (
    KV_DTYPES,
    FixedShapeDecoder,
    fixed_shape_decodable,
    kv_buffer_shareable,
    rotary_cache_positions,
)
from qonnx.runtime.session import make_session, resolve_device

__all__ = ["Generator", "GenerationResult", "kv_buffer_shareable"]

#: The inputs of a causal LM export that generate() feeds, besides the KV cache (past_key_values.*).
_FED = ("input_ids", "attention_mask", "position_ids")


@dataclasses.dataclass
class GenerationResult:
    """Generated tokens and how long each phase took.

    ``prompt_ids`` are the ids the model read (after the tokenizer's BOS where it adds one); ``chat_template``
    says whether the prompt was wrapped in the model's chat template (False: used as plain text).
    """

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    chat_template: bool = False

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


class Generator:
    """Greedy or top-k generation from an ONNX causal-LM folder (model.onnx + tokenizer files).

    Args:
        model_dir: the folder (or its model.onnx).
        device: "cpu", "cuda" or "auto".
        tokenizer: a Hugging Face tokenizer; default: the one saved beside the model.
        shared_kv: bind past and present to one buffer per cache input (see the module docstring). None
            (default): whenever the model allows it; False: separate past and present buffers; True: required
            (ValueError for a model that does not allow it).
        fixed_shapes: decode with fixed shapes, replayed as a CUDA graph on CUDA. None (default): on CUDA when
            the model allows it; True: required (ValueError otherwise), also on the CPU.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "cpu",
        tokenizer: Any = None,
        shared_kv: bool | None = None,
        fixed_shapes: bool | None = None,
    ) -> None:
        path = resolve_model_path(model_dir)
        model = ir.load(path)
        device = resolve_device(device)
        decodable = fixed_shape_decodable(model)
        if fixed_shapes and not decodable:
            raise ConfigError(
                f"{path}: fixed_shapes=True needs a model lowered with GroupQueryAttention whose lengths come from "
                "the attention mask's sum (re-lower it with this version: `qonnx lower --attention`)"
            )
        #: Whether generate() decodes with fixed shapes (:class:`qonnx.runtime.decode.FixedShapeDecoder`): on
        #: CUDA each step then replays one captured CUDA graph.
        if fixed_shapes is None:
            fixed_shapes = decodable and device == "cuda" and shared_kv is not False
        self.fixed_shapes = fixed_shapes
        self.max_positions = rotary_cache_positions(model) if self.fixed_shapes else None
        self.session = make_session(path, device, cuda_graph=self.fixed_shapes and device == "cuda")
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        given = tokenizer is not None
        if tokenizer is None:
            tokenizer = load_tokenizer(Path(path).parent)  # ModelLoadError: no usable tokenizer, bad config.json
        self.tokenizer = tokenizer
        #: The BOS put before every prompt, as the tokenizer asks (None: none).
        self.bos = tokenizer_bos_token_id(tokenizer) if given else bos_token_id(Path(path).parent)
        #: Generation stops at any of these: the tokenizer's EOS and the model's generation_config.json ones.
        self.stop_ids = _stop_ids(Path(path).parent, tokenizer)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        others = [n for n in self.inputs if n not in _FED and not n.startswith("past_key_values.")]
        if "input_ids" not in self.inputs or others:
            what = f"inputs {', '.join(escape_name(n) for n in others)} are" if others else "input_ids is"
            raise ModelLoadError(f"{path}: {what} not those of a causal LM export; cannot generate with it")
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        outputs = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise ValueError(f"model has past inputs but no outputs {missing[:2]}")
        shareable = bool(self.past_names) and all(
            self.inputs[n].type in KV_DTYPES and all(isinstance(self.inputs[n].shape[i], int) for i in (1, 3))
            for n in self.past_names
        )
        shareable = shareable and kv_buffer_shareable(model)
        del model
        if shared_kv and not shareable:
            raise ValueError(
                f"{path}: shared_kv=True needs every past_key_values input read by GroupQueryAttention "
                "(lower the model with `qonnx lower --attention`)"
            )
        #: Whether generate() binds past and present to one buffer per cache input.
        self.shared_kv = shareable if shared_kv is None else shared_kv
        if self.fixed_shapes and not self.shared_kv:
            raise ConfigError("fixed_shapes needs the shared KV buffer (shared_kv=False was asked)")
        #: The shared buffers of the last generate() call (OrtValues on ``device``), by past input name.
        self.kv_buffers: dict[str, Any] = {}
        self._decoder: Any = None

    def _fixed_decoder(self, needed: int) -> Any:
        """The fixed-shape decoder, kept between calls (a CUDA graph is captured once per buffer size)."""
        if self._decoder is None or self._decoder.max_len < needed:
            size = -(-needed // 256) * 256  # whole blocks of 256 positions: fewer new buffers and graphs
            if self.max_positions is not None:
                if needed > self.max_positions:
                    raise ConfigError(
                        f"prompt + max_new_tokens = {needed} positions; the model's rotary cache holds "
                        f"{self.max_positions}"
                    )
                size = min(size, self.max_positions)
            self._decoder = FixedShapeDecoder(self.session, 1, size, cuda_graph=self.device == "cuda")
        self.kv_buffers = self._decoder.kv
        return self._decoder

    def _shared_buffers(self, batch: int, max_len: int) -> dict[str, Any]:
        buffers = {}
        for name in self.past_names:
            info = self.inputs[name]
            shape = (batch, info.shape[1], max_len, info.shape[3])
            buffers[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, KV_DTYPES[info.type]), self.device, 0)
        return buffers

    def _run_shared(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One forward with past and present bound to ``self.kv_buffers`` (written in place); the logits."""
        io = self.session.io_binding()
        for name, arr in feeds.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))
        io.bind_output("logits", self.device)  # first: outputs come back in binding order
        for past, present in zip(self.past_names, self.present_names, strict=True):
            io.bind_ortvalue_input(past, self.kv_buffers[past])
            io.bind_ortvalue_output(present, self.kv_buffers[past])
        io.synchronize_inputs()
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        return io.get_outputs()[0].numpy()

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.past_names:
            info = self.inputs[name]
            dims = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(info.shape)]
            dims[2] = 0
            feeds[name] = np.zeros(dims, dtype=KV_DTYPES.get(info.type, np.float32))
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
        """Generate up to ``max_new_tokens`` after ``prompt`` (top_k=1 is greedy).

        ``chat``: wrap the prompt in the model's chat template when it has one (without one it is used as plain
        text, and ``chat_template`` in the result says so). The tokenizer's BOS comes first where it adds one
        (a template that writes it already is not given a second).
        """
        tok = self.tokenizer
        templated = bool(chat and getattr(tok, "chat_template", None))
        if templated:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if self.bos is not None and prompt_ids[:1] != [self.bos]:
            prompt_ids.insert(0, self.bos)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        rng = np.random.default_rng(seed)
        out_tokens: list[int] = []
        t0 = time.perf_counter()
        prefill = decode = 0.0
        shared = self.shared_kv and not self.fixed_shapes
        past = self._empty_past(1) if self.past_names and not self.shared_kv else {}
        decoder = self._fixed_decoder(ids.shape[1] + max_new_tokens) if self.fixed_shapes else None
        if shared:
            self.kv_buffers = self._shared_buffers(1, ids.shape[1] + max_new_tokens)
        past_len = 0
        seq = ids
        step_ids = ids
        for step in range(max_new_tokens):
            if decoder is not None:
                results = [(decoder.prefill(step_ids) if step == 0 else decoder.step(step_ids)).numpy()]
            elif shared:
                feeds = self._feeds(step_ids, np.ones((1, past_len + step_ids.shape[1])), past_len)
                results = [self._run_shared(feeds)]
                past_len += step_ids.shape[1]
            elif self.past_names:
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
            if nxt in self.stop_ids:
                break
            step_ids = np.array([[nxt]], dtype=np.int64)
            seq = np.concatenate([seq, step_ids], axis=1)
        text_out = tok.decode(out_tokens, skip_special_tokens=True)
        return GenerationResult(text_out, out_tokens, int(ids.shape[1]), prefill, decode, prompt_ids, templated)


def _stop_ids(folder: Path, tokenizer: Any) -> frozenset[int]:
    """The ids generation stops at: the tokenizer's EOS and those of the model's generation_config.json.

    Its ``eos_token_id`` is an id or a list (Llama 3 ends a turn with ``<|eot_id|>``, not its EOS).
    """
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    try:
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    for value in eos if isinstance(eos, list) else [eos]:
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
    return frozenset(ids)

"""Speed of a causal LM on this machine: prefill latency and decode tokens/s at several batch sizes.

What ``qonnx bench`` measures, for a quantized model and (optionally) its floating-point original, so that a
user sees on their own machine whether the smaller model is also the faster one. Random token ids (speed does
not depend on them), one session per model, IOBinding with the KV cache kept on the device:

- prefill: one forward over ``[batch, prompt_len]`` tokens from an empty cache, median of ``repeats``;
- decode: ``new_tokens`` steps of one token per row after that prompt, each step's present bound as the next
  step's past; tokens/s = batch / median step time (the first two steps left out: they allocate).

A lowered model whose attention can share one KV buffer (:func:`qonnx.runtime.decode.fixed_shape_decodable`:
``qonnx lower``'s GroupQueryAttention) is measured the way it is deployed: past and present bound to one buffer per
layer, and on CUDA each decode step replayed as a CUDA graph (:class:`qonnx.runtime.decode.FixedShapeDecoder`);
with a growing cache it would be several times slower on CUDA. Each row names the loop it used.

A model that carries session options for its target's fast kernel (``qonnx.session_config`` metadata, see
:mod:`qonnx.pipeline.deploy`) is measured with them off and on when that provider runs it, and each row says
which was faster.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qonnx.core.errors import ConfigError
from qonnx.core.modelfile import resolve_model_path
from qonnx.runtime.decode import KV_DTYPES, FixedShapeDecoder, fixed_shape_decodable
from qonnx.runtime.evaluate import check_seq_len, model_config
from qonnx.runtime.session import make_session, resolve_device

__all__ = ["GRAPH", "GROWING", "SHARED", "BenchRow", "bench_model", "session_config_of"]


#: The decode loops a row can name.
GROWING = "growing KV"  # past in, present out: a new cache every step
SHARED = "shared KV"  # one buffer per layer, written in place (GroupQueryAttention)
GRAPH = "shared KV + CUDA graph"  # the same, each step replayed as a CUDA graph


@dataclasses.dataclass
class BenchRow:
    """One batch size of one model: prefill latency and decode speed."""

    model: str
    batch: int
    prompt_len: int
    prefill_ms: float
    step_ms: float
    options: str = ""  # the session options used, when the model carries some
    loop: str = GROWING  # how the KV cache was fed: GROWING, SHARED or GRAPH

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second over all rows."""
        return self.batch / (self.step_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with tokens/s."""
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}


def session_config_of(path: Path) -> tuple[str | None, dict[str, str]]:
    """The (provider, session config entries) a model's ``qonnx.session_config`` metadata asks for, or (None, {})."""
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    raw = meta.get("qonnx.session_config")
    if raw is None:
        return None, {}
    try:
        data = json.loads(raw)
        entries = {str(k): str(v) for k, v in data["session_config_entries"].items()}
        return str(data["provider"]), entries
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, {}  # not ours, or damaged: measured as it is


class _Decoder:
    """The decode loop of one session: input names, empty caches, one step with IOBinding."""

    def __init__(self, session: ort.InferenceSession, path: Path) -> None:
        self.session = session
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self.inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in self.inputs or "attention_mask" not in self.inputs:
            raise ConfigError(f"{path}: bench measures causal LMs (input_ids, attention_mask); this model has neither")
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        if not self.past:
            raise ConfigError(f"{path}: bench measures decoding with a KV cache; this model has no past_key_values")
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        odd = sorted({self.inputs[n].type for n in self.past} - set(KV_DTYPES))
        if odd:
            kinds = "float32/float16/float64 or quantized int8/uint8"
            raise ConfigError(f"{path}: bench feeds {kinds} KV caches; this model's are {', '.join(odd)}")
        outputs = {o.name for o in session.get_outputs()}
        if "logits" not in outputs or any(p not in outputs for p in self.present):
            raise ConfigError(f"{path}: the model's outputs are not logits and present.* for its past inputs")

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty(self, batch: int) -> dict[str, ort.OrtValue]:
        out = {}
        for name in self.past:
            info = self.inputs[name]
            dims = [d if isinstance(d, int) else 0 for d in info.shape]
            dims[0], dims[2] = batch, 0
            out[name] = self._value(np.zeros(dims, KV_DTYPES[info.type]))
        return out

    def step(self, ids: np.ndarray, past: dict[str, ort.OrtValue], length: int) -> tuple[float, dict]:
        batch, seq = ids.shape
        io = self.session.io_binding()
        io.bind_ortvalue_input("input_ids", self._value(ids.astype(np.int64)))
        io.bind_ortvalue_input("attention_mask", self._value(np.ones((batch, length + seq), np.int64)))
        if "position_ids" in self.inputs:
            pos = np.arange(length, length + seq, dtype=np.int64)[None].repeat(batch, 0)
            io.bind_ortvalue_input("position_ids", self._value(pos))
        io.bind_output("logits", self.device)
        for name in self.past:
            io.bind_ortvalue_input(name, past[name])
        for name in self.present:
            io.bind_output(name, self.device)
        io.synchronize_inputs()
        start = time.perf_counter()
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        seconds = time.perf_counter() - start
        outs = io.get_outputs()
        return seconds, dict(zip(self.past, outs[1:], strict=True))


def _fixed_shape(
    session: ort.InferenceSession, ids: np.ndarray, new_tokens: int, repeats: int, vocab: int, graph: bool
) -> tuple[list[float], list[float]]:
    """Prefill and step seconds of one batch with :class:`FixedShapeDecoder` (shared buffers, CUDA graph)."""
    batch, prompt_len = ids.shape
    decoder = FixedShapeDecoder(session, batch, prompt_len + new_tokens, cuda_graph=graph)
    rng = np.random.default_rng(1)
    prefill = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        decoder.prefill(ids)  # synchronizes its outputs
        prefill.append(time.perf_counter() - start)
    steps = []
    for _ in range(new_tokens):
        step_ids = rng.integers(0, vocab, size=(batch, 1))
        start = time.perf_counter()
        decoder.step(step_ids)  # synchronizes its outputs
        steps.append(time.perf_counter() - start)
    return prefill, steps


def _vocab(session: ort.InferenceSession) -> int:
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1]
    return vocab if isinstance(vocab, int) else 2  # ids 0/1 exist in every vocabulary


def bench_model(
    model: str | Path,
    *,
    device: str = "cpu",
    batches: Sequence[int] = (1, 4, 16),
    prompt_len: int = 128,
    new_tokens: int = 16,
    repeats: int = 3,
    label: str | None = None,
    session_config: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> list[BenchRow]:
    """Prefill and decode speed of one causal-LM model at each batch size (see the module docstring)."""
    path = resolve_model_path(model)
    check_seq_len(model_config(path.parent), prompt_len + new_tokens, path.parent, "--prompt-len + --new-tokens")
    fixed = fixed_shape_decodable(ir.load(path))  # external data stays on disk
    graph = fixed and resolve_device(device) == "cuda"
    session = make_session(path, device, threads=threads, config_entries=session_config, cuda_graph=graph)
    decoder = _Decoder(session, path)
    graph = graph and decoder.device == "cuda"
    loop = GRAPH if graph else SHARED if fixed else GROWING
    vocab = _vocab(session)
    rng = np.random.default_rng(0)
    rows = []
    options = ", ".join(f"{k}={v}" for k, v in (session_config or {}).items())
    for batch in batches:
        ids = rng.integers(0, vocab, size=(batch, prompt_len))
        try:
            if fixed:
                prefill, steps = _fixed_shape(session, ids, new_tokens, repeats, vocab, graph)
            else:
                prefill = [decoder.step(ids, decoder.empty(batch), 0)[0] for _ in range(max(1, repeats))]
                _, past = decoder.step(ids, decoder.empty(batch), 0)
                steps = []
                for i in range(new_tokens):
                    seconds, past = decoder.step(rng.integers(0, vocab, size=(batch, 1)), past, prompt_len + i)
                    steps.append(seconds)
        except Exception as e:  # ONNX Runtime's failures (out of memory at a large batch, a shape it refuses)
            first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            raise ConfigError(f"{path}: ONNX Runtime failed at batch {batch}: {first}") from None
        kept = steps[2:] if len(steps) > 4 else steps
        rows.append(
            BenchRow(
                label or path.parent.name or path.name,
                batch,
                prompt_len,
                1e3 * statistics.median(prefill),
                1e3 * statistics.median(kept),
                options,
                loop,
            )
        )
    return rows

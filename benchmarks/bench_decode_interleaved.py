"""Decode speed of several causal LMs measured step by step in turn, for cores shared with other work.

Usage: python benchmarks/bench_decode_interleaved.py DIR [DIR ...] [--steps 48] [--prompt-len 128]

Each model gets its session and a prompt of ``--prompt-len`` random tokens (batch 1); then one decode step of
each model in turn, ``--steps`` times, so that load from other processes falls on all of them alike. Prints the
min and median step time per model (the first two steps left out) and tokens/s from the median. The steps are
``qonnx bench``'s (IOBinding, the KV cache kept as OrtValues).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from qonnx.core.modelfile import resolve_model_path
from qonnx.runtime.bench import _Decoder, _vocab
from qonnx.runtime.session import make_session


def main() -> None:
    """Interleave the models' decode steps and print their times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    state = {}
    for folder in args.folders:
        path = resolve_model_path(folder)
        decoder = _Decoder(make_session(path, "cpu", threads=args.threads), path)
        ids = rng.integers(0, _vocab(decoder.session), size=(1, args.prompt_len))
        _, past = decoder.step(ids, decoder.empty(1), 0)
        state[Path(folder).name] = [decoder, past, []]
    for i in range(args.steps):
        for entry in state.values():
            decoder, past, times = entry
            token = rng.integers(0, _vocab(decoder.session), size=(1, 1))
            seconds, entry[1] = decoder.step(token, past, args.prompt_len + i)
            times.append(seconds)
    for name, (_, _, times) in state.items():
        kept = times[2:]
        median = statistics.median(kept)
        print(f"{name}: step min {1e3 * min(kept):.1f} ms, median {1e3 * median:.1f} ms, {1 / median:.2f} tokens/s")


if __name__ == "__main__":
    main()

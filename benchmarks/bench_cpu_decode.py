"""CPU decode speed at batch 16 and 1: each model as exported vs lowered, separate vs shared KV buffers (issue 4).

A decode step of a lowered model (``qonnx lower``: GroupQueryAttention) with separate past and present buffers
copies the whole KV cache into a new present every step; ``qonnx generate`` binds both to one buffer instead
(past_present_share_buffer), as this script's "shared" column does. For each model folder given as NAME=DIR:
a 128-token prompt of random ids at the batch size, then ``--steps`` greedy-shaped steps (random next ids), timed
per step; median over steps after two warm-up steps, then median over ``--rounds`` interleaved rounds (every model
and mode once per round, rotated). Ratios are against the first model's best mode.

    python benchmarks/bench_cpu_decode.py fp32=/tmp/fp32 fp32-low=/tmp/fp32-low w8a8-low=/tmp/w8a8-low \
        --batches 16,1 --rounds 5 [--section-out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from _common import machine, write_section

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench_cpu_decode:start -->", "<!-- bench_cpu_decode:end -->"
PROMPT = 128  # --prompt-len


class Model:
    """One model folder: a CPU session and how its past inputs look."""

    def __init__(self, name: str, folder: str, threads: int) -> None:
        from qonnx.runtime.generate import kv_buffer_shareable
        from qonnx.runtime.session import make_session

        self.name, self.folder = name, folder
        self.session = make_session(folder, "cpu", threads=threads or None)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        path = Path(folder) / "model.onnx" if Path(folder).is_dir() else Path(folder)
        self.shareable = kv_buffer_shareable(ir.load(path))
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab = min(vocab, 1000) if isinstance(vocab, int) else 1000

    def _feeds(self, ids: np.ndarray, start: int, mask_len: int) -> dict[str, np.ndarray]:
        batch = ids.shape[0]
        positions = np.arange(start, start + ids.shape[1], dtype=np.int64)
        return {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, mask_len), np.int64),
            "position_ids": np.repeat(positions[None], batch, 0),
        }

    def decode(self, batch: int, steps: int, shared: bool, prompt: int = PROMPT, seed: int = 0) -> float:
        """Median seconds per decode step after a prompt of ``prompt`` tokens."""
        import onnxruntime as ort

        rng = np.random.default_rng(seed)
        ids = rng.integers(0, self.vocab, (batch, prompt))
        nexts = [rng.integers(0, self.vocab, (batch, 1)) for _ in range(steps)]
        times = []
        if shared:
            size = prompt + steps + 8
            buffers = {
                n: ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, self.inputs[n].shape[1], size, self.inputs[n].shape[3]), np.float32)
                )
                for n in self.past
            }

            def run(x: np.ndarray, start: int) -> None:
                feeds = self._feeds(x, start, start + x.shape[1])  # alive until the run: CPU inputs wrap it
                io = self.session.io_binding()
                for k, v in feeds.items():
                    io.bind_cpu_input(k, v)
                io.bind_output("logits")
                for past, present in zip(self.past, self.present, strict=True):
                    io.bind_ortvalue_input(past, buffers[past])
                    io.bind_ortvalue_output(present, buffers[past])
                self.session.run_with_iobinding(io)

            run(ids, 0)
            for i, x in enumerate(nexts):
                t = time.perf_counter()
                run(x, prompt + i)
                times.append(time.perf_counter() - t)
        else:
            names = ["logits", *self.present]
            past = {
                n: np.zeros((batch, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), np.float32) for n in self.past
            }
            feeds = self._feeds(ids, 0, prompt)
            out = self.session.run(names, {**feeds, **past})
            for i, x in enumerate(nexts):
                past = dict(zip(self.past, out[1:], strict=True))
                feeds = self._feeds(x, prompt + i, prompt + i + 1)
                t = time.perf_counter()
                out = self.session.run(names, {**feeds, **past})
                times.append(time.perf_counter() - t)
        return statistics.median(times[2:])


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = [Model(*spec.split("=", 1), threads=args.threads) for spec in args.models]
    modes = [(m, shared) for m in models for shared in ((False, True) if m.shareable else (False,))]
    batches = [int(b) for b in args.batches.split(",")]
    samples: dict[tuple[str, bool, int], list[float]] = {}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for batch in batches:
            for model, shared in order:
                seconds = model.decode(batch, args.steps, shared, args.prompt_len, seed=r)
                samples.setdefault((model.name, shared, batch), []).append(seconds)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return {"samples": samples, "models": [(m.name, m.folder, m.shareable) for m in models], "batches": batches}


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    samples = results["samples"]
    batches = results["batches"]
    ref = results["models"][0][0]
    lines = [
        START,
        "## CPU decode: exported vs lowered, separate vs shared KV buffers (issue 4)",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/"
        f"bench_cpu_decode.py {' '.join(args.models)} --batches {args.batches} --rounds {args.rounds} --steps "
        f"{args.steps} --prompt-len {args.prompt_len}` on {machine()}.",
        f"Decode after a {args.prompt_len}-token prompt; step time = median over {args.steps} steps (2 warm-up), "
        f"then median over {args.rounds} interleaved rounds; tokens/s = batch / step time. separate: past and "
        "present as separate arrays (the whole cache copied into present every step); shared: one KV buffer per "
        "layer bound to both (how `qonnx generate` runs a model with GroupQueryAttention). Ratio: against "
        f"{ref}'s best mode.",
        "",
        "| model | KV buffers | " + " | ".join(f"batch {b} step (ms) | tokens/s | x {ref}" for b in batches) + " |",
        "|---|---|" + "---:|---:|---:|" * len(batches),
    ]
    best = {b: min(statistics.median(v) for (n, _, bb), v in samples.items() if n == ref and bb == b) for b in batches}
    for name, _, shareable in results["models"]:
        for shared in (False, True) if shareable else (False,):
            cells = []
            for b in batches:
                step = statistics.median(samples[(name, shared, b)])
                cells.append(f"{step * 1e3:.1f} | {b / step:.0f} | {best[b] / step:.2f}x")
            lines.append(f"| {name} | {'shared' if shared else 'separate'} | " + " | ".join(cells) + " |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=FOLDER, the first is the reference")
    p.add_argument("--batches", default="16,1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--section-out", help="write the RESULTS.md section here instead of into RESULTS.md")
    p.add_argument("--prompt-len", type=int, default=PROMPT)
    args = p.parse_args(argv)
    if any("=" not in m for m in args.models):
        p.error("models are NAME=FOLDER")
    section = render(run(args), args)
    print(section)
    if args.section_out:
        Path(args.section_out).write_text(section)
    else:
        write_section(HERE / "RESULTS.md", section, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())

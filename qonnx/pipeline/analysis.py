"""``qonnx.analyze``: rank layers by the error they cause when quantized alone.

Every layer the scheme would quantize is fake-quantized on its own (its weight quantized exactly as
``qonnx.quantize`` would store it, then dequantized, :mod:`qonnx.pipeline.fake_quant`) and fed into one ONNX Runtime
session of the float model (:class:`qonnx.runtime.sensitivity.WeightSwapSession`), run over calibration windows:
the output SQNR and, for a causal LM, the KL divergence from the float model's next-token distribution and the
perplexity change are that layer's sensitivity. The ranking is what mixed precision
(:mod:`qonnx.pipeline.mixed_precision`) spends its budget on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qonnx.core.config import SchemeConfig
from qonnx.core.errors import ConfigError, escape_name
from qonnx.pipeline.fake_quant import FakeQuantModel
from qonnx.runtime.data import PYDOC
from qonnx.runtime.sensitivity import Measurement

__all__ = ["LayerSensitivity", "Sensitivity", "analyze", "measure_layers"]


@dataclasses.dataclass
class LayerSensitivity:
    """One layer quantized alone, against the float model.

    Attributes:
        index: position among the analysed layers, in graph order.
        node, module, op_type: the (first) node reading the weight and its source module path.
        weight: the stored weight (initializer) name.
        shape: the weight as the node reads it ([K, N] for MatMul/Gemm).
        params: weights in the layer.
        sqnr_db: output SQNR (a causal LM's logits; else the worst float output).
        kl: mean KL divergence of the next-token distribution from the float model's (causal LMs), in nats
            per token: what causal LMs are ranked by (the NLL change of a single layer is mostly noise).
        nll_increase: mean negative log-likelihood per token minus the float model's (causal LMs), in nats.
        bytes_float, bytes_quantized: the weight's bytes in floating point and as quantized (codes, scales,
            zero points).
    """

    index: int
    node: str
    module: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    params: int
    sqnr_db: float
    kl: float | None
    nll_increase: float | None
    bytes_float: int
    bytes_quantized: int

    @property
    def ppl_change(self) -> float | None:
        """Relative perplexity change (0.01 = +1%), for causal LMs."""
        return None if self.nll_increase is None else math.expm1(self.nll_increase)

    @property
    def score(self) -> float:
        """What the ranking sorts on, larger is worse: the KL divergence, else the relative output noise power."""
        if self.kl is not None:
            return self.kl
        return 10 ** (-self.sqnr_db / 10) if math.isfinite(self.sqnr_db) else (0.0 if self.sqnr_db > 0 else math.inf)

    @property
    def label(self) -> str:
        """The most readable name: module path, else node, else weight (escaped: it is printed)."""
        return escape_name(self.module or self.node or self.weight)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        d["sqnr_db"] = round(min(self.sqnr_db, 999.0), 3) if math.isfinite(self.sqnr_db) or self.sqnr_db > 0 else None
        d["ppl_change"] = None if self.ppl_change is None else round(self.ppl_change, 6)
        return d


@dataclasses.dataclass
class Sensitivity:
    """What :func:`analyze` measured: layers worst first, and what they were measured on."""

    model: str
    config: dict[str, Any]
    layers: list[LayerSensitivity]
    skipped: list[tuple[str, str]]
    causal_lm: bool
    feeds: int
    seq_len: int | None
    float_nll: float | None
    all_quantized: Measurement
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        ppl = None if self.float_nll is None else math.exp(self.float_nll)
        everything = self.all_quantized
        return {
            "model": self.model,
            "config": self.config,
            "measured_on": {"causal_lm": self.causal_lm, "feeds": self.feeds, "seq_len": self.seq_len},
            "float_ppl": ppl,
            "float_nll": self.float_nll,
            "all_quantized": {
                "sqnr_db": _finite(everything.sqnr_db),
                "ppl": None if everything.nll is None else math.exp(everything.nll),
                "nll": everything.nll,
                "kl": everything.kl,
            },
            "seconds": round(self.seconds, 2),
            "layers": [r.to_dict() for r in self.layers],
            "skipped": [{"layer": n, "reason": why} for n, why in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sensitivity:
        """The inverse of :meth:`to_dict` (``qonnx analyze --json``)."""
        names = [f.name for f in dataclasses.fields(LayerSensitivity)]
        layers = []
        for row in d["layers"]:
            values = {n: row[n] for n in names}
            values["shape"] = tuple(values["shape"])
            values["sqnr_db"] = -math.inf if values["sqnr_db"] is None else float(values["sqnr_db"])
            layers.append(LayerSensitivity(**values))
        measured, everything = d["measured_on"], d["all_quantized"]

        def nll(value: Any, ppl: Any) -> float | None:
            return float(value) if value is not None else (math.log(ppl) if ppl else None)

        return cls(
            model=d["model"],
            config=dict(d["config"]),
            layers=layers,
            skipped=[(x["layer"], x["reason"]) for x in d.get("skipped", [])],
            causal_lm=bool(measured["causal_lm"]),
            feeds=int(measured["feeds"]),
            seq_len=measured["seq_len"],
            float_nll=nll(d.get("float_nll"), d.get("float_ppl")),
            all_quantized=Measurement(
                -math.inf if everything["sqnr_db"] is None else everything["sqnr_db"],
                nll(everything.get("nll"), everything.get("ppl")),
                everything.get("kl"),
            ),
            seconds=float(d.get("seconds", 0.0)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        """Read a ``qonnx analyze --json`` file."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the sensitivity file: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a 'qonnx analyze --json' file ({type(e).__name__}: {e})") from None

    def table(self, top: int | None = None) -> str:
        """A text table, worst first (``top`` rows)."""
        rows = self.layers if top is None else self.layers[:top]
        width = max([len(r.label) for r in rows] + [5])
        head = f"{'rank':>4}  {'layer':<{width}}  {'params':>9}  {'SQNR dB':>7}"
        if self.causal_lm:
            head += f"  {'KL nats':>9}  {'dNLL':>8}  {'ppl':>7}"
        lines = [head]
        for i, r in enumerate(rows):
            line = f"{i + 1:>4}  {r.label:<{width}}  {r.params:>9,}  {r.sqnr_db:>7.2f}"
            if r.kl is not None and r.nll_increase is not None and r.ppl_change is not None:
                line += f"  {r.kl:>9.6f}  {r.nll_increase:>+8.5f}  {r.ppl_change:>+7.2%}"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG, per layer in graph order, coloured by projection: perplexity change and KL (causal LMs), or SQNR."""
        import matplotlib  # heavy (about 1 s): only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # heavy, as above
        from matplotlib.patches import Patch  # heavy, as above

        by_order = sorted(self.layers, key=lambda r: r.index)
        kinds = [r.label.rsplit(".", 1)[-1].replace("$", r"\$") for r in by_order]  # "$": matplotlib's math
        palette = plt.get_cmap("tab10")
        colors = {k: palette(i % 10) for i, k in enumerate(dict.fromkeys(kinds))}
        if self.causal_lm:
            panels = [
                ([100 * (r.ppl_change or 0.0) for r in by_order], "ppl change, quantized alone (%)"),
                ([r.kl or 0.0 for r in by_order], "KL vs float (nats/token)"),
            ]
        else:
            panels = [([r.sqnr_db if math.isfinite(r.sqnr_db) else np.nan for r in by_order], "output SQNR (dB)")]
        width = max(8.0, min(24.0, len(by_order) * 0.08))
        fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.6 * len(panels) + 0.8), sharex=True, squeeze=False)
        for ax, (values, label) in zip(axes[:, 0], panels, strict=True):
            ax.bar(range(len(values)), values, color=[colors[k] for k in kinds], width=0.85)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        top = axes[0, 0]
        if len(colors) <= 12:
            handles = [Patch(color=color, label=kind) for kind, color in colors.items()]
            top.legend(handles=handles, fontsize=7, ncol=min(len(colors), 7), loc="upper left")
        worst = axes[-1, 0]  # name the three worst layers where the ranking is drawn
        for r in self.layers[:3]:
            value = (r.kl or 0.0) if self.causal_lm else r.sqnr_db
            if math.isfinite(value):
                label = r.label.replace("$", r"\$")  # a "$" would start matplotlib's math mode
                worst.annotate(label, (by_order.index(r), value), fontsize=6, rotation=0, ha="center", va="bottom")
        axes[-1, 0].set_xlabel("quantized layer, in graph order")
        algo = self.config.get("algo", "rtn")
        algo = algo.get("name", "") if isinstance(algo, dict) else str(algo)
        block = self.config.get("block_size")
        scheme = f"{self.config.get('scheme', '')} {algo} block {block if block else 'per channel'}"
        scheme += " symmetric" if self.config.get("symmetric") else ""
        measured = f"{self.feeds} x {self.seq_len} calibration tokens" if self.causal_lm else f"{self.feeds} feeds"
        name = Path(self.model).parent.name or self.model
        top.set_title(f"{name}: {scheme}, each layer quantized alone ({measured})", fontsize=9)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def measure_layers(model: FakeQuantModel, progress: bool, start: float) -> Sensitivity:
    """Every layer of ``model`` quantized alone, then all of them at once."""
    rows = []
    float_nll = model.session.float_nll
    _ = model.hessians  # collected before the progress bar starts
    for i in tqdm(range(len(model.layers)), desc="sensitivity", unit="layer", file=sys.stderr, disable=not progress):
        layer = model.layers[i]
        m = model.session.measure({layer.name: model.fake(i)})
        cand = layer.cand
        rows.append(
            LayerSensitivity(
                index=i,
                node=cand.node.name or "",
                module=cand.module,
                op_type=cand.node.op_type,
                weight=layer.name,
                shape=tuple(int(d) for d in (cand.shape or (cand.k, cand.n))),
                params=layer.params,
                sqnr_db=m.sqnr_db,
                kl=m.kl,
                nll_increase=None if m.nll is None or float_nll is None else m.nll - float_nll,
                bytes_float=int(cand.tensor().nbytes),
                bytes_quantized=model.quantized(i).nbytes,
            )
        )
    everything = model.measure({i: layer.cfg for i, layer in enumerate(model.layers)})
    rows.sort(key=lambda r: (-r.score, r.sqnr_db, r.index))
    return Sensitivity(
        model=str(model.path),
        config=model.config.to_dict(),
        layers=rows,
        skipped=model.skipped,
        causal_lm=model.session.causal_lm,
        feeds=len(model.session.feeds),
        seq_len=model.seq_len,
        float_nll=float_nll,
        all_quantized=everything,
        seconds=time.perf_counter() - start,
    )


def analyze(
    model: Any,
    config: SchemeConfig | None = None,
    *,
    targets: Mapping[str, SchemeConfig | None] | None = None,
    samples: int = 4,
    seq_len: int = 256,
    data: str | os.PathLike = PYDOC,
    device: str = "cpu",
    progress: bool = False,
) -> Sensitivity:
    """Rank the layers ``config`` would quantize by the error each causes when quantized alone.

    Args:
        model: a .onnx path, a folder holding model.onnx, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        config: a weight-only scheme (default ``W4A16()``); ``algo="gptq"`` collects its calibration Hessians.
        targets: per-layer overrides as for :func:`qonnx.quantize` (``None`` leaves a layer out).
        samples: calibration windows (or .npz batches, or made-up inputs for a model without tokenizer).
        seq_len: tokens per window.
        data: ``"pydoc"`` (from token 60,000, never the evaluation windows), a text file, or a ``.npz`` of feeds.
        device: where ONNX Runtime runs ("cpu", "cuda" or "auto").
        progress: a progress bar on stderr.

    Returns:
        A :class:`Sensitivity`, layers worst first.
    """
    start = time.perf_counter()
    fq = FakeQuantModel(
        model, config, targets, samples=samples, seq_len=seq_len, data=data, device=device, progress=progress
    )
    try:
        return measure_layers(fq, progress, start)
    finally:
        fq.close()

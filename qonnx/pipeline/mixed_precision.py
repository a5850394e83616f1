"""Mixed precision: keep the layers that hurt most in 8 bits (or floating point) to meet a budget.

Two budgets, both decided on calibration windows (pydoc from token 60,000), never on evaluation data:

* ``Budget(target_bits=4.5)``: average stored bits per quantized weight, scales and zero points included,
  from the byte counts of the real quantized arrays. Greedy: layers are promoted to 8 bits (the same
  format, block size, symmetry and algorithm) in order of sensitivity per extra byte, each one that still
  fits, so that the average never exceeds the budget.
* ``Budget(max_ppl_increase=0.05)``: the mixed model's calibration perplexity within 5% of the float
  model's, re-measured with the mixed weights. The most sensitive layers are promoted to 8 bits first
  (the shortest such prefix of the ranking is searched); when even 8 bits everywhere is not enough, the most
  sensitive layers are kept in floating point instead, then the 8-bit prefix is searched again.

Sensitivity is :func:`qonnx.analyze`'s: each layer quantized alone. The result is a ``targets`` mapping
(weight name -> config, or None for floating point) for :func:`qonnx.quantize`, which
``qonnx.quantize(..., budget=Budget(...))`` applies itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from qonnx.core.config import W8A16, SchemeConfig, WeightOnlyConfig
from qonnx.core.errors import ConfigError
from qonnx.pipeline.analysis import Sensitivity, measure_layers
from qonnx.pipeline.fake_quant import FakeQuantModel
from qonnx.runtime.data import PYDOC
from qonnx.runtime.sensitivity import Measurement

__all__ = ["Budget", "MixedPrecision", "mixed_precision"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """A mixed-precision budget: exactly one of ``target_bits`` and ``max_ppl_increase``.

    Attributes:
        target_bits: average stored bits per quantized weight (scales and zero points included).
        max_ppl_increase: allowed relative calibration-perplexity increase over the float model (0.05 = 5%).
        samples, seq_len, data: the calibration windows sensitivity and perplexity are measured on.
        device: where ONNX Runtime runs the measurements.
        sensitivity: a ``qonnx analyze --json`` file of this model and scheme: rank by it instead of
            measuring every layer again (the budget's own measurements still run).
    """

    target_bits: float | None = None
    max_ppl_increase: float | None = None
    samples: int = 4
    seq_len: int = 256
    data: str = PYDOC
    device: str = "cpu"
    sensitivity: str | None = None

    def __post_init__(self) -> None:
        if (self.target_bits is None) == (self.max_ppl_increase is None):
            raise ConfigError("budget: give exactly one of target_bits and max_ppl_increase")
        if self.target_bits is not None and (
            not isinstance(self.target_bits, (int, float)) or not 0 < self.target_bits <= 32
        ):
            raise ConfigError(f"budget: target_bits must be in (0, 32], got {self.target_bits!r}")
        if self.max_ppl_increase is not None and (
            not isinstance(self.max_ppl_increase, (int, float)) or not 0 <= self.max_ppl_increase < 100
        ):
            raise ConfigError(f"budget: max_ppl_increase is a fraction (0.05 = 5%) >= 0, got {self.max_ppl_increase!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"budget: samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"budget: seq_len must be an integer >= 2, got {self.seq_len!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MixedPrecision:
    """The layers a budget promotes, as ``targets`` for :func:`qonnx.quantize`, and the figures behind them.

    Attributes:
        budget: what was asked.
        targets: weight name -> promoted config (8-bit), or None for floating point.
        promoted: one entry per promoted layer (weight, module, to, rank, figures), most sensitive first.
        bits: average stored bits per quantized weight: ``scheme`` (nothing promoted) and ``mixed``.
        calibration: for causal LMs, the calibration perplexities: float, scheme everywhere, mixed.
        sensitivity: the per-layer analysis.
        hessians: GPTQ's calibration Hessians when the scheme uses GPTQ (quantize reuses them).
    """

    budget: Budget
    targets: dict[str, SchemeConfig | None]
    promoted: list[dict[str, Any]]
    bits: dict[str, float]
    calibration: dict[str, float | None]
    sensitivity: Sensitivity
    seconds: float
    hessians: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def reason(self, weight: str) -> str | None:
        """Why a layer was promoted, for its layer record (None when it was not)."""
        for p in self.promoted:
            if p["weight"] == weight:
                what = "kept in floating point" if p["to"] == "float" else f"promoted to {p['to']}"
                return f"{what} by the mixed-precision budget ({self._budget_text()}; sensitivity rank {p['rank']})"
        return None

    def _budget_text(self) -> str:
        b = self.budget
        if b.target_bits is not None:
            return f"target {b.target_bits:g} bits per weight"
        return f"perplexity within +{b.max_ppl_increase:.1%}"

    def to_dict(self, *, layers: bool = False) -> dict[str, Any]:
        """JSON-ready summary (with the whole sensitivity table when ``layers``)."""
        out: dict[str, Any] = {
            "budget": self.budget.to_dict(),
            "promoted": self.promoted,
            "bits_per_weight": {k: round(v, 4) for k, v in self.bits.items()},
            "calibration_ppl": {k: (None if v is None else round(v, 4)) for k, v in self.calibration.items()},
            "seconds": round(self.seconds, 2),
        }
        if layers:
            out["sensitivity"] = self.sensitivity.to_dict()
        return out


def eight_bit(cfg: WeightOnlyConfig) -> W8A16:
    """The 8-bit config that stores like ``cfg``: same format, block size, symmetry and algorithm."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init and f.name != "bits"}
    return W8A16(**fields)


def _rtn(cfg: WeightOnlyConfig) -> WeightOnlyConfig:
    return dataclasses.replace(cfg, algo="rtn")


#: Config fields that change how a layer is stored but not the numbers it computes.
_STORAGE_ONLY = ("format", "accuracy_level")


def _reuse(ctx: FakeQuantModel, source: str | os.PathLike | Sensitivity) -> Sensitivity:
    """A saved analysis, checked against this model and scheme, its layers indexed as ``ctx``'s."""
    s = source if isinstance(source, Sensitivity) else Sensitivity.load(source)
    where = "sensitivity" if isinstance(source, Sensitivity) else str(source)

    def numbers(config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in _STORAGE_ONLY}

    if numbers(s.config) != numbers(json.loads(json.dumps(ctx.config.to_dict()))):
        raise ConfigError(
            f"{where}: measured with {s.config.get('scheme')} {numbers(s.config)}, not the scheme asked for now; "
            "run qonnx analyze again with the same options"
        )
    index = {layer.name: i for i, layer in enumerate(ctx.layers)}
    saved = {r.weight for r in s.layers}
    if saved != set(index):
        raise ConfigError(
            f"{where}: its {len(saved)} layers are not the {len(index)} this model quantizes "
            f"({len(saved ^ set(index))} differ); run qonnx analyze on this model with the same --exclude"
        )
    return dataclasses.replace(s, layers=[dataclasses.replace(r, index=index[r.weight]) for r in s.layers])


def _smallest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The smallest k in (lo, hi] with ok(k), ok taken as monotone: galloping up from lo, then bisection.

    None when not even ok(hi); ok(hi) is only evaluated when the gallop gets there.
    """
    step, last_bad = 1, lo
    while True:
        k = min(lo + step, hi)
        if ok(k):
            break
        if k == hi:
            return None
        last_bad, step = k, 2 * step
    good = k
    while good - last_bad > 1:
        mid = (last_bad + good) // 2
        if ok(mid):
            good = mid
        else:
            last_bad = mid
    return good


def _ppl(m: Measurement | None) -> float | None:
    return None if m is None or m.nll is None else math.exp(m.nll)


def mixed_precision(
    model: Any,
    config: SchemeConfig | None = None,
    budget: Budget | None = None,
    *,
    targets: Mapping[str, SchemeConfig | None] | None = None,
    progress: bool = False,
) -> MixedPrecision:
    """Choose the layers to keep in 8 bits (or floating point) so that quantizing with ``config`` meets ``budget``.

    Args:
        model: as for :func:`qonnx.quantize` (an ``onnx_ir.Model`` is not changed).
        config: the weight-only scheme (default ``W4A16()``).
        budget: the :class:`Budget`.
        targets: the per-layer overrides that quantize will get; layers they keep float or give another
            config are measured with that config; only layers of fewer than 8 bits are promoted.
        progress: progress bars and the search's steps on stderr.

    Returns:
        A :class:`MixedPrecision`; pass ``{**targets, **result.targets}`` to :func:`qonnx.quantize`.
    """
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a Budget(...), not {type(budget).__name__}")
    start = time.perf_counter()
    ctx = FakeQuantModel(
        model,
        config,
        targets,
        samples=budget.samples,
        seq_len=budget.seq_len,
        data=budget.data,
        device=budget.device,
        progress=progress,
    )
    try:
        params = sum(layer.params for layer in ctx.layers)
        # sizes do not depend on how codes are chosen: round to nearest, without GPTQ's cost
        q_bytes = {i: ctx.quantized(i, _rtn(layer.cfg)).nbytes for i, layer in enumerate(ctx.layers)}
        base_bits = 8 * sum(q_bytes.values()) / params
        if budget.target_bits is not None and base_bits > budget.target_bits:
            raise ConfigError(_below_floor(ctx, budget.target_bits, base_bits))
        if budget.max_ppl_increase is not None and not ctx.session.causal_lm:
            raise ConfigError(
                "max_ppl_increase needs a causal LM export with its tokenizer (perplexity); use target_bits"
            )
        if budget.sensitivity is not None:
            analysis = _reuse(ctx, budget.sensitivity)
            everything = ctx.measure({i: layer.cfg for i, layer in enumerate(ctx.layers)})
        else:
            analysis = measure_layers(ctx, progress, start)
            everything = analysis.all_quantized
        ranked = [r.index for r in analysis.layers]  # worst first
        low = [i for i in ranked if ctx.layers[i].cfg.bits < 8 and ctx.layers[i].cfg.grid == "int"]
        choice: dict[int, WeightOnlyConfig | None] = {}
        if budget.target_bits is not None:
            choice = _by_bits(ctx, analysis, low, q_bytes, params, budget.target_bits)
        else:
            max_nll = math.log1p(float(budget.max_ppl_increase or 0.0))
            choice = _by_ppl(ctx, low, max_nll, everything, progress)
        mixed = {i: choice.get(i, layer.cfg) for i, layer in enumerate(ctx.layers)}
        final = ctx.measure({i: c for i, c in mixed.items() if c is not None})
        kept = [i for i, c in mixed.items() if c is not None]
        stored = sum(ctx.quantized(i, mixed[i]).nbytes for i in kept)
        kept_params = sum(ctx.layers[i].params for i in kept)
        by_index = {r.index: r for r in analysis.layers}
        promoted = [
            {
                "weight": ctx.layers[i].name,
                "module": ctx.layers[i].cand.module,
                "node": ctx.layers[i].cand.node.name or "",
                "to": "float" if choice[i] is None else choice[i].name,  # type: ignore[union-attr]
                "rank": ranked.index(i) + 1,
                "kl": by_index[i].kl,
                "nll_increase": by_index[i].nll_increase,
                "sqnr_db": round(by_index[i].sqnr_db, 3),
            }
            for i in ranked
            if i in choice
        ]
        float_nll = ctx.session.float_nll
        return MixedPrecision(
            budget=budget,
            targets={ctx.layers[i].name: c for i, c in choice.items()},
            promoted=promoted,
            bits={"scheme": base_bits, "mixed": 8 * stored / kept_params if kept_params else 0.0},
            calibration={
                "float": None if float_nll is None else math.exp(float_nll),
                "scheme": _ppl(everything),
                "mixed": _ppl(final),
            },
            sensitivity=analysis,
            seconds=time.perf_counter() - start,
            hessians=ctx.hessians,
        )
    finally:
        ctx.close()


def _by_bits(
    ctx: FakeQuantModel, analysis: Sensitivity, low: list[int], q_bytes: dict[int, int], params: int, target: float
) -> dict[int, WeightOnlyConfig | None]:
    """Greedy: promote to 8 bits by sensitivity per extra byte, every layer that still fits the budget."""
    total = sum(q_bytes.values())
    limit = target * params / 8
    score = {r.index: r.score for r in analysis.layers}
    extra = {}
    for i in low:
        extra[i] = ctx.quantized(i, _rtn(eight_bit(ctx.layers[i].cfg))).nbytes - q_bytes[i]
    order = sorted((i for i in low if score[i] > 0 and extra[i] > 0), key=lambda i: -score[i] / extra[i])
    choice: dict[int, WeightOnlyConfig | None] = {}
    for i in order:
        if total + extra[i] <= limit:
            choice[i] = eight_bit(ctx.layers[i].cfg)
            total += extra[i]
    return choice


def _below_floor(ctx: FakeQuantModel, target: float, floor: float) -> str:
    ragged = sorted(
        {
            layer.cand.k
            for layer in ctx.layers
            if layer.cfg.format == "matmulnbits" and layer.cfg.block_size and layer.cand.k % layer.cfg.block_size
        }
    )
    hint = (
        f"; MatMulNBits pads K={', '.join(map(str, ragged))} to whole blocks of {ctx.config.block_size} "
        "(format qdq does not)"
        if ragged
        else ""
    )
    return (
        f"target {target:g} bits per weight is below what the scheme itself stores "
        f"({floor:.3f} bits per weight with scales and zero points{hint})"
    )


def _by_ppl(
    ctx: FakeQuantModel, low: list[int], max_nll: float, everything: Measurement, progress: bool
) -> dict[int, WeightOnlyConfig | None]:
    """The shortest prefix of the ranking in 8 bits (then in floating point) that meets the perplexity budget.

    ``everything``: the measurement with every layer quantized by its own config (nothing promoted).
    """
    float_nll = ctx.session.float_nll
    assert float_nll is not None and everything.nll is not None
    seen: dict[tuple[int, int], bool] = {(0, 0): everything.nll - float_nll <= max_nll}

    def assignment(floats: int, eights: int) -> dict[int, WeightOnlyConfig | None]:
        out: dict[int, WeightOnlyConfig | None] = {i: None for i in low[:floats]}
        out.update({i: eight_bit(ctx.layers[i].cfg) for i in low[floats : floats + eights]})
        return out

    def ok(floats: int, eights: int) -> bool:
        if (floats, eights) not in seen:
            choice = assignment(floats, eights)
            configs = {i: choice.get(i, layer.cfg) for i, layer in enumerate(ctx.layers)}
            m = ctx.measure({i: c for i, c in configs.items() if c is not None})
            assert m.nll is not None
            seen[(floats, eights)] = m.nll - float_nll <= max_nll
            if progress:
                print(
                    f"qonnx: mixed precision: {floats} float + {eights} 8-bit layers: calibration ppl "
                    f"{math.exp(m.nll):.4f} (float {math.exp(float_nll):.4f}, +{math.expm1(m.nll - float_nll):.2%})",
                    file=sys.stderr,
                )
        return seen[(floats, eights)]

    n = len(low)
    if ok(0, 0):
        return {}
    eights = _smallest(lambda k: ok(0, k), 0, n)  # 8 bits for the fewest most sensitive layers
    if eights is not None:
        return assignment(0, eights)
    floats = _smallest(lambda j: ok(j, n - j), 0, n) or n  # 8 bits everywhere is not enough: float first
    if ok(floats, 0):
        return assignment(floats, 0)
    return assignment(floats, _smallest(lambda k: ok(floats, k), 0, n - floats) or n - floats)


def parse_percent(text: str) -> float:
    """``"5%"`` or ``"0.05"`` as a fraction (0.05); a one-line ConfigError otherwise."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ConfigError(f"expected a percentage such as 5% (or a fraction such as 0.05), not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"expected a non-negative percentage, not {text!r}")
    return value

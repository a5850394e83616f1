"""Weight-rounding algorithms as data: GPTQ, AWQ, HQQ (round-to-nearest is the string ``"rtn"``).

An algorithm config says how weights are rounded; the scheme (:mod:`qonnx.core.config`) says to what. The
solvers are in ``qonnx.passes`` (gptq, awq, hqq); calibration that feeds them runs in ``qonnx.runtime``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from qonnx.core.errors import ConfigError

__all__ = ["ALGOS", "AWQ", "GPTQ", "HQQ", "Algo", "algo_from_name"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ:
    """GPTQ (Frantar et al., 2022): round weights so that the layer's outputs, not its weights, stay close.

    A weight is rounded one K row at a time and each row's rounding error is folded into the rows not yet
    rounded, weighted by the inverse Hessian ``H = 2/n X^T X`` of the layer's input. The Hessians come from
    calibration data run through ONNX Runtime on the *float* model, all layers at once (the "non-sequential"
    mode), or with ``sequential`` stage by stage on the partly quantized model.

    Attributes:
        damp: fraction of the mean Hessian diagonal added to the diagonal (percdamp) before inverting.
        block: rows per lazy batch update; a speed knob that does not change the result much.
        calib_samples: calibration windows (sequences).
        calib_seq_len: tokens per window.
        calib_data: ``"pydoc"`` (the standard corpus, from token 60,000: disjoint from evaluation),
            a ``.txt`` / ``.jsonl`` file tokenized with the model folder's tokenizer, or a ``.npz`` file of
            feeds (one array per model input, the first axis indexing batches) for a model without one.
        act_order: round the rows of K in order of decreasing Hessian diagonal (the inputs with the most
            energy first). Blocks stay contiguous along K ("static groups": their scales and zero points are
            chosen from the original weight), so the stored format and the kernels are unchanged.
        clip_search: choose each block's range among shrunk ranges (x1.00 .. x0.80) for the lowest weight
            error (the reference's ``Quantizer(mse=True)``); else the block's full range.
        sequential: take each layer's Hessian from the model whose earlier layers are already quantized, stage
            by stage (:mod:`qonnx.pipeline.gptq_sequential`; one calibration pass per stage) instead of all from the
            float model in one pass.
        stream_layers: cut the graph at its decoder-layer boundaries and calibrate and solve one layer at a
            time, in one pass over the data, each layer fed the quantized earlier layers' outputs
            (:mod:`qonnx.pipeline.gptq_stream`): ONNX Runtime holds one layer's weights at a time. With
            ``sequential`` the stages within each layer are solved in turn too; without, a layer's Hessians
            come from one run.
    """

    name: ClassVar[str] = "gptq"
    damp: float = 0.01
    block: int = 128
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_data: str = "pydoc"
    act_order: bool = True
    clip_search: bool = True
    sequential: bool = False
    stream_layers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"gptq: block must be a positive integer, got {self.block!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"gptq: calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not isinstance(self.calib_seq_len, int) or self.calib_seq_len < 2:
            raise ConfigError(f"gptq: calib_seq_len must be an integer >= 2, got {self.calib_seq_len!r}")
        for flag in ("act_order", "clip_search", "sequential", "stream_layers"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"gptq: {flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ:
    """AWQ (Lin et al., 2023): scale each weight's input channels by ``s = rms(x)^a`` before rounding.

    The inputs that carry the most activation energy get finer weight grids; ``1/s`` is folded into what
    produces the input (the preceding RMSNorm/LayerNorm weight, or the preceding linear's columns: the up
    projection under SwiGLU); layers whose input nothing can absorb keep ``s = 1``. ``a`` is searched per group
    of layers that read the same input, and each block's range is then shrunk (clip search), both for the
    least output error on calibration data, computed exactly from the Hessians GPTQ uses (one calibration
    pass). With ``gptq`` set the scaled weights are then rounded by GPTQ ("awq+gptq"), which chooses its own
    ranges (its ``clip_search``). See :mod:`qonnx.passes.awq`.

    Attributes:
        grid: values of ``a`` tried in [0, 1) (``grid`` evenly spaced points, searched coarse to fine).
        clip_search: search each block's range shrink for the least output error (awq; GPTQ's own with gptq).
        calib_samples, calib_seq_len, calib_data: calibration data, as for :class:`GPTQ`.
        gptq: round the scaled weights with GPTQ instead of to nearest.
    """

    name: ClassVar[str] = "awq"
    grid: int = 20
    clip_search: bool = True
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_data: str = "pydoc"
    gptq: GPTQ | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"awq: grid must be a positive integer, got {self.grid!r}")
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"awq: clip_search must be True or False, got {self.clip_search!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"awq: calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not isinstance(self.calib_seq_len, int) or self.calib_seq_len < 2:
            raise ConfigError(f"awq: calib_seq_len must be an integer >= 2, got {self.calib_seq_len!r}")
        if self.gptq is not None:
            if not isinstance(self.gptq, GPTQ):
                raise ConfigError(f"awq: gptq must be a GPTQ(...) config or None, got {self.gptq!r}")
            if self.gptq.sequential or self.gptq.stream_layers:
                raise ConfigError(
                    "awq: sequential GPTQ applies to algo 'gptq' alone (layer-streamed too), not after AWQ's scaling"
                )
            # one calibration run serves both: GPTQ uses AWQ's data
            object.__setattr__(
                self,
                "gptq",
                dataclasses.replace(
                    self.gptq,
                    calib_samples=self.calib_samples,
                    calib_seq_len=self.calib_seq_len,
                    calib_data=self.calib_data,
                ),
            )

    @property
    def label(self) -> str:
        """The label "awq+gptq" when GPTQ rounds the scaled weights, else "awq"."""
        return "awq+gptq" if self.gptq is not None else "awq"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        out = {"name": self.label, **dataclasses.asdict(self)}
        out["gptq"] = None if self.gptq is None else self.gptq.to_dict()
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class HQQ:
    """HQQ (Badri & Shaji, 2023): half-quadratic optimisation of each block's zero point, no data needed.

    Minimises ``|| W - dequant(quant(W)) ||_p`` (``p`` < 1 favours fitting most weights exactly and
    letting outliers go) by alternating a shrinkage step on the error with a closed-form zero-point update
    (see :mod:`qonnx.passes.hqq`). Asymmetric codes only (symmetric ones have no zero point). Zero points
    stay fractional in MatMulNBits (2- and 4-bit codes: ONNX Runtime runs those far slower on the CPU than
    packed integer ones); DequantizeLinear and 8-bit MatMulNBits take integers, where HQQ's zero points are
    rounded and give about round-to-nearest.

    Attributes:
        iterations: optimisation steps per weight.
        lp_norm: ``p`` of the error norm.
        beta: initial weight of the quadratic penalty; multiplied by ``kappa`` every step.
        kappa: growth of ``beta`` per step.
    """

    name: ClassVar[str] = "hqq"
    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"hqq: iterations must be a positive integer, got {self.iterations!r}")
        if not isinstance(self.lp_norm, (int, float)) or not 0 < self.lp_norm <= 2:
            raise ConfigError(f"hqq: lp_norm must be in (0, 2], got {self.lp_norm!r}")
        if not isinstance(self.beta, (int, float)) or self.beta <= 0:
            raise ConfigError(f"hqq: beta must be positive, got {self.beta!r}")
        if not isinstance(self.kappa, (int, float)) or self.kappa < 1:
            raise ConfigError(f"hqq: kappa must be >= 1, got {self.kappa!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, with the algorithm name."""
        return {"name": self.name, **dataclasses.asdict(self)}


#: ``algo=`` strings and the configs they stand for.
ALGOS = ("rtn", "gptq", "awq", "awq+gptq", "hqq")
Algo = Literal["rtn"] | GPTQ | AWQ | HQQ


def algo_from_name(name: str) -> Algo:
    """The default config of an algorithm named on the command line (``rtn`` stays a string)."""
    table: dict[str, Any] = {
        "rtn": "rtn",
        "gptq": GPTQ(),
        "awq": AWQ(),
        "awq+gptq": AWQ(gptq=GPTQ()),
        "hqq": HQQ(),
    }
    try:
        return table[name.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown algo {name!r}; choose one of {', '.join(ALGOS)}") from None

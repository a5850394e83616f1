"""AWQ for [K, N] MatMul weights, on the Hessian of their input: pure and graph-free, in torch (CUDA when available).

AWQ (Lin et al., 2023) protects the input channels that carry the most activation energy: the layers that read
an input X multiply their weight rows by ``s = x^a`` (``x`` the RMS of each input channel) and X is divided by
``s`` (folded into whatever produces X), so the product is unchanged and the rows that meet large inputs get a
finer grid. ``a`` is chosen per group of layers that read one input (q/k/v, gate/up) from a grid, for the least
output error; then each block's range is shrunk (clip search), again for the least output error.

The output error needs no activations: for calibration rows X and an effective weight ``W'``,
``||X W - X W'||^2 = n/2 tr((W - W')^T H (W - W'))`` with the Hessian ``H = 2/n X^T X`` that GPTQ collects
(:class:`qonnx.passes.gptq.HessianAccumulator`), so AWQ and GPTQ share one calibration pass. Where AutoAWQ
measures each block's clipping on its own, :func:`search_clip` also counts the error terms between blocks
(one Gauss-Seidel sweep over the blocks): the full output error, and never more than round-to-nearest's.

Rounding follows :func:`qonnx.core.quant.quantize_kn` exactly (its ``shrink`` argument applies a clip search's
result), so the errors compared here are those of the stored weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qonnx.core import numerics
from qonnx.passes.hessian import torch_device

if TYPE_CHECKING:
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

__all__ = [
    "CLIP_SHRINKS",
    "Rounding",
    "ScaleSearch",
    "fake_quantize",
    "output_error",
    "scale_factors",
    "scaled_hessian",
    "search_clip",
    "search_scales",
]

#: Range shrink factors the clip search tries per block and column: 1.00, 0.95, ..., 0.50 (AutoAWQ: 1.00 .. 0.55).
CLIP_SHRINKS = tuple(1 - i / 20 for i in range(11))
_S_MIN, _S_MAX = 1e-4, 1e4


@dataclasses.dataclass(frozen=True)
class Rounding:
    """How a weight is rounded: the arguments of :func:`qonnx.core.quant.quantize_kn`.

    ``bits``-bit codes in blocks of ``block_size`` rows along K (None: one block per column), signed without
    zero points when ``symmetric``, scales stored in ``scale_dtype``.
    """

    bits: int
    block_size: int | None
    symmetric: bool
    scale_dtype: Any = np.float32


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The outcome of :func:`search_scales` for one group of layers.

    Attributes:
        alpha: the chosen exponent ``a`` (None: no scaling did better than round-to-nearest, ``s`` is 1).
        s: per-input-channel factors [K] (float32): weight rows are multiplied by them, the input divided.
        error: the group's output error with ``s``, relative to its output energy ``tr(W^T H W)``.
        rtn_error: the same without scaling (round-to-nearest).
    """

    alpha: float | None
    s: np.ndarray
    error: float
    rtn_error: float


def _blocks(k: int, block_size: int | None) -> list[tuple[int, int]]:
    bs = k if block_size is None else block_size
    return [(i, min(i + bs, k)) for i in range(0, k, bs)]


def _parts(k: int, block_size: int | None) -> list[tuple[int, int, int]]:
    """(first row, rows per block, blocks): the whole blocks, then the ragged last one."""
    bs = k if block_size is None else block_size
    full = k // bs
    parts = [(0, bs, full)] if full else []
    return [*parts, (full * bs, k - full * bs, 1)] if full * bs < k else parts


def _qdq_(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, r: Rounding) -> torch.Tensor:
    """Quantize-dequantize blocks ``x`` [..., rows, N] in place, on ranges ``mn``, ``mx`` [..., N], as quant does.

    The arithmetic of :meth:`qonnx.core.numerics.IntGrid.qparams` in torch (many candidate ranges at once, on
    the GPU when there is one), then the grid's own rounding (:meth:`IntGrid.round`), as
    :func:`qonnx.core.quant.quantize_kn` computes it.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    grid = numerics.IntGrid(r.bits, r.symmetric)
    qmin, qmax = grid.qmin, grid.qmax
    dtype = torch.from_numpy(np.zeros(0, dtype=r.scale_dtype)).dtype
    if r.symmetric:
        v = torch.where(mn.abs() >= mx.abs(), mn, mx)
        scale = (v / qmin).to(dtype).float()
        zpo = torch.full_like(scale, float(grid.offset))  # codes in the unsigned domain, as quant computes them
    else:
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        scale = ((mx - mn) / (qmax - qmin)).to(dtype).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zpo = numerics.round_half_up(qmin - mn / safe).clamp_(qmin, qmax)
    fmax = float(np.finfo(np.float32).max)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale).clamp_(-fmax, fmax)
    zpo = zpo.unsqueeze(-2)
    x.copy_(grid.round(x.mul_(inv.unsqueeze(-2)).add_(zpo)))
    return x.sub_(zpo).mul_(scale.unsqueeze(-2))


def _fake_quantize_(w: torch.Tensor, r: Rounding, shrink: np.ndarray | None = None) -> torch.Tensor:
    """:func:`fake_quantize` in place."""
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    k, n = w.shape
    first = 0
    for r0, rows, count in _parts(k, r.block_size):
        x = w[r0 : r0 + rows * count].view(count, rows, n)
        mn, mx = torch.aminmax(x, dim=1)
        if shrink is not None:
            f = torch.from_numpy(np.ascontiguousarray(shrink[first : first + count], dtype=np.float32)).to(w.device)
            mn, mx = mn * f, mx * f
        _qdq_(x, mn, mx, r)
        first += count
    return w


def fake_quantize(w: torch.Tensor, r: Rounding, shrink: np.ndarray | None = None) -> torch.Tensor:
    """The float32 weight [K, N] that ``quant.quantize_kn(w, ..., shrink=shrink).dequantize()`` stands for."""
    return _fake_quantize_(w.clone(), r, shrink)


def output_error(err: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E^T H E)`` for a weight error E [K, N]: the squared output error over the calibration rows, x n/2."""
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    return float(torch.dot(err.reshape(-1), (h @ err).reshape(-1)))


def scaled_hessian(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The Hessian of ``X / s``: ``diag(1/s) H diag(1/s)`` (float32), for GPTQ on the scaled weight."""
    inv = (1.0 / s).astype(np.float32)
    return np.asarray(h, dtype=np.float32) * inv[:, None] * inv[None, :]


def _weight_mean(w: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """AutoAWQ's per-input-channel weight magnitude: ``|W|`` over its block's max per column, averaged over N."""
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    out = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    for r0, r1 in _blocks(w.shape[0], block_size):
        a = w[r0:r1].abs()
        out[r0:r1] = (a / (a.amax(0, keepdim=True) + 1e-6)).mean(1)
    return out


def scale_factors(x: np.ndarray, alpha: float, w_mean: np.ndarray | None = None) -> np.ndarray:
    """``s = x^a`` (or ``x^a / w^(1-a)`` with AutoAWQ's duo scaling), normalized to ``max(s) min(s) = 1``."""
    xs = np.maximum(x.astype(np.float64), 1e-12)
    s = xs**alpha
    if w_mean is not None:
        s = s / (np.maximum(w_mean.astype(np.float64), 0.0) ** (1 - alpha) + 1e-4)
    s = np.maximum(s, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, _S_MIN, _S_MAX).astype(np.float32)


def search_scales(
    layers: Sequence[tuple[np.ndarray, Rounding]],
    hessian: np.ndarray,
    *,
    grid: int = 20,
    duo: bool = False,
    device: str | None = None,
) -> ScaleSearch:
    """AWQ's scale search for the layers (weight [K, N_i], its rounding) that read one input of Hessian ``hessian``.

    Tries ``s = 1`` (round-to-nearest) and ``s = x^a`` for ``a`` on the grid ``0, 1/grid, ..., (grid-1)/grid``,
    where ``x = sqrt(diag(H) / 2)`` is the RMS of each input channel, and keeps the one whose rounded weights
    ``diag(1/s) Q(diag(s) W)`` give the least output error summed over the layers. Above 10 points the grid is
    searched coarse to fine (every second point, then the two beside the best): on SmolLM2's 90 groups the
    error is unimodal or nearly so in ``a`` and flat near its minimum. With ``duo`` the weights' own magnitude
    enters as in AutoAWQ: ``s = x^a / w^(1-a)``.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    dev = device or torch_device()
    by_rounding: dict[Rounding, list[np.ndarray]] = {}
    for w, r in layers:  # layers rounded alike are searched as one matrix
        by_rounding.setdefault(r, []).append(np.asarray(w, dtype=np.float32))
    ws = [(torch.tensor(np.concatenate(a, axis=1), device=dev), r) for r, a in by_rounding.items()]
    h = torch.tensor(np.asarray(hessian, dtype=np.float32), device=dev)
    energy = max(sum(output_error(w, h) for w, _ in ws), 1e-30)
    x = torch.sqrt(torch.clamp(torch.diagonal(h) / 2, min=0)).cpu().numpy()
    w_mean = None
    if duo:
        w_mean = torch.stack([_weight_mean(w, r.block_size) for w, r in ws]).mean(0).cpu().numpy()

    def error_of(s: np.ndarray | None) -> float:
        total = 0.0
        st = None if s is None else torch.from_numpy(s).to(dev)[:, None]
        for w, r in ws:
            e = w.clone() if st is None else w * st
            _fake_quantize_(e, r)
            if st is not None:
                e.div_(st)
            total += output_error(torch.sub(w, e, out=e), h)
        return total / energy

    rtn = error_of(None)
    tried: dict[int, tuple[float, np.ndarray]] = {}

    def visit(i: int) -> None:
        if 0 <= i < grid and i not in tried and (i > 0 or duo):  # a = 0 without duo is s = 1: measured above
            s = scale_factors(x, i / grid, w_mean)
            tried[i] = (error_of(s), s)

    step = 2 if grid > 10 else 1  # coarse to fine: the error is close to unimodal in a, and flat near its minimum
    for i in range(0, grid, step):
        visit(i)
    if tried and step > 1:
        center = min(tried, key=lambda i: tried[i][0])
        visit(center - 1)
        visit(center + 1)
    best = min(tried, key=lambda i: tried[i][0], default=None)
    if best is None or tried[best][0] >= rtn:
        return ScaleSearch(None, np.ones(h.shape[0], np.float32), rtn, rtn)
    return ScaleSearch(best / grid, tried[best][1], tried[best][0], rtn)


def search_clip(
    w: np.ndarray,
    hessian: np.ndarray,
    r: Rounding,
    *,
    shrinks: Sequence[float] = CLIP_SHRINKS,
    device: str | None = None,
) -> np.ndarray:
    """Per block and column, the range shrink (of ``shrinks``) with the least output error: [nblocks, N] float32.

    Starts from round-to-nearest (shrink 1) and visits the blocks in order; each block's choice minimises
    the whole output error ``tr(E^T H E)`` given the others' current errors (its own term and the cross terms
    with every other block), so with 1.0 in ``shrinks`` the result never has a larger output error than
    round-to-nearest. Pass the result to :func:`qonnx.core.quant.quantize_kn` as ``shrink``.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    dev = device or torch_device()
    wt = torch.tensor(np.asarray(w, dtype=np.float32), device=dev)
    h = torch.tensor(np.asarray(hessian, dtype=np.float32), device=dev)
    f = torch.tensor(np.asarray(shrinks, dtype=np.float32), device=dev)[:, None]  # [S, 1]
    blocks = _blocks(wt.shape[0], r.block_size)
    chosen = np.ones((len(blocks), wt.shape[1]), dtype=np.float32)
    err = wt - fake_quantize(wt, r)
    for b, (r0, r1) in enumerate(blocks):
        x = wt[r0:r1]
        hb = h[r0:r1, r0:r1]
        cross = 2 * (h[r0:r1] @ err - hb @ err[r0:r1])  # [rows, N]: twice the other blocks' terms
        mn, mx = torch.aminmax(x, dim=0)
        e = _qdq_(x.expand(len(f), -1, -1).clone(), mn * f, mx * f, r)  # [S, rows, N]: every shrink at once
        torch.sub(x, e, out=e)
        cost = (e * (hb @ e + cross)).sum(1)  # [S, N]
        pick = cost.argmin(0)  # [N]; ties go to the first shrink
        chosen[b] = f[:, 0][pick].cpu().numpy()
        err[r0:r1] = e.gather(0, pick[None, None, :].expand(1, r1 - r0, -1))[0]
    return chosen

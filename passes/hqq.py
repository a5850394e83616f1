"""HQQ for a [K, N] MatMul weight: pure and graph-free, in torch (CUDA when available).

HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models") needs no data:
for each block it looks for the zero point that minimises ``||W - dequant(quant(W))||_p^p`` with ``p < 1``
(a sparsity-promoting norm: fit most weights well, let a few outliers carry large errors). Splitting off
the error as an auxiliary ``W_e`` gives a half-quadratic problem, solved by alternating two closed forms:

* ``W_e = shrink_p(W - dequant(Q), beta)``: generalised soft thresholding,
  ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``;
* ``z = mean(Q - (W - W_e) / s)`` over the block: the zero point that best explains the weights less
  ``W_e``, with the codes ``Q = clamp(round(W / s + z))`` of the previous zero point;

``beta`` grows by ``kappa`` each step. The scale stays the one of the block's range.

Which iterate to keep: each (block, column) keeps the zero point of lowest *squared* error among the
iterates, the starting (round-to-nearest) one included, so HQQ is never worse than round-to-nearest by
that measure. The lp norm steers the search; the squared error is what a layer's output error grows with.
On SmolLM2-135M (W4, block 128, perplexity; round-to-nearest 19.117) keeping the lowest squared error gave
18.848, the lowest lp (p = 0.7) error 19.199, the lowest absolute error 18.993, and the reference code's
rule (stop at the first step whose mean absolute error over the weight does not improve) 18.896.
Fitting the scale the same way (least squares against ``W - W_e``) measured worse (19.055).

qonnx's conventions (see :mod:`qonnx.core.quant`): blocks run down the K rows of a [K, N] weight, the last
block may be ragged, codes are unsigned, ``roundf(w * (1 / s) + z)`` in float32 as
:func:`qonnx.core.quant.quantize_kn` computes them: with no iterations the result is round-to-nearest bit for bit.

Zero points are fractional (``zero_point="float"``, stored in the scales' dtype), or integers
(``"integer"``: rounded after every update, a projected iteration): MatMulNBits reads float zero points
for 2- and 4-bit codes (ONNX Runtime 1.31, CPU), DequantizeLinear and 8-bit MatMulNBits integers only.
A rounded zero point rarely moves from round-to-nearest's: there HQQ gives about round-to-nearest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from qonnx.core import numerics, quant
from qonnx.passes.hessian import torch_device

if TYPE_CHECKING:
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

__all__ = ["hqq_quantize", "lp_error"]

#: Elements of a weight processed at once (columns are split to stay under it).
_CHUNK = 1 << 22
_FMAX = float(np.finfo(np.float32).max)


def lp_error(w: np.ndarray, qm: quant.QuantizedMatrix, p: float) -> float:
    """``sum |w - dequantize(qm)|^p`` over a [K, N] weight: the error HQQ minimises."""
    return float((np.abs(w.astype(np.float32) - qm.dequantize()).astype(np.float64) ** p).sum())


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft thresholding ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``.

    For ``p < 2`` it is non-zero only where ``|x|^(2-p) > 1 / beta``: the power (slow on CPU) is computed
    for those elements alone, typically a few outliers.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    a = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(a - 1.0 / beta)
    if p == 2:
        return x * max(0.0, 1.0 - 1.0 / beta)
    keep = a > beta ** (-1.0 / (2.0 - p))
    out = torch.zeros_like(x)
    if bool(keep.any()):
        big = a[keep]
        out[keep] = torch.sign(x[keep]) * torch.relu(big - big.pow(p - 1) / beta)
    return out


def _inverse(s: torch.Tensor) -> torch.Tensor:
    """``1 / s`` in float32 as :func:`qonnx.core.numerics.inverse` computes it (0 for a zero scale)."""
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)
    return inv.clamp_(-_FMAX, _FMAX)


def _solve(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    *,
    grid: numerics.IntGrid,
    iterations: int,
    p: float,
    beta: float,
    kappa: float,
    integer: bool,
    store: Any,
) -> torch.Tensor:
    """The zero points [nb, 1, N] of lowest squared error for blocks ``x`` [nb, rows, N] with scales ``s``.

    ``z`` (round-to-nearest's) is where the search starts; codes are unsigned (``grid.round``).
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    inv = _inverse(s)

    def codes(z: torch.Tensor) -> torch.Tensor:
        return grid.round(x * inv + z)

    def error(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (x - (q - z) * s).square_().sum(1, keepdim=True)

    q = codes(z)
    best_z, best_err = z, error(q, z)
    for _ in range(iterations):
        target = x - _shrink(x - (q - z) * s, beta, p)  # the weights less the outlier part of the error
        beta *= kappa
        z = (q - target * inv).mean(1, keepdim=True)
        z = grid.round(z.clone()) if integer else z.to(store).to(torch.float32)  # what the format will hold
        q = codes(z)
        err = error(q, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, z, best_z)
    return best_z


def hqq_quantize(
    w: np.ndarray,
    *,
    bits: int,
    block_size: int | None,
    scale_dtype: np.dtype | type = np.float32,
    iterations: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    zero_point: Literal["float", "integer"] = "float",
    device: str | None = None,
) -> quant.QuantizedMatrix:
    """Quantize a [K, N] weight with HQQ zero points, in blocks of ``block_size`` rows along K (None: one per column).

    Args:
        w: float weight [K, N].
        bits: code width (unsigned codes with a zero point: HQQ has nothing to optimise in symmetric codes).
        block_size: rows per block along K (None: one block per column); the last block may be ragged.
        scale_dtype: dtype the scales (and fractional zero points) are stored in; codes are computed
            with the stored values.
        iterations: half-quadratic steps.
        lp_norm: ``p`` of the error norm.
        beta: initial weight of the quadratic coupling; multiplied by ``kappa`` every step.
        kappa: growth of ``beta`` per step.
        zero_point: "float" (fractional, in ``scale_dtype``) or "integer" (in the code range).
        device: torch device (default CUDA when available).

    Returns:
        A :class:`qonnx.core.quant.QuantizedMatrix`; its zero points are int32, or float32 values exact in
        ``scale_dtype`` when fractional.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if zero_point not in ("float", "integer"):
        raise ValueError(f"zero_point must be 'float' or 'integer', got {zero_point!r}")
    dev = device or torch_device()
    k, n = w.shape
    bs = k if block_size is None else block_size
    full = (k // bs) * bs
    grid = numerics.IntGrid(bits, False)
    store = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(np.dtype(scale_dtype).name, torch.float32)
    parts = [(0, full, bs)] if full else []
    if full < k:
        parts.append((full, k, k - full))
    codes = np.empty((k, n), np.uint8)
    scales, zeros = [], []
    step = max(1, _CHUNK // k)
    for r0, r1, rows in parts:
        nb = (r1 - r0) // rows
        blocks = w[r0:r1].astype(np.float32, copy=False).reshape(nb, rows, n)
        scale, zp = numerics.IntGrid(bits, False).qparams(blocks.min(1), blocks.max(1), scale_dtype)
        z_out = np.empty((nb, n), np.float32)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x = torch.from_numpy(np.array(blocks[:, :, c0:c1], dtype=np.float32)).to(dev)  # a copy: w may be read-only
            s = torch.from_numpy(scale[:, c0:c1].astype(np.float32)).to(dev)[:, None]
            z0 = torch.from_numpy(zp[:, c0:c1].astype(np.float32)).to(dev)[:, None]
            z = _solve(
                x,
                s,
                z0,
                grid=grid,
                iterations=iterations,
                p=lp_norm,
                beta=beta,
                kappa=kappa,
                integer=zero_point == "integer",
                store=store,
            )
            q = grid.round(x * _inverse(s) + z)
            codes[r0:r1, c0:c1] = q.reshape(r1 - r0, c1 - c0).to(torch.uint8).cpu().numpy()
            z_out[:, c0:c1] = z[:, 0].cpu().numpy()
            del x, q
        scales.append(scale)
        zeros.append(z_out.astype(np.int32) if zero_point == "integer" else z_out)
    return quant.QuantizedMatrix(codes, np.concatenate(scales), np.concatenate(zeros), bs, bits, False)

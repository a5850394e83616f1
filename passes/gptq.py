"""GPTQ for a [K, N] MatMul weight: pure and graph-free, in torch (CUDA when available).

GPTQ (Frantar et al., 2022, after the IST-DASLab reference ``gptq.py``) rounds the K rows of a weight one at
a time and spreads each row's rounding error over the rows not yet rounded, so that ``X W`` changes as
little as possible for the layer's inputs X. All it needs from the data is the Hessian ``H = 2/n X^T X``
[K, K], which :class:`HessianAccumulator` builds batch by batch.

qonnx's weights are [K, N] with blocks along K (see :mod:`qonnx.quant`), so the reference's columns are our
rows. The scale and zero point of a block are chosen when the solve reaches its first row, from the rows as
the error feedback has changed them (as the reference does with ``groupsize``), or, with ``act_order``, from
the original weight before the solve (the reference's ``static_groups``: blocks stay contiguous along K
whatever order the rows are rounded in, so the stored format does not change). Either way they come from
:func:`qonnx.quant.qparams_from_range` (optionally on a shrunk range, ``clip_search``), and codes use the
float32 rounding of :func:`qonnx.quant.quantize_kn`: with an identity Hessian the result is round-to-nearest
bit for bit, and any result is a valid :class:`qonnx.quant.QuantizedMatrix` for either output format.

Inputs that are zero on all calibration data (a zero Hessian diagonal) keep their weights and are rounded
to nearest without feedback; the reference zeroes their weights instead, which breaks inputs that calibration
happened not to exercise.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from qonnx import quant

if TYPE_CHECKING:
    import torch

__all__ = ["HessianAccumulator", "gptq_quantize", "torch_device"]


def torch_device() -> str:
    """The torch device GPTQ runs on: "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    with _CUDA_WARMUP:  # once: torch loads its CUDA linear algebra lazily, and two threads doing that race
        if not _CUDA_READY:  # ("lazy wrapper should be called at most once", seen with 4 quantizing threads)
            eye = torch.eye(2, device="cuda")
            lower, _ = torch.linalg.cholesky_ex(eye)
            torch.cholesky_inverse(lower)
            _CUDA_READY.append(True)
    return "cuda"


_CUDA_WARMUP = threading.Lock()
_CUDA_READY: list[bool] = []


class HessianAccumulator:
    """Streams ``H = 2/n X^T X`` of one layer input [..., K] over calibration batches (n: rows of X seen)."""

    def __init__(self, k: int, device: str | None = None) -> None:
        import torch

        self.k = k
        self.device = device or torch_device()
        self.rows = 0
        self._sum = torch.zeros((k, k), dtype=torch.float32, device=self.device)

    def add_batch(self, x: np.ndarray | torch.Tensor) -> None:
        """Add the rows of an activation [..., K] (any float dtype)."""
        import torch

        t = torch.as_tensor(x).to(self.device, torch.float32).reshape(-1, self.k)
        if t.shape[0]:
            self._sum.addmm_(t.T, t)
            self.rows += int(t.shape[0])

    def finalize(self) -> np.ndarray:
        """The float32 Hessian [K, K]; the accumulator's memory is released."""
        if self.rows == 0:
            raise ValueError("no calibration rows were added to the Hessian")
        h = (self._sum * (2.0 / self.rows)).cpu().numpy()
        del self._sum
        return h


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1``; retries with 10x damping if H is not positive definite."""
    import torch

    mean = float(torch.diagonal(h).mean())
    for attempt in range(4):
        d = h.clone()
        d.diagonal().add_(damp * 10**attempt * mean)
        lower, info = torch.linalg.cholesky_ex(d)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the Hessian is not positive definite even with 1000x damping")


def _group_rows(k: int, group: int, block: int) -> list[tuple[int, int]]:
    """Lazy-update blocks [i1, i2) such that every quantization group starts at the start of a block."""
    step = group * max(1, block // group) if group <= block else (block if group % block == 0 else group)
    return [(i, min(i + step, k)) for i in range(0, k, step)]


class _Grid:
    """One block's scale and zero point for every column, with the float32 tensors rounding needs.

    ``round(x)`` is :func:`qonnx.quant.quantize_kn`'s arithmetic on one row: ``roundf(x / scale + zp)``
    (``x * (1 / scale)`` in float32, ties up, clamped), returned as float codes in the unsigned domain.
    """

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool, device: str) -> None:
        import torch

        qmin, qmax = quant.qrange(bits, symmetric)
        self.offset = -qmin if symmetric else 0
        self.lo, self.hi = float(qmin + self.offset), float(qmax + self.offset)
        self.scale_np, self.zero_point_np = scale, zero_point
        self.scale = torch.from_numpy(scale.astype(np.float32)).to(device)
        self.inv = torch.from_numpy(quant._inverse(scale)).to(device)
        self.zpo = torch.from_numpy((zero_point + self.offset).astype(np.float32)).to(device)
        self.zpf = torch.from_numpy(zero_point.astype(np.float32)).to(device)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        v = x * self.inv
        v += self.zpo
        q = torch.floor(v)
        q += (v - q) >= 0.5  # round half up, as quant.round_half_up
        return q.clamp_(self.lo, self.hi)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.offset - self.zpf) * self.scale


#: Range shrink factors tried by the clip search: 1.0, 0.99, ..., 0.80.
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(21))
#: The error norm the clip search minimises, as the reference's ``Quantizer(mse=True)``.
CLIP_NORM = 2.4


def _choose_grid(
    rows: torch.Tensor, bits: int, symmetric: bool, scale_dtype: Any, clip_search: bool, device: str
) -> _Grid:
    """Scale and zero point of one block [rows, N] from its range, or the shrunk range that rounds it best."""
    mn, mx = rows.amin(0).cpu().numpy(), rows.amax(0).cpu().numpy()
    best = _Grid(*quant.qparams_from_range(mn, mx, bits, symmetric, scale_dtype), bits, symmetric, device)
    if not clip_search:
        return best
    scale, zp = best.scale_np.copy(), best.zero_point_np.copy()
    best_err = None
    for shrink in CLIP_SHRINKS:
        f = np.float32(shrink)
        grid = _Grid(*quant.qparams_from_range(mn * f, mx * f, bits, symmetric, scale_dtype), bits, symmetric, device)
        err = ((rows - grid.dequantize(grid.round(rows))).abs_() ** CLIP_NORM).sum(0).cpu().numpy()
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        scale = np.where(better, grid.scale_np, scale)
        zp = np.where(better, grid.zero_point_np, zp)
    return _Grid(scale, zp, bits, symmetric, device)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    block_size: int | None,
    symmetric: bool,
    scale_dtype: np.dtype | type = np.float32,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    device: str | None = None,
) -> quant.QuantizedMatrix:
    """Quantize a [K, N] weight with GPTQ, in blocks of ``block_size`` rows along K (None: one per column).

    Args:
        w: float weight [K, N].
        hessian: ``2/n X^T X`` [K, K] of the layer's input (:class:`HessianAccumulator`).
        bits: code width.
        block_size: rows per quantization block along K (None: one block per column), as in
            :func:`qonnx.quant.quantize_kn`; the last block may be ragged.
        symmetric: signed codes without zero points.
        scale_dtype: dtype the scales are stored in; codes are computed with the rounded scale.
        damp: fraction of the mean Hessian diagonal added to its diagonal.
        block: rows per lazy batch update.
        act_order: round rows in order of decreasing Hessian diagonal (largest inputs first). Blocks stay
            contiguous along K ("static groups"): every block's scale and zero point are chosen from the
            original weight before the solve, so the stored format does not change.
        clip_search: choose each block's range among shrunk ranges (:data:`CLIP_SHRINKS`) for the lowest
            weight error, as the reference's ``Quantizer(mse=True)``; else the block's full range.
        device: torch device (default CUDA when available).

    Returns:
        A :class:`qonnx.quant.QuantizedMatrix` in qonnx's conventions (ragged last block included).
    """
    import torch

    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {hessian.shape} does not match a weight with K={k}")
    dev = device or torch_device()
    group = k if block_size is None else block_size
    W = torch.tensor(w, dtype=torch.float32, device=dev)
    H = torch.tensor(hessian, dtype=torch.float32, device=dev)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0

    def choose(rows: torch.Tensor) -> _Grid:
        return _choose_grid(rows, bits, symmetric, scale_dtype, clip_search, dev)

    grids: list[_Grid | None] = [None] * quant.num_blocks(k, group)
    if act_order:  # static groups, then the rows in order of decreasing H diagonal
        grids = [choose(W[i : i + group]) for i in range(0, k, group)]
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[perm], H[perm][:, perm]
        order = perm.tolist()
        blocks = [(i, min(i + block, k)) for i in range(0, k, block)]
    else:
        order = list(range(k))
        blocks = _group_rows(k, group, block)
    Hinv = _inverse_cholesky(H, damp)
    del H
    codes = torch.empty((k, n), dtype=torch.float32, device=dev)
    for i1, i2 in blocks:
        W1 = W[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = order[i1 + i]
            grid = grids[row // group]
            if grid is None:  # entering a group in K order: its rows as the error feedback has left them
                # blocks hold whole groups, or a group starts a block and W past the block is up to date
                grid = choose(W1[i : i + group] if row + group <= i2 or i2 == k else W[row : row + group])
                grids[row // group] = grid
            x = W1[i]
            q = grid.round(x)
            codes[row] = q
            err = (x - grid.dequantize(q)) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1[i] = err
        if i2 < k:
            W[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)
    out = codes.cpu().numpy()
    offset = 1 << (bits - 1) if symmetric else 0
    q_np: np.ndarray[Any, Any] = (out - offset).astype(np.int8) if symmetric else out.astype(np.uint8)
    done = [g for g in grids if g is not None]
    scales = np.stack([g.scale_np for g in done])
    zero_points = np.stack([g.zero_point_np for g in done])
    return quant.QuantizedMatrix(q_np, scales, zero_points, group, bits, symmetric)

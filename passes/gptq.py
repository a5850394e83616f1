"""GPTQ for a [K, N] MatMul weight: pure and graph-free, in torch (CUDA when available).

GPTQ (Frantar et al., 2022, after the IST-DASLab reference ``gptq.py``) rounds the K rows of a weight one at
a time and spreads each row's rounding error over the rows not yet rounded, so that ``X W`` changes as
little as possible for the layer's inputs X. All it needs from the data is the Hessian ``H = 2/n X^T X``
[K, K], which :class:`qonnx.passes.hessian.HessianAccumulator` builds batch by batch.

qonnx's weights are [K, N] with blocks along K (see :mod:`qonnx.core.quant`), so the reference's columns are our
rows. The scale and zero point of a block are chosen when the solve reaches its first row, from the rows as
the error feedback has changed them (as the reference does with ``groupsize``), or, with ``act_order``, from
the original weight before the solve (the reference's ``static_groups``: blocks stay contiguous along K
whatever order the rows are rounded in, so the stored format does not change). Either way they come from
:meth:`qonnx.core.numerics.IntGrid.qparams` (optionally on a shrunk range, ``clip_search``), and codes use the
float32 rounding of :func:`qonnx.core.quant.quantize_kn`: with an identity Hessian the result is round-to-nearest
bit for bit, and any result is a valid :class:`qonnx.core.quant.QuantizedMatrix` for either output format.

Inputs that are zero on all calibration data (a zero Hessian diagonal) keep their weights and are rounded
to nearest without feedback; the reference zeroes their weights instead, which breaks inputs that calibration
happened not to exercise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from qonnx.core import numerics, quant
from qonnx.passes.hessian import torch_device

if TYPE_CHECKING:
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

__all__ = ["gptq_quantize", "gptq_quantize_many"]


#: Held while LAPACK runs on one thread per matrix (the thread count torch keeps is per process).
_ONE_THREAD = threading.Lock()
#: From this K on, the matrices of a batch are factorized in parallel threads (one each); below, one after the
#: other on the calling thread (a 576 x 576 factorization takes milliseconds: threads would cost more).
_SPREAD_K = 1024


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors of the damped ``H^-1`` [L, K, K].

    A matrix that is not positive definite is retried with 10x, 100x, 1000x damping (the others keep theirs).

    On the CPU each factorization runs on one thread, the L matrices spread over the cores, so that the
    factors do not depend on the number of cores: MKL splits a factorization's sums by thread count (on 1
    and 2 threads the factors of one 512 x 512 Hessian differed in 111,920 of 262,144 float32 values, and
    GPTQ's codes in 198 bytes of a 2-layer model). torch sets the thread count of the calling thread (and, for threads
    that start meanwhile, of the process: it is set back after). CUDA: nothing to do (cuSOLVER's result does
    not depend on the machine's cores).
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    if h.device.type != "cpu":
        return _inverse_cholesky_any_threads(h, damp)
    with _ONE_THREAD:
        threads = torch.get_num_threads()
        spread = min(h.shape[0], threads) if h.shape[-1] >= _SPREAD_K else 1
        try:
            if spread == 1:
                return _on_one_thread(h, damp)
            chunks = torch.arange(h.shape[0]).tensor_split(spread)
            with concurrent.futures.ThreadPoolExecutor(spread, thread_name_prefix="qonnx-gptq-lapack") as pool:
                return torch.cat(list(pool.map(lambda rows: _on_one_thread(h[rows], damp), chunks)))
        finally:
            torch.set_num_threads(threads)


def _on_one_thread(h: torch.Tensor, damp: float) -> torch.Tensor:
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    torch.set_num_threads(1)  # this worker thread's OpenMP and MKL
    return _inverse_cholesky_any_threads(h, damp)


def _inverse_cholesky_any_threads(h: torch.Tensor, damp: float) -> torch.Tensor:
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    mean = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)  # [L]
    out = torch.empty_like(h)
    todo = torch.arange(h.shape[0], device=h.device)
    for attempt in range(4):
        d = h[todo].clone()
        d.diagonal(dim1=-2, dim2=-1).add_((damp * 10**attempt * mean[todo])[:, None])
        lower, info = torch.linalg.cholesky_ex(d)
        inv = torch.cholesky_inverse(lower)
        upper, info2 = torch.linalg.cholesky_ex(inv, upper=True)
        ok = (info == 0) & (info2 == 0)
        out[todo[ok]] = upper[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return out
    raise ValueError("the Hessian is not positive definite even with 1000x damping")


def _group_rows(k: int, group: int, block: int) -> list[tuple[int, int]]:
    """Lazy-update blocks [i1, i2) such that every quantization group starts at the start of a block."""
    step = group * max(1, block // group) if group <= block else (block if group % block == 0 else group)
    return [(i, min(i + step, k)) for i in range(0, k, step)]


class _IntBlock:
    """One block's integer grid for every column of L matrices: scale and zero point [L, N].

    ``round(x)`` is :func:`qonnx.core.quant.quantize_kn`'s arithmetic, :meth:`IntGrid.round` of
    ``x * (1 / scale) + zp`` (float codes in the unsigned domain); ``x`` is [L, N] or [L, R, N].
    """

    def __init__(self, grid: numerics.IntGrid, scale: np.ndarray, zero_point: np.ndarray, device: str) -> None:
        import torch  # heavy (~1 s): GPTQ alone needs it; its callers imported it already

        self.grid = grid
        self.scale_np, self.zero_point_np = scale, zero_point
        self.scale = torch.from_numpy(scale.astype(np.float32)).to(device)
        self.inv = torch.from_numpy(numerics.inverse(scale)).to(device)
        self.zpo = torch.from_numpy((zero_point + grid.offset).astype(np.float32)).to(device)
        self.zpf = torch.from_numpy(zero_point.astype(np.float32)).to(device)

    def params(self) -> list[torch.Tensor]:
        return [self.scale, self.inv, self.zpo, self.zpf]

    def numpy_params(self) -> list[np.ndarray]:
        return [self.scale_np, self.zero_point_np]

    def with_params(self, params: list[torch.Tensor]) -> _IntBlock:
        block = object.__new__(_IntBlock)
        block.__dict__.update(self.__dict__)
        block.scale, block.inv, block.zpo, block.zpf = params
        return block

    def round(self, x: torch.Tensor) -> torch.Tensor:
        inv, zpo = (self.inv, self.zpo) if x.dim() == 2 else (self.inv[:, None], self.zpo[:, None])
        v = x * inv
        v += zpo
        return self.grid.round(v)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        scale, zpf = (self.scale, self.zpf) if q.dim() == 2 else (self.scale[:, None], self.zpf[:, None])
        return (q - self.grid.offset - zpf) * scale


class _ScaledBlock:
    """One block of a scale-only grid (float8 E4M3, NF4, FP4) for every column of L matrices: scale [L, N].

    ``round(x)`` is the grid value nearest ``x / scale`` (:meth:`Float8Grid.round`, :meth:`LookupGrid.round`),
    ``x ~ value * scale``, as :func:`qonnx.core.quant.quantize_scaled_kn` computes it.
    """

    def __init__(self, grid: numerics.Float8Grid | numerics.LookupGrid, scale: np.ndarray, device: str) -> None:
        import torch  # heavy (~1 s): GPTQ alone needs it; its callers imported it already

        self.grid = grid
        self.scale_np = scale
        self.scale = torch.from_numpy(scale.astype(np.float32)).to(device)

    def params(self) -> list[torch.Tensor]:
        return [self.scale]

    def numpy_params(self) -> list[np.ndarray]:
        return [self.scale_np]

    def with_params(self, params: list[torch.Tensor]) -> _ScaledBlock:
        block = object.__new__(_ScaledBlock)
        block.__dict__.update(self.__dict__)
        (block.scale,) = params
        return block

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.round(x / (self.scale if x.dim() == 2 else self.scale[:, None]))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return q * (self.scale if q.dim() == 2 else self.scale[:, None])


_Block = _IntBlock | _ScaledBlock
Grid = numerics.IntGrid | numerics.Float8Grid | numerics.LookupGrid


#: Range shrink factors tried by the clip search: 1.0, 0.99, ..., 0.80.
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(21))
#: The error norm the clip search minimises, as the reference's ``Quantizer(mse=True)``.
CLIP_NORM = 2.4


@dataclasses.dataclass(frozen=True)
class _Scheme:
    """What a block's grid is made of (:mod:`qonnx.core.numerics`), the scales' dtype, and the clip search."""

    grid: Grid
    scale_dtype: Any
    clip_search: bool

    def block(self, mn: np.ndarray, mx: np.ndarray, device: str) -> _Block:
        params = self.grid.qparams(mn, mx, self.scale_dtype)
        return self.make(list(params) if isinstance(params, tuple) else [params], device)

    def make(self, params: list[np.ndarray], device: str) -> _Block:
        if isinstance(self.grid, numerics.IntGrid):
            return _IntBlock(self.grid, params[0], params[1], device)
        return _ScaledBlock(self.grid, params[0], device)

    def choose(self, rows: torch.Tensor, device: str) -> _Block:
        """The grid of one block [L, R, N] from its range, or the shrunk range that rounds it best."""
        import torch  # heavy (~1 s): GPTQ alone needs it; its callers imported it already

        mn, mx = rows.amin(1).cpu().numpy(), rows.amax(1).cpu().numpy()
        if not self.clip_search:
            return self.block(mn, mx, device)
        best_err = None
        best_np: list[np.ndarray] = []
        for shrink in CLIP_SHRINKS:
            f = np.float32(shrink)
            block = self.block(mn * f, mx * f, device)
            err = ((rows - block.dequantize(block.round(rows))).abs_() ** CLIP_NORM).sum(1)
            params = block.numpy_params()
            if best_err is None:
                best_err, best_np = err, [p.copy() for p in params]
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            mask = better.cpu().numpy()
            best_np = [np.where(mask, p, b) for p, b in zip(params, best_np, strict=True)]
        return self.make(best_np, device)


def _solve(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: _Scheme,
    group: int,
    *,
    damp: float,
    block: int,
    act_order: bool,
    device: str,
) -> tuple[torch.Tensor, list[_Block]]:
    """GPTQ on L matrices at once: W [L, K, N] (overwritten), H [L, K, K]; codes [L, K, N] (K order) and the grids.

    Every step works on all L matrices: one Python iteration per row of K, whatever L is, so the small GPU
    kernels of a row are launched once for the whole batch.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    n_mat, k, _ = W.shape
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)  # inputs calibration never exercised: no feedback to or from them
    ngroups = quant.num_blocks(k, group)
    grids: list[_Block | None] = [None] * ngroups
    lanes = torch.arange(n_mat, device=device)
    if act_order:  # static groups, then the rows in order of decreasing H diagonal
        static = [scheme.choose(W[:, i : i + group], device) for i in range(0, k, group)]
        grids = list(static)
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [L, K]
        W = torch.take_along_dim(W, perm[:, :, None], dim=1)
        H = torch.take_along_dim(torch.take_along_dim(H, perm[:, :, None], dim=1), perm[:, None, :], dim=2)
        row_group = perm // group  # [L, K]: the group of the row each matrix rounds at step i
        stacked = [torch.stack(ps) for ps in zip(*(g.params() for g in static), strict=True)]  # [G, L, N] each
        template = static[0]
        blocks = [(i, min(i + block, k)) for i in range(0, k, block)]
    else:
        blocks = _group_rows(k, group, block)
    Hinv = _inverse_cholesky(H, damp)
    del H
    codes = torch.empty_like(W)
    for i1, i2 in blocks:
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            grid: _Block
            if act_order:
                g_idx = row_group[:, row]
                grid = template.with_params([p[g_idx, lanes] for p in stacked])
            else:
                entered = grids[row // group]
                if entered is None:  # entering a group in K order: its rows as the error feedback has left them
                    # blocks hold whole groups, or a group starts a block and W past the block is up to date
                    rows = W1[:, i : i + group] if row + group <= i2 or i2 == k else W[:, row : row + group]
                    entered = grids[row // group] = scheme.choose(rows, device)
                grid = entered
            x = W1[:, i]
            q = grid.round(x)
            codes[:, row] = q
            err = (x - grid.dequantize(q)) / Hinv1[:, i, i, None]
            W1[:, i:].sub_(Hinv1[:, i, i:, None] * err[:, None, :])
            Err1[:, i] = err
        if i2 < k:
            W[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1.0)
    if act_order:  # back to K order
        codes = torch.empty_like(codes).scatter_(1, perm[:, :, None].expand_as(codes), codes)
    return codes, [g for g in grids if g is not None]


def _stack(arrays: list[np.ndarray], shape: tuple[int, int], device: str) -> torch.Tensor:
    """float32 [L, *shape] on ``device``, filled one array at a time.

    No stacked copy in host memory for a GPU; read-only (memory-mapped) inputs are copied once.
    """
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

    if device == "cpu":
        out = np.empty((len(arrays), *shape), dtype=np.float32)
        for j, a in enumerate(arrays):
            out[j] = a
        return torch.from_numpy(out)
    t = torch.empty((len(arrays), *shape), dtype=torch.float32, device=device)
    for j, a in enumerate(arrays):
        t[j].copy_(torch.from_numpy(np.array(a, dtype=np.float32)))
    return t


def gptq_quantize_many(
    ws: list[np.ndarray],
    hessians: list[np.ndarray],
    *,
    grid: Grid,
    block_size: int | None,
    scale_dtype: np.dtype | type = np.float32,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    device: str | None = None,
) -> list[quant.QuantizedMatrix] | list[quant.ScaledMatrix]:
    """GPTQ on several [K, N] weights of one shape, each with its own Hessian, solved together.

    See :func:`gptq_quantize` for the arguments. Integer grids give :class:`qonnx.core.quant.QuantizedMatrix`
    objects, scale-only grids (float8, NF4, FP4) :class:`qonnx.core.quant.ScaledMatrix` ones, in the layout
    round-to-nearest gives them.
    """
    if not ws:
        return []
    k, n = ws[0].shape
    for w, h in zip(ws, hessians, strict=True):
        if w.shape != (k, n):
            raise ValueError(f"weights solved together must share one shape: {w.shape} and {(k, n)}")
        if h.shape != (k, k):
            raise ValueError(f"Hessian shape {h.shape} does not match a weight with K={k}")
    dev = device or torch_device()
    group = k if block_size is None else block_size
    W = _stack(ws, (k, n), dev)
    H = _stack(hessians, (k, k), dev)
    scheme = _Scheme(grid, scale_dtype, clip_search)
    codes_t, blocks = _solve(W, H, scheme, group, damp=damp, block=block, act_order=act_order, device=dev)
    del W, H
    out = codes_t.cpu().numpy()
    del codes_t
    scales = np.stack([b.scale_np for b in blocks], axis=1)  # [L, G, N]
    if not isinstance(grid, numerics.IntGrid):
        return [quant.ScaledMatrix(grid.codes(out[j]), scales[j], group, grid) for j in range(len(ws))]
    zero_points = np.stack([b.zero_point_np for b in blocks], axis=1)  # type: ignore[union-attr]
    results = []
    for j in range(len(ws)):
        q = (out[j] - grid.offset).astype(np.int8) if grid.symmetric else out[j].astype(np.uint8)
        results.append(quant.QuantizedMatrix(q, scales[j], zero_points[j], group, grid.bits, grid.symmetric))
    return results


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
            :func:`qonnx.core.quant.quantize_kn`; the last block may be ragged.
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
        A :class:`qonnx.core.quant.QuantizedMatrix` in qonnx's conventions (ragged last block included).
    """
    (qm,) = gptq_quantize_many(
        [w],
        [hessian],
        grid=numerics.IntGrid(bits, symmetric),
        block_size=block_size,
        scale_dtype=scale_dtype,
        damp=damp,
        block=block,
        act_order=act_order,
        clip_search=clip_search,
        device=device,
    )
    assert isinstance(qm, quant.QuantizedMatrix)
    return qm

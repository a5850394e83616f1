"""The Hessian ``H = 2/n X^T X`` of a layer's input, streamed over calibration batches (GPTQ and AWQ use it)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["HessianAccumulator", "torch_device"]


def torch_device() -> str:
    """The torch device GPTQ runs on: "cuda" when torch sees a GPU, else "cpu"."""
    import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

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
        import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

        self.k = k
        self.device = device or torch_device()
        self.rows = 0
        self._sum = torch.zeros((k, k), dtype=torch.float32, device=self.device)

    def add_batch(self, x: np.ndarray | torch.Tensor) -> None:
        """Add the rows of an activation [..., K] (any float dtype)."""
        import torch  # deferred: heavy (~1 s); only the solvers need it, so round-to-nearest runs without it

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

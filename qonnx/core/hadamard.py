"""Orthogonal matrices for rotating a model (QuaRot / SpinQuant): Hadamard constructions and random ones.

Pure numpy, graph-free. A Hadamard matrix of order n (entries +-1, ``H H^T = n I``) is built as a Kronecker
product ``H_m (x) H_p`` of a Sylvester matrix of order ``p = 2^k`` and a Paley matrix of order m:

* Paley I: ``m = q + 1`` for a prime ``q = 3 (mod 4)`` (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, ...);
* Paley II: ``m = 2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76, 84, 108, ...).

That covers the widths of most language models (SmolLM2: hidden 576 = 36 x 16, MLP 1536 = 48 x 32). The
factor pair with the smallest ``m + p`` is chosen: an online transform costs ``m + p`` multiply-adds per
element as two small MatMuls (:func:`kron_factors`).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "ROTATIONS",
    "check_rotation",
    "hadamard",
    "hadamard_factors",
    "kron_factors",
    "random_orthogonal",
    "randomized_hadamard",
    "sylvester",
]


#: The residual-stream rotations a scheme config can ask for (``rotate``): none, a randomized Hadamard
#: matrix, or a random orthogonal matrix (both seeded, so a model quantizes the same way twice).
ROTATIONS: tuple[str, ...] = ("none", "hadamard", "random")


def check_rotation(scheme: str, rotate: object) -> None:
    """Refuse a ``rotate`` value that is not one of :data:`ROTATIONS` (ValueError; configs wrap it)."""
    if rotate not in ROTATIONS:
        raise ValueError(f"{scheme}: rotate must be one of {', '.join(map(repr, ROTATIONS))}, got {rotate!r}")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % f for f in range(2, int(q**0.5) + 1))


def _legendre(q: int) -> np.ndarray:
    """The quadratic character mod prime q, chi(0..q-1): 0, +1 (a square), -1."""
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    chi[[(i * i) % q for i in range(1, q)]] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    chi = _legendre(q)
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


@functools.cache
def _paley(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from a Paley construction (entries +-1), or None when neither applies."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]] (Q antisymmetric)
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(m, dtype=np.int64) + s
    if m % 2 == 0:
        q = m // 2 - 1
        if _is_prime(q) and q % 4 == 1:  # Paley II: C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, 1], [1, -1]])
    return None


def sylvester(p: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order p, a power of two (entries +-1)."""
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != p:
        raise ValueError(f"Sylvester's construction needs a power of two, got {p}")
    return h


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, p): a Paley order m and a power of two p with ``m p = n`` and the smallest ``m + p``, or None."""
    best: tuple[int, int] | None = None
    p = 1
    while p <= n and n % p == 0:
        m = n // p
        if _paley(m) is not None and (best is None or m + p < sum(best)):
            best = (m, p)
        p *= 2
    return best


def kron_factors(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(H_m, H_p) normalized (orthogonal), with ``hadamard(n) == kron(H_m, H_p)``, or None (no construction)."""
    found = hadamard_factors(n)
    if found is None:
        return None
    m, p = found
    hm = _paley(m)
    assert hm is not None
    return hm / np.sqrt(m), sylvester(p) / np.sqrt(p)


def hadamard(n: int) -> np.ndarray | None:
    """An orthogonal Hadamard matrix of order n (entries +-1/sqrt(n)), float64, or None (no construction)."""
    factors = kron_factors(n)
    return None if factors is None else np.kron(*factors)


def randomized_hadamard(n: int, seed: int = 0) -> np.ndarray | None:
    """QuaRot's randomized Hadamard ``diag(s) H`` with random signs s (seeded), or None (no construction)."""
    h = hadamard(n)
    if h is None:
        return None
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return signs[:, None] * h


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A random orthogonal matrix (Haar measure: QR of a Gaussian with the signs of R's diagonal), float64."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]

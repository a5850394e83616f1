"""Hadamard constructions (Paley x Sylvester) and the random orthogonal matrices of the rotation pass."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.core.hadamard import hadamard, hadamard_factors, kron_factors, random_orthogonal, randomized_hadamard


@pytest.mark.parametrize("n", [12, 20, 28, 36, 64, 576, 1536, 896, 4864, 14336])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h is not None
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))


def test_factors_are_the_cheapest_pair():
    assert hadamard_factors(576) == (36, 16)  # SmolLM2's hidden size: Paley II (q=17) x Sylvester
    assert hadamard_factors(1536) == (48, 32)  # its MLP: Paley I (q=47) x Sylvester
    assert hadamard_factors(18) is None and hadamard(18) is None  # 18 = 2 x 9: no Hadamard matrix exists
    hm, hp = kron_factors(1536)
    np.testing.assert_array_equal(np.kron(hm, hp), hadamard(1536))


def test_seeded_matrices():
    q = random_orthogonal(48, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(48), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(48, seed=3))
    assert not np.array_equal(q, random_orthogonal(48, seed=4))
    r = randomized_hadamard(576, seed=0)
    np.testing.assert_allclose(r @ r.T, np.eye(576), atol=1e-12)

"""AWQ's searches: scales and clip ranges lower the output error; alpha 0 is round to nearest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated, hessian

from qonnx.core import quant
from qonnx.passes.awq import Rounding, fake_quantize, scale_factors, scaled_hessian, search_clip, search_scales


def outlier_inputs(rng, rows, k, channels=(3, 17, 40), gain=25.0):
    """Activations with a few input channels far larger than the rest (as after an LLM's norms)."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, list(channels)] *= gain
    return x


def output_error(x, w, w_hat):
    return float(((x @ w - x @ w_hat) ** 2).sum())


def awq_weight(w, s, r, shrink=None):
    """The effective weight AWQ stores: ``diag(1/s) Q(diag(s) W)`` with quant's own rounding."""
    scaled = quant.quantize_kn(w * s[:, None], r.bits, r.block_size, r.symmetric, r.scale_dtype, shrink=shrink)
    return scaled.dequantize() / s[:, None]


@pytest.mark.parametrize(
    ("bits", "block_size", "symmetric", "scale_dtype", "k"),
    [(4, 128, False, np.float32, 200), (4, 32, True, np.float16, 96), (8, None, False, np.float32, 72)],
)
def test_fake_quantize_is_quantize_kn(rng, bits, block_size, symmetric, scale_dtype, k):
    """The searches measure exactly what the weight pass stores, with and without shrunk ranges."""
    w = rng.standard_normal((k, 24)).astype(np.float32)
    r = Rounding(bits, block_size, symmetric, scale_dtype)
    shrink = rng.choice([1.0, 0.9, 0.75], size=(quant.num_blocks(k, block_size), 24)).astype(np.float32)
    for f in (None, shrink):
        ref = quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype, shrink=f).dequantize()
        np.testing.assert_array_equal(fake_quantize(torch.from_numpy(w), r, f).numpy(), ref)
    ones = np.ones_like(shrink)
    np.testing.assert_array_equal(
        quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype, shrink=ones).q,
        quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype).q,
    )
    with pytest.raises(ValueError, match="shrink must have shape"):
        quant.quantize_kn(w, bits, block_size, symmetric, shrink=shrink[:, :3])


def test_alpha_zero_is_round_to_nearest(rng):
    """a = 0 gives s = 1, so the stored weight is round-to-nearest's bit for bit."""
    x = np.abs(rng.standard_normal(200)).astype(np.float32) * 10
    s = scale_factors(x, 0.0)
    np.testing.assert_array_equal(s, np.ones(200, np.float32))
    w = rng.standard_normal((200, 16)).astype(np.float32)
    r = Rounding(4, 64, False)
    np.testing.assert_array_equal(awq_weight(w, s, r), quant.quantize_kn(w, 4, 64, False).dequantize())
    # data whose channels are all alike: nothing to protect, the search keeps round-to-nearest's error
    flat = rng.standard_normal((2048, 200)).astype(np.float32)
    found = search_scales([(w, r)], hessian(flat), grid=10, device="cpu")
    assert found.error <= found.rtn_error
    if found.alpha is None:
        np.testing.assert_array_equal(found.s, np.ones(200, np.float32))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("duo", [False, True])
def test_scales_lower_output_error_with_outlier_channels(rng, symmetric, duo):
    """Two layers reading one input with outlier channels: the chosen s beats RTN, also on unseen rows."""
    k = 320  # ragged with block 128
    calib, test = outlier_inputs(rng, 4096, k), outlier_inputs(np.random.default_rng(1), 4096, k)
    w1 = rng.standard_normal((k, 48)).astype(np.float32)
    w2 = 0.1 * rng.standard_normal((k, 32)).astype(np.float32)
    r = Rounding(4, 128, symmetric)
    found = search_scales([(w1, r), (w2, r)], hessian(calib), grid=20, duo=duo, device="cpu")
    assert found.alpha is not None and 0 <= found.alpha < 1
    assert found.s.shape == (k,) and found.s.dtype == np.float32
    assert found.s[[3, 17, 40]].min() > np.median(found.s)  # the outlier channels are scaled up
    assert found.error < 0.7 * found.rtn_error
    for w in (w1, w2):
        rtn = quant.quantize_kn(w, 4, 128, symmetric).dequantize()
        assert output_error(test, w, awq_weight(w, found.s, r)) < 0.8 * output_error(test, w, rtn)
    # the relative errors reported are those of the stored weights
    energy = sum(output_error(calib, w, 0 * w) for w in (w1, w2))
    stored = sum(output_error(calib, w, awq_weight(w, found.s, r)) for w in (w1, w2)) / energy
    assert stored == pytest.approx(found.error, rel=1e-3)


def test_clip_search_by_output_error(rng):
    """Shrunk ranges chosen per block and column never raise the output error, and here lower it."""
    k = 200
    x = correlated(rng, 4096, k)
    h = hessian(x)
    w = rng.standard_normal((k, 40)).astype(np.float32)
    w[5, :] *= 6  # weight outliers that a full range would spend its steps on
    r = Rounding(4, 64, False)
    shrink = search_clip(w, h, r, device="cpu")
    assert shrink.shape == (quant.num_blocks(k, 64), 40) and shrink.dtype == np.float32
    assert shrink.min() >= 0.5 and shrink.max() <= 1.0 and shrink.min() < 1.0
    clipped = quant.quantize_kn(w, 4, 64, False, shrink=shrink).dequantize()
    rtn = quant.quantize_kn(w, 4, 64, False).dequantize()
    assert output_error(x, w, clipped) < 0.95 * output_error(x, w, rtn)
    # only the unshrunk range on the grid: round-to-nearest exactly
    np.testing.assert_array_equal(search_clip(w, h, r, shrinks=(1.0,), device="cpu"), np.ones_like(shrink))


def test_scaled_hessian(rng):
    x = correlated(rng, 512, 24)
    s = np.abs(rng.standard_normal(24)).astype(np.float32) + 0.5
    np.testing.assert_allclose(scaled_hessian(hessian(x), s), hessian(x / s), rtol=1e-4, atol=1e-4)

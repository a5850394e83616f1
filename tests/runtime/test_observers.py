"""Streaming range observers against numpy on the concatenated data, and quant.py's quantizer."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qonnx.core import numerics, quant
from qonnx.core.errors import ConfigError
from qonnx.runtime.observers import METHODS, TensorObserver


def observe(*batches, **kw):
    obs = TensorObserver(**kw)
    for b in batches:
        obs.add_batch(b)
    return obs


def bin_width(obs):
    edges = obs.histogram[1]
    return edges[1] - edges[0]


def growing_batches(rng):
    """Three batches whose max |x| grows 1 -> ~5 -> ~300: the histogram range doubles several times."""
    return [
        rng.standard_normal((64, 32)).astype(np.float32) * 0.3,
        rng.standard_normal((100, 32)).astype(np.float32),
        (rng.laplace(size=(50, 32)) * 30).astype(np.float32),
    ]


def qdq_error(x, lo, hi, symmetric):
    """Mean squared error of quantize-dequantize to 8 bits with qonnx.core.quant's conventions."""
    scale, zp = numerics.IntGrid(8, symmetric).qparams(np.float32([lo]), np.float32([hi]))
    q = quant.quantize(x.reshape(1, -1), scale, zp, 8, symmetric)
    return float(((quant.dequantize(q, scale, zp).ravel() - x) ** 2).mean())


def test_minmax_is_exact():
    batches = growing_batches(np.random.default_rng(0))
    obs, data = observe(*batches), np.concatenate([b.ravel() for b in batches])
    assert (obs.min, obs.max, obs.count) == (data.min(), data.max(), data.size)
    a = float(np.abs(data).max())
    assert obs.range() == (-a, a)
    assert obs.range("minmax", symmetric=False) == (float(data.min()), float(data.max()))


@pytest.mark.parametrize("p", [99.0, 99.9, 99.999])
def test_percentile_matches_numpy_within_a_bin(p):
    batches = growing_batches(np.random.default_rng(1))
    obs, data = observe(*batches), np.concatenate([b.ravel() for b in batches])
    w = bin_width(obs)
    lo, hi = obs.range("percentile", percentile=p)
    assert lo == -hi and abs(hi - np.percentile(np.abs(data), p)) <= w
    lo, hi = obs.range("percentile", symmetric=False, percentile=p)
    ref_lo, ref_hi = np.percentile(data, [100 - p, p])
    assert abs(lo - ref_lo) <= w and abs(hi - ref_hi) <= w


def test_rebinning_is_exact():
    rng = np.random.default_rng(2)
    # values on bin edges of every histogram below: the coarsest check of the half-open bins
    batches = [rng.integers(-127, 128, 1000) / 128, rng.integers(-40, 41, 1000) / 8, rng.standard_normal(500) * 100]
    batches = [b.astype(np.float32) for b in batches]
    for bins in (8, 256, 2048):
        obs, data = observe(*batches, bins=bins, channels=False), np.concatenate(batches)
        counts, edges = obs.histogram
        assert edges[-1] > np.abs(data).max() >= edges[-1] / 2 >= 128
        assert counts.sum() == data.size
        np.testing.assert_array_equal(counts, np.histogram(data, bins=bins, range=(edges[0], edges[-1]))[0])


def test_zero_batches_then_data_keep_fine_bins():
    data = np.float32([0.005, -0.0025, 0.00001])
    obs = observe(np.zeros((4, 3), np.float32), data[None])
    counts, edges = obs.histogram
    assert edges[-1] == 2.0**-7 and counts.sum() == 15  # set by the first nonzero batch, not by the zeros
    np.testing.assert_array_equal(counts, np.histogram(np.append(np.zeros(12), data), 2048, (-(2.0**-7), 2.0**-7))[0])


def test_entropy_clips_outliers_of_gaussian_data():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(200_000), [30.0, -27.0, 21.0]]).astype(np.float32)
    obs = observe(x[:100_000], x[100_000:], channels=False)
    lo, hi = obs.range("entropy")
    assert lo == -hi and np.percentile(np.abs(x), 99) < hi < 0.25 * np.abs(x).max()
    assert obs.range("entropy", symmetric=False) == (lo, hi)  # both signs are clipped


def test_entropy_keeps_the_range_of_uniform_data():
    x = np.random.default_rng(4).uniform(-1, 1, 200_000).astype(np.float32)
    lo, hi = observe(x).range("entropy")
    assert 0.98 * np.abs(x).max() <= hi <= np.abs(x).max() and lo == -hi
    relu = observe(np.maximum(x, 0))
    assert relu.range("entropy", symmetric=False, qmin=0, qmax=255) == (0.0, pytest.approx(x.max(), rel=0.02))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_and_percentile(symmetric):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.laplace(0, 1, 300_000), [60.0, -45.0, 80.0]]).astype(np.float32)
    obs = observe(*np.split(x, 3), channels=False)
    kw = {} if symmetric else {"qmin": 0, "qmax": 255}
    best = obs.range("mse", symmetric=symmetric, **kw)
    err = qdq_error(x, *best, symmetric)
    assert best[1] < 0.75 * x.max()
    assert err <= 0.7 * qdq_error(x, *obs.range("minmax", symmetric=symmetric), symmetric)
    assert err <= 1.001 * qdq_error(x, *obs.range("percentile", symmetric=symmetric, percentile=99.9), symmetric)
    # the histogram's estimate finds the optimum of a brute-force search on the data
    grid = np.linspace(5, 80, 151)
    assert err <= 1.001 * min(qdq_error(x, -t, t, True) for t in grid) if symmetric else err < 0.012


@pytest.mark.parametrize(
    ("symmetric", "qmin", "qmax", "lo", "hi"),
    [(True, -128, 127, -3.0, 3.0), (True, -128, 127, -12.0, 1.0), (True, -8, 7, -2.5, 2.5),
     (False, 0, 255, -4.0, 9.0), (False, 0, 255, -0.3, 2.0), (False, 0, 255, -7.77, 0.01), (False, 0, 15, -3.1, 5.0)],
)  # fmt: skip
def test_expected_error_matches_quantize_dequantize(symmetric, qmin, qmax, lo, hi):
    x = np.random.default_rng(10).laplace(0, 1, 200_000).astype(np.float32)
    scale, zp = numerics.IntGrid(8 if qmax > 15 else 4, symmetric).qparams(np.float32([lo]), np.float32([hi]))
    q = quant.quantize(x.reshape(1, -1), scale, zp, 8 if qmax > 15 else 4, symmetric)
    ref = float(((quant.dequantize(q, scale, zp).ravel() - x) ** 2).mean())
    got = observe(x, channels=False).expected_error(lo, hi, symmetric=symmetric, qmin=qmin, qmax=qmax)
    assert got == pytest.approx(ref, rel=0.01)


def test_mse_of_relu_data_keeps_zero_exact():
    x = np.maximum(np.random.default_rng(6).laplace(0, 1, 200_000), 0).astype(np.float32)
    lo, hi = observe(x).range("mse", symmetric=False, qmin=0, qmax=255)
    assert lo == 0.0 and 0.5 * x.max() < hi <= x.max()
    assert qdq_error(x, lo, hi, False) <= qdq_error(x, 0.0, float(x.max()), False)


def test_channel_absmax_over_batches():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 3, 8)).astype(np.float32), 5 * rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(observe(a).channel_absmax, np.abs(a).max(axis=(0, 1)))
    obs = observe(a, b)
    ref = np.maximum(np.abs(a).max(axis=(0, 1)), np.abs(b).max(axis=0))
    np.testing.assert_array_equal(obs.channel_absmax, ref)
    assert obs.channel_absmax.shape == (8,)
    assert observe(a, channels=False).channel_absmax is None


def test_state_round_trip_through_npz(tmp_path):
    obs = observe(*growing_batches(np.random.default_rng(8)))
    np.savez(tmp_path / "cache.npz", **{f"t0/{k}": v for k, v in obs.state().items()})
    with np.load(tmp_path / "cache.npz") as z:
        back = TensorObserver.from_state({k[3:]: z[k] for k in z.files})
    for method in METHODS:
        for symmetric in (True, False):
            assert back.range(method, symmetric=symmetric) == obs.range(method, symmetric=symmetric)
    np.testing.assert_array_equal(back.channel_absmax, obs.channel_absmax)
    assert (back.count, back.bins, back.channels) == (obs.count, obs.bins, obs.channels)
    bad = obs.state() | {"count": np.array(1)}
    with pytest.raises(ConfigError, match="inconsistent"):
        TensorObserver.from_state(bad)
    with pytest.raises(ConfigError, match="invalid"):
        TensorObserver.from_state({"counts": obs.state()["counts"]})


@pytest.mark.parametrize("order", ["small_into_large", "large_into_small"])
def test_merge_equals_one_observer_of_both(order):
    a, b, c = growing_batches(np.random.default_rng(9))
    first, second = observe(a, b), observe(c)
    if order == "large_into_small":
        first, second = second, first
    first.merge(second)
    one = observe(a, b, c)
    assert (first.min, first.max, first.count) == (one.min, one.max, one.count)
    np.testing.assert_array_equal(first.histogram[0], one.histogram[0])
    np.testing.assert_array_equal(first.histogram[1], one.histogram[1])
    np.testing.assert_array_equal(first.channel_absmax, one.channel_absmax)
    for method in METHODS:
        for symmetric in (True, False):
            got, ref = first.range(method, symmetric=symmetric), one.range(method, symmetric=symmetric)
            np.testing.assert_allclose(got, ref, rtol=0, atol=bin_width(one))
    zeros = observe(np.zeros(5, np.float32), channels=False)
    zeros.merge(observe(a.ravel(), channels=False))
    assert zeros.count == 5 + a.size and zeros.histogram[0][1024] >= 5


def test_merge_rejects_other_settings():
    with pytest.raises(ConfigError, match="bins"):
        observe(np.ones(4, np.float32)).merge(observe(np.ones(4, np.float32), bins=256))
    with pytest.raises(ConfigError, match="channels"):
        observe(np.ones((2, 4), np.float32)).merge(observe(np.ones((2, 3), np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_is_refused_and_not_counted(bad):
    obs = observe(np.ones((2, 4), np.float32))
    x = np.ones((2, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(ConfigError, match="NaN" if np.isnan(bad) else "infinite"):
        obs.add_batch(x)
    assert obs.count == 8 and obs.histogram[0].sum() == 8


def test_last_axis_change_is_refused():
    obs = observe(np.ones((2, 4), np.float32))
    with pytest.raises(ConfigError, match="last axis"):
        obs.add_batch(np.ones((4, 2), np.float32))
    assert obs.count == 8
    observe(np.ones((2, 4), np.float32), np.ones((4, 2), np.float32), channels=False)  # fine without channels


def test_bad_options_and_inputs():
    with pytest.raises(ConfigError, match="no calibration data"):
        TensorObserver().range()
    with pytest.raises(ConfigError, match="multiple of 4"):
        TensorObserver(bins=1000 + 2)
    obs = observe(np.ones(3, np.float32))
    with pytest.raises(ConfigError, match="unknown range method"):
        obs.range("max")
    with pytest.raises(ConfigError, match="percentile"):
        obs.range("percentile", percentile=0)
    with pytest.raises(ConfigError, match="float array"):
        obs.add_batch(np.ones(3, np.int64))


def test_float16_and_bfloat16_batches():
    x = np.float32([[-3.5, 0.25, 1.0]])
    for dtype in (np.float16, ml_dtypes.bfloat16):
        obs = observe(x.astype(dtype))
        assert obs.range(symmetric=False) == (-3.5, 1.0)
        np.testing.assert_array_equal(obs.channel_absmax, [3.5, 0.25, 1.0])


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_constant_tensor_gets_a_valid_range(value):
    obs = observe(np.full((16, 4), value, np.float32), np.full((2, 4), value, np.float32))
    for method in METHODS:
        for symmetric in (True, False):
            lo, hi = obs.range(method, symmetric=symmetric)
            assert lo <= 0 <= hi and hi - lo >= 2.0**-14 and np.isfinite([lo, hi]).all()
            if value and method == "minmax":
                assert (lo, hi) == ((-abs(value), abs(value)) if symmetric else (min(value, 0), max(value, 0)))


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=finite), st.floats(-30, 5), st.sampled_from(METHODS))
def test_range_always_holds_zero(x, log_scale, method):
    x = x * np.float32(2.0**log_scale)
    obs = observe(x, bins=256, channels=False)
    for symmetric, q in ((True, (-128, 127)), (False, (0, 255)), (False, (-8, 7))):
        lo, hi = obs.range(method, symmetric=symmetric, qmin=q[0], qmax=q[1], percentile=99.0)
        assert lo <= 0 <= hi and hi > lo
        tiny = 2.0**-14
        if symmetric:
            assert lo == -hi and hi <= max(float(np.abs(x).max()), tiny / 2)
        else:
            assert lo >= min(float(x.min()), 0) - tiny and hi <= max(float(x.max()), 0) + tiny

"""GPTQ's solve against numpy references: round to nearest without correlations, less output error with them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import correlated, hessian

from qonnx.core import numerics, packing, quant
from qonnx.passes.gptq import gptq_quantize, gptq_quantize_many
from qonnx.passes.hessian import HessianAccumulator

PLAIN = {"act_order": False, "clip_search": False}


def output_error(x, w, qm):
    return float(((x @ w - x @ qm.dequantize()) ** 2).sum())


def reference_gptq(w, h, bits, block_size, symmetric, damp=0.01):
    """GPTQ without lazy batches or act-order, in float64 numpy: one row at a time, the whole rest updated."""
    k = w.shape[0]
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h[np.diag(h) == 0, np.diag(h) == 0] = 1
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    deq = np.zeros_like(w)
    for i in range(k):
        if i % block_size == 0:
            blk = w[i : i + block_size].astype(np.float32)
            scale, zp = numerics.IntGrid(bits, symmetric).qparams(blk.min(0), blk.max(0))
        v = w[i].astype(np.float32) * (1 / scale) + (zp + (1 << (bits - 1) if symmetric else 0)).astype(np.float32)
        q = np.clip(np.floor(v + 0.5), *(np.array(numerics.qrange(bits, symmetric)) + (8 if symmetric else 0)))
        deq[i] = (q - (8 if symmetric else 0) - zp) * scale
        err = (w[i] - deq[i]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return deq


@pytest.mark.parametrize(
    ("bits", "block_size", "symmetric", "scale_dtype", "k"),
    [
        (4, 128, False, np.float32, 576),  # ragged: the last block holds 64 rows
        (4, 32, True, np.float16, 200),
        (8, 64, False, np.float32, 96),
        (4, None, False, np.float32, 72),  # one block per column
        (4, 256, True, np.float32, 300),  # blocks longer than the lazy batch
    ],
)
@pytest.mark.parametrize("options", [PLAIN, {"act_order": True, "clip_search": False}])
def test_identity_hessian_is_round_to_nearest(rng, bits, block_size, symmetric, scale_dtype, k, options):
    """Without correlations there is nothing to compensate: codes, scales and zero points equal RTN's."""
    w = rng.standard_normal((k, 24)).astype(np.float32)
    got = gptq_quantize(
        w,
        np.eye(k, dtype=np.float32),
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
        device="cpu",
        **options,
    )
    ref = quant.quantize_kn(w, bits, block_size, symmetric, scale_dtype)
    assert got.q.dtype == ref.q.dtype and got.scale.dtype == ref.scale.dtype
    np.testing.assert_array_equal(got.q, ref.q)
    np.testing.assert_array_equal(got.scale, ref.scale)
    np.testing.assert_array_equal(got.zero_point, ref.zero_point)
    assert got.block_size == ref.block_size


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_unbatched_numpy_reference(rng, symmetric):
    """Lazy batches (block 128 over K = 200, groups of 32) give the numbers of the row-by-row algorithm."""
    k, n = 200, 40
    x = correlated(rng, 2048, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = hessian(x)
    got = gptq_quantize(w, h, bits=4, block_size=32, symmetric=symmetric, device="cpu", **PLAIN).dequantize()
    ref = reference_gptq(w, h, 4, 32, symmetric)
    step = np.abs(ref).max() / 7
    # float32 against float64 may flip a rounding now and then; the rest must agree exactly
    assert np.mean(np.abs(got - ref) < 1e-3 * step) > 0.98
    assert ((x @ w - x @ got) ** 2).sum() == pytest.approx(((x @ w - x @ ref) ** 2).sum(), rel=0.05)


@pytest.mark.parametrize(
    "options", [PLAIN, {"act_order": True, "clip_search": False}, {"act_order": True, "clip_search": True}]
)
@pytest.mark.parametrize(("bits", "block_size", "symmetric"), [(4, 128, False), (4, 32, True), (8, 64, False)])
def test_lower_output_error_than_rtn(rng, options, bits, block_size, symmetric):
    """||XW - XW'||^2 on correlated inputs, measured on inputs the Hessian did not see."""
    k, n = 320, 64  # ragged with 128
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    acc = HessianAccumulator(k, device="cpu")
    for chunk in np.array_split(calib.reshape(8, 512, k), 3):
        acc.add_batch(chunk)  # [batches, tokens, K], rows counted across calls
    qm = gptq_quantize(
        w, acc.finalize(), bits=bits, block_size=block_size, symmetric=symmetric, device="cpu", **options
    )
    rtn = quant.quantize_kn(w, bits, block_size, symmetric)
    assert output_error(test, w, qm) < 0.8 * output_error(test, w, rtn)
    # a valid QuantizedMatrix in qonnx's conventions
    qmin, qmax = numerics.qrange(bits, symmetric)
    assert qm.q.min() >= qmin and qm.q.max() <= qmax and qm.q.shape == (k, n)
    assert qm.scale.shape == qm.zero_point.shape == (quant.num_blocks(k, block_size), n)
    if symmetric:
        assert not qm.zero_point.any()
    # the codes and the dequantized weights agree with the MatMulNBits packing round trip
    packed = packing.pack_matmulnbits(qm)
    codes = packing.unpack_nbits_matmulnbits(packed, bits, block_size).reshape(n, -1)[:, :k].T
    np.testing.assert_array_equal(codes, qm.unsigned()[0])


def test_accumulator_and_dead_inputs(rng):
    k = 48
    x = correlated(rng, 300, k)
    x[:, [5, 17]] = 0  # inputs calibration never exercises
    acc = HessianAccumulator(k, device="cpu")
    for part in np.array_split(x, 4):
        acc.add_batch(part.astype(np.float16))
    h = acc.finalize()
    np.testing.assert_allclose(h, hessian(x.astype(np.float16).astype(np.float32)), rtol=1e-4, atol=1e-3)
    w = rng.standard_normal((k, 16)).astype(np.float32)
    qm = gptq_quantize(w, h, bits=4, block_size=16, symmetric=False, device="cpu")
    deq = qm.dequantize()
    assert np.isfinite(deq).all()
    # dead rows keep their weights (rounded), they are not zeroed as in the reference implementation
    step = (qm.scale[[0, 1]]).max(axis=0)
    assert (np.abs(deq[[5, 17]] - w[[5, 17]]) <= step + 1e-6).all()
    with pytest.raises(ValueError, match="no calibration rows"):
        HessianAccumulator(4, device="cpu").finalize()


@pytest.mark.parametrize(("block_size", "symmetric"), [(128, False), (32, True), (None, False)])
def test_three_bits(rng, block_size, symmetric):
    """GPTQ at 3 bits: identity Hessian = round to nearest; correlated inputs: less output error, codes in range."""
    k, n = 320, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    plain = gptq_quantize(w, np.eye(k, dtype=np.float32), bits=3, block_size=block_size, symmetric=symmetric, **PLAIN)
    rtn = quant.quantize_kn(w, 3, block_size, symmetric)
    np.testing.assert_array_equal(plain.q, rtn.q)
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    qm = gptq_quantize(
        w, hessian(calib), bits=3, block_size=block_size, symmetric=symmetric, act_order=True, clip_search=True
    )
    assert output_error(test, w, qm) < 0.8 * output_error(test, w, rtn)
    qmin, qmax = numerics.qrange(3, symmetric)
    assert qm.q.min() >= qmin and qm.q.max() <= qmax and qm.zero_point.max() <= qmax


@pytest.mark.parametrize(
    "options", [PLAIN, {"act_order": True, "clip_search": False}, {"act_order": True, "clip_search": True}]
)
@pytest.mark.parametrize(("bits", "block_size", "symmetric"), [(4, 128, False), (3, None, True)])
def test_batched_solve_equals_one_at_a_time(rng, options, bits, block_size, symmetric):
    """Weights of one shape solved together, each with its own Hessian, give each one's own result exactly."""
    k, n = 200, 24  # ragged with 128
    ws = [rng.standard_normal((k, n)).astype(np.float32) for _ in range(3)]
    hs = [hessian(correlated(rng, 1024, k, seed=s)) for s in range(3)]
    hs[1][:, 7] = hs[1][7, :] = 0  # a dead input in one matrix only
    kw = dict(grid=numerics.IntGrid(bits, symmetric), block_size=block_size, device="cpu", **options)
    together = gptq_quantize_many(ws, hs, **kw)
    for w, h, got in zip(ws, hs, together, strict=True):
        alone = gptq_quantize(w, h, bits=bits, symmetric=symmetric, block_size=block_size, device="cpu", **options)
        np.testing.assert_array_equal(got.q, alone.q)
        np.testing.assert_array_equal(got.scale, alone.scale)
        np.testing.assert_array_equal(got.zero_point, alone.zero_point)
    assert not np.array_equal(together[0].q, together[2].q)
    with pytest.raises(ValueError, match="share one shape"):
        gptq_quantize_many([ws[0], ws[0][:100]], [*hs[:1], hs[0][:100, :100]], **kw)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_float8(rng, scale_dtype):
    """float8 E4M3 GPTQ (one scale per column): identity Hessian = quantize_fp8_kn bit for bit; correlated
    inputs: less output error than rounding to nearest, codes and scales in quantize_fp8_kn's layout."""

    k, n = 256, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 5] *= 40  # a column with a large range
    kw = dict(grid=numerics.FLOAT8, block_size=None, scale_dtype=scale_dtype, device="cpu")
    (sm,) = gptq_quantize_many([w], [np.eye(k, dtype=np.float32)], **kw)
    codes, scale = sm.codes, sm.scale.reshape(n)
    ref = quant.quantize_fp8_kn(w, scale_dtype=scale_dtype)
    ref_codes, ref_scale = ref.codes, ref.scale.reshape(n)
    assert codes.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == scale_dtype
    np.testing.assert_array_equal(codes.astype(np.float32), ref_codes.astype(np.float32))
    np.testing.assert_array_equal(scale, ref_scale)
    calib, test = correlated(rng, 4096, k), correlated(np.random.default_rng(1), 4096, k)
    for options in ({"act_order": False}, {"act_order": True, "clip_search": True}):
        (sm,) = gptq_quantize_many([w], [hessian(calib)], **kw, **options)
        codes, scale = sm.codes, sm.scale.reshape(n)
        deq = codes.astype(np.float32) * scale.astype(np.float32)
        rtn = ref_codes.astype(np.float32) * ref_scale.astype(np.float32)
        err, rtn_err = ((test @ w - test @ deq) ** 2).sum(), ((test @ w - test @ rtn) ** 2).sum()
        assert err < 0.8 * rtn_err, (options, err, rtn_err)
        assert np.isfinite(deq).all() and np.abs(codes.astype(np.float32)).max() <= numerics.FP8_MAX


@pytest.fixture
def torch_threads():
    """Set torch's intra-op thread count for a test; the count before is restored."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [512, 1024])  # factorized one after the other / in parallel threads
def test_same_codes_on_any_number_of_threads(torch_threads, k):
    """GPTQ on one and on two torch threads gives the same bytes (MKL's Cholesky depends on its thread count).

    The Hessians come from calibration runs in ONNX Runtime and from torch's X^T X: both measured identical
    on 1 and 2 threads; the solve's factorizations did not (198 bytes differed on a 2-layer model).
    """
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((k, 64)).astype(np.float32) for _ in range(3)]
    hs = [hessian(correlated(rng, 2048, k, rank=32, seed=s)) for s in range(3)]
    grid = numerics.IntGrid(4, False)
    out = {}
    for threads in (1, 2):
        torch_threads(threads)
        solved = gptq_quantize_many(ws, hs, grid=grid, block_size=128, act_order=True, device="cpu")
        out[threads] = b"".join(qm.q.tobytes() + qm.scale.tobytes() + qm.zero_point.tobytes() for qm in solved)
    assert out[1] == out[2]

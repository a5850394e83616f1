"""qonnx.core.quant: the numerics against element-by-element references, packing, float8, activation ranges."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import sqnr_db
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qonnx.core import numerics, packing, quant


def reference_blocked(w, bits, block, symmetric):
    """Element-by-element reference of the documented conventions (slow, obvious)."""
    c, k = w.shape
    block = k if block is None else block
    out = np.zeros_like(w, dtype=np.float32)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    for i in range(c):
        for s in range(0, k, block):
            b = w[i, s : s + block].astype(np.float32)
            if symmetric:
                v = b.min() if abs(b.min()) >= abs(b.max()) else b.max()
                scale = np.float32(v / qmin)
                zp = 0
            else:
                lo, hi = min(b.min(), 0.0), max(b.max(), 0.0)
                scale = np.float32((hi - lo) / (qmax - qmin))
                zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax)) if scale != 0 else 0
            # ONNX Runtime's convention: roundf in the unsigned domain (symmetric: zero point 2^(bits-1))
            off = 2 ** (bits - 1) if symmetric else 0
            v = b * (np.float32(1) / scale if scale != 0 else np.float32(0)) + np.float32(zp + off)
            q = np.clip(np.floor(np.abs(v) + 0.5) * np.sign(v), qmin + off, qmax + off) - off
            out[i, s : s + block] = (q - zp) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32, 128, None])
def test_blocked_matches_reference(rng, bits, symmetric, block):
    w = rng.standard_normal((6, 200)).astype(np.float32)  # 200: ragged for 16, 32 and 128
    qb = quant.quantize_blocked(w, bits, block, symmetric)
    np.testing.assert_allclose(qb.dequantize(), reference_blocked(w, bits, block, symmetric), rtol=0, atol=1e-6)
    nb = quant.num_blocks(200, block)
    assert qb.scale.shape == (6, nb) and qb.q.shape[:2] == (6, nb)


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    block=st.sampled_from([2, 4, 16, None]),
)
def test_error_is_at_most_half_a_step(w, bits, symmetric, block):
    qb = quant.quantize_blocked(w, bits, block, symmetric)
    err = np.abs(qb.dequantize() - w)
    step = np.repeat(np.abs(qb.scale).astype(np.float32), qb.block_size, axis=1)[:, : w.shape[1]]
    # asymmetric: rounding only. Symmetric (ONNX Runtime's convention: the largest magnitude maps to -2^(b-1))
    # can clip the opposite end by up to one step, e.g. [-1, 1] -> scale 1/8, and 1 -> code 7.
    bound = 1.0 if symmetric else 0.5
    # plus float32 rounding of the dequantized value itself: a value exactly half a step from two codes
    # (w = [-0.5, 0.5], 8 bits, block 2) comes back up to a few ulps of |w| further than half a step
    ulps = 4 * np.finfo(np.float32).eps * np.abs(w)
    assert np.all(err <= bound * step * (1 + 1e-5) + ulps + 1e-30)
    assert np.all(np.isfinite(qb.dequantize()))


def test_fp16_scales_reproduce_codes(rng):
    w = rng.standard_normal((8, 64)).astype(np.float16)
    qb = quant.quantize_blocked(w.astype(np.float32), 4, 32, False, scale_dtype=np.float16)
    assert qb.scale.dtype == np.float16
    # codes computed with the rounded fp16 scale: dequantizing in fp16 gives back the same values
    deq16 = ((qb.q.astype(np.float16) - qb.zero_point[..., None].astype(np.float16)) * qb.scale[..., None]).reshape(
        8, 64
    )
    np.testing.assert_allclose(deq16.astype(np.float32), qb.dequantize(), rtol=1e-3, atol=1e-3)


def test_zero_block_is_exact():
    w = np.zeros((2, 32), np.float32)
    for sym in (False, True):
        assert np.all(quant.quantize_blocked(w, 4, 16, sym).dequantize() == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(rng, bits):
    w = rng.standard_normal((5, 96)).astype(np.float32)
    qb = quant.quantize_blocked(w, bits, 32, False)
    packed = packing.pack_nbits_matmulnbits(qb)
    assert packed.shape == (5, 3, 32 * bits // 8) and packed.dtype == np.uint8
    codes = packing.unpack_nbits_matmulnbits(packed, bits, 32)
    np.testing.assert_array_equal(codes, qb.q)
    zp = packing.pack_zero_points(qb.zero_point, bits)
    np.testing.assert_array_equal(packing.unpack_zero_points(zp, bits, 5, 3), qb.zero_point)


def test_int4_low_nibble_first():
    qb = quant.QuantizedBlocks(
        np.array([[[1, 2] + [0] * 14]], np.uint8),
        np.ones((1, 1), np.float32),
        np.zeros((1, 1), np.int32),
        16,
        16,
        4,
        False,
    )
    assert packing.pack_nbits_matmulnbits(qb)[0, 0, 0] == 0x21


def test_ragged_tail_packs_zero_and_zero_points_pad_with_default(rng):
    w = rng.standard_normal((3, 40)).astype(np.float32)
    qb = quant.quantize_blocked(w, 4, 32, False)
    codes = packing.unpack_nbits_matmulnbits(packing.pack_nbits_matmulnbits(qb), 4, 32).reshape(3, -1)
    assert np.all(codes[:, 40:] == 0)
    assert packing.pack_zero_points(qb.zero_point, 4).shape == (3, 1)  # 2 blocks fill one byte
    qb3 = quant.quantize_blocked(rng.standard_normal((2, 80)).astype(np.float32), 4, 32, False)
    assert np.all(packing.pack_zero_points(qb3.zero_point, 4)[:, 1] >> 4 == 8)  # 3 blocks: pad nibble = 8


def test_round_half_up_is_roundf_for_non_negative():
    v = np.array([0.5, 1.5, 2.5, 2.4999998, 0.49999997, 7.5, 0.0, 3.25], np.float32)
    np.testing.assert_array_equal(numerics.round_half_up(v.copy()), [1, 2, 3, 2, 0, 8, 0, 3])


def test_bad_arguments():
    with pytest.raises(ValueError):
        quant.quantize_blocked(np.zeros((2, 2, 2), np.float32), 4, 2, False)
    with pytest.raises(ValueError):
        numerics.qrange(5, False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "block"), [(200, 16), (200, 32), (576, 128), (64, 64), (72, None)])
def test_kn_layout_equals_row_layout(rng, bits, symmetric, k, block):
    """quantize_kn works on the [K, N] weight as stored; same numbers and bytes as the [N, K] reference."""
    w = rng.standard_normal((k, 24)).astype(np.float32)
    qm = quant.quantize_kn(w, bits, block, symmetric)
    qb = quant.quantize_blocked(w.T, bits, block, symmetric)
    np.testing.assert_array_equal(qm.dequantize(), qb.dequantize().T)
    np.testing.assert_array_equal(qm.scale, qb.scale.T)
    if block is not None and block >= 16:
        np.testing.assert_array_equal(packing.pack_matmulnbits(qm), packing.pack_nbits_matmulnbits(qb))
        if not symmetric:
            np.testing.assert_array_equal(
                packing.pack_matmulnbits_zero_points(qm), packing.pack_zero_points(qb.zero_point, bits)
            )


@pytest.mark.parametrize("symmetric", [False, True])
def test_three_bit_codes_in_four_bit_containers(rng, symmetric):
    """Widening keeps every code and zero point: the container dequantizes to the same weights."""
    w = rng.standard_normal((200, 24)).astype(np.float32)
    qm = quant.quantize_kn(w, 3, 32, symmetric)
    wide = qm.in_container(4)
    assert wide.bits == 4 and np.array_equal(wide.dequantize(), qm.dequantize())
    codes, zps = wide.unsigned()
    if symmetric:  # signed codes in [-4, 3] around the 4-bit default zero point 8: no zero points to store
        assert codes.min() >= 4 and codes.max() <= 11 and np.all(zps == 8)
    else:
        assert codes.max() <= 7 and zps.max() <= 7
    unpacked = packing.unpack_nbits_matmulnbits(packing.pack_matmulnbits(wide), 4, 32).reshape(24, -1)[:, :200].T
    np.testing.assert_array_equal(unpacked, codes)
    with pytest.raises(ValueError, match="cannot hold"):
        qm.in_container(2)


def test_fractional_zero_points(rng):
    w = rng.standard_normal((64, 8)).astype(np.float32)
    qm = quant.quantize_kn(w, 4, 32, False)
    assert not qm.fractional_zero_point
    frac = quant.QuantizedMatrix(qm.q, qm.scale, qm.zero_point.astype(np.float32) + 0.25, 32, 4, False)
    assert frac.fractional_zero_point
    np.testing.assert_allclose(frac.dequantize(), qm.dequantize() - 0.25 * np.repeat(qm.scale, 32, axis=0), atol=1e-6)
    assert frac.unsigned()[1].dtype == np.float32  # not truncated to uint8
    with pytest.raises(ValueError, match="not packed"):
        packing.pack_matmulnbits_zero_points(frac)


def test_bf16_scales_are_float32_math(rng):
    """Quantization of bfloat16 weights runs in float32; scales are rounded to bfloat16 before the codes."""
    w = rng.standard_normal((16, 64)).astype(ml_dtypes.bfloat16)
    qb = quant.quantize_blocked(w.astype(np.float32), 4, 32, False, scale_dtype=ml_dtypes.bfloat16)
    assert qb.scale.dtype == ml_dtypes.bfloat16
    assert sqnr_db(w.astype(np.float32), qb.dequantize()) > 15


def test_activation_qparams():
    scale, zp = numerics.activation_qparams(-1.0, 3.0, "int8", symmetric=False)
    assert scale == pytest.approx(4 / 255) and zp == 64  # -1 / (4/255) = -63.75 -> zero point 64
    assert numerics.activation_qparams(-1.0, 3.0, "int8", symmetric=True) == (pytest.approx(3 / 127), 0)
    assert numerics.activation_qparams(0.5, 3.0, "int8", symmetric=False)[1] == 0  # range widened to hold 0
    assert numerics.activation_qparams(-2.0, 1.0, "fp8", symmetric=True) == (pytest.approx(2 / 448), 0)
    assert numerics.activation_qparams(0.0, 0.0, "int8", symmetric=False)[0] > 0


def test_fp8_weights(rng):
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] *= 50
    sm = quant.quantize_fp8_kn(w)
    codes, scale = sm.codes, sm.scale.reshape(-1)
    assert codes.dtype == ml_dtypes.float8_e4m3fn and sm.scale.shape == (1, 40)
    back = codes.astype(np.float32) * scale
    assert np.abs(back).max(axis=0) == pytest.approx(np.abs(w).max(axis=0), rel=1e-6)
    assert sqnr_db(w, back) > 28  # E4M3 keeps 3 mantissa bits: ~30 dB on Gaussian columns

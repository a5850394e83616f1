"""GGML blocks decoded into codes: the values gguf-py's own dequantize gives, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from qonnx.core import formats
from qonnx.core.ggml import decode_blocks


def _raw(type_name: str, n: int = 12, k: int = 96, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_decoded_blocks_dequantize_as_gguf_does(type_name):
    raw = _raw(type_name)
    km = decode_blocks(raw, type_name, (12, 96))
    expected = gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(km.dequantize(), expected)
    order = np.arange(12)[::-1]
    np.testing.assert_array_equal(km.rows(order).dequantize(), expected[order])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_symmetric_types_are_matmulnbits_codes_exactly(type_name):
    raw = _raw(type_name)
    km = decode_blocks(raw, type_name, (12, 96))
    qw = formats.emit(km.symmetric(), "matmulnbits", np.dtype(np.float32))
    assert "zero_points" not in qw.arrays  # MatMulNBits' default zero point: 8 or 128
    np.testing.assert_array_equal(qw.dequantize(), gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name]).T)


def test_q4_1_is_symmetric_codes_plus_a_block_offset():
    raw = _raw("Q4_1")
    km = decode_blocks(raw, "Q4_1", (12, 96))
    rows = np.arange(96) // 32
    rebuilt = km.symmetric().dequantize() + km.offset()[rows]
    np.testing.assert_allclose(rebuilt, km.dequantize().T, rtol=0, atol=1e-6)


def test_refuses_types_and_sizes_it_cannot_keep():
    with pytest.raises(ValueError, match="Q6_K is not kept"):
        decode_blocks(np.zeros(10, np.uint8), "Q6_K", (1, 256))
    with pytest.raises(ValueError, match="needs 68 bytes"):
        decode_blocks(np.zeros(10, np.uint8), "Q8_0", (1, 64))

"""torch_dequant against ggml's own to_float, bit for bit, for every type it decodes."""
import numpy as np
import pytest
import torch

import quant_utils as qu
import torch_dequant


def weights_with_outliers(rows, cols, seed):
    """Gaussian rows with a few large entries and one all-negative row: scales, mins and sign paths all used."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.integers(rows, size=8), rng.integers(cols, size=8)] *= 40
    w[0] = -np.abs(w[0]) - 0.5
    return w


@pytest.mark.parametrize("qtype", sorted(torch_dequant.DECODERS))
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decodes_ggml_bytes_bit_for_bit(qtype, with_imatrix):
    w = weights_with_outliers(48, 512, seed=len(qtype))
    imatrix = np.random.default_rng(1).uniform(0.1, 4.0, 512).astype(np.float32) if with_imatrix else None
    raw = qu.quantize(w, qtype, imatrix)
    expected = qu.dequantize(raw, qtype, w.shape)
    got = torch_dequant.dequantize(torch.frombuffer(bytearray(raw), dtype=torch.uint8), qtype, w.shape,
                                   max_blocks=100)         # several chunks
    assert got.dtype == torch.float32 and tuple(got.shape) == w.shape
    assert np.array_equal(got.numpy().view(np.int32), expected.view(np.int32))
    assert np.abs(expected - w).max() > 0                   # a real rounding, not an identity


def test_wrong_byte_count_is_a_clear_error():
    raw = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold a Q4_K tensor"):
        torch_dequant.dequantize(raw, "Q4_K", (1, 256))

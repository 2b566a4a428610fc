"""quant_utils against ggml itself and against gguf-py's independent decoder."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import quant_utils as qu

# Ordered from fewest to most bits: relative error must fall strictly along this list.
LADDER = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
TESTED = LADDER + ["Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS"]


def gaussian(rows=64, cols=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def rel_err(w, wq):
    return float(np.linalg.norm(w - wq) / np.linalg.norm(w))


@pytest.mark.parametrize("qtype", TESTED)
def test_bytes_per_row_equal_ggml_row_size(qtype):
    w = gaussian()
    raw = qu.quantize(w, qtype)
    t = qu.get_type(qtype)
    assert len(raw) == w.shape[0] * t.row_size_bytes(w.shape[1])
    assert t.tensor_size_bytes(w.shape) == len(raw)
    assert t.bits_per_weight == pytest.approx(8 * len(raw) / w.size)


@pytest.mark.parametrize("qtype", TESTED)
def test_dequantize_matches_gguf_py_bit_for_bit(qtype):
    w = gaussian()
    raw = qu.quantize(w, qtype)
    ours = qu.dequantize(raw, qtype, w.shape)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(w.shape[0], -1)
    theirs = gguf_dequantize(rows, GGMLQuantizationType[qtype])
    assert theirs.shape == w.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def test_relative_error_falls_strictly_with_bits():
    w = gaussian(128, 1024)
    errors = [rel_err(w, qu.fake_quantize(w, t)) for t in LADDER]
    assert all(a > b for a, b in zip(errors, errors[1:])), dict(zip(LADDER, errors))
    assert errors[-1] < 0.01 and errors[0] > 0.1


def test_quantization_independent_of_thread_split():
    w = gaussian(700, 768)        # enough weights for decoding to split across threads too
    raw = qu.quantize(w, "Q4_K", n_threads=1)
    assert raw == qu.quantize(w, "Q4_K", n_threads=7) == qu.quantize(w, "Q4_K", n_threads=2)
    np.testing.assert_array_equal(qu.dequantize(raw, "Q4_K", w.shape, n_threads=1),
                                  qu.dequantize(raw, "Q4_K", w.shape, n_threads=7))


def test_float_types_round_trip():
    w = gaussian(8, 64)
    np.testing.assert_array_equal(qu.fake_quantize(w, "F32"), w)
    np.testing.assert_array_equal(qu.fake_quantize(w, "F16"), w.astype(np.float16).astype(np.float32))
    bf16 = torch.from_numpy(w).to(torch.bfloat16)
    np.testing.assert_array_equal(qu.fake_quantize(bf16, "BF16").numpy(), bf16.float().numpy())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q4_0", "IQ4_XS"])
def test_imatrix_lowers_error_on_weighted_columns(qtype):
    w = gaussian(256, 512, seed=1)
    important = np.zeros(512, dtype=bool)
    important[::4] = True
    imatrix = np.where(important, 100.0, 0.01).astype(np.float32)
    plain = qu.fake_quantize(w, qtype)
    weighted = qu.fake_quantize(w, qtype, imatrix=imatrix)
    err = lambda wq: float(((w - wq)[:, important] ** 2).sum())
    assert err(weighted) < 0.9 * err(plain)


def test_fake_quantize_torch_in_torch_out():
    w = torch.from_numpy(gaussian()).to(torch.bfloat16)
    wq = qu.fake_quantize(w, "Q4_K")
    assert isinstance(wq, torch.Tensor) and wq.dtype == torch.float32 and wq.device == w.device
    np.testing.assert_array_equal(wq.numpy(), qu.fake_quantize(w.float().numpy(), "Q4_K"))


def test_catalog_sizes_come_from_ggml():
    cat = qu.type_catalog()
    assert cat["Q4_K"].bits_per_weight == 4.5 and cat["Q4_K"].block_size == 256
    assert cat["Q8_0"].bits_per_weight == 8.5 and cat["Q8_0"].block_size == 32
    assert cat["Q6_K"].bits_per_weight == 6.5625 and cat["F16"].bits_per_weight == 16
    assert cat["IQ2_XXS"].requires_imatrix and not cat["Q2_K"].requires_imatrix
    assert qu.fitting_types(576, LADDER) == ["Q8_0"]
    assert qu.fitting_types(1536, LADDER) == LADDER


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 256), dtype=np.int32), "floating-point"),
    (torch.zeros((4, 256), dtype=torch.int64), "floating-point"),
    (np.zeros(256, dtype=np.float32), "2-D"),
    (np.full((4, 256), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((4, 576), dtype=np.float32), "divisible by 256"),
])
def test_bad_input_raises_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        qu.quantize(bad, "Q4_K")


def test_bad_type_imatrix_and_bytes_raise_value_error():
    w = gaussian(4, 256)
    with pytest.raises(ValueError, match="unknown quantization type"):
        qu.quantize(w, "Q4_K_M")
    with pytest.raises(ValueError, match="imatrix has 128 entries"):
        qu.quantize(w, "Q4_K", imatrix=np.ones(128, dtype=np.float32))
    with pytest.raises(ValueError, match="without an imatrix"):
        qu.quantize(w, "IQ2_XXS")
    with pytest.raises(ValueError, match="divisible by 32"):
        qu.quantize(np.zeros((4, 48), dtype=np.float32), "Q8_0")
    with pytest.raises(ValueError, match="do not hold"):
        qu.dequantize(b"\0" * 10, "Q4_K", (4, 256))

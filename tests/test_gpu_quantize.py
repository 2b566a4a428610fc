"""gpu_quantize.cu writes ggml's own bytes: compiled for the CPU here (the same source NVRTC compiles for a GPU) and
on a CUDA GPU where there is one, each held equal to ggml_quantize_chunk on values that reach its branches."""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

import gpu_quantize
import quant_utils


@pytest.fixture(scope="module")
def cpu_port(tmp_path_factory):
    """gpu_quantize.cu built as a host library (no contraction into FMAs, as NVRTC is told with --fmad=false)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the port for the CPU")
    lib = tmp_path_factory.mktemp("port") / "gpu_quantize.so"
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-x", "c++", str(gpu_quantize.SOURCE),
                    "-o", str(lib)], check=True)
    port = ctypes.CDLL(str(lib))
    port.quantize_blocks.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int]
    return port


def hard_rows(n_per_row: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows that reach the quantizers' branches: Gaussian, heavy-tailed, one-signed, a single outlier, constant,
    all zero, tiny and huge magnitudes, sparse; and an imatrix spanning six decades with zeros in it."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((48, n_per_row)),
            rng.standard_t(2, (48, n_per_row)) * 0.02,
            np.abs(rng.standard_normal((8, n_per_row))),
            -np.abs(rng.standard_normal((8, n_per_row))) * 3,
            np.where(rng.random((8, n_per_row)) < 0.9, 0.0, rng.standard_normal((8, n_per_row))),
            rng.standard_normal((8, n_per_row)) * 1e-12,
            rng.standard_normal((8, n_per_row)) * 1e3,
            np.full((2, n_per_row), 0.37), np.zeros((2, n_per_row))]
    spike = rng.standard_normal((8, n_per_row)) * 0.01
    spike[np.arange(8), rng.integers(0, n_per_row, 8)] = 5.0
    values = np.concatenate(rows + [spike]).astype(np.float32)
    imatrix = (10.0 ** rng.uniform(-4, 2, n_per_row)).astype(np.float32)
    imatrix[rng.random(n_per_row) < 0.05] = 0.0
    return values, imatrix


@pytest.mark.parametrize("qtype", list(gpu_quantize.TYPE_IDS))
def test_port_on_the_cpu_writes_ggml_bytes(cpu_port, qtype):
    t = quant_utils.get_type(qtype)
    for seed, n_per_row in ((0, 512), (1, 256)):
        values, imatrix = hard_rows(n_per_row, seed)
        expected = np.frombuffer(quant_utils.quantize(values, qtype, imatrix), dtype=np.uint8)
        got = np.zeros(values.shape[0] * t.row_size_bytes(n_per_row), dtype=np.uint8)
        blocks_per_row = n_per_row // t.block_size
        cpu_port.quantize_blocks(values.ctypes.data, imatrix.ctypes.data, got.ctypes.data,
                                 gpu_quantize.TYPE_IDS[qtype], values.shape[0] * blocks_per_row, blocks_per_row)
        differ = np.flatnonzero((got != expected).reshape(values.shape[0], -1).any(1))
        assert differ.size == 0, f"{qtype}: rows {differ[:8].tolist()} differ from ggml's bytes"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", list(gpu_quantize.TYPE_IDS))
def test_gpu_writes_ggml_bytes(qtype):
    values, imatrix = hard_rows(512)
    device = torch.device("cuda")
    assert gpu_quantize.supports(qtype, device, has_imatrix=True)
    got = gpu_quantize.quantize(torch.from_numpy(values).to(device), qtype, torch.from_numpy(imatrix))
    expected = np.frombuffer(quant_utils.quantize(values, qtype, imatrix), dtype=np.uint8)
    np.testing.assert_array_equal(got.cpu().numpy().reshape(-1), expected)
    assert qtype not in gpu_quantize._off


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fake_quantize_is_ggml_round_trip():
    values, imatrix = hard_rows(256, seed=2)
    weight, im = torch.from_numpy(values).cuda(), torch.from_numpy(imatrix).cuda()
    for qtype in ("Q4_K", "Q6_K", "Q4_0"):         # Q4_0 is not ported: ggml on the CPU, back on the GPU
        got = gpu_quantize.fake_quantize(weight, qtype, im)
        assert got.device == weight.device and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), torch.from_numpy(quant_utils.fake_quantize(values, qtype, imatrix)),
                                   rtol=0, atol=0)

"""ggml's quantizers on a CUDA GPU, bit for bit: gpu_quantize.cu compiled at run time by NVRTC, one thread a block.

On a GPU machine the search's GPTQ passes hand ggml thousands of block columns (rows x 32 or 256 values), and
ggml's K-quant scale search on the CPU was what bounded the 7B-shaped search (docs/RESULTS.md: quantization 305 s
of a 344 s GA, and the whole sensitivity stage). gpu_quantize.cu ports the quantizers of the K menu (Q2_K..Q6_K
with an imatrix, Q8_0) statement for statement; other types, and a type without an imatrix, stay with ggml.

A port is trusted only after it has written ggml's bytes on this machine: the first CHECKED_CALLS calls of each
type also quantize their first CHECKED_ROWS rows with ggml (quant_utils) and compare; a type that differs goes
back to ggml for the rest of the run, with one warning line. GGML_GPU_QUANTIZE=0 turns the GPU path off.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

import numpy as np
import torch

import quant_utils
import torch_dequant

SOURCE = Path(__file__).with_name("gpu_quantize.cu")
TYPE_IDS = {"Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
NEEDS_IMATRIX = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")   # ggml takes another path without one
NVRTC_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")
CHECKED_CALLS = 3
CHECKED_ROWS = 64
THREADS_PER_BLOCK = 128

_lock = threading.Lock()
_checks_left = dict.fromkeys(TYPE_IDS, CHECKED_CALLS)
_off: set[str] = set()


def _warn(message: str) -> None:
    print(f"warning: gpu_quantize: {message}", file=sys.stderr, flush=True)


def enabled() -> bool:
    return os.environ.get("GGML_GPU_QUANTIZE", "1") != "0"


def supports(qtype: str, device: torch.device, has_imatrix: bool) -> bool:
    """Whether `quantize` runs this type on `device` (a CUDA GPU where the kernel compiled)."""
    return (device.type == "cuda" and enabled() and qtype in TYPE_IDS and qtype not in _off
            and (has_imatrix or qtype not in NEEDS_IMATRIX) and _kernel() is not None)


@functools.cache
def _kernel():
    """The compiled `quantize_blocks` kernel as a callable (grid, block, args), or None with one line saying why."""
    source = SOURCE.read_text()
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is not None:
        try:
            kernel = compile_kernel(source, "quantize_blocks", nvcc_options=list(NVRTC_OPTIONS))
        except (RuntimeError, OSError) as err:
            _warn(f"NVRTC could not compile {SOURCE.name} ({str(err).splitlines()[0]}); "
                  "quantizing with ggml on the CPU")
            return None

        def launch(grid, block, args):
            kernel(grid=(grid, 1, 1), block=(block, 1, 1), args=args)
        return launch
    try:
        import cupy
    except ImportError:
        _warn("this PyTorch has no torch.cuda._compile_kernel and cupy is not installed; "
              "quantizing with ggml on the CPU")
        return None
    kernel = cupy.RawModule(code=source, options=NVRTC_OPTIONS).get_function("quantize_blocks")

    def launch_cupy(grid, block, args):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            kernel((grid,), (block,), tuple(cupy.from_dlpack(a) if isinstance(a, torch.Tensor) else np.int32(a)
                                            for a in args))
    return launch_cupy


def quantize(values: torch.Tensor, qtype: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """ggml's bytes of a 2-D float tensor on a CUDA GPU (rows x row length, `supports` true for it), as a uint8
    tensor [rows, row bytes] on that GPU; `imatrix` is the per-column importance ggml is given."""
    t = quant_utils.get_type(qtype)
    values = values.detach().to(torch.float32).contiguous()
    n_rows, n_per_row = values.shape
    quant_utils.check_fits(t, n_per_row)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("weight contains NaN or Inf")
    if imatrix is None:
        imatrix_gpu = torch.zeros(n_per_row, dtype=torch.float32, device=values.device)
    else:
        imatrix_gpu = imatrix.detach().to(device=values.device, dtype=torch.float32).reshape(-1).contiguous()
        if imatrix_gpu.numel() != n_per_row:
            raise ValueError(f"imatrix has {imatrix_gpu.numel()} entries for rows of {n_per_row}")
        if not bool(torch.isfinite(imatrix_gpu).all()) or bool((imatrix_gpu < 0).any()):
            raise ValueError("imatrix must be finite and non-negative")
    out = torch.empty((n_rows, t.row_size_bytes(n_per_row)), dtype=torch.uint8, device=values.device)
    blocks_per_row = n_per_row // t.block_size
    n_blocks = n_rows * blocks_per_row
    if n_blocks:
        grid = (n_blocks + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
        _kernel()(grid, THREADS_PER_BLOCK, [values, imatrix_gpu, out, TYPE_IDS[t.name], n_blocks, blocks_per_row])
    with _lock:
        check = _checks_left[t.name] > 0
        if check:
            _checks_left[t.name] -= 1
    if check:
        _check(values, t.name, imatrix, out)
    return out


def _check(values: torch.Tensor, qtype: str, imatrix: torch.Tensor | None, out: torch.Tensor) -> None:
    """Compare the first rows with ggml's own bytes; on a difference the type goes back to ggml (and this call's
    bytes are ggml's: the caller gets them through `out`, rewritten in place)."""
    rows = min(CHECKED_ROWS, values.shape[0])
    im = None if imatrix is None else imatrix.detach().float().cpu().numpy()
    expected = np.frombuffer(quant_utils.quantize(values[:rows].cpu().numpy(), qtype, im), dtype=np.uint8)
    if np.array_equal(out[:rows].cpu().numpy().reshape(-1), expected):
        return
    with _lock:
        _off.add(qtype)
    _warn(f"the GPU's {qtype} bytes differ from ggml's on this machine; "
          f"quantizing {qtype} with ggml on the CPU from here on")
    whole = quant_utils.quantize(values.cpu().numpy(), qtype, im)
    out.copy_(torch.from_numpy(np.frombuffer(whole, dtype=np.uint8).reshape(out.shape)).to(out.device))


def quantize_bytes(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> bytes:
    """quant_utils.quantize's bytes, written on the weight's CUDA GPU where `supports` holds, else by ggml."""
    if supports(qtype, weight.device, imatrix is not None):
        return quantize(weight, qtype, imatrix).cpu().numpy().tobytes()
    return quant_utils.quantize(weight, qtype, imatrix)


def fake_quantize(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """quant_utils.fake_quantize (ggml's round trip, float32 on the weight's device), on a CUDA GPU where `supports`
    holds: the bytes by `quantize`, decoded by torch_dequant (ggml's decoder, bit for bit)."""
    if supports(qtype, weight.device, imatrix is not None) and torch_dequant.supports(qtype):
        raw = quantize(weight, qtype, imatrix)
        return torch_dequant.dequantize(raw.reshape(-1), qtype, tuple(weight.shape))
    return quant_utils.fake_quantize(weight, qtype, imatrix)

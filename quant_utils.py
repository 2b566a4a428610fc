"""ggml-exact quantization: the numerics every other script relies on.

Weights are quantized by ggml's own ``ggml_quantize_chunk`` and read back by ggml's own ``to_float``, both
from the libggml-base shared library that llama-cpp-python ships, so a tensor simulated here is bit for bit
the tensor llama.cpp loads from a GGUF. The type catalog (block sizes, bytes per row, bits per weight) is read
from the same library, never written down by hand.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import UserError

# ggml_type enum values (ggml/include/ggml.h) of the types this project reads and writes.
GGML_TYPE_IDS = {
    "F32": 0, "F16": 1, "BF16": 30,
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20,
    "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29,
}
# The 8-bit activation formats llama.cpp's CPU matmuls round a quantized weight's input to (vec_dot_type).
ACTIVATION_TYPE_IDS = {"Q8_1": 9, "Q8_K": 15}
FLOAT_TYPES = ("F32", "F16", "BF16")

# Weights per worker task, at least: enough to amortise handing the task to a pool thread (tens of us). ggml's
# quantizers spend about 0.1 us a weight (IQ4_NL several times that), so a GPTQ block column of a few
# hundred rows x 32 is worth splitting; decoding is about 1 ns a weight, so only large tensors are.
_MIN_QUANTIZE_ELEMENTS_PER_TASK = 1 << 12
_MIN_DEQUANTIZE_ELEMENTS_PER_TASK = 1 << 18


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _TypeTraitsCpu(ctypes.Structure):
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


# ggml's row converters, to_float and from_float alike: (source, destination, number of values).
_ROW_CONVERT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _find_libggml_base() -> Path:
    """Locate libggml-base: in $LLAMA_CPP_LIB_PATH when set (llama-cpp-python loads its libllama from there
    too, e.g. a CUDA build of llama.cpp), else inside the installed llama_cpp package (without importing it)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        found = sorted(Path(override).glob("*ggml-base.*"))
        if not found:
            raise UserError(f"LLAMA_CPP_LIB_PATH={override} holds no libggml-base")
        return found[0]
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("llama-cpp-python is not installed: run `make test` or "
                           "`pip install -r requirements.txt` first")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    candidates = [pkg_dir / "lib" / names.get(sys.platform, "libggml-base.so")]
    candidates += sorted((pkg_dir / "lib").glob("*ggml-base*")) + sorted(pkg_dir.glob("**/*ggml-base*"))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"libggml-base not found under {pkg_dir}; reinstall llama-cpp-python")


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    """The ggml base library with the prototypes this module calls (loaded once)."""
    lib = ctypes.CDLL(str(_find_libggml_base()))
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


@functools.lru_cache(maxsize=None)
def _cpu_lib() -> ctypes.CDLL:
    """ggml's CPU backend library (next to libggml-base): the matmul kernels' activation formats."""
    base = _find_libggml_base()
    _lib()                                   # libggml-base first: libggml-cpu links against it
    candidates = sorted(base.parent.glob("*ggml-cpu*"))
    if not candidates:
        raise UserError(f"libggml-cpu not found next to {base}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_cpu_init.argtypes = []
    lib.ggml_cpu_init.restype = None
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
    lib.ggml_cpu_init()
    return lib


def _type_name(type_id: int) -> str:
    names = {v: k for k, v in {**GGML_TYPE_IDS, **ACTIVATION_TYPE_IDS}.items()}
    if type_id not in names:
        raise ValueError(f"ggml type id {type_id} is not one this project knows")
    return names[type_id]


@functools.lru_cache(maxsize=None)
def activation_type(qtype: str) -> str:
    """The format llama.cpp's CPU backend rounds a matmul's activations to when the weight is `qtype`
    (ggml's vec_dot_type: Q8_0 or Q8_1 in 32-blocks, Q8_K in 256-blocks, F16, F32), read from libggml-cpu."""
    t = get_type(qtype)
    return _type_name(int(_cpu_lib().ggml_get_type_traits_cpu(t.ggml_type).contents.vec_dot_type))


def ggml_round_activations(x: np.ndarray, act_type: str) -> np.ndarray:
    """Rows of float32 activations rounded by ggml's own CPU quantizer for `act_type` and read back: the
    ground truth the torch emulation (activation_rounding.py) is tested against."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n = x.shape
    if act_type == "F32":
        return x.copy()
    type_id = {**GGML_TYPE_IDS, **ACTIVATION_TYPE_IDS}[act_type]
    from_float = _ROW_CONVERT(_cpu_lib().ggml_get_type_traits_cpu(type_id).contents.from_float)
    block = int(_lib().ggml_blck_size(type_id))
    row_bytes = int(_lib().ggml_row_size(type_id, n))
    raw = np.zeros(n_rows * row_bytes, dtype=np.uint8)
    for r in range(n_rows):
        from_float(x[r].ctypes.data, raw.ctypes.data + r * row_bytes, n)
    raw = raw.reshape(n_rows, n // block, row_bytes * block // n)
    if act_type == "F16":
        return raw.reshape(n_rows, -1).view(np.float16).astype(np.float32)
    if act_type == "BF16":
        return (raw.reshape(n_rows, -1).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if act_type == "Q8_K":      # float d, int8 qs[256], int16 bsums[16]
        d = raw[..., :4].copy().view(np.float32)
        qs = raw[..., 4:4 + block].view(np.int8).astype(np.float32)
    else:                       # Q8_0: half d, int8 qs[32]; Q8_1: half d, half s, int8 qs[32]
        d = raw[..., :2].copy().view(np.float16).astype(np.float32)
        start = 2 if act_type == "Q8_0" else 4
        qs = raw[..., start:start + block].view(np.int8).astype(np.float32)
    return (qs * d).reshape(n_rows, n)


@dataclass(frozen=True)
class QuantType:
    """One GGUF tensor type as ggml defines it."""
    name: str
    ggml_type: int
    block_size: int           # weights per block; a row length must be a multiple of it
    block_bytes: int          # bytes per block
    bits_per_weight: float    # exact: 8 * block_bytes / block_size
    requires_imatrix: bool    # ggml refuses to quantize to it without activation statistics

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_TYPES

    def fits(self, n_per_row: int) -> bool:
        """Whether a row of this length can be stored in this type."""
        return n_per_row > 0 and n_per_row % self.block_size == 0

    def row_size_bytes(self, n_per_row: int) -> int:
        check_fits(self.name, n_per_row)
        return int(_lib().ggml_row_size(self.ggml_type, n_per_row))

    def tensor_size_bytes(self, shape) -> int:
        """Bytes the tensor data of this shape takes in a GGUF (rows along the last HF axis)."""
        shape = tuple(int(s) for s in shape)
        n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return n_rows * self.row_size_bytes(shape[-1])


@functools.lru_cache(maxsize=None)
def type_catalog() -> dict[str, QuantType]:
    """Every supported type, keyed by its GGUF name, with sizes read from ggml itself."""
    lib = _lib()
    catalog = {}
    for name, type_id in GGML_TYPE_IDS.items():
        block_size = int(lib.ggml_blck_size(type_id))
        block_bytes = int(lib.ggml_type_size(type_id))
        catalog[name] = QuantType(name, type_id, block_size, block_bytes, 8.0 * block_bytes / block_size,
                                  bool(lib.ggml_quantize_requires_imatrix(type_id)))
    return catalog


def get_type(qtype: str | QuantType) -> QuantType:
    """Look up a type by name (case-insensitive); a clear ValueError for an unknown one."""
    if isinstance(qtype, QuantType):
        return qtype
    catalog = type_catalog()
    key = str(qtype).upper()
    if key not in catalog:
        raise ValueError(f"unknown quantization type {qtype!r}; supported: {', '.join(catalog)}")
    return catalog[key]


def check_fits(qtype: str | QuantType, n_per_row: int) -> None:
    """Raise a ValueError naming the rule when a row of `n_per_row` weights cannot be stored as `qtype`."""
    t = get_type(qtype)
    if not t.fits(n_per_row):
        kind = "K-quant and IQ types" if t.block_size == 256 else f"{t.name}"
        raise ValueError(f"{t.name} needs a row length divisible by {t.block_size} ({kind} pack "
                         f"{t.block_size}-weight blocks); this tensor has rows of {n_per_row}")


def fitting_types(n_per_row: int, names=None) -> list[str]:
    """The types (from `names`, default all) that can store rows of this length."""
    return [n for n in (names or type_catalog()) if get_type(n).fits(n_per_row)]


def _as_float32_rows(weight) -> np.ndarray:
    """A C-contiguous float32 numpy view of a 2-D float weight (torch or numpy), validated."""
    if hasattr(weight, "detach"):  # torch.Tensor
        if not weight.dtype.is_floating_point:
            raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
        weight = weight.detach().to(device="cpu").float().numpy()
    weight = np.asarray(weight)
    if weight.dtype.kind != "f":
        raise ValueError(f"weight must be a floating-point array, got {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (rows x row length), got shape {tuple(weight.shape)}")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if not np.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")
    return weight


def _as_imatrix(imatrix, n_per_row: int) -> np.ndarray | None:
    """Validated float32 per-column importance (llama.cpp's imatrix: mean squared activation)."""
    if imatrix is None:
        return None
    if hasattr(imatrix, "detach"):
        imatrix = imatrix.detach().to(device="cpu").float().numpy()
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if imatrix.shape[0] != n_per_row:
        raise ValueError(f"imatrix has {imatrix.shape[0]} entries for rows of {n_per_row}")
    if not np.isfinite(imatrix).all() or (imatrix < 0).any():
        raise ValueError("imatrix must be finite and non-negative")
    return imatrix


def _row_chunks(n_rows: int, n_per_row: int, n_threads: int, min_elements: int) -> list[tuple[int, int]]:
    """(first_row, n_rows) tasks that split the rows evenly across threads, `min_elements` weights or more
    each."""
    rows_per_task = max(1, min_elements // n_per_row)
    rows_per_task = max(rows_per_task, -(-n_rows // (4 * n_threads)))
    return [(r, min(rows_per_task, n_rows - r)) for r in range(0, n_rows, rows_per_task)]


def default_threads() -> int:
    return int(os.environ.get("QUANT_THREADS", os.cpu_count() or 1))


def quantize(weight, qtype: str | QuantType, imatrix=None, n_threads: int | None = None) -> bytes:
    """Quantize a 2-D weight (rows x row length, i.e. HF's [out, in]) to the bytes a GGUF stores.

    Rows go through ggml_quantize_chunk on a thread pool (ctypes releases the GIL); rows are independent,
    so the result does not depend on the split. `imatrix` is the per-column activation importance that
    llama-quantize passes (sum of squares / count).
    """
    return quantize_many([(weight, qtype, imatrix)], n_threads)[0]


def quantize_many(jobs, n_threads: int | None = None) -> list[bytes]:
    """`quantize` of several (weight, qtype, imatrix) jobs, their rows split into one list of tasks for the
    thread pool: many small jobs (GPTQ's block columns of several tensors and types) keep every thread busy
    where one call per job would leave the pool waiting on the slowest chunk of each."""
    n_threads = n_threads or default_threads()
    lib = _lib()
    outs, tasks = [], []
    for weight, qtype, imatrix in jobs:
        t = get_type(qtype)
        w = _as_float32_rows(weight)
        n_rows, n_per_row = w.shape
        check_fits(t, n_per_row)
        im = _as_imatrix(imatrix, n_per_row)
        if t.requires_imatrix and im is None:
            raise ValueError(f"{t.name} cannot be quantized without an imatrix")
        lib.ggml_quantize_init(t.ggml_type)
        out = np.empty(n_rows * t.row_size_bytes(n_per_row), dtype=np.uint8)
        outs.append(out)
        tasks += [(t, w, out, im, first_row, rows) for first_row, rows in
                  _row_chunks(n_rows, n_per_row, n_threads, _MIN_QUANTIZE_ELEMENTS_PER_TASK)]

    def run(task):
        t, w, out, im, first_row, rows = task
        n_per_row = w.shape[1]
        written = lib.ggml_quantize_chunk(t.ggml_type, w.ctypes.data, out.ctypes.data, first_row * n_per_row,
                                          rows, n_per_row, im.ctypes.data if im is not None else None)
        if written != rows * t.row_size_bytes(n_per_row):
            raise RuntimeError(f"ggml wrote {written} bytes for {rows} rows of {t.name}")

    _run_tasks(run, tasks, n_threads)
    return [out.tobytes() for out in outs]


def dequantize(raw: bytes | np.ndarray, qtype: str | QuantType, shape, n_threads: int | None = None
               ) -> np.ndarray:
    """Decode GGUF tensor bytes to float32 with ggml's own to_float (what llama.cpp's CPU backend reads)."""
    t = get_type(qtype)
    shape = tuple(int(s) for s in shape)
    n_per_row = shape[-1]
    n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    row_bytes = t.row_size_bytes(n_per_row)
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8)
    buf = np.ascontiguousarray(buf.reshape(-1))
    if buf.size != n_rows * row_bytes:
        raise ValueError(f"{buf.size} bytes do not hold a {t.name} tensor of shape {shape} "
                         f"({n_rows * row_bytes} expected)")
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    if t.name == "F32":
        out[:] = buf.view(np.float32).reshape(n_rows, n_per_row)
        return out.reshape(shape)
    to_float = _ROW_CONVERT(_lib().ggml_get_type_traits(t.ggml_type).contents.to_float)

    def run(task):
        first_row, rows = task
        to_float(buf.ctypes.data + first_row * row_bytes, out.ctypes.data + first_row * n_per_row * 4,
                 rows * n_per_row)

    _run_tasks(run, _row_chunks(n_rows, n_per_row, n_threads or default_threads(),
                                _MIN_DEQUANTIZE_ELEMENTS_PER_TASK), n_threads)
    return out.reshape(shape)


def fake_quantize(weight, qtype: str | QuantType, imatrix=None, n_threads: int | None = None):
    """Round-trip a weight through ggml: quantize, then dequantize, on the CPU.

    Torch in, torch out (float32, on the input's device); numpy in, numpy out. The values are bit for bit
    what llama.cpp reads back from a GGUF holding this tensor as `qtype`.
    """
    shape = tuple(weight.shape)
    raw = quantize(weight, qtype, imatrix, n_threads)
    values = dequantize(raw, qtype, shape, n_threads)
    if hasattr(weight, "detach"):
        import torch
        return torch.from_numpy(values).to(weight.device)
    return values


@functools.cache
def _thread_pool(n_threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count: starting threads for every call cost more than the work of the
    small calls GPTQ makes (one per block column)."""
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="ggml")


def _run_tasks(fn, tasks, n_threads: int | None) -> None:
    """Run `fn` over tasks on a thread pool (inline for a single task or thread)."""
    n_threads = n_threads or default_threads()
    if n_threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            fn(task)
        return
    for _ in _thread_pool(n_threads).map(fn, tasks):
        pass

"""GPTQ error feedback through ggml's own quantizers.

GPTQ (Frantar et al., 2022) quantizes a weight's input columns in turn and moves each quantization error
onto the columns not yet quantized, where the input Gram matrix H = X^T X says they can cancel it in the
layer output. ggml decides a block's scales and rounding jointly, so here the unit is a whole ggml block
column (32 or 256 input columns, every row): ggml quantizes it, then the block-OBS update

    W[:, later] -= (W[:, S] - Q[:, S]) U_SS^-1 U_S,later        (H^-1 = U^T U, U upper triangular)

spreads its error over the later columns. U_SS^T U_SS is the inverse Hessian of the columns still free, so
(U_SS^T U_SS)^-1's diagonal is what an error in each column of the block costs once the later columns have
compensated; ggml gets it as the block's importance weights (its `imatrix` argument). Blocks go in order of
falling input energy (act-order at block granularity), so the most important errors have the most columns to
absorb them.

GPTQ never revisits a block once its error has moved on. A refinement sweep then does (block coordinate
descent): with every other block as quantized, the best block is the least-squares target
`W_S - (D_rest H_rest,S) H_SS^-1` (D = Q - W); ggml quantizes that target, weighted by H_SS's diagonal, and each
row keeps the new block only where it lowers that row's exact output error, so a sweep never makes a row worse.
A sweep costs more than GPTQ's own pass (on the demo model 5 s against 3.5 s a block of 42 tensor-type pairs),
so a search can rank every (tensor, type) by its GPTQ bytes and `refine` only the ones it measures or ships:
the result is bit for bit `quantize` with the sweep.

Every block column is quantized by `ggml_quantize_chunk` as a matrix of rows x block_size, so the bytes this
returns are ggml's own for those values; they are what the GGUF ships (the exporter copies them, it does not
quantize again). On SmolLM2-135M (wikitext-2 calibration, 16k Gram tokens) GPTQ cuts the layer output error
to 0.18-0.57x of plain imatrix-weighted ggml and one refinement sweep another 4-9% of what is left; the
held-out KLD of llama.cpp's Q5_K_M recipe goes from 0.0204 to 0.0145 (GPTQ alone). With 64k Gram tokens (128
windows, the default) and smoothing, the same recipe goes from 0.0175 to 0.0112; the mix searched at its size
measures 0.0088, against 0.0097 with 16k Gram tokens and no sweep.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import gpu_quantize
import quant_utils
import torch_dequant
from quant_utils import get_type

# Dampening added to H's diagonal, as a fraction of its mean (GPTQ's percdamp). 0.3, not GPTQ's 0.01: the fit
# then transfers to text the calibration did not see (docs/RESULTS.md, "GPTQ dampening 0.3").
DAMP = 0.3
REFINE_SWEEPS = 1   # block coordinate descent sweeps after GPTQ (a second adds about 2% on the demo model)


@dataclass(frozen=True)
class Feedback:
    """What GPTQ needs of one input for one block size: the processing order of the input columns (whole
    blocks, most energetic first), the damped Gram in that order and (`upper`) the upper Cholesky factor of its
    inverse. The factor and the per-block inverses are computed on first use: a refinement sweep of GPTQ's
    bytes (`refine`) needs only the Gram, so refining a search's pairs block after block factorises nothing."""
    order: torch.Tensor         # int64 [n]: input column processed at each position
    hessian: torch.Tensor       # float64 [n, n]: H[order][:, order] + damp
    block_size: int

    @functools.cached_property
    def upper(self) -> torch.Tensor:
        """U with hessian^-1 = U^T U (float64 [n, n])."""
        h = self.hessian
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    @property
    def n_columns(self) -> int:
        return int(self.order.numel())

    @functools.cached_property
    def block_inverses(self) -> list[torch.Tensor]:
        """U_SS^-1 of each block position: shared by every type of this block size and every tensor that reads
        the same input, so it is solved once per factor."""
        b, eye = self.block_size, torch.eye(self.block_size, dtype=self.upper.dtype, device=self.upper.device)
        return [torch.linalg.solve_triangular(self.upper[j:j + b, j:j + b], eye, upper=True)
                for j in range(0, self.n_columns, b)]

    @functools.cached_property
    def hessian_block_inverses(self) -> list[torch.Tensor]:
        """H_SS^-1 of each block position (the refinement sweep's least-squares target)."""
        b = self.block_size
        return [torch.linalg.inv(self.hessian[j:j + b, j:j + b]) for j in range(0, self.n_columns, b)]


def compute_device(device: torch.device) -> torch.device:
    """float64 runs on CUDA and the CPU; MPS has no float64, so Apple GPUs compute this on the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def feedback_factor(gram: torch.Tensor, block_size: int, damp: float = DAMP) -> Feedback:
    """The Feedback for an input whose Gram is `gram` (any dtype, on the device to compute on). Columns that
    never saw a nonzero input get H=1 on the diagonal: their errors stay where they are."""
    device = compute_device(gram.device)
    h = gram.to(device=device, dtype=torch.float64).clone()
    n = h.shape[0]
    if n % block_size:
        raise ValueError(f"a Gram of {n} columns does not split into blocks of {block_size}")
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    block_energy = diag.reshape(-1, block_size).sum(1)
    block_order = torch.argsort(block_energy, descending=True, stable=True)
    order = (block_order[:, None] * block_size + torch.arange(block_size, device=device)[None]).reshape(-1)
    return Feedback(order, h[order][:, order], block_size)


def _decode(raw: bytes, qtype: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """ggml's decoding of `raw` as float64 on `device` (torch_dequant on CUDA: bit for bit ggml's)."""
    if device.type == "cuda" and torch_dequant.supports(qtype):
        return torch_dequant.dequantize(torch_dequant.bytes_on(raw, device), qtype, shape).double()
    return torch.from_numpy(quant_utils.dequantize(raw, qtype, shape)).to(device=device, dtype=torch.float64)


def _check(weight: torch.Tensor, qtype: str, feedback: Feedback):
    t = get_type(qtype)
    if t.is_float:
        raise ValueError(f"{t.name} is not quantized: GPTQ does not apply")
    if t.block_size != feedback.block_size or weight.shape[1] != feedback.n_columns:
        raise ValueError(f"a Feedback for {feedback.n_columns} columns in blocks of {feedback.block_size} does not "
                         f"fit {t.name} on rows of {weight.shape[1]}")
    return t


def _block_positions(feedback: Feedback) -> np.ndarray:
    """The block (in row order) processed at each position."""
    return (feedback.order[::feedback.block_size] // feedback.block_size).cpu().numpy()


def quantize(weight: torch.Tensor, qtype: str, feedback: Feedback, n_threads: int | None = None,
             sweeps: int = REFINE_SWEEPS) -> bytes:
    """The GGUF bytes of a 2-D weight (rows x row length) in `qtype` with GPTQ error feedback and `sweeps`
    refinement sweeps; row layout as quant_utils.quantize returns it. Rows are independent: a subset of rows
    gives those rows' bytes."""
    return quantize_many([weight], [qtype], feedback, n_threads, sweeps)[0]


def quantize_many(weights: Sequence[torch.Tensor], qtypes: Sequence[str], feedback: Feedback,
                  n_threads: int | None = None, sweeps: int = REFINE_SWEEPS) -> list[bytes]:
    """`quantize` of several weights that read the same input (q/k/v, gate/up, one tensor in several types of
    one block size, row samples), in one pass: GPTQ's rows are independent given H, so their rows are stacked,
    every block column of all of them goes to ggml in one dispatch (quant_utils.quantize_many) and one product
    moves all their errors on. Fewer, larger dispatches: on 2 CPU cores a SmolLM2 block's 42 pairs quantize 15%
    faster; on an H200 the sensitivity stage stayed bound by ggml's own work (372 s against 379 s)."""
    stack = _Stack.of(weights, qtypes, feedback)
    device, upper = feedback.upper.device, feedback.upper
    original = stack.original(weights, feedback, device)
    w = original.clone()
    b, n_blocks = feedback.block_size, feedback.n_columns // feedback.block_size
    by_position = [np.empty((z - a, n_blocks, t.block_bytes), dtype=np.uint8) for (a, z), t in stack]
    quantized = torch.empty_like(w)
    for j, u_inv in enumerate(feedback.block_inverses):
        cols = slice(j * b, (j + 1) * b)
        raws, quantized[:, cols] = stack.quantize(w[:, cols], (u_inv ** 2).sum(1), n_threads)
        for ((a, z), t), raw, positions in zip(stack, raws, by_position):
            positions[:, j] = np.frombuffer(raw, dtype=np.uint8).reshape(z - a, t.block_bytes)
        if j + 1 < n_blocks:
            err = (w[:, cols] - quantized[:, cols]) @ u_inv
            w[:, cols.stop:] -= err @ upper[cols, cols.stop:]
    return _swept_bytes(original, quantized, by_position, stack, feedback, n_threads, sweeps)


def refine(weight: torch.Tensor, raw: bytes, qtype: str, feedback: Feedback, n_threads: int | None = None,
           sweeps: int = REFINE_SWEEPS) -> bytes:
    """`sweeps` refinement sweeps of `raw`, this weight's `quantize(..., sweeps=0)` bytes, so that the sweeps can
    wait until a search knows which (tensor, type) it keeps: `refine(w, quantize(w, q, f, sweeps=0), q, f, k)`
    is `quantize(w, q, f, sweeps=k)`, bit for bit."""
    return refine_many([weight], [raw], [qtype], feedback, n_threads, sweeps)[0]


def refine_many(weights: Sequence[torch.Tensor], raws: Sequence[bytes], qtypes: Sequence[str],
                feedback: Feedback, n_threads: int | None = None, sweeps: int = REFINE_SWEEPS) -> list[bytes]:
    """`refine` of several weights that read the same input, their rows stacked (see `quantize_many`)."""
    stack = _Stack.of(weights, qtypes, feedback)
    device = feedback.hessian.device
    original = stack.original(weights, feedback, device)
    n = feedback.n_columns
    quantized = torch.cat([_decode(raw, t.name, (z - a, n), device) for ((a, z), t), raw in zip(stack, raws)]
                          )[:, feedback.order].contiguous()
    positions = _block_positions(feedback)
    by_position = [np.frombuffer(raw, dtype=np.uint8).reshape(z - a, n // t.block_size, t.block_bytes)[:, positions]
                   for ((a, z), t), raw in zip(stack, raws)]     # fancy indexing: writable copies
    return _swept_bytes(original, quantized, by_position, stack, feedback, n_threads, sweeps)


@dataclass(frozen=True)
class _Stack:
    """Weights of one block size stacked by rows: each one's row range in the stack and its type."""
    bounds: tuple[tuple[int, int], ...]
    types: tuple

    @classmethod
    def of(cls, weights: Sequence[torch.Tensor], qtypes: Sequence[str], feedback: Feedback) -> _Stack:
        if len(weights) != len(qtypes) or not weights:
            raise ValueError(f"{len(weights)} weights and {len(qtypes)} types: one type per weight, at least one")
        types = tuple(_check(w, q, feedback) for w, q in zip(weights, qtypes))
        ends = np.cumsum([w.shape[0] for w in weights]).tolist()
        return cls(tuple(zip([0] + ends[:-1], ends)), types)

    def __iter__(self):
        return iter(zip(self.bounds, self.types))

    def original(self, weights: Sequence[torch.Tensor], feedback: Feedback, device: torch.device) -> torch.Tensor:
        """The stacked rows in float64 on `device`, columns in processing order."""
        return torch.cat([w.detach().to(device=device, dtype=torch.float64) for w in weights])[:, feedback.order]

    def quantize(self, columns: torch.Tensor, importance: torch.Tensor, n_threads: int | None
                 ) -> tuple[list[bytes], torch.Tensor]:
        """ggml's bytes of each weight's rows of these columns, in its type, weighted by `importance`, and all
        of them decoded (float64, stacked, on the columns' device). On a CUDA GPU gpu_quantize writes the types it
        has (one copy of all their bytes to the host), ggml on the CPU the others, in one dispatch."""
        values, importance = columns.float(), importance.float()
        device, n_columns = columns.device, columns.shape[1]
        on_gpu = {i: gpu_quantize.quantize(values[a:z], t.name, importance) for i, ((a, z), t) in enumerate(self)
                  if gpu_quantize.supports(t.name, device, has_imatrix=True)}
        raws: list[bytes | None] = [None] * len(self.bounds)
        if on_gpu:
            host = torch.cat([q.reshape(-1) for q in on_gpu.values()]).cpu().numpy()
            offset = 0
            for i, q in on_gpu.items():
                raws[i] = host[offset:offset + q.numel()].tobytes()
                offset += q.numel()
        on_cpu = [i for i in range(len(self.bounds)) if i not in on_gpu]
        if on_cpu:
            values_np, importance_np = values.cpu().numpy(), importance.cpu().numpy()
            for i, raw in zip(on_cpu, quant_utils.quantize_many(
                    [(values_np[slice(*self.bounds[i])], self.types[i], importance_np) for i in on_cpu], n_threads)):
                raws[i] = raw
        decoded = []
        for i, ((a, z), t) in enumerate(self):
            if i in on_gpu and torch_dequant.supports(t.name):
                decoded.append(torch_dequant.dequantize(on_gpu[i].reshape(-1), t.name, (z - a, n_columns)).double())
            else:
                decoded.append(_decode(raws[i], t.name, (z - a, n_columns), device))
        return raws, torch.cat(decoded)


def _swept_bytes(original: torch.Tensor, quantized: torch.Tensor, by_position: list[np.ndarray], stack: _Stack,
                 feedback: Feedback, n_threads: int | None, sweeps: int) -> list[bytes]:
    """The bytes after `sweeps` refinement sweeps, blocks put back in row order (the end of `quantize_many` and
    of `refine_many`, which must agree bit for bit)."""
    for _ in range(sweeps):
        _refine(original, quantized, by_position, stack, feedback, n_threads)
    positions = _block_positions(feedback)
    out = []
    for by_pos in by_position:
        rows = np.empty_like(by_pos)
        rows[:, positions] = by_pos
        out.append(rows.tobytes())
    return out


def _refine(original: torch.Tensor, quantized: torch.Tensor, by_position: list[np.ndarray], stack: _Stack,
            feedback: Feedback, n_threads: int | None) -> None:
    """One block coordinate descent sweep (module docstring), in place: `quantized` (decoded values) and
    `by_position` (their bytes) change together, row by row, only where a row's output error falls."""
    b = feedback.block_size
    hessian = feedback.hessian
    diff = quantized - original
    grad = diff @ hessian                      # D H: each block's coupling to all the others
    for j, h_block_inv in enumerate(feedback.hessian_block_inverses):
        cols = slice(j * b, (j + 1) * b)
        h_block = hessian[cols, cols]
        rest = grad[:, cols] - diff[:, cols] @ h_block
        target = original[:, cols] - rest @ h_block_inv
        raws, candidate = stack.quantize(target, torch.diagonal(h_block), n_threads)
        old, new = quantized[:, cols] - target, candidate - target
        better = ((new @ h_block) * new).sum(1) < ((old @ h_block) * old).sum(1)
        if not bool(better.any()):
            continue
        step = torch.where(better[:, None], candidate - quantized[:, cols], torch.zeros_like(candidate))
        quantized[:, cols] += step
        diff[:, cols] += step
        grad[:, cols.stop:] += step @ hessian[cols, cols.stop:]    # earlier blocks are not visited again
        rows = better.cpu().numpy()
        for ((a, z), t), raw, by_pos in zip(stack, raws, by_position):
            keep = rows[a:z]
            by_pos[keep, j] = np.frombuffer(raw, dtype=np.uint8).reshape(z - a, -1)[keep]

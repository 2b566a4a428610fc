"""Mixed-precision type assignment for GGUF export.

Part 1, per-tensor sensitivity (LayerSensitivityAnalyzer): for every quantizable tensor and every GGUF type
that fits its rows, quantize that tensor alone with ggml's own quantizer (weighted by the imatrix; by default
with GPTQ's error feedback wherever the tensor's input has a Gram, gptq.py, before its refinement sweep: the
"draft", see `draft_bytes`) and measure
- `rel_out_err`: the layer's output error through the input Gram matrix, tr(dW H dW^T) / tr(W H W^T);
- `kld_mean`: the model-level damage, mean KL divergence of the next-token distribution from the original
  model's over held-out calibration tokens (full vocabulary, float32), recomputing only the blocks from the
  perturbed one onward from cached block inputs.
Types whose KLD was not measured (see `kld_types`) get `kld_pred` = the tensor's measured KLD per unit of
output error times their own output error; measured types keep their measurement. Tensors whose output error
does not fall with bits (`irregular_tensors`) get every type measured.
- `act_kld`: the damage of llama.cpp's rounding of this tensor's input to the type's activation format (Q8_0
  in 32-blocks, Q8_K in 256-blocks: activation_rounding.py), measured once per (tensor, format) with the
  weight left in float32. A type's predicted damage (`damage`) is kld_pred + act_kld: on SmolLM2-135M the
  ffn_down inputs alone cost 0.0024 KLD rounded to Q8_K but 0.0005 to Q8_0, as much as a whole Q5-size
  allocation's weight error differs by. A tensor whose every type rounds its input the same way gets
  act_kld 0: its term is a constant of every assignment, so predicted totals omit it (measured KLDs do not).

Results are cached per (tensor, type) as small JSON files under a key of model, data and settings, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import activation_rounding
import calib_stats
from calib_stats import BlockBatch, CalibStats
import gptq
import quant_utils
import torch_dequant
from quant_utils import dequantize, get_type, quantize

# Candidate menus. K-quants pack 256 weights per block; rows not divisible by 256 (hidden 576 or 896, say)
# take the 32-weight-block types instead, as llama-quantize's fallbacks do. IQ4_NL is the 4.5-bit
# non-linear type llama.cpp uses for IQ4_XS rows that K-blocks do not fit.
K_MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BLOCK32_MENU = ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# KLD is measured for these types, one per menu, ~4.5 bits: strong signal, still in the regime where KLD
# grows like the output error ("all" measures every candidate). The other types are predicted from their
# output error and the tensor's measured KLD per unit of output error. On SmolLM2-135M (11 tensors, all
# 6 types measured on the same 512 tokens) 51 of 55 predictions fell within 0.8-1.25x of the measurement,
# median 1.02x; worst 1.8x (Q4_1/Q5_1 on an attn_v, whose asymmetric grid errs in less harmful directions).
DEFAULT_KLD_TYPES = ("Q4_K", "Q4_0")
SENSITIVITY_FORMAT_VERSION = 4   # 2: tied embeddings quantized with the head's imatrix; 3: row samples;
                                 # 4: GPTQ before its refinement sweep (`draft_bytes`)
QUANTIZERS = ("gptq", "ggml")     # gptq: ggml's quantizer with GPTQ error feedback (gptq.py); ggml: ggml alone
# The output error of a type whose KLD is not measured needs only some rows quantized (ggml quantizes rows
# independently, so a row of the sample is bit for bit that row of the whole tensor): tensors over
# SAMPLE_ABOVE_WEIGHTS get an evenly spread row sample of about SAMPLE_WEIGHTS weights. On the Qwen2.5-7B
# shape (H100, 16 cores) quantizing every row of every candidate took 23 s per block, 13 minutes in all; the
# SmolLM2-135M demo's tensors are all below the threshold. A lookup-only embedding's error is measured on the
# rows of the tokens that occur, which is exact.
SAMPLE_ABOVE_WEIGHTS = 32 * 2**20
SAMPLE_WEIGHTS = 8 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Which tensors, which types
# ---------------------------------------------------------------------------------------------------------

def candidate_types(n_per_row: int, k_menu: Sequence[str] = K_MENU,
                    block32_menu: Sequence[str] = BLOCK32_MENU) -> tuple[str, ...]:
    """The K-quant menu when 256-weight blocks fit the row, else the 32-weight-block menu (those that fit)."""
    if all(get_type(t).fits(n_per_row) for t in k_menu):
        return tuple(k_menu)
    return tuple(t for t in block32_menu if get_type(t).fits(n_per_row))


@dataclass(frozen=True)
class TensorSpec:
    """One quantizable weight as the analysis sees it."""
    name: str                   # HF parameter name, e.g. "model.layers.3.mlp.down_proj.weight"
    kind: str                   # "q_proj", ..., "down_proj", "embed_tokens", "lm_head"
    block: int | None           # decoder block index; None for the embedding and the head
    shape: tuple[int, int]      # (rows, row length)
    types: tuple[str, ...]      # candidate GGUF types
    is_embedding: bool          # read by row lookup (token embedding)
    feeds_logits: bool          # multiplies the final hidden state (the head, or a tied embedding)


def quantizable_tensors(model: nn.Module, k_menu: Sequence[str] = K_MENU,
                        block32_menu: Sequence[str] = BLOCK32_MENU) -> list[TensorSpec]:
    """Every linear of every decoder block, the token embedding, and the head when it is not tied."""
    specs = []
    embed_name = calib_stats.embedding_weight_name(model)
    tied = calib_stats.is_tied(model)
    weight = model.get_input_embeddings().weight
    specs.append(TensorSpec(embed_name, "embed_tokens", None, tuple(weight.shape),
                            candidate_types(weight.shape[1], k_menu, block32_menu), True, tied))
    for index, block in enumerate(calib_stats.decoder_blocks(model)):
        prefix = calib_stats.block_prefix(model, index)
        for rel_name, linear in calib_stats.block_linears(block):
            specs.append(TensorSpec(f"{prefix}{rel_name}.weight", rel_name.split(".")[-1], index,
                                    tuple(linear.weight.shape),
                                    candidate_types(linear.weight.shape[1], k_menu, block32_menu), False, False))
    if not tied:
        head = model.get_output_embeddings().weight
        specs.append(TensorSpec(calib_stats.output_weight_name(model), "lm_head", None, tuple(head.shape),
                                candidate_types(head.shape[1], k_menu, block32_menu), False, True))
    return specs


def quantizer_imatrix(spec: TensorSpec, stats: CalibStats, head_name: str | None = None) -> torch.Tensor | None:
    """The imatrix the quantizer gets for this tensor: mean squared input for linears and the head. A tied
    embedding takes the head's (`head_name`): its error hurts far more through the logits than through the
    lookup, and weighting by the final hidden state's energy halves its KLD (SmolLM2-135M, Q5_1: 0.0147 ->
    0.0068). llama-imatrix never records a tied head, so llama.cpp's presets quantize it unweighted; an
    untied embedding (a pure lookup) gets none either."""
    if spec.is_embedding:
        return stats.imatrix(head_name) if spec.feeds_logits and head_name is not None else None
    return stats.imatrix(spec.name)


# ---------------------------------------------------------------------------------------------------------
# Layer output error
# ---------------------------------------------------------------------------------------------------------

def gram_output_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(dW H dW^T) in H's dtype: the squared output change summed over the tokens H was accumulated on
    (divide by that token count for the per-token mean)."""
    w = weight.to(device=gram.device, dtype=gram.dtype)
    dw = new_weight.to(device=gram.device, dtype=gram.dtype) - w
    return float(torch.einsum("oi,oi->", dw @ gram, dw))


def gram_output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(W H W^T): the layer's summed squared output over the same tokens."""
    w = weight.to(device=gram.device, dtype=gram.dtype)
    return float(torch.einsum("oi,oi->", w @ gram, w))


def diagonal_output_error(weight: torch.Tensor, new_weight: torch.Tensor, mean_sq_input: torch.Tensor) -> float:
    """sum_j h_j sum_i dW_ij^2 with h the mean squared input (H's diagonal / N): the output error with the
    inputs' correlations ignored, for inputs too wide to keep a Gram of (what llama.cpp's quantizer weighs).
    Computed on the GPU when either weight is there (a streamed block's weight is held in CPU RAM)."""
    device = new_weight.device if new_weight.device.type != "cpu" else weight.device
    h = mean_sq_input.to(device=device, dtype=torch.float64)
    dw = new_weight.to(device=device, dtype=torch.float64) - weight.to(device=device, dtype=torch.float64)
    return float(dw.square().sum(0) @ h)


def rows_output_error(weight: torch.Tensor, new_weight: torch.Tensor, token_counts: torch.Tensor) -> float:
    """Relative error of an embedding lookup over the calibration tokens: sum_r c_r |dE_r|^2 / sum_r c_r |E_r|^2."""
    c = token_counts.to(torch.float64)
    w = weight.detach().to("cpu", torch.float64)
    dw = new_weight.detach().to("cpu", torch.float64) - w
    return float((c * dw.square().sum(1)).sum() / (c * w.square().sum(1)).sum().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# Model-level damage: KL divergence of the logits from cached block inputs
# ---------------------------------------------------------------------------------------------------------

def kl_per_token(ref_logits: torch.Tensor, ref_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) per row over the full vocabulary, float32, exactly 0 for identical logits.

    With d = z_ref - z: KL = sum p d + log(sum p e^-d) = sum p d + log1p(sum p expm1(-d)); both terms are of
    the size of d, so a tiny KL is not lost in the rounding of two log-sum-exps of size |z|. `logits` is
    overwritten (the vocabulary-wide passes are the cost here, so they run in place).
    """
    d = logits.neg_().add_(ref_logits)
    first = torch.linalg.vecdot(ref_probs, d)
    # Rows where the identity loses precision: some logit rose by > 80 nats (e^-d overflows float32), or
    # sum p e^-d is tiny (>= e^-first by Jensen, so only when first is large) and log1p(second) near -1.
    direct_rows = (d.amin(-1) < -80.0) | (first > 8.0)
    if direct_rows.any():
        z = ref_logits[direct_rows] - d[direct_rows]
        direct = (ref_probs[direct_rows] * (torch.log_softmax(ref_logits[direct_rows], -1)
                                            - torch.log_softmax(z, -1))).sum(-1)
    second = torch.linalg.vecdot(ref_probs, d.neg_().expm1_())
    kl = first + torch.log1p(second)
    if direct_rows.any():
        kl[direct_rows] = direct
    return kl


class HeldOutCache:
    """The held-out windows' hidden states entering every block, and the original model's logits.

    With these, the damage of changing tensors in block i costs only blocks i.. and the head. The reference
    logits come from the same code path, so an unchanged weight gives KL = 0 exactly. `keep_block_inputs`
    False keeps only block 0's inputs (for whole-model measurements: a 7B model's 29 x tokens x 3584 floats
    are gigabytes). The head runs on at most `KL_ROWS` tokens at a time (a 152k vocabulary's logits for
    thousands of tokens would be gigabytes too).
    """

    KL_ROWS = 1024

    def __init__(self, model: nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int,
                 keep_block_inputs: bool = True):
        self.model = model
        self.device = device
        self.ids = [ids[s:s + batch_size] for s in range(0, ids.shape[0], batch_size)]
        self.blocks = calib_stats.decoder_blocks(model)
        self.norm = calib_stats.decoder(model).norm
        self.head = model.get_output_embeddings()
        batches = calib_stats.catch_block_inputs(model, ids, batch_size, device)
        self.kwargs = [b.kwargs for b in batches]
        hidden = [b.hidden for b in batches]
        self.block_inputs = [hidden]                  # [block index][micro-batch]; last = after the last block
        with torch.no_grad():
            for block in self.blocks:
                hidden = [calib_stats.run_block(block, BlockBatch(h, kw)) for h, kw in zip(hidden, self.kwargs)]
                if keep_block_inputs:
                    self.block_inputs.append(hidden)
            self.ref_logits = [torch.cat([self._logits(rows) for rows in self._row_chunks(h)]) for h in hidden]
        self.ref_probs = [torch.softmax(z, -1) for z in self.ref_logits]
        self.n_tokens = int(ids.numel())
        self._stacked: dict[tuple[int, int], dict] = {}

    def _row_chunks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return hidden.reshape(-1, hidden.shape[-1]).split(self.KL_ROWS)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.head.weight.device)   # the last block may sit on another GPU (place_model)
        with calib_stats.float32_params(self.norm), calib_stats.float32_params(self.head):
            z = self.head(self.norm(hidden))
        return z.reshape(-1, z.shape[-1]).float()

    def _kl_sum(self, mb: int, hidden: torch.Tensor) -> float:
        """Summed KL over micro-batch `mb`'s tokens of the logits from these final hidden states."""
        total, start = 0.0, 0
        for rows in self._row_chunks(hidden):
            end = start + rows.shape[0]
            kl = kl_per_token(self.ref_logits[mb][start:end], self.ref_probs[mb][start:end], self._logits(rows))
            total += float(kl.double().sum())
            start = end
        return total

    def _stacked_kwargs(self, mb: int, n_variants: int) -> dict:
        """Block keyword arguments for `n_variants` copies of micro-batch `mb` stacked along the batch."""
        key = (mb, n_variants)
        if key not in self._stacked:
            ids = self.ids[mb].repeat(n_variants, 1)
            self._stacked[key] = calib_stats.catch_block_inputs(self.model, ids, ids.shape[0], self.device)[0].kwargs
        return self._stacked[key]

    @torch.no_grad()
    def kld_means_in_block(self, start_block: int, variants: list[dict[str, torch.Tensor]],
                           act_formats: list[dict[str, str]] | None = None) -> list[float]:
        """Mean KL of each variant, a set of weights of block `start_block` replaced (and, with `act_formats`,
        the inputs of some of its linears rounded: {weight name: activation format}).

        Each variant runs the perturbed block on its own; their outputs are then stacked along the batch and
        go through the later blocks together: the same arithmetic as one at a time, in larger matrix
        products (on a CPU several times faster than small ones).
        """
        totals = [0.0] * len(variants)
        act_formats = act_formats or [{}] * len(variants)
        block = self.blocks[start_block]
        for mb, kwargs in enumerate(self.kwargs):
            h_in = self.block_inputs[start_block][mb]
            outs = []
            for weights, formats in zip(variants, act_formats):
                with replaced_weights(self.model, weights), activation_rounding.rounded_inputs(self.model, formats):
                    outs.append(calib_stats.run_block(block, BlockBatch(h_in, kwargs)))
            hidden = torch.cat(outs) if len(outs) > 1 else outs[0]
            stacked_kwargs = self._stacked_kwargs(mb, len(variants)) if len(outs) > 1 else kwargs
            for later in self.blocks[start_block + 1:]:
                hidden = calib_stats.run_block(later, BlockBatch(hidden, stacked_kwargs))
            for v, h in enumerate(hidden.split(h_in.shape[0])):
                totals[v] += self._kl_sum(mb, h)
        return [t / self.n_tokens for t in totals]

    @torch.no_grad()
    def kld_mean(self, start_block: int | None) -> float:
        """Mean KL over held-out tokens of the model as it is now, recomputed from `start_block` onward
        (None: from the embeddings, for a changed token embedding)."""
        total = 0.0
        for mb, kwargs in enumerate(self.kwargs):
            if start_block is None:
                hidden = calib_stats.catch_block_inputs(self.model, self.ids[mb], self.ids[mb].shape[0],
                                                        self.device)[0].hidden
                start = 0
            else:
                hidden, start = self.block_inputs[start_block][mb], start_block
            for block in self.blocks[start:]:
                hidden = calib_stats.run_block(block, BlockBatch(hidden, kwargs))
            total += self._kl_sum(mb, hidden)
        return total / self.n_tokens

    @torch.no_grad()
    def kld_mean_blockwise(self, block_weights: Callable[[int], dict[str, torch.Tensor]]) -> float:
        """Mean KL of the model as it is now with block i's weights replaced by `block_weights(i)` only while
        block i runs: every micro-batch goes through one block before the next, so one block's replaced
        float32 weights are on the device at a time (a 7B model's would not fit beside the model)."""
        hidden = [calib_stats.catch_block_inputs(self.model, ids, ids.shape[0], self.device)[0].hidden
                  for ids in self.ids]
        for index, block in enumerate(self.blocks):
            with replaced_weights(self.model, block_weights(index)):
                hidden = [calib_stats.run_block(block, BlockBatch(h, kw)) for h, kw in zip(hidden, self.kwargs)]
        return sum(self._kl_sum(mb, h) for mb, h in enumerate(hidden)) / self.n_tokens


@contextlib.contextmanager
def replaced_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily give parameters new values, kept in float32 whatever the model's storage dtype (a
    quantized weight rounded to bf16 would not be the weight llama.cpp holds); a tied embedding changes in
    both of its uses. A value goes to its parameter's GPU; one for a parameter held in CPU RAM stays where it
    is (a streamed block runs on the GPU: calib_stats.streamed_to then leaves it there)."""
    saved = {}
    try:
        for name, value in weights.items():
            param = model.get_parameter(name)
            saved[name] = param.data
            device = value.device if param.device.type == "cpu" else param.device
            param.data = value.to(device=device, dtype=calib_stats.COMPUTE_DTYPE)
        yield model
    finally:
        for name, data in saved.items():
            model.get_parameter(name).data = data


# ---------------------------------------------------------------------------------------------------------
# Per-(tensor, type) result cache
# ---------------------------------------------------------------------------------------------------------

class ResultCache:
    """One small JSON file per (tensor, type): <root>/<run key>/<tensor name>/<TYPE>.json, written atomically."""

    def __init__(self, root: str | os.PathLike | None, run_key: str):
        self.dir = Path(root) / run_key if root is not None else None
        self.memory: dict[tuple[str, str], dict] = {}

    def _path(self, tensor: str, qtype: str) -> Path:
        return self.dir / tensor / f"{qtype}.json"

    def get(self, tensor: str, qtype: str) -> dict | None:
        if (tensor, qtype) in self.memory:
            return self.memory[(tensor, qtype)]
        if self.dir is None or not self._path(tensor, qtype).is_file():
            return None
        entry = json.loads(self._path(tensor, qtype).read_text())
        self.memory[(tensor, qtype)] = entry
        return entry

    def put(self, entry: dict) -> None:
        self.memory[(entry["tensor"], entry["type"])] = entry
        if self.dir is None:
            return
        path = self._path(entry["tensor"], entry["type"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The analyzer
# ---------------------------------------------------------------------------------------------------------

def working_bytes(model: nn.Module, held_out_tokens: int, stack_tokens: int, with_logits: bool = True) -> int:
    """GPU memory the sensitivity analysis and the GA use beside the weights, from the model's widths: the
    reference logits and probabilities of `held_out_tokens` (with_logits: on the GPU holding the head), every
    block's inputs for them, one stacked pass of `stack_tokens` through an MLP, float32 copies of six blocks
    (compute copies, replaced and decoded weights, a streamed block's copy) and 1 GiB of CUDA context, plus
    15% for the allocator. What place_model keeps free on each GPU. (7B shape, defaults: 16.8 GB; measured on
    the H100, 14.6 GB beside the weights with the model on the GPU, 15.7 GB with every block streamed.)"""
    cfg = model.config
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in calib_stats.decoder_blocks(model))
    f32 = 4
    total = (2 * held_out_tokens * cfg.vocab_size * f32 * with_logits
             + (cfg.num_hidden_layers + 1) * held_out_tokens * cfg.hidden_size * f32
             + 4 * stack_tokens * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size) * f32
             + 6 * largest_block * f32 + 2**30)
    return int(1.15 * total)


class LayerSensitivityAnalyzer:
    """Sensitivity of every quantizable tensor to every candidate GGUF type (see the module docstring).

    With `device` CUDA and a model that does not fit there beside its working memory (`max_memory`: bytes
    per device, default the free memory of every GPU; `eval_tokens`: the largest held-out set the GA will
    measure), the blocks are spread over the GPUs and the rest held in CPU RAM and streamed to `device` as
    they run (calib_stats.place_model; `device_map` says where each went). The model is kept resident
    in its own dtype (on `device`, or as placed) and computes in float32 one block at a time
    (calib_stats.float32_params; the KLD re-runs the tail of the network many times, and a 7B model in bf16
    leaves room on a 40 GB budget that its float32 copy would not). `holdout_ids` [n, seq_len] must not
    overlap the windows the statistics came from; they run in
    micro-batches of `kld_batch_size` windows, and the KLDs of up to `kld_stack` perturbations of one block
    run together as one batch of `kld_stack x kld_batch_size` windows through the later blocks.
    """

    def __init__(self, model: nn.Module, stats: CalibStats, holdout_ids: torch.Tensor, cache_dir=None,
                 device="auto", k_menu: Sequence[str] = K_MENU, block32_menu: Sequence[str] = BLOCK32_MENU,
                 kld_types: str | Sequence[str] = DEFAULT_KLD_TYPES, kld_batch_size: int = 4,
                 kld_stack: int = 8, progress: bool = True, max_memory: dict[str, int] | None = None,
                 eval_tokens: int = 0, quantizer: str = "gptq"):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, not {quantizer!r}")
        self.device = calib_stats.resolve_device(device)
        self.quantizer = quantizer
        held_out_tokens = max(int(holdout_ids.numel()), eval_tokens)
        stack_tokens = max(kld_stack * kld_batch_size * holdout_ids.shape[-1], eval_tokens)
        self.device_map = calib_stats.place_model(model, self.device, max_memory,
                                                  working_bytes(model, held_out_tokens, stack_tokens),
                                                  working_bytes(model, held_out_tokens, stack_tokens, False))
        self.model = model.eval()
        self.stats = stats
        self.holdout_ids = holdout_ids.to(torch.long)
        self.tensors = quantizable_tensors(model, k_menu, block32_menu)
        self.kld_types = kld_types
        self.kld_batch_size = kld_batch_size
        self.kld_stack = kld_stack              # perturbed copies of the held-out batch run together
        self.progress = progress
        self.run_key = self._run_key()
        self.cache = ResultCache(cache_dir, self.run_key)
        self.n_computed = 0          # (tensor, type) pairs quantized and measured by this instance
        self._held_out: HeldOutCache | None = None
        self._energy: dict[str, float] = {}      # tr(W H W^T) per tensor
        self.drafts: dict[tuple[str, str], bytes] = {}      # (tensor, type) -> the table's bytes, whole tensors
        self.quantized: dict[tuple[str, str], bytes] = {}   # (tensor, type) -> refined GPTQ bytes (shipped)
        self.plain_quantized: dict[tuple[str, str], bytes] = {}   # the same by ggml alone (see quantized_weight)
        self._feedback: dict[tuple[str, int], gptq.Feedback] = {}   # (Gram key, block size), current block's

    def _run_key(self) -> str:
        """Model, statistics data, held-out data, quantizer and format: what the cached numbers depend on."""
        meta = self.stats.meta
        parts = [f"v{SENSITIVITY_FORMAT_VERSION}", meta.get("model_fingerprint") or
                 calib_stats.model_fingerprint(self.model), meta.get("calib_fingerprint", "unknown"),
                 str(max(self.stats.gram_tokens.values(), default=0)), calib_stats.ids_fingerprint(self.holdout_ids)]
        if self.quantizer != "ggml":
            parts.append(f"{self.quantizer}-damp{gptq.DAMP}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def held_out(self) -> HeldOutCache:
        if self._held_out is None:
            self._held_out = HeldOutCache(self.model, self.holdout_ids, self.device, self.kld_batch_size)
        return self._held_out

    def wants_kld(self, qtype: str) -> bool:
        return self.kld_types == "all" or (self.kld_types != "none" and qtype in self.kld_types)

    def draft_bytes(self, spec: TensorSpec, qtype: str) -> bytes:
        """The whole tensor's bytes in `qtype` as the sensitivity table measures them: `encode` without GPTQ's
        refinement sweep, which lowers every type's error by a few percent and costs more than GPTQ's own pass,
        so it is left to the pairs a search measures or ships (`quantized_bytes`). Kept in `drafts` until
        then."""
        key = (spec.name, qtype)
        if key not in self.drafts:
            self.drafts[key] = self.encode(spec, qtype, sweeps=0)
        return self.drafts[key]

    def quantized_bytes(self, spec: TensorSpec, qtype: str, plain: bool = False) -> bytes:
        """The whole tensor's GGUF bytes in `qtype` as they ship: the draft after GPTQ's refinement sweep, which
        then replaces the draft in memory (without a draft at hand, GPTQ with the sweep in one go: the same
        bytes); the draft itself where GPTQ does not apply (kept in `drafts`); with `plain`, ggml's alone, as
        llama-quantize makes them (`plain_quantized`). No (tensor, type) is quantized twice."""
        key = (spec.name, qtype)
        if plain and self.quantizer != "ggml":
            if key not in self.plain_quantized:
                self.plain_quantized[key] = self.encode(spec, qtype, feedback=False)
            return self.plain_quantized[key]
        if key not in self.quantized:
            feedback = self.feedback_of(spec, qtype)
            if feedback is None or gptq.REFINE_SWEEPS == 0:
                return self.draft_bytes(spec, qtype)
            draft = self.drafts.pop(key, None)
            if draft is None:
                self.quantized[key] = self.encode(spec, qtype, sweeps=gptq.REFINE_SWEEPS)
            else:
                weight = self.model.get_parameter(spec.name).detach()
                self.quantized[key] = gptq.refine(weight, draft, qtype, feedback, sweeps=gptq.REFINE_SWEEPS)
        return self.quantized[key]

    def _decoded(self, raw: bytes, spec: TensorSpec, qtype: str) -> torch.Tensor:
        """float32 values of a whole tensor's bytes: decoded on a CUDA device by torch_dequant (bit-identical to
        ggml's decoder, and only the bytes cross the bus), elsewhere by ggml on the CPU."""
        if self.device.type == "cuda" and torch_dequant.supports(qtype):
            return torch_dequant.dequantize(torch_dequant.bytes_on(raw, self.device), qtype, spec.shape)
        return torch.from_numpy(dequantize(raw, qtype, spec.shape))

    def quantized_weight(self, spec: TensorSpec, qtype: str, plain: bool = False) -> torch.Tensor:
        """The tensor as llama.cpp will hold it in `qtype` (`quantized_bytes`), float32."""
        return self._decoded(self.quantized_bytes(spec, qtype, plain), spec, qtype)

    def draft_weight(self, spec: TensorSpec, qtype: str) -> torch.Tensor:
        """The tensor as the sensitivity table measures it (`draft_bytes`), float32."""
        return self._decoded(self.draft_bytes(spec, qtype), spec, qtype)

    def feedback_of(self, spec: TensorSpec, qtype: str) -> gptq.Feedback | None:
        """GPTQ's factor for this tensor's input at this type's block size; None where the quantizer is plain
        ggml, for float types, and for tensors without a Gram (lookups, inputs wider than --gram_max_dim).
        Factors are kept for one Gram at a time per block size (q/k/v and gate/up share theirs); their Cholesky
        factor is computed only when GPTQ runs (`refine` needs the Gram alone)."""
        t = get_type(qtype)
        if self.quantizer == "ggml" or t.is_float or spec.is_embedding or spec.name not in self.stats.gram_key:
            return None
        key = (self.stats.gram_key[spec.name], t.block_size)
        if key not in self._feedback:
            self._feedback = {k: v for k, v in self._feedback.items() if k[1] != t.block_size}
            self._feedback[key] = gptq.feedback_factor(self.stats.gram_of(spec.name)[0].to(self.device),
                                                       t.block_size)
        return self._feedback[key]

    def encode(self, spec: TensorSpec, qtype: str, rows: torch.Tensor | None = None, feedback: bool = True,
               sweeps: int = 0) -> bytes:
        """The GGUF bytes of this tensor (or of its `rows`) in `qtype`: ggml's quantizer with the imatrix, and
        GPTQ's error feedback with `sweeps` refinement sweeps (0: the table's draft) where `feedback_of` gives
        a factor, unless `feedback` is off (rows are independent either way)."""
        weight = self.model.get_parameter(spec.name).detach()
        if rows is not None:
            weight = weight[rows.to(weight.device)]
        feedback = self.feedback_of(spec, qtype) if feedback else None
        if feedback is None:
            return quantize(weight.cpu(), qtype, self.imatrix_of(spec))
        return gptq.quantize(weight, qtype, feedback, sweeps=sweeps)

    def error_rows(self, spec: TensorSpec) -> torch.Tensor | None:
        """The rows the output error is measured on (None: all; see SAMPLE_ABOVE_WEIGHTS)."""
        n_rows, n_per_row = spec.shape
        if spec.is_embedding and not spec.feeds_logits:
            counts = self.stats.token_counts[:n_rows]
            return torch.nonzero(counts > 0).flatten() if (counts == 0).any() else None
        if n_rows * n_per_row <= SAMPLE_ABOVE_WEIGHTS:
            return None
        return torch.linspace(0, n_rows - 1, max(1, SAMPLE_WEIGHTS // n_per_row)).round().long().unique()

    def imatrix_of(self, spec: TensorSpec) -> torch.Tensor | None:
        """What the quantizer is given for this tensor (see `quantizer_imatrix`)."""
        return quantizer_imatrix(spec, self.stats, calib_stats.output_weight_name(self.model))

    def output_error(self, spec: TensorSpec, new_weight: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
        """`rel_out_err` (the matmul output, through H; a lone embedding's lookup output) and, for embeddings,
        `rel_rows_err` (the lookup output weighted by token frequency); over `rows` only when given (then
        `new_weight` holds just those rows)."""
        weight = self.model.get_parameter(spec.name).detach()
        counts = self.stats.token_counts
        if rows is not None:
            weight, counts = weight[rows.to(weight.device)], counts[rows]
        out = {}
        if spec.is_embedding:
            out["rel_rows_err"] = rows_output_error(weight, new_weight, counts)
        if spec.is_embedding and not spec.feeds_logits:
            out["rel_out_err"] = out["rel_rows_err"]
            return out
        matmul_name = calib_stats.output_weight_name(self.model) if spec.feeds_logits else spec.name
        if matmul_name not in self.stats.gram_key:          # too wide for a Gram: through its diagonal
            h = self.stats.imatrix(matmul_name)
            if spec.name not in self._energy:
                self._energy[spec.name] = diagonal_output_error(weight, torch.zeros_like(weight), h)
            out["rel_out_err"] = diagonal_output_error(weight, new_weight, h) / self._energy[spec.name]
            out["out_err_diagonal"] = True
            return out
        gram = self.stats.gram_of(matmul_name)[0].to(self.device)
        if spec.name not in self._energy:
            self._energy[spec.name] = gram_output_energy(weight, gram)
        out["rel_out_err"] = gram_output_error(weight, new_weight, gram) / self._energy[spec.name]
        return out

    def kld_mean(self, new_weights: dict[str, torch.Tensor]) -> float:
        """Mean KL divergence of the logits on the held-out tokens with these weights replaced."""
        by_name = {s.name: s for s in self.tensors}
        specs = [by_name[n] for n in new_weights]
        if any(s.is_embedding for s in specs):
            start = None
        else:
            n_blocks = len(calib_stats.decoder_blocks(self.model))
            start = min(n_blocks if s.block is None else s.block for s in specs)
        held_out = self.held_out      # the reference must be built from the original weights
        with replaced_weights(self.model, new_weights):
            return held_out.kld_mean(start)

    def kld_means_in_block(self, block: int, variants: list[dict[str, torch.Tensor]],
                           act_formats: list[dict[str, str]] | None = None) -> list[float]:
        """Mean KL of each variant (weights of decoder block `block` replaced, inputs rounded as `act_formats`
        says), stacked `kld_stack` at a time."""
        held_out = self.held_out
        act_formats = act_formats or [{}] * len(variants)
        out = []
        for start in range(0, len(variants), self.kld_stack):
            out += held_out.kld_means_in_block(block, variants[start:start + self.kld_stack],
                                               act_formats[start:start + self.kld_stack])
        return out

    def activation_formats(self, spec: TensorSpec) -> list[str]:
        """The rounded formats of this tensor's input whose damage is measured: none for a pure lookup, and
        none when every type of its menu rounds the input the same way. That term is then the same for every
        choice and cannot move an allocation (SmolLM2-135M: every 576-wide input, 190 s of 824 on 2 cores);
        predicted damages leave it out."""
        if spec.is_embedding and not spec.feeds_logits:
            return []
        formats = {activation_rounding.rounding_of(t) for t in spec.types}
        if len(formats) < 2:
            return []
        return sorted(formats - set(quant_utils.FLOAT_TYPES))

    def activation_klds(self, specs: list[TensorSpec]) -> dict[tuple[str, str], float]:
        """{(tensor, format): mean KL with only this tensor's input rounded to the format}, cached like the
        weight entries (under type "act_<format>"). The weights stay float32: this is the activation term
        alone, added to each weight type's damage by `entry_damage`."""
        out, need = {}, []
        for spec in specs:
            for fmt in self.activation_formats(spec):
                entry = self.cache.get(spec.name, f"act_{fmt}")
                if entry is None:
                    need.append((spec, fmt))
                else:
                    out[(spec.name, fmt)] = entry["kld_mean"]
        if not need:
            return out
        in_block = [(spec, fmt) for spec, fmt in need if spec.block is not None]
        at_head = [(spec, fmt) for spec, fmt in need if spec.block is None]
        klds = []
        if in_block:
            klds = self.kld_means_in_block(in_block[0][0].block, [{}] * len(in_block),
                                           [{spec.name: fmt} for spec, fmt in in_block])
        held_out = self.held_out
        n_blocks = len(calib_stats.decoder_blocks(self.model))
        for spec, fmt in at_head:                 # the head's matmul: only the head runs
            with activation_rounding.rounded_inputs(self.model, {spec.name: fmt}):
                klds.append(held_out.kld_mean(n_blocks))
        for (spec, fmt), kld in zip(in_block + at_head, klds):
            self.cache.put({"tensor": spec.name, "type": f"act_{fmt}", "kld_mean": kld,
                            "kld_tokens": int(self.holdout_ids.numel())})
            out[(spec.name, fmt)] = kld
        return out

    def measure_errors(self, spec: TensorSpec, qtype: str, whole: bool = True
                       ) -> tuple[dict, torch.Tensor | None]:
        """Quantize one tensor to one type (the draft); its entry with the output errors (on `error_rows`), and
        the whole draft weight, or None when `whole` is False and a row sample sufficed."""
        t0 = time.perf_counter()
        rows = self.error_rows(spec)
        if whole or rows is None:
            new_weight = self.draft_weight(spec, qtype)
            new_rows = new_weight if rows is None else new_weight[rows.to(new_weight.device)]
        else:
            new_weight = None
            shape = (int(rows.numel()), spec.shape[1])
            new_rows = torch.from_numpy(dequantize(self.encode(spec, qtype, rows), qtype, shape))
        entry = {"tensor": spec.name, "type": qtype, "kind": spec.kind, "block": spec.block,
                 "bits_per_weight": get_type(qtype).bits_per_weight,
                 "size_bytes": get_type(qtype).tensor_size_bytes(spec.shape),
                 **self.output_error(spec, new_rows, rows),
                 "error_rows": spec.shape[0] if rows is None else int(rows.numel()),
                 "kld_mean": None, "kld_tokens": 0, "seconds": time.perf_counter() - t0}
        return entry, new_weight

    def _measure_group(self, pairs: list[tuple[TensorSpec, str]], on_entry) -> list[dict]:
        """Measure the pairs of one decoder block (or of one tensor outside the blocks), reusing cached
        entries: output errors for each, then the KLDs asked for, stacked when they share a block. A tensor
        whose output error is irregular in bits (see `irregular_tensors`) gets every type's KLD measured."""
        specs = {spec.name: spec for spec, _ in pairs}
        entries, weights, fresh = {}, {}, set()
        for spec, qtype in pairs:
            entry = self.cache.get(spec.name, qtype)
            if entry is None:
                entry, new_weight = self.measure_errors(spec, qtype, whole=self.wants_kld(qtype))
                if new_weight is not None:
                    weights[(spec.name, qtype)] = new_weight
                fresh.add((spec.name, qtype))
            entries[(spec.name, qtype)] = entry
        irregular = irregular_tensors(list(entries.values()))
        need = [key for key, e in entries.items()
                if e["kld_mean"] is None and (self.wants_kld(key[1]) or key[0] in irregular)]
        for key in need:
            if key not in weights:
                weights[key] = self.draft_weight(specs[key[0]], key[1])
        if need:
            t0 = time.perf_counter()
            block = pairs[0][0].block
            variants = [{name: weights[(name, qtype)]} for name, qtype in need]
            if block is not None:
                klds = self.kld_means_in_block(block, variants)
            else:
                klds = [self.kld_mean(v) for v in variants]
            per_pair_s = (time.perf_counter() - t0) / len(need)
            for key, kld in zip(need, klds):
                entries[key] = dict(entries[key], kld_mean=kld, kld_tokens=int(self.holdout_ids.numel()),
                                    seconds=entries[key]["seconds"] + per_pair_s)
        for key in [k for k in entries if k in fresh or k in need]:
            self.cache.put(entries[key])
            self.n_computed += 1
            if on_entry is not None:
                on_entry(entries[key])
        return list(entries.values())

    def _groups(self) -> list[list[tuple[TensorSpec, str]]]:
        """All (tensor, type) pairs, grouped by decoder block; the embedding and the head alone."""
        groups: dict = {}
        for spec in self.tensors:
            key = ("block", spec.block) if spec.block is not None else ("tensor", spec.name)
            groups.setdefault(key, []).extend((spec, t) for t in spec.types)
        return list(groups.values())

    def run(self, on_entry: Callable[[dict], None] | None = None) -> "SensitivityTable":
        """Measure every (tensor, type), reusing cached results; `on_entry` sees each newly computed one."""
        groups = self._groups()
        bar = tqdm(total=len(groups), desc="sensitivity", unit="group", disable=not self.progress)
        done: dict[tuple[str, str], dict] = {}
        act: dict[tuple[str, str], float] = {}
        for group in groups:
            spec = group[0][0]
            bar.set_postfix_str(f"block {spec.block}" if spec.block is not None else spec.kind, refresh=False)
            for entry in self._measure_group(group, on_entry):
                done[(entry["tensor"], entry["type"])] = entry
            act.update(self.activation_klds(list({s.name: s for s, _ in group}.values())))
            bar.update()
        bar.close()
        entries = [dict(done[(spec.name, t)], act_kld=act.get((spec.name, activation_rounding.rounding_of(t)), 0.0))
                   for spec in self.tensors for t in spec.types]
        meta = {"run_key": self.run_key, "kld_tokens": int(self.holdout_ids.numel()),
                "kld_types": self.kld_types if isinstance(self.kld_types, str) else list(self.kld_types),
                **{k: v for k, v in self.stats.meta.items() if isinstance(v, (int, float, str))}}
        return SensitivityTable(predict_kld(entries), meta)


IRREGULAR_ERROR_FACTOR = 2.0


def irregular_tensors(entries: list[dict], factor: float = IRREGULAR_ERROR_FACTOR) -> set[str]:
    """Tensors whose output error is more than `factor` times larger at some type than at a type of fewer
    bits. Normally the error falls about 4x per bit; an inversion means a few weights or channels dominate
    (e.g. a massive-activation channel into a down_proj that one grid stores well and another badly), and then
    one measured type does not predict the others: all get measured."""
    by_tensor: dict[str, list[dict]] = {}
    for e in entries:
        by_tensor.setdefault(e["tensor"], []).append(e)
    out = set()
    for name, es in by_tensor.items():
        for low in es:
            if any(high["bits_per_weight"] > low["bits_per_weight"]
                   and high["rel_out_err"] > factor * low["rel_out_err"] for high in es):
                out.add(name)
                break
    return out


def predict_kld(entries: list[dict]) -> list[dict]:
    """Add `kld_pred` to every entry: the measured KLD where there is one; otherwise the tensor's gain
    (geometric mean over its measured types of kld_mean / rel_out_err) times the entry's rel_out_err.
    Near a small perturbation both are quadratic in the weight error, so the ratio is the tensor's
    downstream sensitivity per unit of output error."""
    gains: dict[str, list[float]] = {}
    for e in entries:
        if e.get("kld_mean") is not None and e["rel_out_err"] > 0 and e["kld_mean"] > 0:
            gains.setdefault(e["tensor"], []).append(math.log(e["kld_mean"] / e["rel_out_err"]))
    out = []
    for e in entries:
        e = dict(e)
        if e.get("kld_mean") is not None:
            e["kld_pred"] = e["kld_mean"]
        elif e["tensor"] in gains:
            e["kld_pred"] = math.exp(sum(gains[e["tensor"]]) / len(gains[e["tensor"]])) * e["rel_out_err"]
        else:
            e["kld_pred"] = None
        out.append(e)
    return out


# ---------------------------------------------------------------------------------------------------------
# The table: save, plot
# ---------------------------------------------------------------------------------------------------------

TABLE_FIELDS = ("bits_per_weight", "size_bytes", "rel_out_err", "kld_mean", "kld_pred", "act_kld")


def entry_damage(entry: dict) -> float | None:
    """Predicted model damage of one (tensor, type): its weight error's KLD plus its input rounding's."""
    if entry.get("kld_pred") is None:
        return None
    return entry["kld_pred"] + entry.get("act_kld", 0.0)


@dataclass
class SensitivityTable:
    entries: list[dict]
    meta: dict

    def tensors(self) -> list[str]:
        return list(dict.fromkeys(e["tensor"] for e in self.entries))

    def types(self) -> list[str]:
        names = dict.fromkeys(e["type"] for e in self.entries)
        return sorted(names, key=lambda t: (get_type(t).bits_per_weight, t))

    def lookup(self) -> dict[tuple[str, str], dict]:
        return {(e["tensor"], e["type"]): e for e in self.entries}

    def to_tensors(self) -> dict:
        """Plain matrices [n_tensors, n_types] (NaN where a type does not fit), loadable with weights_only."""
        tensors, types, table = self.tensors(), self.types(), self.lookup()
        out = {"format_version": SENSITIVITY_FORMAT_VERSION, "tensors": tensors, "types": types,
               "meta": self.meta}
        for field in TABLE_FIELDS:
            m = torch.full((len(tensors), len(types)), float("nan"), dtype=torch.float64)
            for i, name in enumerate(tensors):
                for j, qtype in enumerate(types):
                    value = table.get((name, qtype), {}).get(field)
                    if value is not None:
                        m[i, j] = float(value)
            out[field] = m
        return out

    def save(self, path_prefix: str | os.PathLike) -> tuple[Path, Path]:
        """Write <prefix>.pt (matrices) and <prefix>.json (entries), each atomically."""
        prefix = Path(path_prefix)
        pt_path, json_path = prefix.with_name(prefix.name + ".pt"), prefix.with_name(prefix.name + ".json")
        calib_stats.atomic_torch_save(self.to_tensors(), pt_path)
        tmp = json_path.with_name(json_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"meta": self.meta, "entries": self.entries}, indent=1))
        os.replace(tmp, json_path)
        return pt_path, json_path


def plot_heatmap(table: SensitivityTable, path: str | os.PathLike, field: str = "kld_pred") -> None:
    """log10(field) as blocks x tensor kinds, one panel per type; embedding/head values in the panel titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    block_entries = [e for e in table.entries if e["block"] is not None]
    kinds = list(dict.fromkeys(e["kind"] for e in block_entries))
    n_blocks = max(e["block"] for e in block_entries) + 1
    types = table.types()
    grids = {t: np.full((n_blocks, len(kinds)), np.nan) for t in types}
    extras = {t: [] for t in types}
    for e in table.entries:
        value = e.get(field)
        if value is None or value <= 0:
            continue
        if e["block"] is None:
            extras[e["type"]].append(f"{e['kind']} {value:.1e}")
        else:
            grids[e["type"]][e["block"], kinds.index(e["kind"])] = math.log10(value)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-6.0, 0.0)
    n_cols = min(6, len(types))
    n_rows = -(-len(types) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 0.16 * n_blocks * n_rows + 1.5),
                             squeeze=False, constrained_layout=True)
    for ax, qtype in zip(axes.flat, types):
        im = ax.imshow(grids[qtype], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"{qtype}\n" + "; ".join(extras[qtype]), fontsize=7)
        ax.set_xticks(range(len(kinds)), [k.replace("_proj", "") for k in kinds], fontsize=6, rotation=90)
        ax.set_yticks(range(0, n_blocks, 5), [str(b) for b in range(0, n_blocks, 5)], fontsize=6)
        ax.set_ylabel("block", fontsize=6)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"log10 {field}")
    path = Path(path)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Additivity: does the sum of single-tensor KLDs rank mixed assignments like their measured KLD?
# ---------------------------------------------------------------------------------------------------------

def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def random_assignments(table: SensitivityTable, n_assignments: int, seed: int,
                       level: float | None = None) -> list[dict[str, str]]:
    """Random mixed assignments, tensor -> type. Each tensor takes its candidate of rank
    Binomial(n_types - 1, p) in bits order, with p = `level` for all assignments (similar sizes, differing
    in which tensors are cut), or, when `level` is None, p spread from 0.05 to 0.95 (low-bit to high-bit)."""
    rng = np.random.default_rng(seed)
    by_tensor: dict[str, list[str]] = {}
    for e in sorted(table.entries, key=lambda e: e["bits_per_weight"]):
        by_tensor.setdefault(e["tensor"], []).append(e["type"])
    levels = [level] * n_assignments if level is not None else list(np.linspace(0.05, 0.95, n_assignments))
    return [{t: types[rng.binomial(len(types) - 1, p)] for t, types in by_tensor.items()} for p in levels]


def additivity_report(analyzer: LayerSensitivityAnalyzer, table: SensitivityTable,
                      assignments: list[dict[str, str]], field: str = "kld_pred",
                      ids: torch.Tensor | None = None) -> dict:
    """Predicted (sum over tensors of single-tensor `field`) versus measured KLD of mixed assignments, all
    tensors of an assignment quantized at once, measured on the analyzer's held-out windows or on `ids`
    (other text: then it also tests how the table carries over). Returns lists `predicted`, `measured`,
    `size_bytes` and the Spearman correlation of predicted with measured."""
    table_of = table.lookup()
    specs = {s.name: s for s in analyzer.tensors}
    held_out = analyzer.held_out if ids is None else HeldOutCache(analyzer.model, ids.to(torch.long),
                                                                  analyzer.device, analyzer.kld_batch_size)
    predicted, measured, sizes = [], [], []
    for assignment in tqdm(assignments, desc="additivity", unit="assignment", disable=not analyzer.progress):
        weights = {name: analyzer.draft_weight(specs[name], qtype) for name, qtype in assignment.items()}
        with replaced_weights(analyzer.model, weights):
            measured.append(held_out.kld_mean(None))
        predicted.append(sum(table_of[(n, t)][field] for n, t in assignment.items()))
        sizes.append(sum(table_of[(n, t)]["size_bytes"] for n, t in assignment.items()))
    return {"predicted": predicted, "measured": measured, "size_bytes": sizes,
            "spearman": spearman(predicted, measured)}

# ---------------------------------------------------------------------------------------------------------
# Bit allocation: the problem, two classical allocators, and the genetic algorithm
# ---------------------------------------------------------------------------------------------------------

def pareto_menu(types, size_bytes, damage) -> list[tuple[str, float, float]]:
    """(type, bytes, damage) sorted by size, keeping only types that beat every smaller one on damage: a
    type no smaller and no better than another is never worth choosing (e.g. Q4_0 beside IQ4_NL)."""
    entries = sorted(zip(types, map(float, size_bytes), map(float, damage)), key=lambda e: (e[1], e[2]))
    kept = []
    for entry in entries:
        if not kept or entry[2] < kept[-1][2]:
            kept.append(entry)
    return kept


@dataclass
class AllocationProblem:
    """One type per tensor under a byte budget: the table every allocator works on.

    `menus[i]` lists tensor i's candidate types in ascending size; `size_bytes[i, j]` is the bytes the tensor
    takes in the file as menu entry j (alignment padding included), `damage[i, j]` its predicted damage
    (single-tensor KLD); entries past a menu's end are inf. `fixed_bytes` is the rest of the file (header,
    metadata, unquantized tensors), so `fixed_bytes + sum(size)` is the exact file size. With a decode cost
    table, `decode_s[i, j]` is the predicted decode seconds per token the entry adds and `base_decode_s` the
    rest (decode_speed.py), so `base_decode_s + sum(decode_s)` is the predicted decode time.
    """
    tensor_names: list[str]
    menus: list[list[str]]
    size_bytes: np.ndarray
    damage: np.ndarray
    fixed_bytes: int
    block_ids: np.ndarray  # decoder block of each tensor; -1 for embedding and output
    decode_s: np.ndarray | None = None
    base_decode_s: float = 0.0

    @classmethod
    def build(cls, tensor_names, menus, size_bytes, damage, fixed_bytes, block_ids,
              decode_s: Sequence[dict[str, float]] | None = None, base_decode_s: float = 0.0):
        menus = [pareto_menu(m, s, d) for m, s, d in zip(menus, size_bytes, damage)]
        n, width = len(tensor_names), max(len(m) for m in menus)
        sizes = np.full((n, width), np.inf)
        dmg = np.full((n, width), np.inf)
        times = None if decode_s is None else np.full((n, width), np.inf)
        for i, menu in enumerate(menus):
            sizes[i, :len(menu)] = [size for _, size, _ in menu]
            dmg[i, :len(menu)] = [d for _, _, d in menu]
            if times is not None:
                times[i, :len(menu)] = [decode_s[i][t] for t, _, _ in menu]
        return cls(list(tensor_names), [[t for t, _, _ in m] for m in menus], sizes, dmg, int(fixed_bytes),
                   np.asarray(block_ids), times, float(base_decode_s))

    def decode_seconds(self, genome: np.ndarray) -> float | None:
        """Predicted decode seconds per token (None without a decode cost table)."""
        if self.decode_s is None:
            return None
        return self.base_decode_s + float(self.decode_s[np.arange(len(genome)), genome].sum())

    @property
    def menu_lengths(self) -> np.ndarray:
        return np.array([len(m) for m in self.menus])

    def file_size_bytes(self, genome: np.ndarray) -> int:
        return self.fixed_bytes + int(self.size_bytes[np.arange(len(genome)), genome].sum())

    def predicted_damage(self, genome: np.ndarray) -> float:
        return float(self.damage[np.arange(len(genome)), genome].sum())

    def smallest(self) -> np.ndarray:
        return np.zeros(len(self.menus), dtype=np.int64)

    def largest(self) -> np.ndarray:
        return self.menu_lengths - 1

    def feasible_range(self) -> tuple[int, int]:
        return self.file_size_bytes(self.smallest()), self.file_size_bytes(self.largest())

    def types_of(self, genome: np.ndarray) -> dict[str, str]:
        return {name: self.menus[i][int(g)] for i, (name, g) in enumerate(zip(self.tensor_names, genome))}

    def genome_of(self, tensor_types: dict[str, str]) -> np.ndarray:
        """The genome of an assignment by name; a type missing from a tensor's menu takes the nearest size."""
        genome = np.zeros(len(self.menus), dtype=np.int64)
        for i, name in enumerate(self.tensor_names):
            wanted = tensor_types[name]
            if wanted in self.menus[i]:
                genome[i] = self.menus[i].index(wanted)
            else:
                bpw = quant_utils.get_type(wanted).bits_per_weight
                bpws = [quant_utils.get_type(t).bits_per_weight for t in self.menus[i]]
                genome[i] = int(np.argmin(np.abs(np.array(bpws) - bpw)))
        return genome


def repair(problem: AllocationProblem, genome: np.ndarray, budget_bytes: int,
           time_limit_s: float | None = None) -> np.ndarray:
    """Fit a genome to the budget: downgrade where predicted damage per byte saved is least; with a decode
    time limit, then swap types where the most time is saved per damage added (within the budget); then
    spend the spare bytes on the upgrades with the most damage removed per byte that keep to the limit. The
    result is always within budget (the budget is checked to be feasible up front); within the time limit
    when some swap sequence gets there (`decode_seconds` says)."""
    g = genome.copy()
    rows = np.arange(len(g))
    size = problem.file_size_bytes(g)
    while size > budget_bytes:
        can = g > 0
        lower = np.where(can, g - 1, 0)
        saved = problem.size_bytes[rows, g] - problem.size_bytes[rows, lower]
        cost = (problem.damage[rows, lower] - problem.damage[rows, g]) / np.where(can, saved, 1)
        cost[~can] = np.inf
        i = int(np.argmin(cost))
        if not can[i]:
            raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest assignment")
        size -= int(saved[i])
        g[i] -= 1
    timed = time_limit_s is not None and problem.decode_s is not None
    if timed:
        g, size = _speed_up(problem, g, size, budget_bytes, time_limit_s)
    slack_s = time_limit_s - problem.decode_seconds(g) if timed else np.inf
    last = problem.menu_lengths - 1
    while True:
        can = g < last
        upper = np.where(can, g + 1, g)
        extra = problem.size_bytes[rows, upper] - problem.size_bytes[rows, g]
        can &= extra <= budget_bytes - size
        if timed:
            extra_s = problem.decode_s[rows, upper] - problem.decode_s[rows, g]
            can &= extra_s <= max(slack_s, 0.0)
        if not can.any():
            return g
        gain = (problem.damage[rows, g] - problem.damage[rows, upper]) / np.where(extra > 0, extra, 1)
        gain[~can] = -np.inf
        i = int(np.argmax(gain))
        if gain[i] <= 0:
            return g
        size += int(extra[i])
        if timed:
            slack_s -= float(extra_s[i])
        g[i] += 1


def _speed_up(problem: AllocationProblem, g: np.ndarray, size: int, budget_bytes: int, time_limit_s: float
              ) -> tuple[np.ndarray, int]:
    """Swap tensors to faster types (any entry of their menu), most decode time saved per damage added first,
    each swap within the byte budget, until the predicted time is within the limit or no swap saves time."""
    rows = np.arange(len(g))[:, None]
    valid = np.isfinite(problem.size_bytes)
    while problem.decode_seconds(g) > time_limit_s:
        cur = g[:, None]
        saved_s = problem.decode_s[rows, cur] - problem.decode_s          # > 0: faster
        extra_b = problem.size_bytes - problem.size_bytes[rows, cur]
        added = problem.damage - problem.damage[rows, cur]
        ok = valid & (saved_s > 0) & (extra_b <= budget_bytes - size)
        if not ok.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(ok, saved_s / np.maximum(added, 1e-12), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        size += int(extra_b[i, j])
        g[i] = j
    return g, size


def greedy_allocation(problem: AllocationProblem, budget_bytes: int, time_limit_s: float | None = None
                      ) -> np.ndarray:
    """The classical allocator: from the smallest types, upgrade by damage removed per byte until full."""
    return repair(problem, problem.smallest(), budget_bytes, time_limit_s)


def lagrangian_allocation(problem: AllocationProblem, budget_bytes: int, iters: int = 60,
                          time_limit_s: float | None = None) -> np.ndarray:
    """Knapsack by Lagrange multiplier (exllamav2-style): each tensor minimises damage + lam * bytes; lam is
    bisected to the budget, then the result is repaired to fill or fit it exactly."""
    lo, hi = 0.0, 1.0
    pick = lambda lam: np.argmin(problem.damage + lam * problem.size_bytes, axis=1)
    while problem.file_size_bytes(pick(hi)) > budget_bytes and hi < 1e30:
        hi *= 10
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.file_size_bytes(pick(mid)) > budget_bytes else (lo, mid)
    return repair(problem, pick(hi), budget_bytes, time_limit_s)


@dataclass
class GAResult:
    genome: np.ndarray
    measured_kld: float | None
    predicted_damage: float
    history: list[dict] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # genome bytes -> measured KLD


def seeds_to_measure(problem: AllocationProblem, seeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The seeds worth an end-to-end measurement up front: those no larger seed is predicted to beat. Under a
    byte budget size is free, so a smaller, worse seed (the Q2_K preset beside Q4_K_M) is not the answer unless
    the proxy is wrong; it stays in the population and is measured if it ever ranks among the best."""
    points = [(problem.file_size_bytes(g), problem.predicted_damage(g)) for g in seeds]
    return [g for g, (s, d) in zip(seeds, points)
            if not any(s2 >= s and d2 < d or s2 > s and d2 <= d for s2, d2 in points)]


class MixedPrecisionGA:
    """Genetic search for a per-tensor type assignment under an exact byte budget.

    Fitness is multi-fidelity (in the spirit of EvoPress): every individual has the proxy (sum of single-tensor
    damages); each generation the best few not yet measured get the end-to-end KLD of the fake-quantized
    model (`measure_fn`), and from then on rank by it, the proxy being rescaled to the measured values. The
    answer is the individual with the lowest measured KLD, never the proxy's favourite alone.

    With `time_limit_s` (and a problem with decode costs) every individual is also repaired toward the predicted
    decode-time limit; one still over it ranks behind every individual within it and is never the answer.
    """

    def __init__(self, problem: AllocationProblem, budget_bytes: int, pop_size: int = 20, generations: int = 12,
                 measure_fn=None, measures_per_generation: int = 2, seed: int = 0, seed_genomes=(),
                 elite: int = 2, tournament_size: int = 3, mutation_rate: float | None = None,
                 time_limit_s: float | None = None):
        low, high = problem.feasible_range()
        if not low <= budget_bytes:
            raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest assignment ({low:,} bytes); "
                             f"feasible range {low:,} .. {high:,} bytes")
        self.problem, self.budget_bytes = problem, int(budget_bytes)
        self.pop_size, self.generations = pop_size, generations
        self.measure_fn, self.measures_per_generation = measure_fn, measures_per_generation
        self.rng = np.random.default_rng(seed)
        self.seed_genomes = [np.asarray(g, dtype=np.int64) for g in seed_genomes]
        self.elite, self.tournament_size = elite, tournament_size
        self.mutation_rate = mutation_rate or 2.0 / len(problem.menus)
        self.measured: dict[bytes, float] = {}
        self.time_limit_s = time_limit_s if problem.decode_s is not None else None

    def _repair(self, genome: np.ndarray) -> np.ndarray:
        return repair(self.problem, genome, self.budget_bytes, self.time_limit_s)

    def too_slow(self, genome: np.ndarray) -> bool:
        """Predicted decode time over the limit (never, without one)."""
        return self.time_limit_s is not None and self.problem.decode_seconds(genome) > self.time_limit_s * (1 + 1e-9)

    # -- operators -------------------------------------------------------------------------------------
    def initialize_population(self) -> list[np.ndarray]:
        """Presets that fit, the greedy and Lagrangian solutions, then random individuals, all repaired."""
        p = self.problem
        population = [self._repair(g) for g in self.seed_genomes]
        population += [greedy_allocation(p, self.budget_bytes, self.time_limit_s),
                       lagrangian_allocation(p, self.budget_bytes, time_limit_s=self.time_limit_s)]
        while len(population) < self.pop_size:
            random_genome = (self.rng.random(len(p.menus)) * p.menu_lengths).astype(np.int64)
            population.append(self._repair(random_genome))
        return self._unique(population)[:self.pop_size] if len(population) > self.pop_size else population

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Uniform crossover, or block-wise (a decoder block's tensors travel together), half the time each."""
        if self.rng.random() < 0.5:
            take_b = self.rng.random(len(a)) < 0.5
        else:
            blocks = np.unique(self.problem.block_ids)
            from_b = set(blocks[self.rng.random(len(blocks)) < 0.5].tolist())
            take_b = np.array([bid in from_b for bid in self.problem.block_ids])
        return np.where(take_b, b, a)

    def mutate(self, genome: np.ndarray) -> np.ndarray:
        """Move a few tensors one step up or down in size."""
        g = genome.copy()
        hit = self.rng.random(len(g)) < self.mutation_rate
        if not hit.any():
            hit[self.rng.integers(len(g))] = True
        step = np.where(self.rng.random(len(g)) < 0.5, -1, 1)
        g[hit] = np.clip(g[hit] + step[hit], 0, self.problem.menu_lengths[hit] - 1)
        return g

    # -- fitness ---------------------------------------------------------------------------------------
    def _proxy(self, population) -> np.ndarray:
        return np.array([self.problem.predicted_damage(g) for g in population])

    def _fitness(self, population) -> np.ndarray:
        """Measured KLD where known; elsewhere the proxy scaled by the median measured/proxy ratio; an
        individual over the decode-time limit behind all others (by how far over)."""
        proxy = self._proxy(population)
        ratios = [kld / max(self.problem.predicted_damage(np.frombuffer(k, dtype=np.int64)), 1e-12)
                  for k, kld in self.measured.items()]
        scale = float(np.median(ratios)) if ratios else 1.0
        fitness = np.array([self.measured.get(g.tobytes(), p * scale) for g, p in zip(population, proxy)])
        for i, g in enumerate(population):
            if self.too_slow(g):
                fitness[i] = 1e6 * (1 + self.problem.decode_seconds(g) / self.time_limit_s)
        return fitness

    def _measure_best(self, population) -> None:
        """Measure the end-to-end KLD of the best individuals (by current fitness) not measured yet."""
        if self.measure_fn is None:
            return
        order = np.argsort(self._fitness(population), kind="stable")
        todo = [population[i] for i in order if population[i].tobytes() not in self.measured]
        for g in todo[:self.measures_per_generation]:
            self.measured[g.tobytes()] = float(self.measure_fn(self.problem.types_of(g)))

    def _tournament(self, population, fitness) -> np.ndarray:
        picks = self.rng.choice(len(population), size=self.tournament_size, replace=False)
        return population[picks[np.argmin(fitness[picks])]]

    @staticmethod
    def _unique(population):
        seen, out = set(), []
        for g in population:
            if g.tobytes() not in seen:
                seen.add(g.tobytes())
                out.append(g)
        return out

    def optimize(self, progress=None) -> GAResult:
        """Run the search; `progress` is an optional callable(generation, stats) for a progress bar."""
        population = self.initialize_population()
        # The seeds (presets, greedy, Lagrangian) are measured first, so the answer is never worse than them,
        # except those a larger seed is predicted to beat: measuring those would quantize whole tensors to
        # types (Q2_K for the Q2_K preset) that the search may never use, the costliest part of a 7B run.
        if self.measure_fn is not None:
            for g in seeds_to_measure(self.problem, population[:len(self.seed_genomes) + 2]):
                if g.tobytes() not in self.measured:
                    self.measured[g.tobytes()] = float(self.measure_fn(self.problem.types_of(g)))
        history = []
        for generation in range(self.generations):
            self._measure_best(population)
            fitness = self._fitness(population)
            order = np.argsort(fitness, kind="stable")
            stats = {"generation": generation, "best_fitness": float(fitness[order[0]]),
                     "mean_fitness": float(fitness.mean()),
                     "best_proxy": float(self._proxy(population).min()),
                     "best_measured_kld": min(self.measured.values()) if self.measured else None,
                     "n_measured": len(self.measured)}
            history.append(stats)
            if progress:
                progress(generation, stats)
            children = [population[i] for i in order[:self.elite]]
            while len(children) < self.pop_size:
                a, b = self._tournament(population, fitness), self._tournament(population, fitness)
                child = self._repair(self.mutate(self.crossover(a, b)))
                children.append(child)
            population = children
        self._measure_best(population)
        fast_enough = {k: v for k, v in self.measured.items()
                       if not self.too_slow(np.frombuffer(k, dtype=np.int64))}
        if fast_enough:
            key = min(fast_enough, key=fast_enough.get)
            best = np.frombuffer(key, dtype=np.int64).copy()
            kld = self.measured[key]
        else:
            ok = [g for g in population if not self.too_slow(g)] or population
            best = min(ok, key=self.problem.predicted_damage)
            kld = None
        return GAResult(best, kld, self.problem.predicted_damage(best), history, dict(self.measured))


# ---------------------------------------------------------------------------------------------------------
# Measured fitness: end-to-end KLD of a whole assignment
# ---------------------------------------------------------------------------------------------------------

class AssignmentEvaluator:
    """Mean KLD of the model with every tensor fake-quantized as an assignment says, and every quantized
    matmul's input rounded as llama.cpp's CPU backend rounds it for that type, on held-out windows.

    Quantized tensors are the analyzer's shipped bytes per (tensor, type) (`quantized_bytes`: ggml's, with
    GPTQ's feedback and its refinement sweep; a fraction of the float size), decoded when an assignment needs
    them, so nothing is quantized twice; results are memoised per assignment.
    """

    def __init__(self, analyzer: LayerSensitivityAnalyzer, ids: torch.Tensor, batch_size: int = 4):
        self.analyzer = analyzer
        self.held_out = HeldOutCache(analyzer.model, ids.to(torch.long), analyzer.device, batch_size,
                                     keep_block_inputs=False)
        self.specs = {s.name: s for s in analyzer.tensors}
        self.results: dict[tuple, float] = {}

    def weight(self, name: str, qtype: str, plain: bool = False) -> torch.Tensor:
        """The analyzer's quantized weight: its bytes are shared, each (tensor, type) quantized once."""
        return self.analyzer.quantized_weight(self.specs[name], qtype, plain)

    def kld_mean(self, tensor_types: dict[str, str], plain: bool = False) -> float:
        """Measured mean KLD of an assignment (with `plain`, quantized by ggml alone, as llama-quantize would);
        the blocks' weights are decoded and replaced one block at a time."""
        plain = plain and self.analyzer.quantizer != "ggml"
        key = (tuple(sorted(tensor_types.items())), plain)
        if key not in self.results:
            in_block: dict[int, list[str]] = {}
            for name in tensor_types:
                if self.specs[name].block is not None:
                    in_block.setdefault(self.specs[name].block, []).append(name)
            outside = {name: self.weight(name, qtype, plain) for name, qtype in tensor_types.items()
                       if self.specs[name].block is None}
            with replaced_weights(self.analyzer.model, outside), \
                    activation_rounding.rounded_linear_inputs(self.analyzer.model, tensor_types):
                self.results[key] = self.held_out.kld_mean_blockwise(
                    lambda i: {n: self.weight(n, tensor_types[n], plain) for n in in_block.get(i, [])})
        return self.results[key]

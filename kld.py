"""Model-level damage: the KL divergence of the next-token distribution from the original model's, on
held-out windows, full vocabulary, float32.

`HeldOutCache` keeps the hidden states entering every block and the original's logits, so the damage of
changing one block's tensors costs only the blocks from there on; `AssignmentEvaluator` measures whole type
assignments (the GA's measured fitness), every quantized matmul's input rounded as llama.cpp's CPU backend
rounds it; `additivity_report` checks that the sum of single-tensor KLDs ranks assignments like their
measured KLD.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import activation_rounding
from model_blocks import (BlockBatch, catch_block_inputs, decoder, decoder_blocks, float32_params, replaced_weights,
                          run_block)
from quantized_weights import QuantizedWeights, WeightSpec


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
        self.blocks = decoder_blocks(model)
        self.norm = decoder(model).norm
        self.head = model.get_output_embeddings()
        batches = catch_block_inputs(model, ids, batch_size, device)
        self.kwargs = [b.kwargs for b in batches]
        hidden = [b.hidden for b in batches]
        self.block_inputs = [hidden]                  # [block index][micro-batch]; last = after the last block
        with torch.no_grad():
            for block in self.blocks:
                hidden = [run_block(block, BlockBatch(h, kw)) for h, kw in zip(hidden, self.kwargs)]
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
        with float32_params(self.norm), float32_params(self.head):
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
            self._stacked[key] = catch_block_inputs(self.model, ids, ids.shape[0], self.device)[0].kwargs
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
                    outs.append(run_block(block, BlockBatch(h_in, kwargs)))
            hidden = torch.cat(outs) if len(outs) > 1 else outs[0]
            stacked_kwargs = self._stacked_kwargs(mb, len(variants)) if len(outs) > 1 else kwargs
            for later in self.blocks[start_block + 1:]:
                hidden = run_block(later, BlockBatch(hidden, stacked_kwargs))
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
                hidden = catch_block_inputs(self.model, self.ids[mb], self.ids[mb].shape[0],
                                            self.device)[0].hidden
                start = 0
            else:
                hidden, start = self.block_inputs[start_block][mb], start_block
            for block in self.blocks[start:]:
                hidden = run_block(block, BlockBatch(hidden, kwargs))
            total += self._kl_sum(mb, hidden)
        return total / self.n_tokens

    @torch.no_grad()
    def kld_mean_blockwise(self, block_weights: Callable[[int], dict[str, torch.Tensor]]) -> float:
        """Mean KL of the model as it is now with block i's weights replaced by `block_weights(i)` only while
        block i runs: every micro-batch goes through one block before the next, so one block's replaced
        float32 weights are on the device at a time (a 7B model's would not fit beside the model)."""
        hidden = [catch_block_inputs(self.model, ids, ids.shape[0], self.device)[0].hidden
                  for ids in self.ids]
        for index, block in enumerate(self.blocks):
            with replaced_weights(self.model, block_weights(index)):
                hidden = [run_block(block, BlockBatch(h, kw)) for h, kw in zip(hidden, self.kwargs)]
        return sum(self._kl_sum(mb, h) for mb, h in enumerate(hidden)) / self.n_tokens



class AssignmentEvaluator:
    """Mean KLD of the model with every tensor fake-quantized as an assignment says, and every quantized
    matmul's input rounded as llama.cpp's CPU backend rounds it for that type, on held-out windows.

    Quantized tensors are the shipped bytes per (tensor, type) (`QuantizedWeights.quantized_bytes`: ggml's,
    with GPTQ's feedback and its refinement sweep; a fraction of the float size), shared with the sensitivity
    analysis and decoded when an assignment needs them, so nothing is quantized twice; results are memoised
    per assignment.
    """

    def __init__(self, weights: QuantizedWeights, specs: Sequence[WeightSpec], ids: torch.Tensor,
                 batch_size: int = 4):
        self.weights = weights
        self.held_out = HeldOutCache(weights.model, ids.to(torch.long), weights.device, batch_size,
                                     keep_block_inputs=False)
        self.specs = {s.name: s for s in specs}
        self.results: dict[tuple, float] = {}
        self.seconds = {"quantization": 0.0, "kld": 0.0}    # wall time of the measurements so far, by part

    def weight(self, name: str, qtype: str, plain: bool = False) -> torch.Tensor:
        """A quantized weight: its bytes are shared, each (tensor, type) quantized once."""
        return self.weights.quantized_weight(self.specs[name], qtype, plain)

    def quantize(self, tensor_types: dict[str, str], plain: bool = False) -> None:
        """The bytes an assignment's measurement needs (shipped ones in stacked GPTQ passes; with `plain`,
        ggml's alone), ahead of `kld_mean`; a caller may run this on another thread while the GPU measures."""
        pairs = [(self.specs[name], qtype) for name, qtype in tensor_types.items()]
        if plain and self.weights.quantizer != "ggml":
            for spec, qtype in pairs:
                self.weights.quantized_bytes(spec, qtype, plain=True)
        else:
            self.weights.prepare_quantized(pairs)

    def kld_mean(self, tensor_types: dict[str, str], plain: bool = False) -> float:
        """Measured mean KLD of an assignment (with `plain`, quantized by ggml alone, as llama-quantize would);
        the blocks' weights are decoded and replaced one block at a time."""
        plain = plain and self.weights.quantizer != "ggml"
        key = (tuple(sorted(tensor_types.items())), plain)
        if key not in self.results:
            t0 = time.perf_counter()
            self.quantize(tensor_types, plain)
            t1 = time.perf_counter()
            in_block: dict[int, list[str]] = {}
            for name in tensor_types:
                if self.specs[name].block is not None:
                    in_block.setdefault(self.specs[name].block, []).append(name)
            outside = {name: self.weight(name, qtype, plain) for name, qtype in tensor_types.items()
                       if self.specs[name].block is None}
            with replaced_weights(self.weights.model, outside), \
                    activation_rounding.rounded_linear_inputs(self.weights.model, tensor_types):
                self.results[key] = self.held_out.kld_mean_blockwise(
                    lambda i: {n: self.weight(n, tensor_types[n], plain) for n in in_block.get(i, [])})
            self.seconds["quantization"] += t1 - t0
            self.seconds["kld"] += time.perf_counter() - t1
        return self.results[key]



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


def random_assignments(table, n_assignments: int, seed: int,
                       level: float | None = None) -> list[dict[str, str]]:
    """Random mixed assignments, tensor -> type. Each tensor takes its candidate of rank
    Binomial(n_types - 1, p) in bits order, with p = `level` for all assignments (similar sizes, differing
    in which tensors are cut), or, when `level` is None, p spread from 0.05 to 0.95 (low-bit to high-bit)."""
    rng = np.random.default_rng(seed)
    by_tensor: dict[str, list[str]] = {}
    for e in sorted(table.entries, key=lambda e: e.bits_per_weight):
        by_tensor.setdefault(e.tensor, []).append(e.type)
    levels = [level] * n_assignments if level is not None else list(np.linspace(0.05, 0.95, n_assignments))
    return [{t: types[rng.binomial(len(types) - 1, p)] for t, types in by_tensor.items()} for p in levels]


def additivity_report(analyzer, table, assignments: list[dict[str, str]], field: str = "kld_pred",
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
        weights = {name: analyzer.weights.draft_weight(specs[name], qtype) for name, qtype in assignment.items()}
        with replaced_weights(analyzer.model, weights):
            measured.append(held_out.kld_mean(None))
        predicted.append(sum(getattr(table_of[(n, t)], field) for n, t in assignment.items()))
        sizes.append(sum(table_of[(n, t)].size_bytes for n, t in assignment.items()))
    return {"predicted": predicted, "measured": measured, "size_bytes": sizes,
            "spearman": spearman(predicted, measured)}

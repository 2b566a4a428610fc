"""Per-tensor sensitivity (LayerSensitivityAnalyzer): for every quantizable tensor and every GGUF type
that fits its rows, quantize that tensor alone with ggml's own quantizer (weighted by the imatrix; by default
with GPTQ's error feedback wherever the tensor's input has a Gram, gptq.py, before its refinement sweep: the
"draft", see quantized_weights.py) and measure
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

Results are typed records (sensitivity_table.SensitivityEntry), cached per (tensor, type) as small JSON files
under a key of model, data and settings, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import activation_rounding
import files
import gptq
import placement
import quant_utils
from calib_stats import CalibStats
from kld import HeldOutCache
from model_blocks import decoder_blocks, model_content_hash, output_weight_name, replaced_weights, resolve_device
from quant_utils import dequantize, get_type
from quantized_weights import BLOCK32_MENU, K_MENU, QuantizedWeights, WeightSpec, quantizable_weights
from sensitivity_table import (SENSITIVITY_FORMAT_VERSION, ResultCache, SensitivityEntry, SensitivityTable,
                               irregular_tensors, predict_kld)

# KLD is measured for these types, one per menu, ~4.5 bits: strong signal, still in the regime where KLD
# grows like the output error ("all" measures every candidate). The other types are predicted from their
# output error and the tensor's measured KLD per unit of output error. On SmolLM2-135M (11 tensors, all
# 6 types measured on the same 512 tokens) 51 of 55 predictions fell within 0.8-1.25x of the measurement,
# median 1.02x; worst 1.8x (Q4_1/Q5_1 on an attn_v, whose asymmetric grid errs in less harmful directions).
DEFAULT_KLD_TYPES = ("Q4_K", "Q4_0")
NEAREST_KLD_BITS = 4.5          # a menu without those: its type nearest this many bits per weight
# The output error of a type whose KLD is not measured needs only some rows quantized (ggml quantizes rows
# independently, so a row of the sample is bit for bit that row of the whole tensor): tensors over
# SAMPLE_ABOVE_WEIGHTS get an evenly spread row sample of about SAMPLE_WEIGHTS weights. On the Qwen2.5-7B
# shape (H100, 16 cores) quantizing every row of every candidate took 23 s per block, 13 minutes in all; the
# SmolLM2-135M demo's tensors are all below the threshold. A lookup-only embedding's error is measured on the
# rows of the tokens that occur, which is exact.
SAMPLE_ABOVE_WEIGHTS = 32 * 2**20
SAMPLE_WEIGHTS = 8 * 2**20


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



def place_for_analysis(model: nn.Module, device, holdout_ids: torch.Tensor, max_memory: dict[str, int] | None = None,
                       eval_tokens: int = 0, kld_batch_size: int = 4, kld_stack: int = 8) -> dict[str, str]:
    """Put the model where the analysis and the GA will run it (placement.place_model, with the working memory
    of `LayerSensitivityAnalyzer`'s measurements reserved); the statistics and smoothing stages run it there
    too. Placing an already placed model again moves nothing. Returns the device map."""
    held_out_tokens = max(int(holdout_ids.numel()), eval_tokens)
    stack_tokens = max(kld_stack * kld_batch_size * holdout_ids.shape[-1], eval_tokens)
    return placement.place_model(model, resolve_device(device), max_memory,
                                 placement.working_bytes(model, held_out_tokens, stack_tokens),
                                 placement.working_bytes(model, held_out_tokens, stack_tokens, False))


class LayerSensitivityAnalyzer:
    """Sensitivity of every quantizable tensor to every candidate GGUF type (see the module docstring).

    With `device` CUDA and a model that does not fit there beside its working memory (`max_memory`: bytes
    per device, default the free memory of every GPU; `eval_tokens`: the largest held-out set the GA will
    measure), the blocks are spread over the GPUs and the rest held in CPU RAM and streamed to `device` as
    they run (placement.place_model; `device_map` says where each went). The model is kept resident
    in its own dtype (on `device`, or as placed) and computes in float32 one block at a time
    (model_blocks.float32_params; the KLD re-runs the tail of the network many times, and a 7B model in bf16
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
        self.device = resolve_device(device)
        self.device_map = place_for_analysis(model, self.device, holdout_ids, max_memory, eval_tokens,
                                             kld_batch_size, kld_stack)
        self.model = model.eval()
        self.stats = stats
        self.holdout_ids = holdout_ids.to(torch.long)
        self.tensors = quantizable_weights(model, k_menu, block32_menu)
        self.weights = QuantizedWeights(model, stats, self.device, quantizer)
        self.kld_types = kld_types
        self.kld_batch_size = kld_batch_size
        self.kld_stack = kld_stack              # perturbed copies of the held-out batch run together
        self.progress = progress
        self.run_key = self._run_key()
        self.cache = ResultCache(cache_dir, self.run_key)
        self.n_computed = 0          # (tensor, type) pairs quantized and measured by this instance
        self._held_out: HeldOutCache | None = None
        self._energy: dict[str, float] = {}      # tr(W H W^T) per tensor
        self._sampled: dict[tuple[str, str], bytes] = {}    # row samples' bytes quantized ahead (_quantize_ahead)
        self._ahead_seconds: dict[tuple[str, str], float] = {}  # and each pair's share of that time

    def _run_key(self) -> str:
        """Everything the cached numbers depend on: the model (after any smoothing), the statistics (their
        windows, Gram tokens and width cap), the held-out windows, the quantizer and the format."""
        meta = self.stats.meta
        return files.record_key({
            "format": SENSITIVITY_FORMAT_VERSION, "model": meta.get("model_content_hash") or model_content_hash(
                self.model), "calib_windows": meta.get("calib_ids_hash"),
            "gram_tokens": max(self.stats.gram_tokens.values(), default=0),
            "gram_max_dim": meta.get("gram_max_dim"), "held_out_windows": files.token_ids_hash(self.holdout_ids),
            "quantizer": self.weights.quantizer, "damp": gptq.DAMP if self.weights.quantizer == "gptq" else None})

    @property
    def held_out(self) -> HeldOutCache:
        if self._held_out is None:
            self._held_out = HeldOutCache(self.model, self.holdout_ids, self.device, self.kld_batch_size)
        return self._held_out

    def wants_kld(self, spec: WeightSpec, qtype: str) -> bool:
        """Whether this pair's KLD is measured: every type ("all"), none, or the `kld_types` on the tensor's
        menu; a menu with none of them (--types Q5_K,Q6_K,Q8_0, say) measures its type nearest 4.5 bits, so
        that every tensor has a measured KLD to predict the others from."""
        if self.kld_types in ("all", "none"):
            return self.kld_types == "all"
        measured = [t for t in spec.types if t in self.kld_types]
        if not measured:
            measured = [min(spec.types, key=lambda t: abs(get_type(t).bits_per_weight - NEAREST_KLD_BITS))]
        return qtype in measured

    def error_rows(self, spec: WeightSpec) -> torch.Tensor | None:
        """The rows the output error is measured on (None: all; see SAMPLE_ABOVE_WEIGHTS)."""
        n_rows, n_per_row = spec.shape
        if spec.is_embedding and not spec.feeds_logits:
            counts = self.stats.token_counts[:n_rows]
            return torch.nonzero(counts > 0).flatten() if (counts == 0).any() else None
        if n_rows * n_per_row <= SAMPLE_ABOVE_WEIGHTS:
            return None
        return torch.linspace(0, n_rows - 1, max(1, SAMPLE_WEIGHTS // n_per_row)).round().long().unique()

    def output_error(self, spec: WeightSpec, new_weight: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
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
        matmul_name = output_weight_name(self.model) if spec.feeds_logits else spec.name
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
            n_blocks = len(decoder_blocks(self.model))
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

    def activation_formats(self, spec: WeightSpec) -> list[str]:
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

    def activation_klds(self, specs: list[WeightSpec]) -> dict[tuple[str, str], float]:
        """{(tensor, format): mean KL with only this tensor's input rounded to the format}, cached like the
        weight entries (under type "act_<format>"). The weights stay float32: this is the activation term
        alone, added to each weight type's damage (SensitivityEntry.damage)."""
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
        n_blocks = len(decoder_blocks(self.model))
        for spec, fmt in at_head:                 # the head's matmul: only the head runs
            with activation_rounding.rounded_inputs(self.model, {spec.name: fmt}):
                klds.append(held_out.kld_mean(n_blocks))
        for (spec, fmt), kld in zip(in_block + at_head, klds):
            self.cache.put({"tensor": spec.name, "type": f"act_{fmt}", "kld_mean": kld,
                            "kld_tokens": int(self.holdout_ids.numel())})
            out[(spec.name, fmt)] = kld
        return out

    def measure_errors(self, spec: WeightSpec, qtype: str, whole: bool = True
                       ) -> tuple[SensitivityEntry, torch.Tensor | None]:
        """Quantize one tensor to one type (the draft); its entry with the output errors (on `error_rows`), and
        the whole draft weight, or None when `whole` is False and a row sample sufficed."""
        t0 = time.perf_counter()
        rows = self.error_rows(spec)
        if whole or rows is None:
            new_weight = self.weights.draft_weight(spec, qtype)
            new_rows = new_weight if rows is None else new_weight[rows.to(new_weight.device)]
        else:
            new_weight = None
            shape = (int(rows.numel()), spec.shape[1])
            raw = self._sampled.pop((spec.name, qtype), None) or self.weights.encode(spec, qtype, rows)
            new_rows = torch.from_numpy(dequantize(raw, qtype, shape))
        entry = SensitivityEntry(
            tensor=spec.name, type=qtype, kind=spec.kind, block=spec.block,
            bits_per_weight=get_type(qtype).bits_per_weight, size_bytes=get_type(qtype).tensor_size_bytes(spec.shape),
            error_rows=spec.shape[0] if rows is None else int(rows.numel()), seconds=0.0,
            **self.output_error(spec, new_rows, rows))
        entry.seconds = time.perf_counter() - t0 + self._ahead_seconds.pop((spec.name, qtype), 0.0)
        return entry, new_weight

    def _quantize_ahead(self, pairs: list[tuple[WeightSpec, str]]) -> None:
        """Quantize what `measure_errors` will need for these pairs in stacked passes: whole drafts where a KLD
        is measured or no row sample applies, row samples (kept in `_sampled`) elsewhere."""
        whole = {(spec, q) for spec, q in pairs if self.wants_kld(spec, q) or self.error_rows(spec) is None}
        sampled = [(spec, q, self.error_rows(spec)) for spec, q in pairs if (spec, q) not in whole]
        whole = [pair for pair in pairs if pair in whole]
        t0 = time.perf_counter()
        self.weights.prepare_drafts(whole)
        self._sampled = {(spec.name, q): raw
                         for (spec, q, _), raw in zip(sampled, self.weights.encode_many(sampled))}
        share = (time.perf_counter() - t0) / max(len(pairs), 1)      # each pair's entry carries a share
        self._ahead_seconds = {(spec.name, q): share for spec, q in pairs}

    def _measure_group(self, pairs: list[tuple[WeightSpec, str]], on_entry) -> list[SensitivityEntry]:
        """Measure the pairs of one decoder block (or of one tensor outside the blocks), reusing cached
        entries: output errors for each, then the KLDs asked for, stacked when they share a block. A tensor
        whose output error is irregular in bits (see `irregular_tensors`) gets every type's KLD measured."""
        specs = {spec.name: spec for spec, _ in pairs}
        cached_entries = {(spec.name, qtype): self.cache.get(spec.name, qtype) for spec, qtype in pairs}
        self._quantize_ahead([(spec, qtype) for spec, qtype in pairs if cached_entries[(spec.name, qtype)] is None])
        entries, weights, fresh = {}, {}, set()
        for spec, qtype in pairs:
            cached = cached_entries[(spec.name, qtype)]
            entry = None if cached is None else SensitivityEntry(**cached)
            if entry is None:
                entry, new_weight = self.measure_errors(spec, qtype, whole=self.wants_kld(spec, qtype))
                if new_weight is not None:
                    weights[(spec.name, qtype)] = new_weight
                fresh.add((spec.name, qtype))
            entries[(spec.name, qtype)] = entry
        irregular = irregular_tensors(list(entries.values()))
        need = [key for key, e in entries.items()
                if e.kld_mean is None and (self.wants_kld(specs[key[0]], key[1]) or key[0] in irregular)]
        self.weights.prepare_drafts([(specs[name], qtype) for name, qtype in need if (name, qtype) not in weights])
        for key in need:
            if key not in weights:
                weights[key] = self.weights.draft_weight(specs[key[0]], key[1])
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
                entries[key] = dataclasses.replace(entries[key], kld_mean=kld,
                                                   kld_tokens=int(self.holdout_ids.numel()),
                                                   seconds=entries[key].seconds + per_pair_s)
        for key in [k for k in entries if k in fresh or k in need]:
            self.cache.put(dataclasses.asdict(entries[key]))
            self.n_computed += 1
            if on_entry is not None:
                on_entry(entries[key])
        return list(entries.values())

    def _groups(self) -> list[list[tuple[WeightSpec, str]]]:
        """All (tensor, type) pairs, grouped by decoder block; the embedding and the head alone."""
        groups: dict = {}
        for spec in self.tensors:
            key = ("block", spec.block) if spec.block is not None else ("tensor", spec.name)
            groups.setdefault(key, []).extend((spec, t) for t in spec.types)
        return list(groups.values())

    def run(self, on_entry: Callable[[SensitivityEntry], None] | None = None) -> SensitivityTable:
        """Measure every (tensor, type), reusing cached results; `on_entry` sees each newly computed one."""
        groups = self._groups()
        bar = tqdm(total=len(groups), desc="sensitivity", unit="group", disable=not self.progress)
        done: dict[tuple[str, str], SensitivityEntry] = {}
        act: dict[tuple[str, str], float] = {}
        for group in groups:
            spec = group[0][0]
            bar.set_postfix_str(f"block {spec.block}" if spec.block is not None else spec.kind, refresh=False)
            for entry in self._measure_group(group, on_entry):
                done[(entry.tensor, entry.type)] = entry
            act.update(self.activation_klds(list({s.name: s for s, _ in group}.values())))
            bar.update()
        bar.close()
        entries = [dataclasses.replace(done[(spec.name, t)],
                                       act_kld=act.get((spec.name, activation_rounding.rounding_of(t)), 0.0))
                   for spec in self.tensors for t in spec.types]
        meta = {"run_key": self.run_key, "kld_tokens": int(self.holdout_ids.numel()),
                "kld_types": self.kld_types if isinstance(self.kld_types, str) else list(self.kld_types),
                **{k: v for k, v in self.stats.meta.items() if isinstance(v, (int, float, str))}}
        return SensitivityTable(predict_kld(entries), meta)

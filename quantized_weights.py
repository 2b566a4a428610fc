"""Which weights of a model quantize to which GGUF types, and their bytes under each type.

A weight's candidate types are the K-quant menu when 256-weight blocks fit its rows, else the 32-weight-block
menu (llama-quantize's fallbacks do the same). Its bytes come from ggml's own quantizer, weighted by the
imatrix and, with the default quantizer, with GPTQ's error feedback wherever its input has a Gram (gptq.py):
- the *draft* (`draft_bytes`): GPTQ before its refinement sweep, what the sensitivity table ranks;
- the *shipped* bytes (`quantized_bytes`): the draft after the sweep, bit for bit GPTQ with the sweep in one
  go; what the GA measures and the config ships;
- the *plain* bytes (`quantized_bytes(plain=True)`): ggml alone, as llama-quantize makes them.
Each (tensor, type) is quantized once; bytes are a fraction of the float weight, decoded when measured.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import torch
from torch import nn

import gpu_quantize
import gptq
import torch_dequant
from calib_stats import CalibStats
from model_blocks import block_linears, block_prefix, decoder_blocks, embedding_weight_name, is_tied, output_weight_name
from gguf_plan import IMATRIX_TYPES
from quant_utils import dequantize, get_type

# Candidate menus. K-quants pack 256 weights per block; rows not divisible by 256 (hidden 576 or 896, say)
# take the 32-weight-block types instead, as llama-quantize's fallbacks do. IQ4_NL is the 4.5-bit
# non-linear type llama.cpp uses for IQ4_XS rows that K-blocks do not fit.
K_MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BLOCK32_MENU = ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The K menu of low budgets (below Q3_K_M's size, mixed_precision_ptq.LOW_BIT_BELOW): the i-quants from 1.56 to
# 4.25 bits per weight beside the K-quants, and the 32-block types, which rows of 256 take as well.
LOW_BIT_K_MENU = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS",
                  "Q4_0", "IQ4_NL", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
QUANTIZERS = ("gptq", "ggml")
# GPTQ passes stack the rows of the weights that share a factor (gptq.quantize_many) up to this many bytes of
# float64 rows; a pass holds about four such arrays (the weights, their updates or quantized values, the
# sweep's gradient), so 1 GiB keeps a pass under 4-5 GiB of device memory.
STACK_BYTES = 1 << 30     # gptq: ggml's quantizer with GPTQ error feedback (gptq.py); ggml: ggml alone


def candidate_types(n_per_row: int, k_menu: Sequence[str] = K_MENU,
                    block32_menu: Sequence[str] = BLOCK32_MENU, is_embedding: bool = False) -> tuple[str, ...]:
    """The K-quant menu when 256-weight blocks fit the row, else the 32-weight-block menu (those that fit). The
    token embedding takes no type llama.cpp quantizes only with an imatrix (IQ1-IQ2, IQ3_XXS): llama-imatrix
    records none for it, so llama-quantize could not follow the recipe."""
    menu = k_menu if all(get_type(t).fits(n_per_row) for t in k_menu) else block32_menu
    return tuple(t for t in menu if get_type(t).fits(n_per_row) and not (is_embedding and t in IMATRIX_TYPES))


def tensor_menus(info, k_menu: Sequence[str] = K_MENU,
                 block32_menu: Sequence[str] = BLOCK32_MENU) -> dict[str, tuple[str, ...]]:
    """Every quantizable tensor's candidate types from the checkpoint's shapes alone, as `quantizable_weights`
    will give them."""
    return {t.hf_name: candidate_types(t.shape[1], k_menu, block32_menu, t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD)
            for t in info.tensors if t.quantizable}


@dataclass(frozen=True)
class WeightSpec:
    """One quantizable weight as the analysis sees it."""
    name: str                   # HF parameter name, e.g. "model.layers.3.mlp.down_proj.weight"
    kind: str                   # "q_proj", ..., "down_proj", "embed_tokens", "lm_head"
    block: int | None           # decoder block index; None for the embedding and the head
    shape: tuple[int, int]      # (rows, row length)
    types: tuple[str, ...]      # candidate GGUF types
    is_embedding: bool          # read by row lookup (token embedding)
    feeds_logits: bool          # multiplies the final hidden state (the head, or a tied embedding)


def quantizable_weights(model: nn.Module, k_menu: Sequence[str] = K_MENU,
                        block32_menu: Sequence[str] = BLOCK32_MENU) -> list[WeightSpec]:
    """Every linear of every decoder block, the token embedding, and the head when it is not tied."""
    specs = []
    embed_name = embedding_weight_name(model)
    tied = is_tied(model)
    weight = model.get_input_embeddings().weight
    specs.append(WeightSpec(embed_name, "embed_tokens", None, tuple(weight.shape),
                            candidate_types(weight.shape[1], k_menu, block32_menu, is_embedding=True), True, tied))
    for index, block in enumerate(decoder_blocks(model)):
        prefix = block_prefix(model, index)
        for rel_name, linear in block_linears(block):
            specs.append(WeightSpec(f"{prefix}{rel_name}.weight", rel_name.split(".")[-1], index,
                                    tuple(linear.weight.shape),
                                    candidate_types(linear.weight.shape[1], k_menu, block32_menu), False, False))
    if not tied:
        head = model.get_output_embeddings().weight
        specs.append(WeightSpec(output_weight_name(model), "lm_head", None, tuple(head.shape),
                                candidate_types(head.shape[1], k_menu, block32_menu), False, True))
    return specs


def quantizer_imatrix(spec: WeightSpec, stats: CalibStats, head_name: str | None = None) -> torch.Tensor | None:
    """The imatrix the quantizer gets for this tensor: mean squared input for linears and the head. A tied
    embedding takes the head's (`head_name`): its error hurts far more through the logits than through the
    lookup, and weighting by the final hidden state's energy halves its KLD (SmolLM2-135M, Q5_1: 0.0147 ->
    0.0068). llama-imatrix never records a tied head, so llama.cpp's presets quantize it unweighted; an
    untied embedding (a pure lookup) gets none either."""
    if spec.is_embedding:
        return stats.imatrix(head_name) if spec.feeds_logits and head_name is not None else None
    return stats.imatrix(spec.name)


class QuantizedWeights:
    """The GGUF bytes of a model's weights under each candidate type (see the module docstring), computed on
    first use and kept: `drafts` until refined, `quantized` (shipped), `plain_quantized` (ggml alone). GPTQ's
    factors are computed on `device` (float64 on the CPU for MPS)."""

    def __init__(self, model: nn.Module, stats: CalibStats, device: torch.device, quantizer: str = "gptq"):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, not {quantizer!r}")
        self.model, self.stats, self.device, self.quantizer = model, stats, device, quantizer
        self.drafts: dict[tuple[str, str], bytes] = {}      # (tensor, type) -> the table's bytes, whole tensors
        self.quantized: dict[tuple[str, str], bytes] = {}   # (tensor, type) -> refined GPTQ bytes (shipped)
        self.plain_quantized: dict[tuple[str, str], bytes] = {}   # the same by ggml alone
        self._feedback: dict[tuple[str, int], gptq.Feedback] = {}   # (Gram key, block size), current block's
        # The weights as given (references, not copies): a measurement swaps parameters' values for quantized
        # ones for a while (model_blocks.replaced_weights), and quantizing on a side thread meanwhile (the plain
        # preset, mixed_precision_ptq.search_assignment) must still read the originals.
        self._originals = {name: param.detach() for name, param in model.named_parameters()}

    def draft_bytes(self, spec: WeightSpec, qtype: str) -> bytes:
        """The whole tensor's bytes in `qtype` as the sensitivity table measures them: `encode` without GPTQ's
        refinement sweep, which lowers every type's error by a few percent and costs more than GPTQ's own pass,
        so it is left to the pairs a search measures or ships (`quantized_bytes`). Kept in `drafts` until
        then."""
        key = (spec.name, qtype)
        if key not in self.drafts:
            self.drafts[key] = self.encode(spec, qtype, sweeps=0)
        return self.drafts[key]

    def quantized_bytes(self, spec: WeightSpec, qtype: str, plain: bool = False) -> bytes:
        """The whole tensor's GGUF bytes in `qtype` as they ship: the draft after GPTQ's refinement sweep, which
        then replaces the draft in memory (without a draft at hand, GPTQ with the sweep in one go: the same
        bytes); the draft itself where GPTQ does not apply (kept in `drafts`); with `plain`, ggml's alone, as
        llama-quantize makes them (`plain_quantized`). No (tensor, type) is quantized twice."""
        key = (spec.name, qtype)
        if plain and self.feedback_key(spec, qtype) is not None:     # elsewhere plain is what GPTQ's path gives
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
                weight = self.original(spec.name)
                self.quantized[key] = gptq.refine(weight, draft, qtype, feedback, sweeps=gptq.REFINE_SWEEPS)
        return self.quantized[key]

    def prepare_drafts(self, pairs: Sequence[tuple[WeightSpec, str]]) -> None:
        """`draft_bytes` of many pairs at once: those that share a GPTQ factor go through it in one stacked
        pass (gptq.quantize_many)."""
        todo = [(spec, q) for spec, q in dict.fromkeys(pairs)
                if (spec.name, q) not in self.drafts and (spec.name, q) not in self.quantized]
        for (spec, q), raw in zip(todo, self.encode_many([(spec, q, None) for spec, q in todo])):
            self.drafts[(spec.name, q)] = raw

    def prepare_quantized(self, pairs: Sequence[tuple[WeightSpec, str]]) -> None:
        """`quantized_bytes` of many pairs at once: drafts at hand are refined, the others quantized with the
        sweep, in stacked passes per GPTQ factor. GPTQ's rows are independent, so a stacked pass computes what
        one pair alone does (tests/test_gptq.py checks the bytes agree bit for bit on the CPU)."""
        todo = [(spec, q) for spec, q in dict.fromkeys(pairs) if (spec.name, q) not in self.quantized]
        if gptq.REFINE_SWEEPS == 0:
            self.prepare_drafts(todo)
            return
        with_factor = [(spec, q) for spec, q in todo if self.feedback_key(spec, q) is not None]
        self.prepare_drafts([(spec, q) for spec, q in todo if self.feedback_key(spec, q) is None])
        drafted = [(spec, q) for spec, q in with_factor if (spec.name, q) in self.drafts]
        for group in self._stacks(drafted):
            weights = [self.original(spec.name) for spec, _ in group]
            raws = [self.drafts.pop((spec.name, q)) for spec, q in group]
            refined = gptq.refine_many(weights, raws, [q for _, q in group], self.feedback_of(*group[0]),
                                       sweeps=gptq.REFINE_SWEEPS)
            self.quantized.update({(spec.name, q): raw for (spec, q), raw in zip(group, refined)})
        fresh = [(spec, q) for spec, q in with_factor if (spec.name, q) not in self.quantized]
        for (spec, q), raw in zip(fresh, self.encode_many([(spec, q, None) for spec, q in fresh],
                                                          sweeps=gptq.REFINE_SWEEPS)):
            self.quantized[(spec.name, q)] = raw

    def encode_many(self, items: Sequence[tuple[WeightSpec, str, torch.Tensor | None]], sweeps: int = 0
                    ) -> list[bytes]:
        """`encode` of many (spec, qtype, rows) at once (rows None: the whole tensor), GPTQ's in stacked passes
        per factor; in the order given."""
        out: dict[int, bytes] = {}
        with_factor = []
        for i, (spec, q, rows) in enumerate(items):
            if self.feedback_key(spec, q) is None:
                out[i] = self.encode(spec, q, rows)
            else:
                with_factor.append(i)
        for group in self._stacks([items[i] for i in with_factor], with_factor):
            weights = []
            for i in group:
                spec, _, rows = items[i]
                weight = self.original(spec.name)
                weights.append(weight if rows is None else weight[rows.to(weight.device)])
            raws = gptq.quantize_many(weights, [items[i][1] for i in group], self.feedback_of(*items[group[0]][:2]),
                                      sweeps=sweeps)
            out.update(zip(group, raws))
        return [out[i] for i in range(len(items))]

    def _stacks(self, items: Sequence[tuple], labels: Sequence | None = None) -> list[list]:
        """`labels` (default: the items themselves) grouped by the GPTQ factor their (spec, qtype) use, each
        group cut so that its stacked float64 rows stay under STACK_BYTES (a larger weight goes alone)."""
        labels = list(items) if labels is None else list(labels)
        by_factor: dict[tuple, list] = {}
        for item, label in zip(items, labels):
            spec, q = item[0], item[1]
            rows = spec.shape[0] if len(item) < 3 or item[2] is None else int(item[2].numel())
            by_factor.setdefault(self.feedback_key(spec, q), []).append((label, rows * spec.shape[1] * 8))
        groups = []
        for members in by_factor.values():
            group, size = [], 0
            for label, nbytes in members:
                if group and size + nbytes > STACK_BYTES:
                    groups.append(group)
                    group, size = [], 0
                group.append(label)
                size += nbytes
            groups.append(group)
        return groups

    def _decoded(self, raw: bytes, spec: WeightSpec, qtype: str) -> torch.Tensor:
        """float32 values of a whole tensor's bytes: decoded on a CUDA device by torch_dequant (bit-identical to
        ggml's decoder, and only the bytes cross the bus), elsewhere by ggml on the CPU."""
        if self.device.type == "cuda" and torch_dequant.supports(qtype):
            return torch_dequant.dequantize(torch_dequant.bytes_on(raw, self.device), qtype, spec.shape)
        return torch.from_numpy(dequantize(raw, qtype, spec.shape))

    def quantized_weight(self, spec: WeightSpec, qtype: str, plain: bool = False) -> torch.Tensor:
        """The tensor as llama.cpp will hold it in `qtype` (`quantized_bytes`), float32."""
        return self._decoded(self.quantized_bytes(spec, qtype, plain), spec, qtype)

    def draft_weight(self, spec: WeightSpec, qtype: str) -> torch.Tensor:
        """The tensor as the sensitivity table measures it (`draft_bytes`), float32."""
        return self._decoded(self.draft_bytes(spec, qtype), spec, qtype)

    def original(self, name: str) -> torch.Tensor:
        """The float weight `name` as this object was given it, whatever a measurement swaps in meanwhile."""
        weight = self._originals.get(name)
        return weight if weight is not None else self.model.get_parameter(name).detach()

    def feedback_key(self, spec: WeightSpec, qtype: str) -> tuple[str, int] | None:
        """(Gram key, block size) of this pair's GPTQ factor; None where the quantizer is plain ggml, for float
        types, and for tensors without a Gram (lookups, inputs wider than --gram_max_dim)."""
        t = get_type(qtype)
        if self.quantizer == "ggml" or t.is_float or spec.is_embedding or spec.name not in self.stats.gram_key:
            return None
        return self.stats.gram_key[spec.name], t.block_size

    def feedback_of(self, spec: WeightSpec, qtype: str) -> gptq.Feedback | None:
        """GPTQ's factor for this tensor's input at this type's block size (None: see `feedback_key`).
        Factors are kept for one Gram at a time per block size (q/k/v and gate/up share theirs); their Cholesky
        factor is computed only when GPTQ runs (`refine` needs the Gram alone)."""
        key = self.feedback_key(spec, qtype)
        if key is None:
            return None
        if key not in self._feedback:
            self._feedback = {k: v for k, v in self._feedback.items() if k[1] != key[1]}
            self._feedback[key] = gptq.feedback_factor(self.stats.gram_of(spec.name)[0].to(self.device), key[1])
        return self._feedback[key]

    def encode(self, spec: WeightSpec, qtype: str, rows: torch.Tensor | None = None, feedback: bool = True,
               sweeps: int = 0) -> bytes:
        """The GGUF bytes of this tensor (or of its `rows`) in `qtype`: ggml's quantizer with the imatrix, and
        GPTQ's error feedback with `sweeps` refinement sweeps (0: the table's draft) where `feedback_of` gives
        a factor, unless `feedback` is off (rows are independent either way)."""
        weight = self.original(spec.name)
        if rows is not None:
            weight = weight[rows.to(weight.device)]
        feedback = self.feedback_of(spec, qtype) if feedback else None
        if feedback is None:
            return gpu_quantize.quantize_bytes(weight, qtype, self.imatrix_of(spec))
        return gptq.quantize(weight, qtype, feedback, sweeps=sweeps)

    def imatrix_of(self, spec: WeightSpec) -> torch.Tensor | None:
        """What the quantizer is given for this tensor (see `quantizer_imatrix`)."""
        return quantizer_imatrix(spec, self.stats, output_weight_name(self.model))

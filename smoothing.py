"""SmoothQuant-style equivalent scaling, folded into the checkpoint, kept only where it lowers quantization error.

A linear layer's input channels are scaled by s (its weight columns times s) and 1/s is folded into whatever
produces that input, so the float model computes exactly the same function:
- `attn_in`: input_layernorm weight / s, q/k/v columns * s (RMSNorm multiplies by its weight last);
- `mlp_in`:  post_attention_layernorm weight / s, gate/up columns * s;
- `v_o`:     v_proj rows (and bias) / s, o_proj columns * s (attention output is linear in V; with GQA one s per
             KV channel, repeated over the query heads that share it);
- `up_down`: up_proj rows / s, down_proj columns * s (down reads act(gate) * up);
- `head`:    final norm weight / s, lm_head columns * s, only when the head is not tied to the embedding (the
             embedding's row lookup would not see the 1/s).
Anything else is left alone: the transform never touches a path where it is not exactly equivalent. Which
kinds qualify is a fact of the architecture (architectures.ArchSpec.smooth_kinds): Gemma's RMSNorm scales by
(1 + w), which cannot absorb 1/s, so Gemma 3 keeps only `v_o` and `up_down`.

Scales follow SmoothQuant, s_j = act_j^a / w_j^(1-a), with act_j the RMS of input channel j over the calibration
tokens (from the imatrix) and w_j the largest |weight| of column j over the consumers; normalised to geometric
mean 1. The strength a is searched per group (block and kind), AWQ-style: for each a on a grid and for each
candidate type of the consumers, the consumers are quantized by ggml (imatrix adjusted to the scaled input) and
their output error is measured exactly through the input Gram matrix, tr(dW H dW^T) with dW the *effective*
change Q(W diag s) diag(1/s) - W, on a fixed subset of rows (rows quantize independently). The group keeps the
a whose error, summed in log-ratio over the types, is lowest, and no scaling when nothing beats it.

A transform is two maps of HF tensor names to float32 vectors: `columns` (multiply the weight's columns) and
`rows` (multiply a 2-D weight's rows, or a 1-D norm weight or bias elementwise). export_gguf_official.py
applies the same maps to the tensors it streams from the checkpoint.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

import gptq
import gpu_quantize
from architectures import architecture_of
from calib_stats import CalibStats
from model_blocks import block_prefix, decoder, decoder_blocks, is_tied, output_weight_name
from quant_utils import get_type

ALPHA_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)
SEARCH_ROWS = 128          # rows per consumer in the error estimate
SCALE_CLAMP = 1e4          # s stays within [1/clamp, clamp] after normalisation
NO_GAIN_TYPES = ("Q8_0", "F16", "BF16", "F32")   # near-lossless: not worth steering the search


@dataclass
class SmoothGroup:
    """One place an exact rescaling can go: who produces the input, who reads it."""
    name: str                       # e.g. "model.layers.3.attn_in"
    kind: str                       # attn_in, mlp_in, v_o, up_down, head
    block: int | None
    producers: list[str]            # parameters scaled by 1/s ("rows": norm weights, v/up rows, v bias)
    consumers: list[str]            # weights whose columns are scaled by s
    repeat: int = 1                 # consumer columns per producer channel group (GQA: heads per KV head)
    head_dim: int = 0               # with repeat > 1: channels per head


@dataclass
class Smoothing:
    """An exact re-parametrisation: multiply `columns[name]` into weight columns, `rows[name]` into rows."""
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)       # group name -> chosen strength
    mode: str = "off"

    def is_identity(self) -> bool:
        return not self.columns and not self.rows

    def scales_hash(self) -> str:
        """Hash of the scales (cache keys of statistics and sensitivities taken after the transform)."""
        h = hashlib.sha256(self.mode.encode())
        for part in (self.columns, self.rows):
            for name in sorted(part):
                h.update(name.encode())
                h.update(part[name].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "alpha": dict(self.alpha),
                "columns": {n: v.float().cpu() for n, v in self.columns.items()},
                "rows": {n: v.float().cpu() for n, v in self.rows.items()}}

    @classmethod
    def from_dict(cls, d: dict | None) -> Smoothing:
        if not d:
            return cls()
        return cls({n: torch.as_tensor(v, dtype=torch.float32) for n, v in d.get("columns", {}).items()},
                   {n: torch.as_tensor(v, dtype=torch.float32) for n, v in d.get("rows", {}).items()},
                   dict(d.get("alpha", {})), d.get("mode", "off"))


# ---------------------------------------------------------------------------------------------------------
# Where the transform is exact
# ---------------------------------------------------------------------------------------------------------

def _is_rms_norm(module: nn.Module) -> bool:
    """A norm that multiplies by its weight last (Llama/Qwen2/Mistral RMSNorm); Gemma's (1 + w) is not."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and getattr(module, "weight", None) is not None


def smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Every group of a Llama-family decoder where scaling is exactly equivalent (see the module docstring)."""
    kinds = set(architecture_of(model).smooth_kinds)
    return [g for g in _candidate_groups(model) if g.kind in kinds]


def _candidate_groups(model: nn.Module) -> list[SmoothGroup]:
    groups = []
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    for index, block in enumerate(decoder_blocks(model)):
        p = block_prefix(model, index)
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        has = lambda mod, *names: mod is not None and all(isinstance(getattr(mod, n, None), nn.Linear)
                                                          for n in names)
        if has(attn, "q_proj", "k_proj", "v_proj", "o_proj"):
            if _is_rms_norm(getattr(block, "input_layernorm", None) or nn.Identity()):
                groups.append(SmoothGroup(f"{p}attn_in", "attn_in", index, [f"{p}input_layernorm.weight"],
                                          [f"{p}self_attn.{n}_proj.weight" for n in "qkv"]))
            v_rows = [f"{p}self_attn.v_proj.weight"] + ([f"{p}self_attn.v_proj.bias"]
                                                        if attn.v_proj.bias is not None else [])
            head_dim = attn.o_proj.weight.shape[1] // n_heads
            groups.append(SmoothGroup(f"{p}v_o", "v_o", index, v_rows, [f"{p}self_attn.o_proj.weight"],
                                      repeat=n_heads // n_kv, head_dim=head_dim))
        if has(mlp, "gate_proj", "up_proj", "down_proj"):
            if _is_rms_norm(getattr(block, "post_attention_layernorm", None) or nn.Identity()):
                groups.append(SmoothGroup(f"{p}mlp_in", "mlp_in", index, [f"{p}post_attention_layernorm.weight"],
                                          [f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"]))
            groups.append(SmoothGroup(f"{p}up_down", "up_down", index,
                                      [f"{p}mlp.up_proj.weight"] + ([f"{p}mlp.up_proj.bias"]
                                                                    if mlp.up_proj.bias is not None else []),
                                      [f"{p}mlp.down_proj.weight"]))
    norm = decoder(model).norm
    if not is_tied(model) and _is_rms_norm(norm):
        norm_name = next(n for n, m in model.named_modules() if m is norm) + ".weight"
        groups.append(SmoothGroup("head", "head", None, [norm_name], [output_weight_name(model)]))
    return groups


def expand_to_columns(group: SmoothGroup, s: torch.Tensor) -> torch.Tensor:
    """Producer-channel scales -> consumer-column scales (GQA: each KV channel repeated over its heads)."""
    if group.repeat <= 1:
        return s
    return s.view(-1, 1, group.head_dim).expand(-1, group.repeat, -1).reshape(-1)


def pool_to_producer(group: SmoothGroup, col_values: torch.Tensor, how: str) -> torch.Tensor:
    """Consumer-column statistics -> producer channels (GQA: over the heads sharing a KV channel)."""
    if group.repeat <= 1:
        return col_values
    v = col_values.view(-1, group.repeat, group.head_dim)
    return (v.amax(1) if how == "max" else v.square().mean(1).sqrt()).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# Scales and the search
# ---------------------------------------------------------------------------------------------------------

def smoothquant_scales(act_rms: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^a / w^(1-a), normalised to geometric mean 1 and clamped (float64 in, float32 out)."""
    a = act_rms.double().clamp_min(1e-12)
    w = w_absmax.double().clamp_min(1e-12)
    log_s = alpha * a.log() - (1 - alpha) * w.log()
    log_s = (log_s - log_s.mean()).clamp(-math.log(SCALE_CLAMP), math.log(SCALE_CLAMP))
    return log_s.exp().float()


def group_statistics(model: nn.Module, stats: CalibStats, group: SmoothGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation RMS, largest |weight|) per producer channel."""
    first = group.consumers[0]
    act = (stats.in_sum2[first] / max(stats.counts[first], 1)).sqrt()
    w = torch.stack([model.get_parameter(c).detach().abs().amax(0).float().cpu() for c in group.consumers]).amax(0)
    return pool_to_producer(group, act, "rms"), pool_to_producer(group, w, "max")


def search_rows(n_rows: int, n: int = SEARCH_ROWS) -> torch.Tensor:
    """A fixed, evenly spread subset of rows."""
    return torch.linspace(0, n_rows - 1, min(n, n_rows)).round().long().unique()


@dataclass
class ConsumerRows:
    """What the error estimate needs of one consumer, prepared once per group: the search rows (float32),
    the input statistics and the rows' output energy through the Gram matrix."""
    weight_rows: torch.Tensor       # float32 [rows, n_in]
    gram: torch.Tensor              # float64 [n_in, n_in]
    in_sum2: torch.Tensor
    count: int
    energy: float


def consumer_rows(model, stats: CalibStats, group: SmoothGroup, device: torch.device | None = None
                  ) -> dict[str, ConsumerRows]:
    """The group's consumers as the search reads them (only the search rows are copied, not whole weights), on
    `device` (default: where the weight is; float64 products, so an Apple GPU's work runs on the CPU)."""
    out = {}
    for name in group.consumers:
        param = model.get_parameter(name).detach()
        on = gptq.compute_device(param.device if device is None else torch.device(device))
        w = param[search_rows(param.shape[0]).to(param.device)].float().to(on)
        gram = stats.gram_of(name)[0].to(device=on, dtype=torch.float64)
        wd = w.double()
        out[name] = ConsumerRows(w, gram, stats.in_sum2[name].to(on), max(stats.counts[name], 1),
                                 float(torch.einsum("oi,oi->", wd @ gram, wd)))
    return out


def consumer_errors(model, stats: CalibStats, group: SmoothGroup, col_scale: torch.Tensor | None,
                    qtype: str, prepared: dict[str, ConsumerRows] | None = None) -> float:
    """Summed output error of the group's consumers quantized to `qtype` after scaling (None: unscaled), through
    the Gram matrix, on the search rows; relative to the consumers' output energy on those rows. `prepared`
    (consumer_rows) saves re-reading the same rows for every strength and type."""
    prepared = prepared or consumer_rows(model, stats, group)
    err = energy = 0.0
    for c in prepared.values():
        if not get_type(qtype).fits(c.weight_rows.shape[1]):
            continue
        device = c.weight_rows.device
        s = torch.ones(c.weight_rows.shape[1], device=device) if col_scale is None else col_scale.float().to(device)
        # the same float32 product and imatrix arithmetic as transform_tensor and apply_to_statistics (element by
        # element, so alike on any device), so the quantizer sees bit-identical inputs to the ones it will get from
        # the transformed model; on a CUDA GPU gpu_quantize writes ggml's bytes there
        scaled = c.weight_rows * s[None, :]
        in_sum2 = c.in_sum2 / s.double().square().to(c.in_sum2.dtype)
        imatrix = (in_sum2 / c.count).to(torch.float32)
        dw = gpu_quantize.fake_quantize(scaled, qtype, imatrix).double() / s.double() - c.weight_rows.double()
        err += float(torch.einsum("oi,oi->", dw @ c.gram, dw))
        energy += c.energy
    return err / max(energy, 1e-30)


def group_types(model, group: SmoothGroup, menus: dict[str, Sequence[str]]) -> list[str]:
    """The candidate types of the group's consumers worth steering for (not the near-lossless ones)."""
    types = []
    for name in group.consumers:
        for t in menus.get(name, ()):
            if t not in types and t not in NO_GAIN_TYPES:
                types.append(t)
    return types


def search_smoothing(model: nn.Module, stats: CalibStats, menus: dict[str, Sequence[str]], mode: str = "auto",
                     alpha_grid: Sequence[float] = ALPHA_GRID, progress: bool = True,
                     device: torch.device | None = None) -> tuple[Smoothing, list[dict]]:
    """Choose the transform. mode "off": identity; a number: that alpha for every group; "auto": per group the
    alpha with the lowest output error over the consumers' candidate types (or none), the errors computed on
    `device` (default: where each weight is; on a CUDA GPU the quantization runs there too). Returns the
    transform and one record per (group, type): errors unscaled and at the chosen alpha."""
    smoothing = Smoothing(mode=str(mode))
    if mode == "off":
        return smoothing, []
    fixed = None if mode == "auto" else float(mode)
    records = []
    groups = smooth_groups(model)
    for group in tqdm(groups, desc="smoothing", unit="group", disable=not progress):
        act, w = group_statistics(model, stats, group)
        types = group_types(model, group, menus)
        if fixed is not None:
            best, candidates = fixed, {}
        elif not all(name in stats.gram_key for name in group.consumers):
            continue                    # an input too wide for a Gram (gram_max_dim): no exact error to steer by
        else:
            prepared = consumer_rows(model, stats, group, device)
            base = {t: consumer_errors(model, stats, group, None, t, prepared) for t in types}
            candidates = {}
            for alpha in alpha_grid:
                cols = expand_to_columns(group, smoothquant_scales(act, w, alpha))
                errs = {t: consumer_errors(model, stats, group, cols, t, prepared) for t in types}
                score = sum(math.log(max(errs[t], 1e-30) / max(base[t], 1e-30)) for t in types) / max(len(types), 1)
                candidates[alpha] = (score, errs)
            best = min(candidates, key=lambda a: candidates[a][0]) if candidates else None
            if best is not None and candidates[best][0] >= 0:
                best = None
            for t in types:
                records.append({"group": group.name, "kind": group.kind, "type": t, "rel_err_off": base[t],
                                "rel_err_smooth": candidates[best][1][t] if best is not None else base[t],
                                "alpha": best})
        if best is not None:
            add_group(smoothing, group, smoothquant_scales(act, w, best), best)
    return smoothing, records


def add_group(smoothing: Smoothing, group: SmoothGroup, s: torch.Tensor, alpha: float) -> None:
    """Rescale one group by producer-channel scales `s`: consumers' columns * s, producers * 1/s."""
    smoothing.alpha[group.name] = alpha
    for name in group.consumers:
        smoothing.columns[name] = expand_to_columns(group, s)
    for name in group.producers:
        smoothing.rows[name] = 1.0 / s


# ---------------------------------------------------------------------------------------------------------
# Applying it: to a model, to its statistics, to one checkpoint tensor
# ---------------------------------------------------------------------------------------------------------

def transform_tensor(name: str, values: torch.Tensor, smoothing: Smoothing) -> torch.Tensor:
    """One tensor (HF name, HF layout) after the transform, in float32."""
    out = values.float()
    if name in smoothing.columns:
        out = out * smoothing.columns[name].to(out.device)[None, :]
    if name in smoothing.rows:
        r = smoothing.rows[name].to(out.device)
        out = out * (r if out.dim() == 1 else r[:, None])
    return out


@torch.no_grad()
def apply_to_model(model: nn.Module, smoothing: Smoothing) -> None:
    """Rescale the model's parameters in place (float32 math, stored back in the parameter's dtype)."""
    for name in set(smoothing.columns) | set(smoothing.rows):
        param = model.get_parameter(name)
        param.data = transform_tensor(name, param.data, smoothing).to(param.dtype)


def apply_to_statistics(stats: CalibStats, smoothing: Smoothing) -> None:
    """The statistics of the transformed model: a consumer's input is x / s, so in_sum2 / s^2 and
    H / (s s^T); Grams shared by consumers are transformed once. The model content hash in `meta` gets the
    transform's, so caches keyed on it never mix smoothed and plain results."""
    done = set()
    for name, s in smoothing.columns.items():
        s = s.double()
        stats.in_sum2[name] = stats.in_sum2[name] / s.square().to(stats.in_sum2[name].dtype)
        key = stats.gram_key.get(name)
        if key is not None and key not in done:
            g = stats.gram[key]
            stats.gram[key] = (g.double() / (s[:, None] * s[None, :]).to(g.device)).to(g.dtype)
            done.add(key)
    if not smoothing.is_identity():
        stats.meta["model_content_hash"] = (f"{stats.meta.get('model_content_hash', '')}"
                                            f"+smooth-{smoothing.scales_hash()}")


def type_gains(records: list[dict]) -> dict[str, float]:
    """Per type: geometric mean over groups of (output error smoothed / unscaled); < 1 means it helps."""
    logs: dict[str, list[float]] = {}
    for r in records:
        if r["rel_err_off"] > 0 and r["rel_err_smooth"] > 0:
            logs.setdefault(r["type"], []).append(math.log(r["rel_err_smooth"] / r["rel_err_off"]))
    return {t: math.exp(sum(v) / len(v)) for t, v in logs.items()}

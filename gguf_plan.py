"""Architecture facts and byte accounting for GGUF export: the one place both the exporter and the GA use.

From a Hugging Face checkpoint directory (config.json, safetensors headers, tokenizer files; never the weights)
this module answers: which tensors the GGUF will hold and what llama.cpp calls them, which type llama.cpp's own
presets give each one, how a type that does not fit a row length falls back, what metadata the file carries,
and exactly how many bytes the exported file will take for a given per-tensor type assignment.

The rules are read from llama.cpp itself (src/llama-quant.cpp, src/llama-vocab.cpp, convert_hf_to_gguf.py) and
name the function they follow; tensor names come from gguf-py's TensorNameMap.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from quant_utils import get_type

# --------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """What the exporter must know about one Hugging Face architecture."""
    gguf_arch: gguf.MODEL_ARCH
    qkv_bias: bool    # q/k/v projections always carry biases (Qwen2); Llama's follow config.attention_bias
    permute_qk: bool  # llama.cpp's llama arch wants q/k rows reordered (convert_hf_to_gguf LlamaModel.permute)


ARCHITECTURES = {
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, qkv_bias=True, permute_qk=False),
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, qkv_bias=False, permute_qk=True),
}

# Checkpoint entries that are not weights of the model and are skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor as stored in a safetensors shard (header only)."""
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the GGUF: where it comes from, what it is called and what shape it has (HF order)."""
    hf_name: str              # checkpoint name; "rope_freqs" for the generated Llama-3 RoPE factors
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    layer: int | None
    shape: tuple[int, ...]    # [rows, row length] for matrices, as Hugging Face stores them

    @property
    def quantizable(self) -> bool:
        """2-D weights may be stored in any type; vectors (norms, biases, RoPE factors) stay F32."""
        return len(self.shape) == 2


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """A checkpoint described without loading its weights."""
    model_dir: Path
    name: str                 # general.name
    config: dict
    hf_arch: str
    spec: ArchSpec
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_vocab: int              # token embedding rows (the GGUF vocabulary is padded to this)
    tied: bool                # lm_head shares the token embedding: no output tensor is written
    rope: dict                # rope_theta, rope_type and scaling parameters, normalised
    sources: dict             # hf_name -> SourceTensor for every exported checkpoint tensor
    tensors: tuple            # TensorSpec, in file order

    @property
    def arch(self) -> str:
        """GGUF architecture name ("qwen2", "llama")."""
        return gguf.MODEL_ARCH_NAMES[self.spec.gguf_arch]

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def _read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _checkpoint_tensors(model_dir: Path) -> dict[str, SourceTensor]:
    """Names, dtypes and shapes of every tensor in the checkpoint (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir} (only safetensors checkpoints are supported)")
    out = {}
    for fname in files:
        path = model_dir / fname
        if not path.is_file():
            raise ValueError(f"checkpoint shard {fname} listed in the index is missing from {model_dir}")
        for name, meta in _read_safetensors_header(path).items():
            out[name] = SourceTensor(path, meta["dtype"], tuple(int(s) for s in meta["shape"]))
    return out


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings from either config layout (transformers 5 rope_parameters, or rope_theta + rope_scaling)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    rope["rope_type"] = str(rope_type).lower()
    return rope


def _expected_shapes(cfg: dict, spec: ArchSpec, n_vocab: int, head_dim: int, tied: bool) -> dict:
    """Every checkpoint tensor the architecture needs, in GGUF file order, with its shape."""
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    qkv_bias = spec.qkv_bias or bool(cfg.get("attention_bias", False))
    o_bias = spec.gguf_arch == gguf.MODEL_ARCH.LLAMA and bool(cfg.get("attention_bias", False))
    shapes = {"model.embed_tokens.weight": (n_vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if qkv_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (ff, h)
        shapes[p + "mlp.up_proj.weight"] = (ff, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ff)
    shapes["model.norm.weight"] = (h,)
    if not tied:
        shapes["lm_head.weight"] = (n_vocab, h)
    return shapes


@functools.lru_cache(maxsize=8)
def _name_map(gguf_arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf_arch, n_layers)


def load_model_info(model_dir, name: str | None = None) -> ModelInfo:
    """Describe a local Hugging Face checkpoint from config.json and safetensors headers (weights not read).

    Raises ValueError with one clear line for an unsupported architecture, a missing or misshapen tensor,
    or an unexpected one.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {model_dir}")
    cfg = json.loads(config_path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else f"(none; model_type={cfg.get('model_type')!r})"
    if hf_arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {hf_arch!r} in {config_path}; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[hf_arch]
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported by llama.cpp's "
                         f"{gguf.MODEL_ARCH_NAMES[spec.gguf_arch]} architecture")
    if cfg.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias) are not supported by llama.cpp's llama architecture")

    sources = _checkpoint_tensors(model_dir)
    if "model.embed_tokens.weight" not in sources:
        raise ValueError(f"checkpoint in {model_dir} lacks tensor model.embed_tokens.weight")
    n_vocab = sources["model.embed_tokens.weight"].shape[0]
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    tied = bool(cfg.get("tie_word_embeddings", False))
    expected = _expected_shapes(cfg, spec, n_vocab, head_dim, tied)

    for hf_name, shape in expected.items():
        if hf_name not in sources:
            raise ValueError(f"checkpoint in {model_dir} lacks tensor {hf_name} (needed by {hf_arch})")
        if sources[hf_name].dtype not in ("F32", "F16", "BF16"):
            raise ValueError(f"tensor {hf_name} is stored as {sources[hf_name].dtype}; only F32/F16/BF16 "
                             "checkpoints are supported")
        if sources[hf_name].shape != shape:
            raise ValueError(f"tensor {hf_name} has shape {list(sources[hf_name].shape)}, config.json implies "
                             f"{list(shape)}")
    skippable = {"lm_head.weight"} if tied else set()
    for hf_name in sources:
        if hf_name not in expected and hf_name not in skippable and not hf_name.endswith(_IGNORED_SUFFIXES):
            raise ValueError(f"checkpoint tensor {hf_name} is not part of {hf_arch} as this exporter knows it")

    tmap = _name_map(spec.gguf_arch, cfg["num_hidden_layers"])
    tensors = []
    for hf_name, shape in expected.items():
        found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"gguf-py has no GGUF name for {hf_name} in architecture {spec.gguf_arch.name}")
        kind, gname = found
        layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else None
        tensors.append(TensorSpec(hf_name, gname, kind, layer, shape))

    rope = _rope_parameters(cfg)
    if rope["rope_type"] == "llama3":
        if spec.gguf_arch != gguf.MODEL_ARCH.LLAMA:
            raise ValueError(f"RoPE type llama3 is only supported for Llama models, not {hf_arch}")
        tensors.append(TensorSpec("rope_freqs", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                  gguf.MODEL_TENSOR.ROPE_FREQS, None, (head_dim // 2,)))
    elif rope["rope_type"] not in ("default", "linear", "yarn"):
        raise ValueError(f"unsupported RoPE scaling type {rope['rope_type']!r} in config.json "
                         "(supported: default, linear, yarn, llama3)")

    return ModelInfo(
        model_dir=model_dir, name=name or model_dir.name, config=cfg, hf_arch=hf_arch, spec=spec,
        n_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads), head_dim=head_dim, n_vocab=n_vocab, tied=tied,
        rope=rope, sources={t.hf_name: sources[t.hf_name] for t in tensors if t.hf_name in sources},
        tensors=tuple(tensors))


def quantizable_tensors(info: ModelInfo) -> dict[str, tuple[int, int]]:
    """The 2-D weights GGUF may store in any type, as {hf_name: (rows, row_len)}.

    Every linear weight of every block, the token embedding and (untied models only) lm_head. Everything else
    (norms, biases) is written as F32, as llama.cpp does.
    """
    return {t.hf_name: t.shape for t in info.tensors if t.quantizable}


def gguf_name(info: ModelInfo, hf_name: str) -> str:
    """The GGUF tensor name of a checkpoint tensor, through gguf-py's TensorNameMap."""
    name = _name_map(info.spec.gguf_arch, info.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for {hf_name!r} in architecture {info.arch}")
    return name


def model_fingerprint(info: ModelInfo) -> str:
    """A short hash identifying the model's structure: architecture fields of config.json and all tensor
    names and shapes. A config made for one model is refused for any other."""
    keys = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    payload = {"config": {k: info.config.get(k) for k in keys},
               "tensors": sorted((t.hf_name, list(t.shape)) for t in info.tensors)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Types: fallback rule and llama.cpp's presets
# --------------------------------------------------------------------------------------------------------------

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a 256-block type that does not divide the row length
# becomes the 32-block type of similar size; if that does not fit either (or the type already has 32-blocks),
# F16. Hidden size 576 (SmolLM2) therefore stores Q4_K as Q5_0 and Q6_K as Q8_0.
FALLBACK_TYPES = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def resolve_type(type_name: str, row_len: int) -> tuple[str, bool]:
    """The type a tensor with rows of `row_len` is actually stored in when `type_name` is asked for.

    Returns (type, fell_back). Rule (llama.cpp's tensor_type_fallback): if the type's block size divides the
    row length, keep it; else use FALLBACK_TYPES (K/IQ types to a 32-block type); if that still does not
    fit, or the type had 32-blocks already, use F16 (block size 1, always fits).
    """
    t = get_type(type_name)
    if t.fits(row_len):
        return t.name, False
    fallback = FALLBACK_TYPES.get(t.name, "F16")
    if not get_type(fallback).fits(row_len):
        fallback = "F16"
    return fallback, True


@dataclass(frozen=True)
class Preset:
    file_type: gguf.LlamaFileType
    default_type: str


# The uniform recipes of llama-quantize (llama_ftype_get_default_type), by their usual names.
PRESETS = {
    "F32": Preset(gguf.LlamaFileType.ALL_F32, "F32"),
    "F16": Preset(gguf.LlamaFileType.MOSTLY_F16, "F16"),
    "BF16": Preset(gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
    "Q8_0": Preset(gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "Q6_K": Preset(gguf.LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
    "Q5_K_M": Preset(gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
    "Q5_K_S": Preset(gguf.LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
    "Q5_1": Preset(gguf.LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
    "Q5_0": Preset(gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
    "Q4_K_M": Preset(gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
    "Q4_K_S": Preset(gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
    "Q4_1": Preset(gguf.LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
    "Q4_0": Preset(gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
    "IQ4_XS": Preset(gguf.LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS"),
    "IQ4_NL": Preset(gguf.LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL"),
    "Q3_K_L": Preset(gguf.LlamaFileType.MOSTLY_Q3_K_L, "Q3_K"),
    "Q3_K_M": Preset(gguf.LlamaFileType.MOSTLY_Q3_K_M, "Q3_K"),
    "Q3_K_S": Preset(gguf.LlamaFileType.MOSTLY_Q3_K_S, "Q3_K"),
    "Q2_K": Preset(gguf.LlamaFileType.MOSTLY_Q2_K, "Q2_K"),
}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get a bigger type in the _M recipes (first/last eighth, every
    third in between)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _preset_choice(info: ModelInfo, preset: str, t: TensorSpec, imatrix_available: bool) -> str:
    """llama_tensor_get_type_impl (src/llama-quant.cpp) for dense qwen2/llama models, before the fallback."""
    K = gguf.MODEL_TENSOR
    p = PRESETS[preset]
    new = p.default_type
    if get_type(new).is_float:  # llama.cpp adjusts only quantized recipes
        return new
    n, i = info.n_layers, t.layer
    gqa = info.n_heads // info.n_kv_heads
    # llama.cpp's LLM_TYPE_70B, the one model size its recipes single out
    is_70b = n == 80 and (info.spec.gguf_arch == gguf.MODEL_ARCH.QWEN2 or info.n_heads != info.n_kv_heads)

    if t.kind == K.OUTPUT or (info.tied and t.kind == K.TOKEN_EMBD):
        if t.shape[1] % get_type(new).block_size != 0:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if t.kind == K.ATTN_V:
        if preset == "Q2_K":
            new = "Q4_K" if gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            new = "Q5_K"
        elif preset in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif preset == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        return new
    if t.kind == K.FFN_DOWN:
        if preset == "Q2_K":
            return "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if preset == "Q3_K_L":
            return "Q5_K"
        if preset == "Q4_K_M":
            return "Q6_K" if _use_more_bits(i, n) else new
        if preset in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not imatrix_available:
            return "Q5_K"
        if preset == "Q5_K_M" and _use_more_bits(i, n):
            return "Q6_K"
        if preset == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if preset in ("Q4_0", "Q5_0") and imatrix_available and i < n // 8:
            return "Q4_1" if preset == "Q4_0" else "Q5_1"
        return new
    if t.kind == K.ATTN_OUT:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, new)
    return new


def preset_choices(info: ModelInfo, preset: str, imatrix_available: bool = False) -> dict[str, str]:
    """The type llama.cpp's recipe asks for, per quantizable tensor, before the row-length fallback."""
    key = preset.upper()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported: {', '.join(PRESETS)}")
    return {t.hf_name: _preset_choice(info, key, t, imatrix_available) for t in info.tensors if t.quantizable}


def preset_types(info: ModelInfo, preset: str, imatrix_available: bool = False) -> dict[str, str]:
    """{hf_name: type} that `llama-quantize --<preset>` gives every quantizable tensor (fallbacks applied)."""
    shapes = quantizable_tensors(info)
    return {name: resolve_type(choice, shapes[name][1])[0]
            for name, choice in preset_choices(info, preset, imatrix_available).items()}


def plan_types(info: ModelInfo, tensor_types: dict) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Check a {hf_name: type} assignment and resolve it to the stored types.

    The assignment must name every quantizable tensor and nothing else. Returns ({hf_name: stored type} for
    every tensor of the file, vectors included as F32) and the fallbacks as (hf_name, asked, stored).
    """
    shapes = quantizable_tensors(info)
    unknown = sorted(set(tensor_types) - set(shapes))
    if unknown:
        raise ValueError(f"tensor_types names {len(unknown)} tensor(s) that are not quantizable weights of this "
                         f"model, e.g. {unknown[0]}")
    missing = [n for n in shapes if n not in tensor_types]
    if missing:
        raise ValueError(f"tensor_types gives no type for {len(missing)} tensor(s), e.g. {missing[0]}")
    stored, fallbacks = {}, []
    for t in info.tensors:
        if not t.quantizable:
            stored[t.hf_name] = "F32"
            continue
        asked = get_type(tensor_types[t.hf_name]).name
        stored[t.hf_name], fell_back = resolve_type(asked, t.shape[1])
        if fell_back:
            fallbacks.append((t.hf_name, asked, stored[t.hf_name]))
    return stored, fallbacks


# Which llama_ftype a file is labelled with when its types are mixed: the type holding most weights, named as
# llama.cpp's model loader names it (llama_model_loader: Q4_K -> MOSTLY_Q4_K_M, ...).
_FILE_TYPE_OF = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}


def mixed_file_type(info: ModelInfo, stored_types: dict[str, str]) -> gguf.LlamaFileType:
    """general.file_type for a mixed assignment: the type that holds the most weights."""
    weights: dict[str, int] = {}
    for t in info.tensors:
        if t.quantizable:
            weights[stored_types[t.hf_name]] = weights.get(stored_types[t.hf_name], 0) + math.prod(t.shape)
    main = max(weights, key=weights.get)
    return gguf.LlamaFileType[_FILE_TYPE_OF.get(main, f"MOSTLY_{main}")]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer (BPE tokenizer.json), as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it
# --------------------------------------------------------------------------------------------------------------

# llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp), each recognised by the Hugging Face pre_tokenizer that
# it reimplements. Key: (pre_tokenizer signature, model.ignore_merges); value: [(tokenizer.ggml.pre,
# clean_up_tokenization_spaces it implies or None if either)]. Pre-tokenizers llama.cpp implements identically
# are told apart by the llama.cpp flags that differ (clean_spaces).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_NO_REGEX = ("ByteLevel", False, False)
PRE_TOKENIZERS = {
    ((("Split", _QWEN2_REGEX, "Isolated", False), _BYTE_LEVEL_NO_REGEX), False): [("qwen2", None)],
    ((("Split", _QWEN35_REGEX, "Isolated", False), _BYTE_LEVEL_NO_REGEX), False): [("qwen35", None)],
    ((("Split", _LLAMA3_REGEX, "Isolated", False), _BYTE_LEVEL_NO_REGEX), True): [("llama-bpe", None)],
    ((("Digits", True), ("ByteLevel", False, True)), False): [("smollm", False), ("starcoder", True)],
    ((("ByteLevel", False, True),), False): [("gpt-2", None)],
}


def _pre_tokenizer_signature(pre: dict | None) -> tuple:
    """The parts of a tokenizers pre_tokenizer config that decide how text is split (offsets ignored)."""
    if not pre:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    sig = []
    for s in steps:
        kind = s.get("type")
        if kind == "Split":
            pattern = s.get("pattern", {})
            sig.append(("Split", pattern.get("Regex", pattern.get("String")), s.get("behavior"), s.get("invert")))
        elif kind == "ByteLevel":
            sig.append(("ByteLevel", s.get("add_prefix_space"), s.get("use_regex", True)))
        elif kind == "Digits":
            sig.append(("Digits", s.get("individual_digits")))
        else:
            sig.append((kind,))
    return tuple(sig)


def identify_pre_tokenizer(tokenizer_json: dict, tokenizer_config: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for this tokenizer, from its own pre_tokenizer config; never a guess."""
    sig = _pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges", False))
    clean = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))  # transformers' default
    candidates = [name for name, want_clean in PRE_TOKENIZERS.get((sig, ignore_merges), [])
                  if want_clean is None or want_clean == clean]
    if len(candidates) != 1:
        found = json.dumps(tokenizer_json.get("pre_tokenizer"))
        raise ValueError(f"unknown BPE pre-tokenizer (ignore_merges={ignore_merges}, clean_up_tokenization_spaces="
                         f"{clean}): {found}; known: {', '.join(n for v in PRE_TOKENIZERS.values() for n, _ in v)}")
    return candidates[0]


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens that are control tokens in practice."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# End-of-turn tokens written as tokenizer.ggml.eot_token_id when the chat template uses them.
_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class Vocab:
    tokens: list
    token_types: list
    merges: list
    pre: str
    special_ids: dict        # bos, eos, unk, pad, eot -> id (only those the tokenizer defines)
    add_bos: bool
    add_eos: bool
    chat_template: object    # str, list of {"name", "template"}, or None


def _merges(tokenizer_json: dict) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges")
    if not merges:
        raise ValueError("tokenizer.json has no BPE merges")
    if isinstance(merges[0], str):
        return list(merges)
    # pairs (transformers >= 4.45): spaces inside a part are encoded as U+0120 + 256, as gguf-py does
    return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
            for pair in merges]


@functools.lru_cache(maxsize=4)
def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """The tokenizer as llama.cpp needs it: tokens padded to `n_vocab` with [PADn], types, merges, the
    pre-tokenizer, special ids, add_bos/add_eos (from what the tokenizer does) and the chat template."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ValueError(f"no tokenizer.json in {model_dir} (only BPE tokenizers in that format are supported)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback"):
        raise ValueError(f"tokenizer model {tj.get('model', {}).get('type')!r} (byte_fallback="
                         f"{tj.get('model', {}).get('byte_fallback')}) is not a byte-level BPE tokenizer")
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    pre = identify_pre_tokenizer(tj, tok_cfg)

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"tokenizer has token id {max(vocab.values())} but the embedding has only {n_vocab} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp assumes control and user-defined tokens are pre-normalised (convert_hf_to_gguf.py)
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    # Special ids: the tokenizer's, else config.json's (gguf-py SpecialVocab reads both in this order).
    model_cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is None and isinstance(model_cfg.get(f"{kind}_token_id"), int):
            tid = model_cfg[f"{kind}_token_id"]
        if tid is not None and 0 <= tid < n_vocab:
            special[kind] = int(tid)

    chat_template = tok.chat_template
    if isinstance(chat_template, dict):
        chat_template = [{"name": k, "template": v} for k, v in chat_template.items()]
    template_text = json.dumps(chat_template) if chat_template else ""
    for text in _EOT_TOKENS:
        if text in vocab and types[vocab[text]] == gguf.TokenType.CONTROL and text in template_text:
            special["eot"] = vocab[text]
            break

    # add_bos / add_eos from what the tokenizer actually does to a text
    with_special = tok.encode("a", add_special_tokens=True)
    plain = tok.encode("a", add_special_tokens=False)
    start = with_special.index(plain[0]) if plain and plain[0] in with_special else 0
    prefix, suffix = with_special[:start], with_special[start + len(plain):]
    if prefix not in ([], [special.get("bos")]) or suffix not in ([], [special.get("eos")]):
        raise ValueError(f"tokenizer adds {prefix} before and {suffix} after a text; llama.cpp can only add "
                         "the BOS and EOS tokens")
    return Vocab(tokens, types, _merges(tj), pre, special, bool(prefix), bool(suffix), chat_template)


# --------------------------------------------------------------------------------------------------------------
# GGUF metadata and byte accounting
# --------------------------------------------------------------------------------------------------------------


def _add_model_metadata(w: gguf.GGUFWriter, info: ModelInfo, file_type: int) -> None:
    """Hyper-parameters from config.json, as convert_hf_to_gguf.py writes them for qwen2 and llama."""
    cfg = info.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(info.name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(info.n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(info.hidden_size)
    w.add_feed_forward_length(info.intermediate_size)
    w.add_head_count(info.n_heads)
    w.add_head_count_kv(info.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(info.n_vocab)
    w.add_rope_dimension_count(info.head_dim)
    if cfg.get("head_dim") is not None:
        w.add_key_length(info.head_dim)
        w.add_value_length(info.head_dim)
    rope = info.rope
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])


def _add_vocab_metadata(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types([int(t) for t in vocab.token_types])
    w.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
         "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}[kind](tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def new_writer(info: ModelInfo, stored_types: dict[str, str], path, file_type: int) -> gguf.GGUFWriter:
    """A GGUFWriter holding all metadata and tensor infos for this assignment, nothing written yet.

    `stored_types` is plan_types()'s first result. The caller writes header, KV data and tensor infos, then
    each tensor's data in info.tensors order (write_tensor_data), so no tensor data is ever held in full.
    """
    w = gguf.GGUFWriter(path, info.arch)
    _add_model_metadata(w, info, file_type)
    _add_vocab_metadata(w, read_vocab(info.model_dir, info.n_vocab))
    for t in info.tensors:
        qtype = get_type(stored_types[t.hf_name])
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), qtype.tensor_size_bytes(t.shape),
                          raw_dtype=gguf.GGMLQuantizationType[qtype.name])
    return w


def _pad(n: int, align: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


_METADATA_BYTES: dict[tuple, int] = {}


def _metadata_bytes(info: ModelInfo) -> int:
    """Bytes before the tensor data (header, KV metadata, tensor infos), measured by writing them with the
    exporter's own writer. They do not depend on the types chosen: every type id and offset has a fixed
    width, so one measurement per model (cached) serves every assignment."""
    key = (str(info.model_dir.resolve()), info.name, model_fingerprint(info))
    if key not in _METADATA_BYTES:
        _METADATA_BYTES[key] = _measure_metadata_bytes(info)
    return _METADATA_BYTES[key]


def _measure_metadata_bytes(info: ModelInfo) -> int:
    all_f32 = {t.hf_name: "F32" for t in info.tensors}
    fd, path = tempfile.mkstemp(suffix=".gguf-meta")
    os.close(fd)
    try:
        w = new_writer(info, all_f32, path, gguf.LlamaFileType.ALL_F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def gguf_fixed_bytes(info: ModelInfo) -> int:
    """The part of the file size no type choice changes: metadata (header, KV, tensor infos) padded to the
    alignment, plus the F32 vectors (norms, biases), each padded."""
    vectors = sum(_pad(get_type("F32").tensor_size_bytes(t.shape)) for t in info.tensors if not t.quantizable)
    return _pad(_metadata_bytes(info)) + vectors


def gguf_tensor_bytes(info: ModelInfo, hf_name: str, type_name: str) -> int:
    """Bytes one quantizable tensor adds to the file when `type_name` is asked for it (after resolve_type's
    fallback, padded to the 32-byte alignment). Additive: the file size is gguf_fixed_bytes plus these."""
    rows, row_len = quantizable_tensors(info)[hf_name]
    return _pad(get_type(resolve_type(type_name, row_len)[0]).tensor_size_bytes((rows, row_len)))


def gguf_file_size(info: ModelInfo, tensor_types: dict[str, str]) -> int:
    """The exact size in bytes of the file export_gguf_official.py writes for this {hf_name: type} assignment
    (every quantizable tensor named; types resolved by resolve_type as the exporter does): the metadata padded
    to the 32-byte alignment, then every tensor's data padded to it. The GA's budget and the file agree to
    the byte; for a per-tensor table use gguf_fixed_bytes + gguf_tensor_bytes, which sum to the same."""
    plan_types(info, tensor_types)
    return gguf_fixed_bytes(info) + sum(gguf_tensor_bytes(info, n, t) for n, t in tensor_types.items())

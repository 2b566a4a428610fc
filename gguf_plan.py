"""The GGUF file a type assignment makes: llama.cpp's preset recipes, the row-length fallback, the metadata
writer, and exact byte accounting (the one place both the exporter and the GA take sizes from).

The rules are read from llama.cpp itself (src/llama-quant.cpp, convert_hf_to_gguf.py) and name the function
they follow; the architecture facts come from architectures.py, the tokenizer from gguf_vocab.py.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import gguf
import numpy as np

import files
from architectures import GGUFTensor, ModelInfo, checkpoint_content_hash, quantizable_tensors, shape_signature
from gguf_vocab import add_vocab_metadata, read_vocab
from quant_utils import get_type

# The checkpoint a GGUF was made from (architectures.checkpoint_content_hash): llama.cpp ignores the key; the
# comparison scripts refuse a GGUF of another checkpoint by it.
CHECKPOINT_HASH_KEY = "mixed_precision.checkpoint_content_hash"

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
    "Q2_K_S": Preset(gguf.LlamaFileType.MOSTLY_Q2_K_S, "Q2_K"),
    "IQ3_M": Preset(gguf.LlamaFileType.MOSTLY_IQ3_M, "IQ3_S"),
    "IQ3_S": Preset(gguf.LlamaFileType.MOSTLY_IQ3_S, "IQ3_S"),
    "IQ3_XS": Preset(gguf.LlamaFileType.MOSTLY_IQ3_XS, "IQ3_S"),
    "IQ3_XXS": Preset(gguf.LlamaFileType.MOSTLY_IQ3_XXS, "IQ3_XXS"),
    "IQ2_M": Preset(gguf.LlamaFileType.MOSTLY_IQ2_M, "IQ2_S"),
    "IQ2_S": Preset(gguf.LlamaFileType.MOSTLY_IQ2_S, "IQ2_XS"),
    "IQ2_XS": Preset(gguf.LlamaFileType.MOSTLY_IQ2_XS, "IQ2_XS"),
    "IQ2_XXS": Preset(gguf.LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XXS"),
    "IQ1_M": Preset(gguf.LlamaFileType.MOSTLY_IQ1_M, "IQ1_M"),
    "IQ1_S": Preset(gguf.LlamaFileType.MOSTLY_IQ1_S, "IQ1_S"),
}
# The i-quant recipes that give most tensors 1-2 bit types (llama-quant.cpp treats them as one group), and the
# types llama.cpp will not quantize a tensor to without an imatrix (tensor_requires_imatrix: the token embedding
# and the output are exempt; Q2_K only inside a Q2_K_S file).
_LOWEST_BIT_PRESETS = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
IMATRIX_TYPES = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get a bigger type in the _M recipes (first/last eighth, every
    third in between)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _preset_choice(info: ModelInfo, preset: str, t: GGUFTensor, imatrix_available: bool) -> str:
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
        if preset in _LOWEST_BIT_PRESETS or preset == "IQ3_XXS":
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if t.kind == K.TOKEN_EMBD:
        if preset in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if preset in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return new
    if preset in _LOWEST_BIT_PRESETS:
        high = "IQ3_S" if preset in ("IQ2_S", "IQ2_M") else "Q2_K"
        if t.kind == K.ATTN_V:
            return "Q4_K" if gqa >= 4 else high
        if t.kind == K.FFN_DOWN:
            return high if i < n // 8 else new
        if t.kind == K.ATTN_OUT:
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(preset, new)
        return new
    if t.kind == K.ATTN_V:
        if preset == "Q2_K":
            new = "Q4_K" if gqa >= 4 else "Q3_K"
        elif preset == "Q2_K_S" and gqa >= 4:
            new = "Q4_K"
        elif preset == "IQ3_XXS":
            new = "Q4_K" if gqa >= 4 else "IQ3_XXS" if imatrix_available else "IQ3_S"
        elif preset in ("IQ3_XS", "IQ3_S") and gqa >= 4 or preset == "IQ3_M":
            new = "Q4_K"
        elif preset == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif preset == "Q3_K_L" or preset in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif preset == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        return new
    if t.kind in (K.ATTN_K, K.ATTN_Q):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(preset, new)
    if t.kind == K.FFN_DOWN:
        if preset == "Q2_K":
            return "Q3_K"
        if preset == "Q2_K_S":
            return "Q4_K" if i < n // 8 else new
        if preset == "IQ3_XXS" and not imatrix_available:
            return "Q4_K" if i < n // 8 else "Q3_K"
        if preset == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if preset == "IQ3_M" and i < n // 8:
            return "Q4_K"
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
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(preset, new)
    if t.kind in (K.FFN_GATE, K.FFN_UP) and preset == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        return "IQ3_XXS"
    return new


def imatrix_required(info: ModelInfo, tensor_types: dict[str, str], preset: str | None = None) -> list[str]:
    """The tensors llama.cpp will not quantize to their type without an imatrix (its tensor_requires_imatrix:
    i-quants of 1-2 bits and IQ3_XXS; Q2_K inside a Q2_K_S file; never the token embedding or the output)."""
    exempt = {t.hf_name for t in info.tensors if t.kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT)}
    needs = set(IMATRIX_TYPES) | ({"Q2_K"} if preset and preset.upper() == "Q2_K_S" else set())
    return [name for name, qtype in tensor_types.items() if qtype in needs and name not in exempt]


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
# GGUF metadata and byte accounting
# --------------------------------------------------------------------------------------------------------------

def _add_model_metadata(w: gguf.GGUFWriter, info: ModelInfo, file_type: int) -> None:
    """Hyper-parameters from config.json, as convert_hf_to_gguf.py writes them for the architectures of
    architectures.ARCHITECTURES."""
    cfg = info.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(info.name)
    w.add_string(CHECKPOINT_HASH_KEY, checkpoint_content_hash(info))   # our own key: which checkpoint this is
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
    if info.spec.swa_pattern is not None:    # Gemma3Model.set_gguf_parameters
        w.add_sliding_window(cfg["sliding_window"])
        if rope.get("rope_theta_swa") is not None:
            w.add_rope_freq_base_swa(rope["rope_theta_swa"])


def new_writer(info: ModelInfo, stored_types: dict[str, str], path, file_type: int) -> gguf.GGUFWriter:
    """A GGUFWriter holding all metadata and tensor infos for this assignment, nothing written yet.

    `stored_types` is plan_types()'s first result. The caller writes header, KV data and tensor infos, then
    each tensor's data in info.tensors order (write_tensor_data), so no tensor data is ever held in full.
    """
    w = gguf.GGUFWriter(path, info.arch)
    _add_model_metadata(w, info, file_type)
    add_vocab_metadata(w, read_vocab(info.model_dir, info.n_vocab, info.spec.sentencepiece,
                                     info.spec.add_space_prefix))
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
    width, so one measurement per model serves every assignment (cached; keyed also on the tokenizer and
    config files, whose vocabulary and chat template are metadata)."""
    side_files = [p for p in info.model_dir.iterdir() if p.is_file() and not p.name.endswith(".safetensors")]
    key = (str(info.model_dir.resolve()), info.name, shape_signature(info), files.file_stat_signature(side_files))
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


def size_range(info: ModelInfo, menus: dict[str, tuple[str, ...]]) -> tuple[int, int]:
    """The smallest and largest file sizes of assignments that give each tensor a type of its menu."""
    low = high = gguf_fixed_bytes(info)
    for name, menu in menus.items():
        sizes = [gguf_tensor_bytes(info, name, t) for t in menu]
        low, high = low + min(sizes), high + max(sizes)
    return low, high


def gguf_file_size(info: ModelInfo, tensor_types: dict[str, str]) -> int:
    """The exact size in bytes of the file export_gguf_official.py writes for this {hf_name: type} assignment
    (every quantizable tensor named; types resolved by resolve_type as the exporter does): the metadata padded
    to the 32-byte alignment, then every tensor's data padded to it. The GA's budget and the file agree to
    the byte; for a per-tensor table use gguf_fixed_bytes + gguf_tensor_bytes, which sum to the same."""
    plan_types(info, tensor_types)
    return gguf_fixed_bytes(info) + sum(gguf_tensor_bytes(info, n, t) for n, t in tensor_types.items())



def metadata_bytes(info: ModelInfo) -> int:
    """File bytes that are not tensor data (header, metadata, tensor infos, padding)."""
    f32 = preset_types(info, "F32")
    return gguf_file_size(info, f32) - 4 * info.n_params


def bits_per_weight(info: ModelInfo, file_size: int) -> float:
    """llama.cpp's BPW: tensor-data bits over parameters."""
    return 8 * (file_size - metadata_bytes(info)) / info.n_params

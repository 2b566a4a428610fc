"""Architecture facts: the one table every stage reads (exporter, size accounting, block walker, smoothing).

From a Hugging Face checkpoint directory (config.json and safetensors headers; never the weights) this module
says which tensors the GGUF will hold, what llama.cpp calls them (gguf-py's TensorNameMap), their shapes, the
RoPE settings, and in which row order llama.cpp wants q/k. Adding a family means adding a row to
ARCHITECTURES (and its tests).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class ArchSpec:
    """What every stage must know about one Hugging Face architecture (a row of ARCHITECTURES)."""
    gguf_arch: gguf.MODEL_ARCH
    qkv_bias: bool = False          # q/k/v projections always carry biases (Qwen2)
    attention_bias_ok: bool = False  # config.attention_bias adds q/k/v/o biases llama.cpp reads (llama arch)
    permute_qk: bool = False        # llama.cpp's llama arch wants q/k rows reordered (LlamaModel.permute)
    qk_norm: bool = False           # RMSNorm over each head of q and k (Qwen3, Gemma 3)
    sandwich_norms: bool = False    # norms after attention and around the FFN (Gemma 3): the FFN reads
    #                                 pre_feedforward_layernorm, post_attention_layernorm normalises attention's output
    norm_shift: float = 0.0         # llama.cpp stores every norm weight + this (Gemma's RMSNorm scales by 1 + w)
    scales_embedding: bool = False  # llama.cpp multiplies the token embeddings by sqrt(hidden size), in float32
    swa_pattern: int | None = None  # llama.cpp's fixed sliding-window layout: every n-th layer global (Gemma 3: 6)
    sentencepiece: bool = False     # reads a tokenizer.model where the checkpoint has one (llama.cpp's "llama" vocab)
    add_space_prefix: bool | None = None  # written as tokenizer.ggml.add_space_prefix (None: tokenizer_config's)
    # Where SmoothQuant-style scaling is exactly equivalent (smoothing.py): Gemma's (1 + w) norms cannot absorb
    # a scale, so only the v->o and up->down pairs qualify there.
    smooth_kinds: tuple[str, ...] = ("attn_in", "mlp_in", "v_o", "up_down", "head")


ARCHITECTURES = {
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, qk_norm=True),
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, attention_bias_ok=True, permute_qk=True,
                                 sentencepiece=True),
    # Mistral's config.sliding_window (4096 in v0.1) is ignored by llama.cpp's llama arch, as by its converter:
    # the same model on contexts up to that length.
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, attention_bias_ok=True, permute_qk=True,
                                   sentencepiece=True),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, qk_norm=True, sandwich_norms=True, norm_shift=1.0,
                                  scales_embedding=True, swa_pattern=6, sentencepiece=True, add_space_prefix=False,
                                  smooth_kinds=("v_o", "up_down")),
}


# Checkpoint entries that are not weights of the model and are skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor as stored in a safetensors shard (header only)."""
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int               # its data's first byte in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFTensor:
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
    tensors: tuple            # GGUFTensor, in file order

    @property
    def arch(self) -> str:
        """GGUF architecture name ("qwen2", "qwen3", "llama", "gemma3")."""
        return gguf.MODEL_ARCH_NAMES[self.spec.gguf_arch]

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without its metadata, file offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


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
        header, data_start = _read_safetensors_header(path)
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            out[name] = SourceTensor(path, meta["dtype"], tuple(int(s) for s in meta["shape"]),
                                     data_start + int(begin), int(end) - int(begin))
    return out


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings from either config layout (transformers 5 rope_parameters, or rope_theta + rope_scaling),
    of the global layers; `rope_theta_swa` is the sliding-window layers' base where it differs (Gemma 3)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope = dict(params.get("full_attention", params))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    rope["rope_type"] = str(rope_type).lower()
    swa_theta = params.get("sliding_attention", {}).get("rope_theta", cfg.get("rope_local_base_freq"))
    if swa_theta is not None:
        rope["rope_theta_swa"] = swa_theta
    return rope


def _check_config(cfg: dict, spec: ArchSpec, hf_arch: str, config_path: Path) -> None:
    """Refuse, in one line each, the settings of config.json that llama.cpp's architecture would not reproduce."""
    arch = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    if cfg.get("use_sliding_window"):
        raise ValueError(f"sliding-window attention (use_sliding_window in {config_path}) is not supported by "
                         f"llama.cpp's {arch} architecture")
    if cfg.get("mlp_bias"):
        raise ValueError(f"MLP biases (mlp_bias in {config_path}) are not supported by llama.cpp's {arch} "
                         "architecture")
    if cfg.get("attention_bias") and not (spec.attention_bias_ok or spec.qkv_bias):
        raise ValueError(f"attention biases (attention_bias in {config_path}) are not supported for {hf_arch}")
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        raise ValueError(f"logit soft-capping ({config_path}) is not supported by this tool's KLD measurements")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"bidirectional attention (use_bidirectional_attention in {config_path}) is not a causal LM")
    if spec.swa_pattern is not None:
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", spec.swa_pattern))
        if pattern != spec.swa_pattern:
            raise ValueError(f"sliding_window_pattern {pattern} in {config_path}: llama.cpp's {arch} has every "
                             f"{spec.swa_pattern}th layer global")
        n = cfg["num_hidden_layers"]
        llama_cpp = ["sliding_attention" if (i + 1) % spec.swa_pattern else "full_attention" for i in range(n)]
        if cfg.get("layer_types") is not None and list(cfg["layer_types"]) != llama_cpp:
            raise ValueError(f"layer_types in {config_path} is not llama.cpp's fixed {arch} pattern (every "
                             f"{spec.swa_pattern}th layer global)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if cfg.get("query_pre_attn_scalar", head_dim) != head_dim:
            raise ValueError(f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']} in {config_path} differs from "
                             f"head_dim {head_dim}: llama.cpp scales attention by 1/sqrt(head_dim)")


def _expected_shapes(cfg: dict, spec: ArchSpec, n_vocab: int, head_dim: int, tied: bool) -> dict:
    """Every checkpoint tensor the architecture needs, in GGUF file order, with its shape."""
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    attention_bias = spec.attention_bias_ok and bool(cfg.get("attention_bias", False))
    qkv_bias = spec.qkv_bias or attention_bias
    shapes = {"model.embed_tokens.weight": (n_vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if qkv_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if spec.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
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
    _check_config(cfg, spec, hf_arch, config_path)

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
        tensors.append(GGUFTensor(hf_name, gname, kind, layer, shape))

    rope = _rope_parameters(cfg)
    if rope["rope_type"] == "llama3":
        if spec.gguf_arch != gguf.MODEL_ARCH.LLAMA:
            raise ValueError(f"RoPE type llama3 is only supported for Llama models, not {hf_arch}")
        tensors.append(GGUFTensor("rope_freqs", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
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


def checkpoint_content_hash(info: ModelInfo, sample_bytes: int = 4096) -> str:
    """A hash of the checkpoint's values, cheap at any size: every exported tensor's name, dtype and shape and
    three samples of its stored bytes (start, middle, end). Two checkpoints of the same shape, a fine-tune and
    its base say, differ in it; a config or a GGUF made from one is refused for the other."""
    h = hashlib.sha256()
    for name in sorted(info.sources):
        src = info.sources[name]
        h.update(f"{name}|{src.dtype}|{list(src.shape)}".encode())
        starts = sorted({0, max(0, src.nbytes // 2 - sample_bytes // 2), max(0, src.nbytes - sample_bytes)})
        with open(src.file, "rb") as f:
            for start in starts:
                f.seek(src.offset + start)
                h.update(f.read(min(sample_bytes, src.nbytes - start)))
    return h.hexdigest()[:16]


def shape_signature(info: ModelInfo) -> str:
    """A short hash identifying the model's structure: architecture fields of config.json and all tensor
    names and shapes. A config made for one model is refused for any other."""
    keys = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    payload = {"config": {k: info.config.get(k) for k in keys},
               "tensors": sorted((t.hf_name, list(t.shape)) for t in info.tensors)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def architecture_of(model) -> ArchSpec:
    """The table row of a loaded transformers model (by its class, e.g. Qwen2ForCausalLM)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# --------------------------------------------------------------------------------------------------------------
# Tensors as llama.cpp stores them
# --------------------------------------------------------------------------------------------------------------

def _permute_rows(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half row order to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(info) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors for rope_type llama3."""
    rope, dim = info.rope, info.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def to_stored_values(info: ModelInfo, hf_name: str, values, half: bool = False):
    """A checkpoint tensor's float values as llama.cpp stores them: norm weights shifted by the architecture's
    norm_shift (Gemma 3: convert_hf_to_gguf's Gemma3Model.norm_shift, 1 + w; in float16 for a float16
    checkpoint, `half`, as the converter adds it in the stored dtype), rows in llama.cpp's order."""
    if info.spec.norm_shift and hf_name.endswith("norm.weight"):
        values = (values.half() + info.spec.norm_shift).float() if half else values + info.spec.norm_shift
    return to_gguf_row_order(info, hf_name, values)


def to_gguf_row_order(info: ModelInfo, hf_name: str, rows):
    """A checkpoint tensor's rows (values, or one row of bytes per weight row) in the order llama.cpp expects:
    the llama architecture's q/k projections permuted (convert_hf_to_gguf LlamaModel.modify_tensors), every
    other tensor as it is."""
    if info.spec.permute_qk:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute_rows(rows, info.n_heads)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute_rows(rows, info.n_kv_heads)
    return rows

"""Model families: Qwen3, Mistral, Gemma 3, Llama 2 and Llama 3's RoPE scaling, exported as llama.cpp's own
tools do.

Tiny random checkpoints, with real byte-level BPE vocabularies (Qwen's from models/qwen-tokenizer, SmolLM2's
from the demo model) or small SentencePiece models trained here, are exported by us and by llama.cpp's own
convert_hf_to_gguf.py (vendored in the llama-cpp-python sdist; `make test` fetches it into
models/llama.cpp-convert-<version>): tensors byte-identical, the metadata llama.cpp reads equal. llama.cpp
(llama-cpp-python) must then compute transformers' logits, quantize to the same bytes as we do, and tokenize
as transformers (and sentencepiece) do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import architectures
import gguf_export
import gguf_plan
import model_blocks
import smoothing
from conftest import CORPUS, QWEN_TOKENIZER_DIR, ROOT, _randomize_
from test_export import assert_same_tensors, export, llama_cpp_model, llama_quantize

LLAMA_VERSION = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                     if line.startswith("llama-cpp-python=="))
CONVERTER = ROOT / "models" / f"llama.cpp-convert-{LLAMA_VERSION}"
SMOLLM_DIR = ROOT / "models" / "smollm2-135m-instruct"

# Keys only one of the two files has. Ours: the checkpoint hash (our own key), and defaults llama.cpp would
# derive anyway (RoPE dimensions = head size, vocabulary size = token count, end-of-turn and add-EOS flags);
# the converter's: the size label it computes.
OURS_ONLY = {"mixed_precision.checkpoint_content_hash", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_eos_token"}
THEIRS_ONLY = {"general.size_label"}

TEXTS = sorted(set(CORPUS)) + [
    " leading space", "two  spaces and trailing ", "\n\nnewlines\n", "naïve café Zürich", "Привет, мир!",
    "مرحبا بالعالم", "こんにちは世界", "🤖🦙🚀 emojis 👍🏽", "x = [i**2 for i in range(10)]  # comment",
    "1234567890 3.14159", "<|im_start|>user\nhi<|im_end|>"]


def _family_config(family: str, n_vocab: int):
    import transformers as T
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if family == "qwen3":      # q/k norms, head size not hidden / heads, tied
        return T.Qwen3ForCausalLM, T.Qwen3Config(**common, num_hidden_layers=2, head_dim=32,
                                                 tie_word_embeddings=True, rope_theta=1e6)
    if family == "mistral":    # llama arch in GGUF, untied; its sliding window is beyond the context
        return T.MistralForCausalLM, T.MistralConfig(**common, num_hidden_layers=2, tie_word_embeddings=False,
                                                     sliding_window=4096)
    if family == "llama2":     # a SentencePiece vocabulary, untied
        return T.LlamaForCausalLM, T.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False)
    if family == "llama3":     # Llama 3.1's rope_scaling: llama.cpp gets the factors as rope_freqs
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return T.LlamaForCausalLM, T.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=True,
                                                 rope_parameters=rope)
    if family == "gemma3":     # 7 layers: 5 sliding-window (16 tokens), 1 global, 1 sliding; MQA
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            **{**common, "num_key_value_heads": 1}, num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=16, tie_word_embeddings=True)
    raise ValueError(family)


def sentencepiece_tokenizer(out_dir: Path, tokenizer_class: str) -> Path:
    """A small SentencePiece BPE tokenizer trained on CORPUS with its releases' settings (byte fallback, digits
    split, no normalisation; a dummy space prefix for LlamaTokenizer as Llama 2's, none for GemmaTokenizer as
    Gemma's); transformers converts it to the tokenizer.json releases carry beside it."""
    import io
    import json
    import sentencepiece as spm
    from transformers import AutoTokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        add_dummy_prefix=tokenizer_class == "LlamaTokenizer", remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}))
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)    # + tokenizer.json, as releases have
    return out_dir


# Each family's vocabulary: a real byte-level BPE where one is at hand (Qwen's, SmolLM2's), and small
# SentencePiece models for the families that read a tokenizer.model (Llama 2 style; Gemma with its settings).
TOKENIZERS = {"qwen3": lambda tmp: QWEN_TOKENIZER_DIR, "gemma3": lambda tmp: QWEN_TOKENIZER_DIR,
              "mistral": lambda tmp: SMOLLM_DIR, "llama3": lambda tmp: SMOLLM_DIR,
              "llama2": lambda tmp: sentencepiece_tokenizer(tmp, "LlamaTokenizer"),
              "gemma3_spm": lambda tmp: sentencepiece_tokenizer(tmp, "GemmaTokenizer")}
FAMILIES = list(TOKENIZERS)


def build_family(out_dir: Path, family: str) -> Path:
    """A random float32 checkpoint of `family` with its vocabulary (embedding rows = its tokens)."""
    from transformers import AutoTokenizer
    tok_dir = TOKENIZERS[family](out_dir.parent / f"{family}-tokenizer")
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"{tok_dir} is not there (make test fetches it)")
    n_vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    model_cls, cfg = _family_config(family.removesuffix("_spm"), n_vocab)
    torch.manual_seed(0)
    model = model_cls(cfg)
    _randomize_(model, seed=3)
    if architectures.ARCHITECTURES[type(model).__name__].norm_shift:
        with torch.no_grad():      # Gemma's RMSNorm scales by 1 + w: keep the scales near 1
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.sub_(1.0)
    model.save_pretrained(out_dir)
    for f in tok_dir.iterdir():
        if f.suffix in (".json", ".jinja", ".model") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    """Checkpoints built on first use, one per family."""
    base = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(base / family, family)
        return built[family]
    return get


@pytest.fixture(scope="session")
def f32(families, tmp_path_factory) -> dict:
    """Our F32 export of each family, made on first use."""
    base = tmp_path_factory.mktemp("families-f32")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = export(families(family), base / f"{family}.gguf", preset="F32")[0]
        return made[family]
    return get


def convert(model_dir: Path, out: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py at F32, with its own gguf-py."""
    script = CONVERTER / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"{script} is not there (make test fetches it: make {script.relative_to(ROOT)})")
    env = {**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_is_llama_cpps_converter_output(family, families, f32, tmp_path):
    model_dir = families(family)
    theirs = convert(model_dir, tmp_path / "theirs.gguf")
    assert_same_tensors(f32(family), theirs)
    ours_kv, theirs_kv = metadata(f32(family)), metadata(theirs)
    arch = ours_kv["general.architecture"]
    ours_only = OURS_ONLY | {f"{arch}.rope.dimension_count", f"{arch}.vocab_size"}
    assert set(ours_kv) - set(theirs_kv) <= ours_only
    assert set(theirs_kv) - set(ours_kv) <= THEIRS_ONLY
    shared = (set(ours_kv) & set(theirs_kv)) - {"general.name"}
    assert {k for k in shared if ours_kv[k] != theirs_kv[k]} == set()
    # our extra keys say what llama.cpp would assume without them
    head_size = ours_kv.get(f"{arch}.attention.key_length",
                            ours_kv[f"{arch}.embedding_length"] // ours_kv[f"{arch}.attention.head_count"])
    assert ours_kv[f"{arch}.rope.dimension_count"] == head_size
    assert ours_kv[f"{arch}.vocab_size"] == len(ours_kv["tokenizer.ggml.tokens"])
    if family == "llama3":
        assert "rope_freqs.weight" in gguf_export_tensor_names(f32(family))
    if family.startswith("llama2") or family.endswith("_spm"):
        assert ours_kv["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.scores" in ours_kv
    if family == "gemma3":   # the norms as llama.cpp stores them: 1 + w
        info = architectures.load_model_info(model_dir)
        w = gguf_export.tensor_values(info, next(t for t in info.tensors if t.hf_name == "model.norm.weight"))
        from safetensors import safe_open
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            assert np.array_equal(w, (f.get_tensor("model.norm.weight") + 1.0).numpy())


def gguf_export_tensor_names(path: Path) -> set[str]:
    return {t.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(family, families, f32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(families(family), dtype=torch.float32).eval()
    n = min(1000, model.config.vocab_size)
    ids = np.random.default_rng(1).integers(0, n, 80).tolist()   # longer than Gemma's 16-token window
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp_model(f32(family), logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    llm.close()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_preset_matches_llama_quantize(family, families, f32, tmp_path):
    ours, _ = export(families(family), tmp_path / "ours.gguf", preset="Q4_K_M")
    llama_quantize(f32(family), tmp_path / "theirs.gguf", "Q4_K_M")
    assert_same_tensors(ours, tmp_path / "theirs.gguf")


@pytest.mark.parametrize("family", ["qwen3", "mistral", "llama2", "gemma3_spm"])
def test_tokenization_matches_transformers(family, families, f32):
    """llama.cpp's tokens are transformers'; for a SentencePiece vocabulary they are also sentencepiece's own
    (transformers' converted Llama tokenizer drops the dummy prefix of a text that starts with a space, where
    sentencepiece and llama.cpp keep it: that one case is held to sentencepiece)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    model_dir = families(family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = Llama(model_path=str(f32(family)), vocab_only=True, verbose=False)
    got = {t: llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS}
    llm.close()
    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        assert {t: [sp.bos_id()] + sp.encode(t) for t in TEXTS} == got
    hf_texts = [t for t in TEXTS if not (family == "llama2" and t.startswith(" "))]
    assert {t: tok(t)["input_ids"] for t in hf_texts} == {t: got[t] for t in hf_texts}


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_is_exact_where_the_table_allows_it(family, families):
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(families(family), dtype=torch.float32).eval()
    model = load()
    spec = architectures.architecture_of(model)
    groups = smoothing.smooth_groups(model)
    n_blocks = len(model_blocks.decoder_blocks(model))
    for kind in ("attn_in", "mlp_in", "v_o", "up_down"):
        assert sum(g.kind == kind for g in groups) == (n_blocks if kind in spec.smooth_kinds else 0)
    gen = torch.Generator().manual_seed(0)
    transform = smoothing.Smoothing(mode="test")
    for g in groups:
        n = model.get_parameter(g.producers[0]).shape[0]
        smoothing.add_group(transform, g, torch.exp(1.2 * torch.randn(n, generator=gen)), 0.5)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, min(1000, model.config.vocab_size), (2, 40)))
    with torch.no_grad():
        ref = model(ids).logits
    smoothed = load()
    smoothing.apply_to_model(smoothed, transform)
    with torch.no_grad():
        got = smoothed(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gemma3_blocks_run_one_at_a_time_with_their_own_masks(families):
    """The block walker gives each layer type its own keyword inputs: block by block is the whole model."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(families("gemma3"), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, 1000, (2, 48)))
    batch = model_blocks.catch_block_inputs(model, ids, 2, torch.device("cpu"))[0]
    assert set(batch.kwargs) == {"sliding_attention", "full_attention"}
    hidden = batch.hidden
    with torch.no_grad():
        for block in model_blocks.decoder_blocks(model):
            hidden = model_blocks.run_block(block, model_blocks.BlockBatch(hidden, batch.kwargs))
        got = model.lm_head(model.model.norm(hidden))
        ref = model(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("change,culprit", [
    ({"layer_types": ["full_attention"] * 7}, "layer_types"),
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
    ({"final_logit_softcapping": 30.0}, "soft-capping"),
])
def test_gemma3_settings_llama_cpp_would_not_reproduce_are_refused(change, culprit, families, tmp_path):
    import json
    src = families("gemma3")
    model_dir = tmp_path / "changed"
    shutil.copytree(src, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=culprit):
        architectures.load_model_info(model_dir)


def test_gemma3_tensors_and_file_size(families, f32):
    info = architectures.load_model_info(families("gemma3"))
    names = {t.gguf_name for t in info.tensors}
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight",
            "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    assert "output.weight" not in names                            # tied
    assert os.path.getsize(f32("gemma3")) == gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, "F32"))


def test_a_family_search_ships_a_file_llama_cpp_runs(families, tmp_path):
    """The whole search on Gemma 3 (sliding-window and global blocks, tied embedding, shifted norms): its file
    has the promised size and llama.cpp runs it."""
    import export_gguf_official as exporter
    from test_ptq import run_search
    model_dir = families("gemma3")
    cfg = run_search(model_dir, tmp_path / "g.pt", tmp_path / "cache", "--target_preset", "Q4_K_M",
                     "--max_slowdown", "off", "--smooth", "auto")
    info = architectures.load_model_info(model_dir)
    types = cfg["tensor_types"]
    budget = gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, "Q4_K_M", imatrix_available=True))
    assert gguf_plan.gguf_file_size(info, types) <= budget
    exporter.main(["--model_id", str(model_dir), "--config", str(tmp_path / "g.pt"), "--output",
                   str(tmp_path / "g.gguf")])
    assert os.path.getsize(tmp_path / "g.gguf") == gguf_plan.gguf_file_size(info, types)
    llm = llama_cpp_model(tmp_path / "g.gguf", logits_all=True)
    llm.eval(list(range(10, 60)))
    assert np.isfinite(np.asarray(llm.scores[:50])).all()
    llm.close()

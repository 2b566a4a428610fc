"""The real Gemma 3 270M reference (models/gemma3-270m, built by `make models/gemma3-270m` or
`make demo MODEL=gemma3`; skipped where it has not been built: Gemma's weights are fetched at build time only).

Its F32 export must hold tensors byte-identical to llama.cpp's own converter's, with the downloaded GGUF's
vocabulary exactly; llama.cpp must tokenize as transformers does and compute its logits.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import ROOT
from test_export import assert_same_tensors, export, llama_cpp_model
from test_families import TEXTS, convert, metadata

GEMMA_DIR = ROOT / "models" / "gemma3-270m"
GEMMA_GGUF = ROOT / "models" / "cache" / "gemma-3-270m-q4_k_m.gguf"

pytestmark = pytest.mark.skipif(not (GEMMA_DIR / "model.safetensors").is_file(),
                                reason="models/gemma3-270m is not built (make models/gemma3-270m)")


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return export(GEMMA_DIR, tmp_path_factory.mktemp("gemma3") / "f32.gguf", preset="F32")[0]


def test_export_is_the_converters_with_the_released_vocabulary(f32, tmp_path):
    theirs = convert(GEMMA_DIR, tmp_path / "theirs.gguf")
    assert_same_tensors(f32, theirs)
    ours_kv, theirs_kv, released = metadata(f32), metadata(theirs), metadata(GEMMA_GGUF)
    for key in [k for k in theirs_kv if k.startswith(("gemma3.", "tokenizer."))]:
        assert ours_kv[key] == theirs_kv[key], key
    for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "add_bos_token",
                "add_eos_token", "add_space_prefix", "model"):
        assert ours_kv[f"tokenizer.ggml.{key}"] == released[f"tokenizer.ggml.{key}"], key


def test_tokenization_matches_transformers(f32):
    from llama_cpp import Llama
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(GEMMA_DIR)
    llm = Llama(model_path=str(f32), vocab_only=True, verbose=False)
    texts = TEXTS + ["<start_of_turn>user\nhi<end_of_turn>\n", "tab\tsep   three spaces"]
    got = {t: llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts}
    llm.close()
    assert {t: tok(t)["input_ids"] for t in texts} == got


def test_logits_match_transformers(f32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(GEMMA_DIR, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 262144, 96).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([[2] + ids])).logits[0].numpy()
    llm = llama_cpp_model(f32, logits_all=True)
    llm.eval([2] + ids)
    got = np.asarray(llm.scores[:len(ids) + 1])
    llm.close()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert gguf.GGUFReader(f32).get_field("general.architecture").contents() == "gemma3"

"""Tiny random checkpoints built inside the tests: Qwen2 (untied, q/k/v biases, padded vocab) and Llama
(tied, rows that 256-blocks do not fit), each with a small byte-level BPE tokenizer llama.cpp recognises."""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf_vocab  # noqa: E402

QWEN_TOKENIZER_DIR = ROOT / "models" / "qwen-tokenizer"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I've been told he's there, you're sure?",
    "def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2",
    "In 2024 the price rose 3.5% to 1,234,567 units; 42 + 58 = 100.",
    "量化把神经网络的权重从浮点数变成低比特整数。太阳系有八大行星。",
    "Emoji test 🚀 ✅ 🦙 and tabs\tand   runs   of   spaces\n\n\nnew lines.",
    "Transformers use attention: softmax(QK^T / sqrt(d)) V, then a feed-forward network.",
] * 20



def build_tokenizer(out_dir: Path, style: str, vocab_size: int = 360) -> int:
    """Train a byte-level BPE tokenizer with a pre-tokenizer llama.cpp knows; returns its token count.

    style "qwen2": Qwen2's split regex, ChatML specials appended after the vocabulary, no BOS added.
    style "smollm": SmolLM's individual digits + GPT-2 byte level, and a BOS added to every text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gguf_vocab._QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if style == "smollm":
        specials.append("<|begin_of_text|>")
    tok.add_special_tokens(specials)
    tok.add_tokens(["<tool_call>"])  # a user-defined (not special) added token
    if style == "smollm":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if style == "smollm" else None, clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


def _randomize_(model, seed: int) -> None:
    """Weights large enough that the residual stream is not just the input embedding (so greedy decoding of
    the tied model does not repeat one token); nonzero biases and norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(2 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def build_model(out_dir: Path, arch: str, tokenizer_dir: Path, n_rows: int, hidden: int, intermediate: int,
                layers: int, heads: int, kv_heads: int, tied: bool, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `arch` with `n_rows` embedding rows, plus the tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = config_cls(vocab_size=n_rows, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                     rope_theta=10000.0)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _randomize_(model, seed)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Qwen2, untied, q/k/v biases, row lengths that are multiples of 256, vocab padded past the tokenizer."""
    base = tmp_path_factory.mktemp("qwen2")
    n_tok = build_tokenizer(base / "tok", "qwen2")
    return build_model(base / "model", "qwen2", base / "tok", n_rows=n_tok + 37, hidden=256,
                       intermediate=256, layers=8, heads=4, kv_heads=2, tied=False, seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama (SmolLM-like), tied embeddings, hidden 192: rows of 192 do not fit 256-blocks (like 576)."""
    base = tmp_path_factory.mktemp("llama")
    n_tok = build_tokenizer(base / "tok", "smollm")
    return build_model(base / "model", "llama", base / "tok", n_rows=n_tok, hidden=192, intermediate=512,
                       layers=4, heads=3, kv_heads=1, tied=True, seed=2)



"""The tokenizer as llama.cpp expects it: a byte-level BPE tokenizer.json written the way
convert_hf_to_gguf.py's _set_vocab_gpt2 writes it, with the pre-tokenizer identified from what the tokenizer
does (an unknown one is refused, never guessed).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

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


def add_vocab_metadata(w: gguf.GGUFWriter, vocab: Vocab) -> None:
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

"""The tokenizer as llama.cpp expects it, written the way convert_hf_to_gguf.py writes it:
- a byte-level BPE tokenizer.json (Qwen, Llama 3, SmolLM) as _set_vocab_gpt2 does, with the pre-tokenizer
  identified from what the tokenizer does (an unknown one is refused, never guessed);
- a SentencePiece tokenizer.model (Gemma, Mistral, Llama 2), for the architectures that read one, as
  _set_vocab_sentencepiece does: pieces, scores and piece types, added tokens, and gguf-py's SpecialVocab.
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


@dataclass(frozen=True)
class SentencePieceVocab:
    tokens: list             # bytes
    scores: list
    token_types: list
    special: gguf.SpecialVocab   # special ids, add_bos/add_eos, chat template (as the converter reads them)
    add_space_prefix: bool | None


def read_vocab(model_dir: Path, n_vocab: int, sentencepiece: bool = False,
               add_space_prefix: bool | None = None) -> Vocab | SentencePieceVocab:
    """The tokenizer of a checkpoint as llama.cpp needs it: its tokenizer.model where the architecture reads
    one (`sentencepiece`) and the checkpoint has one, else its byte-level BPE tokenizer.json."""
    if sentencepiece and (Path(model_dir) / "tokenizer.model").is_file():
        return read_sentencepiece_vocab(Path(model_dir), n_vocab, add_space_prefix)
    return read_bpe_vocab(Path(model_dir), n_vocab)


@functools.lru_cache(maxsize=4)
def read_sentencepiece_vocab(model_dir: Path, n_vocab: int, add_space_prefix: bool | None) -> SentencePieceVocab:
    """convert_hf_to_gguf's _create_vocab_sentencepiece: every piece with its score and type, padded to
    `n_vocab` with [PADn]; added_tokens.json and tokenizer_config.json's added tokens override pieces (control
    when special or special-looking, else user-defined with U+2581 as a space). `add_space_prefix` None reads
    tokenizer_config.json's add_prefix_space (LlamaModel.set_vocab); Gemma 3 writes False."""
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable SentencePiece model ({exc})") from None
    if sp.vocab_size() > n_vocab:
        raise ValueError(f"{path} has {sp.vocab_size()} pieces but the embedding has only {n_vocab} rows")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                    T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
    added_path = model_dir / "added_tokens.json"
    if added_path.is_file():
        for text, i in json.loads(added_path.read_text(encoding="utf-8")).items():
            if i < n_vocab:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, T.USER_DEFINED
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    for key, data in tok_cfg.get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= n_vocab:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = T.CONTROL
        else:
            text, types[i] = text.replace("\u2581", " "), T.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    if add_space_prefix is None:
        add_space_prefix = tok_cfg.get("add_prefix_space")
    special = gguf.SpecialVocab(model_dir, n_vocab=n_vocab)
    return SentencePieceVocab(tokens, scores, [int(t) for t in types], special, add_space_prefix)


@functools.lru_cache(maxsize=4)
def read_bpe_vocab(model_dir: Path, n_vocab: int) -> Vocab:
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


def add_vocab_metadata(w: gguf.GGUFWriter, vocab: Vocab | SentencePieceVocab) -> None:
    if isinstance(vocab, SentencePieceVocab):     # _set_vocab_sentencepiece
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.token_types)
        vocab.special.add_to_gguf(w, quiet=True)
        if vocab.add_space_prefix is not None:
            w.add_add_space_prefix(vocab.add_space_prefix)
        return
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

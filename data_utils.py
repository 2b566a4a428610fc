"""Calibration and evaluation tokens from real text.

A source is a name (`wikitext2`, loaded through `datasets`) or local files (.txt / .tokens / .raw, .jsonl with
a "text" field, .parquet with a "text" column, or a list of several). Each kind is one small function returning
the split's documents as strings; the dispatchers below are dict lookups (gptq's datautils layout).

- `get_calib_dataset` tokenizes the documents into one stream and draws `n_samples` distinct, non-overlapping
  windows of `seq_len` tokens, chosen by `seed` alone, so a run is reproducible and two windows never share
  a token (the held-out part of a draw is disjoint from the rest).
- `get_eval_dataset` cuts the disjoint evaluation split (wikitext-2 test, or a local file) into consecutive
  non-overlapping windows from its start, the way llama-perplexity cuts chunks.
- `chat_documents` wraps documents in the model's chat template (`--calib_chat`), for instruct models.
- `draw_windows` mixes sources by weight (`--calib self:3,wikitext2:1`); `self` is the model's own text
  (self_calibration.py), handed in as a callback so this module stays free of models.

When the tokenizer puts BOS in front of a text, the first token of every window is replaced by BOS, as
llama-imatrix and llama-perplexity do; tokenizers without BOS (SmolLM2, Qwen2) get plain windows.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cli import UserError, accepted_by, at_least

HUB_HINT = ("pass local text with --calib_file (e.g. ../shared/data/wikitext-2/wiki.valid.tokens) "
            "and --eval_file (wiki.test.tokens)")


class DataSourceError(UserError):
    """A calibration/evaluation source that cannot be read; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------------------------
# Sources: each returns the documents of one split as a list of strings.
# ---------------------------------------------------------------------------------------------------------

def load_wikitext2(split: str) -> list[str]:
    """WikiText-2 raw (v1) from the Hugging Face hub through `datasets`; rows are lines, joined back verbatim."""
    import datasets
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except OSError as err:  # ConnectionError and the hub's not-found / offline errors are OSErrors
        raise DataSourceError(f"cannot load wikitext-2-raw-v1 ({split}) from the Hugging Face hub "
                              f"({type(err).__name__}); {HUB_HINT}") from err
    return ["".join(rows)]


def read_text_file(path: Path) -> list[str]:
    """A plain text file (.txt, or WikiText's .tokens) as one document."""
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_jsonl_file(path: Path) -> list[str]:
    """One document per line: the "text" field of each JSON object."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    docs = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}:{line_no}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataSourceError(f"{path}:{line_no}: expected a JSON object with a string \"text\" field")
        docs.append(record["text"])
    return docs


def read_parquet_file(path: Path) -> list[str]:
    """The "text" column of a parquet file, one document per row."""
    import pyarrow
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as exc:
        raise DataSourceError(f"{path} is not a readable parquet file ({exc})") from None
    if "text" not in table.column_names:
        raise DataSourceError(f"{path}: no \"text\" column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if t]


HUB_SOURCES: dict[str, dict[str, Callable[[], list[str]]]] = {
    # name -> {role: loader}; calibration takes the train split, evaluation the disjoint test split
    "wikitext2": {"calib": lambda: load_wikitext2("train"), "eval": lambda: load_wikitext2("test")},
}

FILE_READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": read_text_file,
    ".tokens": read_text_file,
    ".raw": read_text_file,
    ".jsonl": read_jsonl_file,
    ".parquet": read_parquet_file,
}


def load_documents(source, role: str = "calib") -> list[str]:
    """The documents of a source: a hub name, one file, or a list of files (read in the given order)."""
    if isinstance(source, (list, tuple)):
        return [doc for item in source for doc in load_documents(item, role)]
    name = str(source)
    if name in HUB_SOURCES:
        return HUB_SOURCES[name][role]()
    path = Path(name)
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataSourceError(f"unknown data source {name!r}: use one of {', '.join(HUB_SOURCES)} or a file "
                              f"ending in {', '.join(FILE_READERS)}")
    if not path.is_file():
        raise DataSourceError(f"data file not found: {path}")
    docs = reader(path)
    if not any(d.strip() for d in docs):
        raise DataSourceError(f"{path} holds no text")
    return docs


def describe_source(source) -> str:
    """A short printable name of a source (for logs and the imatrix GGUF's dataset list)."""
    if isinstance(source, (list, tuple)):
        return ",".join(describe_source(s) for s in source)
    return str(source)


# ---------------------------------------------------------------------------------------------------------
# Chat formatting (--calib_chat)
# ---------------------------------------------------------------------------------------------------------

def split_paragraphs(documents: Sequence[str], min_chars: int = 200) -> list[str]:
    """Non-empty paragraphs (lines) of at least `min_chars` characters; headings and blank lines drop out."""
    return [p.strip() for doc in documents for p in doc.splitlines() if len(p.strip()) >= min_chars]


def chat_documents(documents: Sequence[str], tokenizer) -> list[str]:
    """Render each paragraph as a two-turn conversation in the model's chat template.

    The user turn asks to continue the paragraph's first sentences, the assistant turn answers with the rest,
    so calibration sees the template's special tokens and the assistant role the model is used in.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataSourceError("--calib_chat needs a tokenizer with a chat template; this one has none")
    rendered = []
    for paragraph in split_paragraphs(documents):
        cut = paragraph.find(". ", len(paragraph) // 3)
        cut = cut + 1 if 0 < cut < len(paragraph) - 2 else len(paragraph) // 2
        messages = [{"role": "user", "content": f"Continue this text:\n{paragraph[:cut].strip()}"},
                    {"role": "assistant", "content": paragraph[cut:].strip()}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    if not rendered:
        raise DataSourceError("no paragraph long enough to build chat samples from")
    return rendered


# ---------------------------------------------------------------------------------------------------------
# Tokens and windows
# ---------------------------------------------------------------------------------------------------------

def tokenize_documents(documents: Sequence[str], tokenizer) -> torch.Tensor:
    """All documents as one token stream (LongTensor [n_tokens]); documents are separated by a blank line."""
    text = "\n\n".join(documents) if len(documents) > 1 else documents[0]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token_to_force(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself starts texts with BOS (llama.cpp's add_bos), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _with_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    bos = bos_token_to_force(tokenizer)
    if bos is not None:
        windows[:, 0] = bos
    return windows


def sample_window_starts(n_tokens: int, seq_len: int, n_samples: int, seed: int) -> np.ndarray:
    """Start offsets of `n_samples` distinct non-overlapping windows, drawn by `seed` alone.

    The stream is cut into aligned windows after a seeded offset below `seq_len`, and a seeded permutation
    orders them; a draw of k windows is the first k of any larger draw with the same seed, so splitting a
    draw into calibration and held-out parts keeps the calibration part unchanged.
    """
    rng = np.random.default_rng(seed)
    offset = int(rng.integers(0, seq_len))
    n_slots = max(0, (n_tokens - offset) // seq_len)
    if n_samples > n_slots:
        raise DataSourceError(f"{n_samples} windows of {seq_len} tokens requested, but the text holds only "
                              f"{n_slots}; pass more text or lower --n_samples / --seq_len")
    slots = rng.permutation(n_slots)[:n_samples]
    return offset + slots.astype(np.int64) * seq_len


def windows_of(documents: Sequence[str], tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens drawn from the documents' token stream (sample_window_starts)."""
    stream = tokenize_documents(documents, tokenizer)
    starts = sample_window_starts(stream.numel(), seq_len, n_samples, seed)
    windows = torch.stack([stream[s:s + seq_len] for s in starts])
    return _with_bos(windows, tokenizer)


def get_calib_dataset(source, tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                      chat: bool = False) -> torch.Tensor:
    """Calibration windows: LongTensor [n_samples, seq_len] drawn from the source's calibration split."""
    if source == SELF:
        raise DataSourceError("--calib self is read by mixed_precision_ptq.py only; pass text here")
    documents = load_documents(source, "calib")
    if chat:
        documents = chat_documents(documents, tokenizer)
    return windows_of(documents, tokenizer, n_samples, seq_len, seed)


# ---------------------------------------------------------------------------------------------------------
# Mixed calibration sources (--calib wikitext2,self or with files, optionally weighted: self:3,notes.txt:1)
# ---------------------------------------------------------------------------------------------------------

SELF = "self"        # the model's own answers to calib_prompts.txt (self_calibration.py)
WINDOW_ROLES = ("calib", "kld", "measure")


def parse_calib_sources(text: str) -> list[tuple[str, float]]:
    """`--calib`: comma-separated sources (a hub name, `self`, or a file), each optionally `:weight` (default 1):
    the share of every window role it supplies."""
    sources = []
    for item in text.split(","):
        name, weight = item.strip(), 1.0
        head, sep, tail = name.rpartition(":")
        if sep and head:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass                           # a path with a colon, no weight
        if not name:
            raise DataSourceError(f"--calib {text!r}: empty source name")
        if not weight > 0 or weight == float("inf"):
            raise DataSourceError(f"--calib {text!r}: the weight of {name} must be a positive number")
        if name != SELF and name not in HUB_SOURCES and Path(name).suffix.lower() not in FILE_READERS:
            raise DataSourceError(f"unknown calibration source {name!r}: use self, {', '.join(HUB_SOURCES)} or a "
                                  f"file ending in {', '.join(FILE_READERS)}")
        sources.append((name, weight))
    if len({n for n, _ in sources}) != len(sources):
        raise DataSourceError(f"--calib {text!r} names a source twice")
    return sources


def split_counts(n: int, weights: Sequence[float]) -> list[int]:
    """`n` split in proportion to `weights` (largest remainder; ties to the earlier source)."""
    exact = [n * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return counts


def describe_sources(sources: Sequence[tuple[str, float]]) -> str:
    if len(sources) == 1:
        return describe_source(sources[0][0])
    return ",".join(f"{describe_source(name)}:{weight:g}" for name, weight in sources)


def draw_windows(sources: Sequence[tuple[str, float]], tokenizer, counts: dict[str, int], seq_len: int, seed: int,
                 chat: bool = False, self_documents: Callable[[str, int], list[str]] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Windows for each role (WINDOW_ROLES: calibration, single-tensor KLDs, the GA's measured KLD), every role
    split over the sources by weight. A text source gives one draw cut into the roles in that order (disjoint
    windows; one source alone gives exactly get_calib_dataset's windows); `self` gives calibration windows from
    its calibration draw and the others from its held-out draw (`self_documents(role, n_tokens)`)."""
    per_source = {role: split_counts(counts[role], [w for _, w in sources]) for role in WINDOW_ROLES}
    parts: dict[str, list[torch.Tensor]] = {role: [] for role in WINDOW_ROLES}
    for i, (name, _) in enumerate(sources):
        n = {role: per_source[role][i] for role in WINDOW_ROLES}
        if name == SELF:
            if self_documents is None:
                raise DataSourceError("--calib self needs the model to write its own text")
            held = n["kld"] + n["measure"]
            drawn = {"calib": windows_of(self_documents("calib", (n["calib"] + 1) * seq_len), tokenizer,
                                         n["calib"], seq_len, seed) if n["calib"] else None,
                     "held": windows_of(self_documents("heldout", (held + 1) * seq_len), tokenizer, held, seq_len,
                                        seed) if held else None}
            cuts = [("calib", drawn["calib"], 0), ("kld", drawn["held"], 0), ("measure", drawn["held"], n["kld"])]
        else:
            total = sum(n.values())
            ids = get_calib_dataset(name, tokenizer, total, seq_len, seed, chat=chat) if total else None
            cuts = [("calib", ids, 0), ("kld", ids, n["calib"]), ("measure", ids, n["calib"] + n["kld"])]
        for role, ids, start in cuts:
            if n[role]:
                parts[role].append(ids[start:start + n[role]])
    return {role: torch.cat(p) if p else torch.zeros(0, seq_len, dtype=torch.long) for role, p in parts.items()}


def get_eval_dataset(source, tokenizer, seq_len: int = 512, n_samples: int | None = None) -> torch.Tensor:
    """Evaluation windows: the first `n_samples` (default all) consecutive windows of the evaluation split."""
    stream = tokenize_documents(load_documents(source, "eval"), tokenizer)
    n_full = stream.numel() // seq_len
    n = n_full if n_samples is None else n_samples
    if n < 1 or n > n_full:
        raise DataSourceError(f"{n} evaluation windows of {seq_len} tokens requested; the text holds {n_full}")
    windows = stream[: n * seq_len].reshape(n, seq_len).clone()
    return _with_bos(windows, tokenizer)


def add_calib_args(parser) -> None:
    """The calibration-data options shared by every script that calibrates."""
    parser.add_argument("--calib", "--calib_dataset", dest="calib_dataset", default="wikitext2", type=calib_spec,
                        help="calibration text: wikitext2 (the hub), self (the model's answers to calib_prompts.txt; "
                             "mixed_precision_ptq.py) or files; several comma-separated, each optionally :weight "
                             "(its share of the windows), e.g. self:3,wikitext2:1")
    parser.add_argument("--calib_file", nargs="+", default=None,
                        help="local calibration text (.txt/.tokens, .jsonl, .parquet; several allowed); "
                             "overrides --calib_dataset")
    parser.add_argument("--calib_chat", action="store_true", help="wrap samples in the model's chat template")
    parser.add_argument("--n_samples", type=at_least(1), default=128, help="calibration windows")
    parser.add_argument("--seq_len", type=at_least(2), default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="window sampling seed")
    parser.add_argument("--device", type=device_argument, default="auto", help="cuda | mps | cpu | auto")


def _resolve_device(text: str):
    from model_blocks import resolve_device     # torch's device checks, imported when a flag needs them
    return resolve_device(text)


calib_spec = accepted_by(parse_calib_sources)          # --calib, once parse_calib_sources accepts it
device_argument = accepted_by(_resolve_device)         # --device, once it names a device this machine has

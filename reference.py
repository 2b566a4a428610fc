"""The original model's log-probabilities over the evaluation windows, computed once and cached on disk: what
every KLD and top-1 agreement is measured against.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import files
from metrics import LogitsFn, Quality, first_scored, log_softmax, scored_targets, summarize_quality

DEFAULT_CACHE_DIR = Path("models/cache/reference-logits")
REFERENCE_FORMAT_VERSION = 1
# References up to this size keep float32 log-probs; larger ones (7B-class vocabularies over many windows)
# keep float16 log-probs, renormalised on load (see build_reference).
REFERENCE_FLOAT32_BUDGET_BYTES = 1 << 30


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files (safetensors, else PyTorch .bin)."""
    model_dir = Path(model_dir)
    return sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))


def transformers_source_id(model_dir: Path, dtype: str, device_type: str) -> str:
    """Identity of the original's logits: its config and weight files, the compute dtype and device kind."""
    model_dir = Path(model_dir)
    paths = [model_dir / "config.json"] + weight_files(model_dir)
    return f"transformers:{model_dir.resolve().name}:{files.file_stat_signature(paths)}:{dtype}:{device_type}"


def gguf_source_id(path: Path) -> str:
    """Identity of a GGUF used as the reference (llama-perplexity's usual base is the F32/F16 GGUF), with the
    llama.cpp settings that change its logits (see open_llama)."""
    return f"gguf:{Path(path).resolve().name}:{files.file_stat_signature([Path(path)])}:flash_attn"


def reference_key(source_id: str, windows: np.ndarray, store_dtype: str = "auto") -> str:
    """Cache key: the reference model's identity, the exact token windows (which fix data, tokenizer, seq_len
    and number of windows) and the requested storage (auto, float32, float16)."""
    h = hashlib.sha256()
    h.update(f"v{REFERENCE_FORMAT_VERSION}|{source_id}|{windows.shape}|{store_dtype}".encode())
    h.update(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


@dataclass
class Reference:
    """A cached reference: per window the log-probs of the scored positions, plus exact NLL and top-1.

    Layout of `path` (a directory, written under a temporary name and renamed when complete):
      manifest.json          key, source, seq_len, n_windows, n_vocab, dtype
      logprobs_NNNNN.npy     [n_scored, n_vocab] float32 or float16 log-softmax of window NNNNN
      nll.npy, top1.npy      [n_windows, n_scored] float32 NLL of the targets and int32 argmax, exact
    """
    path: Path
    manifest: dict

    @property
    def n_windows(self) -> int:
        return int(self.manifest["n_windows"])

    def logprobs(self, i: int) -> np.ndarray:
        """Window i's log-probs as float32; float16 ones are renormalised so exp() sums to one again."""
        lp = np.load(self.path / f"logprobs_{i:05d}.npy")
        if lp.dtype == np.float16:
            return log_softmax(lp.astype(np.float32))
        return lp

    def top1(self) -> np.ndarray:
        return np.load(self.path / "top1.npy")

    def nll(self) -> np.ndarray:
        return np.load(self.path / "nll.npy")

    def quality(self) -> Quality:
        """The reference model's own quality (KLD 0 and full top-1 agreement by definition)."""
        nll = self.nll()
        return summarize_quality(nll, np.zeros(nll.size), np.ones(nll.size, dtype=bool))


def open_reference(cache_dir, key: str) -> Reference | None:
    """The complete cached reference with this key, or None."""
    path = Path(cache_dir) / f"ref-{key}"
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        reference = Reference(path, json.loads(manifest.read_text()))
        complete = all((path / f"logprobs_{i:05d}.npy").is_file() for i in range(reference.n_windows)) and \
            (path / "nll.npy").is_file() and (path / "top1.npy").is_file()
    except (ValueError, KeyError, TypeError, OSError):
        complete = False
    if not complete:
        print(f"warning: discarding unreadable cache entry {path}; computing it again", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return reference


def reference_store_dtype(n_windows: int, seq_len: int, n_vocab: int, requested: str = "auto") -> np.dtype:
    """float32 log-probs while the whole reference stays under REFERENCE_FLOAT32_BUDGET_BYTES, else float16.

    float16 log-probs keep about 3 significant digits; renormalised on load they move a Q4_K-level mean KLD
    by a small fraction of a percent (measured on the demo model; see compare_three_models.py's docstring).
    """
    if requested != "auto":
        return np.dtype(requested)
    n_bytes = n_windows * (seq_len - 1 - first_scored(seq_len)) * n_vocab * 4
    return np.dtype(np.float32 if n_bytes <= REFERENCE_FLOAT32_BUDGET_BYTES else np.float16)


def build_reference(logits_fn: LogitsFn, windows: np.ndarray, cache_dir, key: str, source_id: str,
                    store_dtype: str = "auto", progress: bool = True) -> Reference:
    """Run the reference model over every window once and store what KLD needs (see Reference).

    Written to a temporary directory beside the final one and renamed when complete, so an interrupted run
    never leaves a half reference that a later run would trust.
    """
    from tqdm import tqdm
    with files.atomic_path(Path(cache_dir) / f"ref-{key}") as tmp:
        tmp.mkdir()
        nll, top1, dtype, n_vocab = [], [], None, None
        for i, window in enumerate(tqdm(windows, desc="reference logits", unit="window", disable=not progress,
                                        file=sys.stderr)):
            logits = logits_fn(window)
            if dtype is None:
                n_vocab = logits.shape[-1]
                dtype = reference_store_dtype(len(windows), windows.shape[1], n_vocab, store_dtype)
            logp = log_softmax(logits)
            targets = scored_targets(window)
            nll.append(-logp[np.arange(len(targets)), targets])
            top1.append(logits.argmax(axis=-1).astype(np.int32))
            np.save(tmp / f"logprobs_{i:05d}.npy", logp.astype(dtype))
        np.save(tmp / "nll.npy", np.stack(nll).astype(np.float32))
        np.save(tmp / "top1.npy", np.stack(top1))
        manifest = {"format_version": REFERENCE_FORMAT_VERSION, "key": key, "source": source_id,
                    "n_windows": len(windows), "seq_len": int(windows.shape[1]), "n_vocab": int(n_vocab),
                    "dtype": np.dtype(dtype).name, "first_scored": first_scored(windows.shape[1])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return open_reference(cache_dir, key)

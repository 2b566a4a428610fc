"""Quality numerics, numpy only: the scoring convention, per-token NLL / KLD / top-1, and their summaries.

Convention (llama.cpp's `llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp): each window of
n_ctx tokens is evaluated from an empty KV cache; only its second half is scored: the logits at positions
first = n_ctx // 2 .. n_ctx - 2 predict tokens first + 1 .. n_ctx - 1, i.e. n_ctx - 1 - n_ctx // 2 tokens per
window (255 of 512), so every scored token has at least n_ctx / 2 tokens of context. When the tokenizer adds
BOS, the first token of every window is replaced by BOS (data_utils does it, as llama-perplexity does).
Perplexity is exp(mean NLL) over all scored tokens; KLD mean/median/p99 are over all scored tokens (the
percentile interpolates linearly, as llama-perplexity's does); top-1 agreement is the fraction of scored
positions where both models' most likely token is the same.

Differences from llama-perplexity, both small: its base log-probs are stored as 16-bit steps over the top 16
nats and tokens below exp(-16) are left out of the KLD sum; ours keeps every token (float32 log-probs, or
float16 ones for large references, see build_reference).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cli import UserError

if TYPE_CHECKING:
    from reference import Reference

LogitsFn = Callable[[np.ndarray], np.ndarray]   # one window [seq_len] -> logits of its scored positions


def first_scored(seq_len: int) -> int:
    """Position of the first scored logit in a window: the first half of every window is context only."""
    return seq_len // 2


def scored_targets(window: np.ndarray) -> np.ndarray:
    """The tokens the scored logits predict: window[first + 1:], n_ctx - 1 - n_ctx // 2 of them."""
    return np.asarray(window[first_scored(len(window)) + 1:], dtype=np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 with the normaliser summed in float64 (as llama.cpp sums exp)."""
    x = np.asarray(logits, dtype=np.float32)
    peak = x.max(axis=-1, keepdims=True)
    shifted = x - peak
    log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - log_norm


def token_metrics(logits: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None = None,
                  ref_top1: np.ndarray | None = None) -> dict:
    """Per scored token: NLL of the target; with a reference, KL(P_ref || Q) and whether the top-1 tokens agree.

    `logits` [n, vocab] are the candidate's raw logits, `ref_logprobs` [n, vocab] the reference's normalised
    log-probabilities and `ref_top1` [n] its most likely tokens (argmax of the reference's own logits, kept
    exactly because float16 storage can tie near-equal log-probs). Returns float64 arrays "nll", "kld" and a
    bool array "same_top1" (the last two only with a reference).
    """
    logq = log_softmax(logits)
    rows = np.arange(len(targets))
    out = {"nll": -logq[rows, targets].astype(np.float64)}
    if ref_logprobs is not None:
        if ref_logprobs.shape != logq.shape:
            raise UserError(f"reference log-probs have shape {list(ref_logprobs.shape)}, the model's logits "
                            f"{list(logq.shape)}: different vocabularies")
        p = np.exp(ref_logprobs)
        # p * (log p - log q), with 0 * log 0 = 0 for tokens the reference gives no mass
        terms = np.where(p > 0, p * (ref_logprobs - logq), np.float32(0))
        out["kld"] = terms.sum(axis=-1, dtype=np.float64)
        top1 = ref_top1 if ref_top1 is not None else ref_logprobs.argmax(axis=-1)
        out["same_top1"] = np.asarray(logits).argmax(axis=-1) == top1
    return out


@dataclass
class Quality:
    """Quality over all scored tokens of the evaluation windows (KLD fields None without a reference)."""
    n_tokens: int
    ppl: float
    nll_mean: float
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    top1_agree: float | None = None


def summarize_quality(nll: np.ndarray, kld: np.ndarray | None = None,
                      same_top1: np.ndarray | None = None) -> Quality:
    """Perplexity = exp(mean NLL); KLD mean, median and 99th percentile; fraction of agreeing top-1 tokens."""
    nll = np.asarray(nll, dtype=np.float64).ravel()
    q = Quality(n_tokens=int(nll.size), ppl=float(math.exp(nll.mean())), nll_mean=float(nll.mean()))
    if kld is not None:
        kld = np.asarray(kld, dtype=np.float64).ravel()
        q.kld_mean = float(kld.mean())
        q.kld_median = float(np.median(kld))
        q.kld_p99 = float(np.percentile(kld, 99.0))
        q.top1_agree = float(np.mean(same_top1))
    return q


def evaluate_quality(logits_fn: LogitsFn, windows: np.ndarray, reference: Reference | None = None,
                     progress: bool = True, desc: str = "quality") -> Quality:
    """Perplexity of a model on the windows and, given the reference over the same windows, KLD and top-1."""
    from tqdm import tqdm
    if reference is not None and reference.n_windows != len(windows):
        raise UserError(f"reference holds {reference.n_windows} windows, evaluation has {len(windows)}")
    ref_top1 = reference.top1() if reference is not None else None
    nll, kld, same = [], [], []
    for i, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress, file=sys.stderr)):
        ref_lp = reference.logprobs(i) if reference is not None else None
        m = token_metrics(logits_fn(window), scored_targets(window), ref_lp,
                          ref_top1[i] if ref_top1 is not None else None)
        nll.append(m["nll"])
        if reference is not None:
            kld.append(m["kld"])
            same.append(m["same_top1"])
    if reference is None:
        return summarize_quality(np.concatenate(nll))
    return summarize_quality(np.concatenate(nll), np.concatenate(kld), np.concatenate(same))

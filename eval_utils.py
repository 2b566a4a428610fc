"""Measure a quantized model against its original: quality on an evaluation text, speed, memory, generations.

Used by compare_real_quant.py, compare_three_models.py and test_mixed_precision.py. The parts:

- Evaluation windows: consecutive non-overlapping windows of the evaluation text (data_utils.get_eval_dataset).
- Logits sources: a function from one window (int array [seq_len]) to float32 logits of its *scored positions*;
  one for a transformers model (plain, fake-quantized, any torch module with `.logits`), one for llama.cpp
  through llama-cpp-python.
- Numerics: perplexity, KL divergence KL(P_original || Q_candidate) per token, top-1 agreement; numpy only.
- Reference cache: the original's log-probabilities over the windows, computed once and kept on disk.
- Speed, memory and greedy generations for one model, run in a fresh Python that loads only that model's runtime
  (llama.cpp or torch) so peak memory is that model's (see WORKER_RUNTIME).

Convention (llama.cpp's `llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp): each window of
n_ctx tokens is evaluated from an empty KV cache; only its second half is scored: the logits at positions
first = n_ctx // 2 .. n_ctx - 2 predict tokens first + 1 .. n_ctx - 1, i.e. n_ctx - 1 - n_ctx // 2 tokens per
window (255 of 512), so every scored token has at least n_ctx / 2 tokens of context. When the tokenizer adds
BOS, the first token of every window is replaced by BOS (data_utils does it, as llama-perplexity does).
Perplexity is exp(mean NLL) over all scored tokens; KLD mean/median/p99 are over all scored tokens (the
percentile interpolates linearly, as llama-perplexity's does); top-1 agreement is the fraction of scored
positions where both models' most likely token is the same.

Use from another script (test_mixed_precision.py: the original with a config's fake quantization):

    windows = eval_utils.load_eval_windows(args.eval_file, tokenizer, seq_len=512, n_windows=64)
    ref = eval_utils.reference_for_model(model_dir, windows)            # cached original, built if missing
    q = eval_utils.evaluate_quality(eval_utils.transformers_logits_fn(fake_quant_model), windows, ref)
    q.ppl, q.kld_mean, q.kld_median, q.kld_p99, q.top1_agree

Differences from llama-perplexity, both small: its base log-probs are stored as 16-bit steps over the top 16
nats and tokens below exp(-16) are left out of the KLD sum; ours keeps every token (float32 log-probs, or
float16 ones for large references, see build_reference).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_PROMPTS_FILE = REPO_DIR / "prompts.txt"
DEFAULT_CACHE_DIR = Path("models/cache/reference-logits")
LOCAL_EVAL_HINT = "pass local text with --eval_file (e.g. ../shared/data/wikitext-2/wiki.test.tokens)"
REFERENCE_FORMAT_VERSION = 1
# References up to this size keep float32 log-probs; larger ones (7B-class vocabularies over many windows)
# keep float16 log-probs, renormalised on load (see build_reference).
REFERENCE_FLOAT32_BUDGET_BYTES = 1 << 30

LogitsFn = Callable[[np.ndarray], np.ndarray]


class CompareError(Exception):
    """A problem with the user's inputs or environment, reported as one line."""


# --------------------------------------------------------------------------------------------------------------
# Evaluation windows and the scoring convention
# --------------------------------------------------------------------------------------------------------------


def first_scored(seq_len: int) -> int:
    """Position of the first scored logit in a window: the first half of every window is context only."""
    return seq_len // 2


def scored_targets(window: np.ndarray) -> np.ndarray:
    """The tokens the scored logits predict: window[first + 1:], n_ctx - 1 - n_ctx // 2 of them."""
    return np.asarray(window[first_scored(len(window)) + 1:], dtype=np.int64)


def load_eval_windows(eval_file: str | None, tokenizer, seq_len: int, n_windows: int | None) -> np.ndarray:
    """The first `n_windows` consecutive windows of the evaluation text as int64 [n_windows, seq_len].

    `eval_file` None means wikitext-2-raw-v1 test through `datasets`; a path is read by data_utils (.txt,
    .tokens, .raw, .jsonl, .parquet). An unreachable hub is one error naming --eval_file.
    """
    import data_utils
    source = eval_file or "wikitext2"
    if eval_file is not None and not Path(eval_file).is_file():
        raise CompareError(f"--eval_file {eval_file} not found")
    try:
        windows = data_utils.get_eval_dataset(source, tokenizer, seq_len=seq_len, n_samples=n_windows)
    except data_utils.DataSourceError as exc:
        if eval_file is None:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else str(exc)
            raise CompareError(f"cannot load wikitext-2-raw-v1 (test split) through datasets ({cause}); "
                               f"{LOCAL_EVAL_HINT}") from None
        raise CompareError(f"--eval_file {eval_file}: {exc}") from None
    return windows.numpy().astype(np.int64)


def load_prompts(extra_file: str | None = None, default_file: Path = DEFAULT_PROMPTS_FILE) -> list[str]:
    """The repository's generation prompts followed by those of `extra_file` (--prompts).

    One prompt per line; blank lines and lines starting with '#' are skipped; a literal "\\n" in a line stands
    for a newline, so a prompt may span lines.
    """
    prompts = []
    for path in [default_file] + ([Path(extra_file)] if extra_file else []):
        if not Path(path).is_file():
            raise CompareError(f"prompts file {path} not found")
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(line.strip().replace("\\n", "\n"))
    return prompts


# --------------------------------------------------------------------------------------------------------------
# Numerics: log-softmax, per-token NLL / KLD / top-1, summaries
# --------------------------------------------------------------------------------------------------------------


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
            raise CompareError(f"reference log-probs have shape {list(ref_logprobs.shape)}, the model's logits "
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


# --------------------------------------------------------------------------------------------------------------
# Logits sources: window [seq_len] -> float32 logits [seq_len - 1 - first, vocab] of the scored positions
# --------------------------------------------------------------------------------------------------------------


def transformers_logits_fn(model, device=None) -> LogitsFn:
    """Scored-position logits of a transformers causal LM (or any module returning `.logits`), fresh per window.

    Only the last n_ctx - first positions go through the output head (logits_to_keep), which keeps a 152k
    vocabulary affordable; the very last row predicts past the window and is dropped.
    """
    import torch
    device = device or next(model.parameters()).device

    def logits_of(window: np.ndarray) -> np.ndarray:
        keep = len(window) - first_scored(len(window))
        ids = torch.as_tensor(np.asarray(window), dtype=torch.long, device=device)[None]
        with torch.inference_mode():
            logits = model(ids, use_cache=False, logits_to_keep=keep).logits
        return logits[0, -keep:-1].float().cpu().numpy()

    return logits_of


def llama_logits_fn(llm) -> LogitsFn:
    """Scored-position logits of a llama-cpp-python model built with logits_all=True and n_ctx >= seq_len.

    The KV cache is cleared before each window (reset + eval from position 0), as llama-perplexity does.
    """
    def logits_of(window: np.ndarray) -> np.ndarray:
        first = first_scored(len(window))
        llm.reset()
        llm.eval([int(t) for t in window])
        return np.array(llm.scores[first:len(window) - 1], dtype=np.float32)

    return logits_of


# --------------------------------------------------------------------------------------------------------------
# Reference: the original's log-probabilities, computed once and cached on disk
# --------------------------------------------------------------------------------------------------------------


def file_fingerprint(paths: Sequence[Path]) -> str:
    """Names, sizes and modification times of files: cheap identity of weights without hashing gigabytes."""
    items = sorted((Path(p).name, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def transformers_source_id(model_dir: Path, dtype: str, device_type: str) -> str:
    """Identity of the original's logits: its config and weight files, the compute dtype and device kind."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + weight_files(model_dir)
    return f"transformers:{model_dir.resolve().name}:{file_fingerprint(files)}:{dtype}:{device_type}"


def gguf_source_id(path: Path) -> str:
    """Identity of a GGUF used as the reference (llama-perplexity's usual base is the F32/F16 GGUF), with the
    llama.cpp settings that change its logits (see open_llama)."""
    return f"gguf:{Path(path).resolve().name}:{file_fingerprint([Path(path)])}:flash_attn"


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
    return Reference(path, json.loads(manifest.read_text()))


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
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"ref-{key}"
    tmp = cache_dir / f".ref-{key}.{os.getpid()}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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
                    "n_windows": int(len(windows)), "seq_len": int(windows.shape[1]), "n_vocab": int(n_vocab),
                    "dtype": np.dtype(dtype).name, "first_scored": first_scored(windows.shape[1])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():  # built meanwhile by another run with the same key: identical content
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_reference(cache_dir, key)


def evaluate_quality(logits_fn: LogitsFn, windows: np.ndarray, reference: Reference | None = None,
                     progress: bool = True, desc: str = "quality") -> Quality:
    """Perplexity of a model on the windows and, given the reference over the same windows, KLD and top-1."""
    from tqdm import tqdm
    if reference is not None and reference.n_windows != len(windows):
        raise CompareError(f"reference holds {reference.n_windows} windows, evaluation has {len(windows)}")
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


# --------------------------------------------------------------------------------------------------------------
# Models: resolving the original, checking that a GGUF belongs to it
# --------------------------------------------------------------------------------------------------------------


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files (safetensors, else PyTorch .bin)."""
    model_dir = Path(model_dir)
    return sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))


def resolve_model_dir(model_id: str) -> Path:
    """A local directory for a local path or a Hugging Face model id (local cache first, then the hub)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise CompareError(f"--model_id {model_id}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except (OSError, ValueError) as exc:  # connection, offline mode and not-found errors
        raise CompareError(f"cannot fetch {model_id} from the Hugging Face hub ({type(exc).__name__}); "
                           "download it elsewhere and pass the local directory with --model_id") from None


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF of this model must say about itself (read from config.json)."""
    arch: str             # GGUF architecture name
    n_layers: int
    hidden_size: int
    n_vocab: int


def model_facts(model_dir: Path) -> ModelFacts:
    """Architecture facts of a Hugging Face checkpoint, named as GGUF metadata names them (via gguf_plan's
    architecture table; other architectures by their model_type, which llama.cpp mostly shares)."""
    import gguf
    import gguf_plan
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise CompareError(f"no config.json in {model_dir}")
    cfg = json.loads(cfg_path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    hf_arch = (cfg.get("architectures") or [""])[0]
    spec = gguf_plan.ARCHITECTURES.get(hf_arch)
    arch = gguf.MODEL_ARCH_NAMES[spec.gguf_arch] if spec else str(cfg.get("model_type"))
    return ModelFacts(arch, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["vocab_size"]))


def check_gguf_matches_model(gguf_path, model_dir: Path, tokenizer) -> None:
    """Refuse a GGUF that is not a quantization of this model: architecture, block count, embedding size and
    vocabulary size must equal the checkpoint's, and every regular (non-added) token must be the same string
    at the same id. Raises one CompareError listing every difference."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as exc:
        raise CompareError(f"{gguf_path} is not a readable GGUF file ({exc})") from None

    def field(name):
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    facts = model_facts(model_dir)
    arch = field("general.architecture")
    tokens = field("tokenizer.ggml.tokens") or []
    found = {"architecture": arch, "block_count": field(f"{arch}.block_count"),
             "embedding_length": field(f"{arch}.embedding_length"), "vocabulary size": len(tokens)}
    wanted = {"architecture": facts.arch, "block_count": facts.n_layers, "embedding_length": facts.hidden_size,
              "vocabulary size": facts.n_vocab}
    diffs = [f"{k} {found[k]} (model: {wanted[k]})" for k in wanted if found[k] != wanted[k]]
    if not diffs:
        added = tokenizer.get_added_vocab()
        bad = [(i, t) for t, i in tokenizer.get_vocab().items()
               if t not in added and (i >= len(tokens) or tokens[i] != t)]
        if bad:
            i, t = min(bad)
            in_gguf = repr(tokens[i]) if i < len(tokens) else "nothing"
            diffs.append(f"tokenizer differs at {len(bad)} tokens (id {i}: {in_gguf} in the GGUF, {t!r} in "
                         "the model)")
    if diffs:
        raise CompareError(f"{gguf_path} is not a GGUF of {model_dir}: " + "; ".join(diffs))


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user turn in the model's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise CompareError("the tokenizer has no chat template; generations need an instruct model's template")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """Tokens that end a generation: the tokenizer's EOS and generation_config.json's eos_token_id(s)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(int(i) for i in ids)


# --------------------------------------------------------------------------------------------------------------
# Speed, memory and generation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that fixes a measurement, printed at start and stored in results.json."""
    seq_len: int = 512
    n_windows: int | None = 64
    pp_tokens: int = 512
    tg_tokens: int = 128
    speed_runs: int = 5
    max_tokens: int = 200
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "auto"          # transformers device: auto, cuda, mps or cpu
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    reference_dtype: str = "auto"  # auto, float32 or float16 storage of the cached reference
    progress: bool = True


def bench_tokens(n_tokens: int, n_vocab: int, seed: int) -> list[int]:
    """Fixed pseudo-random token ids (llama-bench also times random tokens: speed does not depend on text)."""
    return np.random.default_rng(seed).integers(0, n_vocab, n_tokens).tolist()


def median_seconds(fn: Callable[[], None], runs: int) -> float:
    """Median wall time of `runs` calls of fn after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image so far.

    Linux: VmHWM from /proc/self/status, because ru_maxrss survives fork and exec, so a spawned child would
    report at least its parent's resident size. Elsewhere: ru_maxrss (bytes on macOS, KiB on other Unixes).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gpu_used_bytes() -> int | None:
    """Memory in use on all NVIDIA GPUs (nvidia-smi), or None without one. Device-wide: per-process figures
    are often unavailable inside containers."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(v) for v in out.split()) * 2**20


@dataclass
class Speed:
    load_s: float
    pp_tok_per_s: float
    tg_tok_per_s: float
    peak_rss_bytes: int
    gpu_mem_bytes: int | None


def llama_speed(llm, pp_tokens: int, tg_tokens: int, runs: int) -> tuple[float, float]:
    """(prompt-processing, decode) tok/s of a llama-cpp-python model, like llama-bench's pp/tg tests: a prompt
    of pp_tokens in one batch from an empty cache; tg_tokens single-token decodes from an empty cache."""
    import llama_cpp
    prompt = bench_tokens(pp_tokens, llm.n_vocab(), seed=1)
    decode = bench_tokens(tg_tokens, llm.n_vocab(), seed=2)

    def pp():
        llm.reset()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(llm.ctx)

    def tg():
        llm.reset()
        for tok in decode:
            llm.eval([tok])
        llama_cpp.llama_synchronize(llm.ctx)

    return pp_tokens / median_seconds(pp, runs), tg_tokens / median_seconds(tg, runs)


def transformers_speed(model, n_vocab: int, pp_tokens: int, tg_tokens: int, runs: int) -> tuple[float, float]:
    """(prompt-processing, decode) tok/s of a transformers model: one forward over pp_tokens; tg_tokens
    single-token forwards with the KV cache, from an empty cache (the same shape of work as llama_speed)."""
    import torch
    device = next(model.parameters()).device
    prompt = torch.tensor([bench_tokens(pp_tokens, n_vocab, seed=1)], device=device)
    decode = torch.tensor(bench_tokens(tg_tokens, n_vocab, seed=2), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    def pp():
        with torch.inference_mode():
            model(prompt, use_cache=True, logits_to_keep=1)
        sync()

    cache_name = kv_cache_name(model)

    def tg():
        with torch.inference_mode():
            cache = None
            for tok in decode:
                out = model(tok.view(1, 1), **{cache_name: cache}, use_cache=True, logits_to_keep=1)
                cache = getattr(out, cache_name)
        sync()

    return pp_tokens / median_seconds(pp, runs), tg_tokens / median_seconds(tg, runs)


def llama_greedy(llm, prompt_ids: list[int], max_tokens: int, stop_ids: Sequence[int]) -> list[int]:
    """Greedy continuation with llama.cpp (argmax of the last logits; needs logits_all=True)."""
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    while len(out) < max_tokens:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in stop_ids:
            break
        out.append(tok)
        if len(out) < max_tokens:
            llm.eval([tok])
    return out


def kv_cache_name(model) -> str:
    """The KV cache's name in the model's forward (argument and output): transformers 5.24 (the pinned
    version) says `cache`, earlier 5.x (the device image's 5.17) `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def transformers_greedy(model, prompt_ids: list[int], max_tokens: int, stop_ids: Sequence[int]) -> list[int]:
    """Greedy continuation with transformers, written as the same loop as llama_greedy (argmax, KV cache)."""
    import torch
    device = next(model.parameters()).device
    cache_name = kv_cache_name(model)
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        while len(out) < max_tokens:
            tok = int(res.logits[0, -1].argmax())
            if tok in stop_ids:
                break
            out.append(tok)
            if len(out) < max_tokens:
                res = model(torch.tensor([[tok]], device=device), **{cache_name: getattr(res, cache_name)},
                            use_cache=True, logits_to_keep=1)
    return out


# --------------------------------------------------------------------------------------------------------------
# One model, measured in its own process
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelJob:
    """What to measure for one model. kind "gguf" (llama.cpp) or "transformers" (the original)."""
    name: str
    kind: str
    path: str
    windows: np.ndarray
    prompt_ids: list
    stop_ids: list
    settings: Settings
    reference_key: str | None = None      # cached reference to compare against (or, for the original, build)
    reference_source: str | None = None   # the original's source id, stored in a reference it builds


@dataclass
class ModelResult:
    """One row of the comparison (fields None where not measured)."""
    name: str
    kind: str
    path: str
    size_bytes: int
    device: str
    quality: dict | None = None
    speed: dict | None = None
    generations: list = field(default_factory=list)   # token ids per prompt (decoded by the parent)


def transformers_device(requested: str = "auto") -> str:
    """cuda, then mps, then cpu, unless one is named."""
    import torch
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def transformers_dtype_name(device: str) -> str:
    """bf16 on a GPU that supports it, else fp16 on a GPU; fp32 on CPU."""
    import torch
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device == "mps" else "float32"


def llama_gpu_offload() -> bool:
    """Whether this llama-cpp-python build can offload layers to a GPU (CUDA, Metal, ...)."""
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def open_llama(path: str, n_ctx: int, n_batch: int, logits_all: bool, n_threads: int):
    """A llama-cpp-python model with every layer on the GPU when the build supports it.

    Flash attention is on, as llama.cpp's own tools have it by default (their "auto" enables it on CPU, CUDA
    and Metal; llama-cpp-python's default is off): with it our logits reproduce llama-perplexity's perplexity
    and top-1 agreement to the printed digit; without it they differ in the 4th digit.
    """
    from llama_cpp import Llama
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512),
                     logits_all=logits_all, n_gpu_layers=-1 if llama_gpu_offload() else 0,
                     n_threads=n_threads, n_threads_batch=n_threads, flash_attn=True, verbose=False)
    except ValueError as exc:
        raise CompareError(f"llama.cpp cannot load {path}: {exc}") from None


def progress_bar(job: ModelJob, what: str):
    """The job's prompts wrapped in a tqdm bar on stderr (silent with --no_progress)."""
    from tqdm import tqdm
    return tqdm(job.prompt_ids, desc=f"{job.name} {what}", unit="prompt", disable=not job.settings.progress,
                file=sys.stderr)


def measure_gguf(job: ModelJob) -> ModelResult:
    """Load time, speed and peak memory, then greedy generations and quality of one GGUF via llama.cpp.

    Peak RSS and GPU memory are read after the speed runs, before the evaluation context (whose
    n_ctx x vocab logit buffer is measurement overhead, not what running the model costs) is created.
    """
    s = job.settings
    gpu_before = gpu_used_bytes()
    t0 = time.perf_counter()
    llm = open_llama(job.path, max(s.pp_tokens, s.tg_tokens), max(s.pp_tokens, 1), False, s.n_threads)
    load_s = time.perf_counter() - t0
    pp, tg = llama_speed(llm, s.pp_tokens, s.tg_tokens, s.speed_runs)
    gpu_after = gpu_used_bytes()
    speed = Speed(load_s, pp, tg, peak_rss_bytes(),
                  gpu_after - gpu_before if gpu_after is not None and gpu_before is not None else None)
    llm.close()

    longest = max([len(p) for p in job.prompt_ids] + [0]) + s.max_tokens
    llm = open_llama(job.path, max(s.seq_len, longest), 512, True, s.n_threads)
    generations = [llama_greedy(llm, ids, s.max_tokens, job.stop_ids) for ids in progress_bar(job, "generate")]
    reference = open_reference(s.cache_dir, job.reference_key) if job.reference_key else None
    quality = evaluate_quality(llama_logits_fn(llm), job.windows, reference, s.progress, desc=job.name)
    llm.close()
    device = "llama.cpp GPU (all layers offloaded)" if llama_gpu_offload() else f"llama.cpp CPU, {s.n_threads} threads"
    return ModelResult(job.name, job.kind, job.path, os.path.getsize(job.path), device, asdict(quality),
                       asdict(speed), generations)


def load_transformers_model(model_dir: str, device: str, dtype_name: str):
    """The original model on `device` in `dtype_name`, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    return model.to(device).eval()


def measure_transformers(job: ModelJob) -> ModelResult:
    """Load time, speed and peak memory, greedy generations and quality of the original (transformers).

    Builds the cached reference when it is missing (its own quality comes from the same pass); otherwise its
    quality is read from the cache.
    """
    import torch
    s = job.settings
    torch.set_num_threads(s.n_threads)
    device = transformers_device(s.device)
    dtype_name = transformers_dtype_name(device)
    gpu_before = gpu_used_bytes()
    t0 = time.perf_counter()
    model = load_transformers_model(job.path, device, dtype_name)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    n_vocab = model.get_output_embeddings().weight.shape[0]
    pp, tg = transformers_speed(model, n_vocab, s.pp_tokens, s.tg_tokens, s.speed_runs)
    gpu_after = gpu_used_bytes()
    speed = Speed(load_s, pp, tg, peak_rss_bytes(),
                  gpu_after - gpu_before if gpu_after is not None and gpu_before is not None else None)
    generations = [transformers_greedy(model, ids, s.max_tokens, job.stop_ids)
                   for ids in progress_bar(job, "generate")]
    reference = open_reference(s.cache_dir, job.reference_key) if job.reference_key else None
    if reference is None and job.reference_key:
        reference = build_reference(transformers_logits_fn(model), job.windows, s.cache_dir, job.reference_key,
                                    job.reference_source, s.reference_dtype, s.progress)
    quality = reference.quality() if reference is not None else evaluate_quality(
        transformers_logits_fn(model), job.windows, None, s.progress, desc=job.name)
    size = sum(os.path.getsize(p) for p in weight_files(Path(job.path)))
    return ModelResult(job.name, job.kind, job.path, size, f"transformers {device} {dtype_name}",
                       asdict(quality), asdict(speed), generations)


MEASURE = {"gguf": measure_gguf, "transformers": measure_transformers}


# One process cannot hold both runtimes with CUDA builds (H100: torch 2.11+cu130 and llama.cpp built against the
# system's CUDA 13): importing torch after llama_cpp aborts at once (free(): invalid pointer), and a GGUF loaded in
# a process that imported torch first segfaults in libggml-cuda. So this module imports neither at the top, and
# every model is measured in a fresh Python that imports only its own runtime, first (llama.cpp also before numpy:
# with an OpenMP build, numpy first segfaulted at the model load).
WORKER_RUNTIME = {"gguf": "llama_cpp", "transformers": "torch"}


def repo_python_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH: for a fresh Python that imports our modules."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH"))
                                                       if p))


def worker_command(kind: str, job_path: Path, result_path: Path) -> list[str]:
    """The command line of the fresh Python that measures one pickled job (see WORKER_RUNTIME)."""
    code = (f"import {WORKER_RUNTIME[kind]}\nimport sys\nimport eval_utils\n"
            "eval_utils.worker_main(sys.argv[1], sys.argv[2])\n")
    return [sys.executable, "-c", code, str(job_path), str(result_path)]


def worker_main(job_path: str, result_path: str) -> None:
    """Inside the worker: measure the job; write the ModelResult, or the failure as (error type, message)."""
    job = pickle.loads(Path(job_path).read_bytes())
    try:
        outcome = MEASURE[job.kind](job)
    except Exception as exc:  # reported by the parent as one line; the traceback is printed here
        if not isinstance(exc, CompareError):
            traceback.print_exc()
        outcome = (type(exc).__name__, str(exc))
    Path(result_path).write_bytes(pickle.dumps(outcome))


def exit_description(returncode: int) -> str:
    """'exited with status 1' or 'was killed by SIGSEGV' for a subprocess's return code."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def run_job(job: ModelJob, isolate: bool = True) -> ModelResult:
    """Measure one model, by default in a fresh Python (worker_command) so that its peak memory, its runtime
    and a crash are its own; isolate=False runs it here (tests, notebooks)."""
    if not isolate:
        return MEASURE[job.kind](job)
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        job_path, result_path = Path(tmp, "job.pkl"), Path(tmp, "result.pkl")
        job_path.write_bytes(pickle.dumps(job))
        done = subprocess.run(worker_command(job.kind, job_path, result_path), env=repo_python_env())
        if done.returncode != 0 or not result_path.is_file():
            raise CompareError(f"the process measuring {job.name} {exit_description(done.returncode)} (out of "
                               f"memory, or a crash in {WORKER_RUNTIME[job.kind]}: its output is above)")
        outcome = pickle.loads(result_path.read_bytes())  # written by our own worker, in our own temp dir
    if isinstance(outcome, ModelResult):
        return outcome
    error_type, message = outcome
    raise CompareError(message if error_type == "CompareError" else
                       f"measuring {job.name} failed: {error_type}: {message}")


# --------------------------------------------------------------------------------------------------------------
# A comparison: the original and any number of GGUFs over the same windows and prompts
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Original:
    """The model every GGUF is compared with: its directory and tokenizer (weights load in the child)."""
    model_id: str
    model_dir: Path
    tokenizer: object


def load_original(model_id: str) -> Original:
    """Resolve --model_id to a local directory and load its tokenizer (the weights are loaded later, in the
    process that measures the original)."""
    from transformers import AutoTokenizer
    model_dir = resolve_model_dir(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    return Original(model_id, model_dir, tokenizer)


def original_reference_source(model_dir: Path, settings: Settings) -> str:
    """Identity of the original's logits as this machine computes them (device and dtype included)."""
    device = transformers_device(settings.device)
    return transformers_source_id(model_dir, transformers_dtype_name(device), device.split(":")[0])


def reference_for_model(model_dir, windows: np.ndarray, settings: Settings | None = None) -> Reference:
    """The original's cached reference over these windows (the one compare_*.py use), built here if missing."""
    settings = settings or Settings()
    source = original_reference_source(Path(model_dir), settings)
    key = reference_key(source, windows, settings.reference_dtype)
    reference = open_reference(settings.cache_dir, key)
    if reference is None:
        device = transformers_device(settings.device)
        model = load_transformers_model(str(model_dir), device, transformers_dtype_name(device))
        reference = build_reference(transformers_logits_fn(model), windows, settings.cache_dir, key, source,
                                    settings.reference_dtype, settings.progress)
    return reference


def compare_models(original: Original, ggufs: list[tuple[str, str]], windows: np.ndarray, prompts: list[str],
                   settings: Settings, skip_original: bool = False, isolate: bool = True):
    """Measure the original (unless skipped) and every (name, path) GGUF; returns (results, texts, notes).

    The original runs first and leaves its logits in the reference cache; every GGUF is then compared with
    that reference. With skip_original, a reference cached by an earlier run over the same windows is used;
    without one, KLD and top-1 are not measured (noted). `texts` maps model name -> decoded generations.
    """
    source = original_reference_source(original.model_dir, settings)
    key = reference_key(source, windows, settings.reference_dtype)
    prompt_ids = [chat_prompt_ids(original.tokenizer, p) for p in prompts]
    stop_ids = stop_token_ids(original.tokenizer, original.model_dir)
    jobs = []
    if not skip_original:
        jobs.append(ModelJob("original", "transformers", str(original.model_dir), windows, prompt_ids, stop_ids,
                             settings, key, source))
    jobs += [ModelJob(name, "gguf", str(path), windows, prompt_ids, stop_ids, settings, key, source)
             for name, path in ggufs]
    results, notes = [], []
    for i, job in enumerate(jobs, 1):
        if job.kind == "gguf" and open_reference(settings.cache_dir, key) is None:
            job.reference_key = None
            if not notes:
                notes.append("no cached logits of the original for these windows: KLD and top-1 not measured "
                             "(run once without --skip_original)")
        print(f"[{i}/{len(jobs)}] {job.name}: {job.path}", file=sys.stderr, flush=True)
        results.append(run_job(job, isolate))
    texts = {r.name: [original.tokenizer.decode(ids, skip_special_tokens=True) for ids in r.generations]
             for r in results}
    return results, texts, notes


def add_measurement_args(parser) -> None:
    """Options shared by compare_real_quant.py and compare_three_models.py (DESIGN.md's tables extended)."""
    d = Settings()
    parser.add_argument("--max_tokens", type=int, default=d.max_tokens, help="tokens to generate per prompt")
    parser.add_argument("--eval_file", default=None,
                        help="evaluation text (.txt/.tokens/.raw/.jsonl/.parquet); default wikitext-2-raw-v1 "
                             "test through datasets")
    parser.add_argument("--seq_len", type=int, default=d.seq_len, help="tokens per evaluation window")
    parser.add_argument("--n_windows", type=int, default=d.n_windows,
                        help="evaluation windows (consecutive, from the start of the text)")
    parser.add_argument("--prompts", default=None,
                        help=f"file of extra prompts, one per line (added to {DEFAULT_PROMPTS_FILE.name})")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write results.json, report.md and PNG plots here")
    parser.add_argument("--pp_tokens", type=int, default=d.pp_tokens, help="prompt length for the pp speed test")
    parser.add_argument("--tg_tokens", type=int, default=d.tg_tokens, help="decoded tokens for the tg speed test")
    parser.add_argument("--speed_runs", type=int, default=d.speed_runs,
                        help="timed runs per speed test (median reported, after one warm-up)")
    parser.add_argument("--threads", type=int, default=d.n_threads, help="CPU threads (llama.cpp and torch)")
    parser.add_argument("--device", default=d.device, help="device of the transformers model: auto|cuda|mps|cpu")
    parser.add_argument("--cache_dir", default=d.cache_dir, help="cache of the original's logits")
    parser.add_argument("--reference_dtype", default=d.reference_dtype, choices=["auto", "float32", "float16"],
                        help="storage of cached log-probs (auto: float32 up to 1 GiB, else float16)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def settings_from_args(args) -> Settings:
    """Settings from parsed add_measurement_args options."""
    for name in ("seq_len", "pp_tokens", "tg_tokens", "speed_runs", "threads"):
        if getattr(args, name) < 1:
            raise CompareError(f"--{name} must be at least 1")
    if args.seq_len < 4:
        raise CompareError("--seq_len must be at least 4")
    if args.max_tokens < 0 or (args.n_windows is not None and args.n_windows < 1):
        raise CompareError("--max_tokens must be >= 0 and --n_windows >= 1")
    return Settings(seq_len=args.seq_len, n_windows=args.n_windows, pp_tokens=args.pp_tokens,
                    tg_tokens=args.tg_tokens, speed_runs=args.speed_runs, max_tokens=args.max_tokens,
                    n_threads=args.threads, device=args.device, cache_dir=args.cache_dir,
                    reference_dtype=args.reference_dtype, progress=not args.no_progress)


def describe_devices(settings: Settings) -> str:
    """Where each kind of model runs, for the log."""
    device = transformers_device(settings.device)
    gguf = ("GPU, all layers offloaded" if llama_gpu_offload() else f"CPU, {settings.n_threads} threads")
    return f"transformers on {device} ({transformers_dtype_name(device)}); llama.cpp on {gguf}"

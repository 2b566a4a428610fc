"""The two runtimes a comparison runs models in, behind the same small verbs: logits of a window, prompt and
decode speed, greedy generation, and memory read-outs. transformers (torch) for the original, llama.cpp
(llama-cpp-python) for GGUFs.

Neither runtime is imported at the top: with CUDA builds one process cannot hold both (see workers.py), so
each function imports the one it uses.
"""
from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import UserError
from metrics import LogitsFn, first_scored


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
    """One model's load time, memory and speed: pp and tg medians, with their quartiles when the runs were
    interleaved with other models' (comparison.compare_models)."""
    load_s: float
    pp_tok_per_s: float | None
    tg_tok_per_s: float | None
    peak_rss_bytes: int
    gpu_mem_bytes: int | None
    pp_q25: float | None = None
    pp_q75: float | None = None
    tg_q25: float | None = None
    tg_q75: float | None = None
    speed_runs: int | None = None

    def with_runs(self, runs: "SpeedRuns") -> "Speed":
        """This record with its speeds taken from interleaved runs (medians and quartiles)."""
        summary = runs.summary()
        return dataclasses.replace(
            self, pp_tok_per_s=summary["pp"]["median"], tg_tok_per_s=summary["tg"]["median"],
            pp_q25=summary["pp"]["q25"], pp_q75=summary["pp"]["q75"], tg_q25=summary["tg"]["q25"],
            tg_q75=summary["tg"]["q75"], speed_runs=summary["pp"]["runs"])


def llama_bench_tests(llm, pp_tokens: int, tg_tokens: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """llama-bench's two tests on a llama-cpp-python model, as callables: pp (a prompt of pp_tokens in one
    batch from an empty cache) and tg (tg_tokens single-token decodes from an empty cache), random tokens."""
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

    return pp, tg


@dataclass
class SpeedRuns:
    """Every timed run of one model's pp and tg tests, in tok/s, in the order they ran."""
    pp_tok_per_s: list[float]
    tg_tok_per_s: list[float]

    @staticmethod
    def _summary(values: list[float]) -> dict:
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        return {"median": float(median), "q25": float(q25), "q75": float(q75), "runs": len(values)}

    def summary(self) -> dict:
        """Medians and quartiles: {"pp": {...}, "tg": {...}}."""
        return {"pp": self._summary(self.pp_tok_per_s), "tg": self._summary(self.tg_tok_per_s)}


def interleaved_llama_speeds(paths: Sequence[str], pp_tokens: int, tg_tokens: int, rounds: int,
                             n_threads: int, keep_loaded: bool = True, progress: bool = False) -> list[SpeedRuns]:
    """pp and tg tok/s of several GGUFs measured in turn: each of `rounds` rounds runs every model's pp and tg
    test once, so a machine whose speed drifts (a shared host, a cooling CPU) slows every model alike and the
    medians compare like with like. With `keep_loaded` every model stays loaded (warmed up once); without, each
    is loaded and warmed up again for each of its turns (models that do not fit memory together)."""
    from tqdm import tqdm

    def opened(path):
        llm = open_llama(path, max(pp_tokens, tg_tokens) + 8, max(pp_tokens, 1), False, n_threads)
        pp, tg = llama_bench_tests(llm, pp_tokens, tg_tokens)
        pp()
        tg()
        return llm, pp, tg

    loaded = [opened(p) for p in paths] if keep_loaded else None
    runs = [SpeedRuns([], []) for _ in paths]
    with tqdm(total=rounds * len(paths), desc="speed (interleaved)", unit="run", disable=not progress,
              file=sys.stderr) as bar:
        for _ in range(rounds):
            for i, path in enumerate(paths):
                llm, pp, tg = loaded[i] if keep_loaded else opened(path)
                for fn, n_tokens, values in ((pp, pp_tokens, runs[i].pp_tok_per_s),
                                             (tg, tg_tokens, runs[i].tg_tok_per_s)):
                    t0 = time.perf_counter()
                    fn()
                    values.append(n_tokens / (time.perf_counter() - t0))
                if not keep_loaded:
                    llm.close()
                bar.update()
    for llm, _, _ in loaded or []:
        llm.close()
    return runs


def transformers_speed(model, n_vocab: int, pp_tokens: int, tg_tokens: int, runs: int) -> tuple[float, float]:
    """(prompt-processing, decode) tok/s of a transformers model: one forward over pp_tokens; tg_tokens
    single-token forwards with the KV cache, from an empty cache (the same work as llama_bench_tests)."""
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


def transformers_device(requested: str = "auto") -> str:
    """cuda, then mps, then cpu, unless one is named (model_blocks.resolve_device, as a string)."""
    from model_blocks import resolve_device
    return requested if requested != "auto" else resolve_device("auto").type


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
        raise UserError(f"llama.cpp cannot load {path}: {exc}") from None


def load_transformers_model(model_dir: str, device: str, dtype_name: str):
    """The original model on `device` in `dtype_name`, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    return model.to(device).eval()

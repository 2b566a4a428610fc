"""One model measured in a fresh Python that imports only its own runtime: load time, speed, peak memory,
greedy generations and quality, returned to the parent as a ModelResult.

One process cannot hold both runtimes with CUDA builds (H100: torch 2.11+cu130 and llama.cpp built against the
system's CUDA 13): importing torch after llama_cpp aborts at once (free(): invalid pointer), and a GGUF loaded in
a process that imported torch first segfaults in libggml-cuda. So this module imports neither at the top, and
every model is measured in a fresh Python that imports only its own runtime, first (llama.cpp also before numpy:
with an OpenMP build, numpy first segfaulted at the model load). Peak memory is then that model's own.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cli import UserError
from metrics import evaluate_quality
from reference import DEFAULT_CACHE_DIR, build_reference, open_reference, weight_files
from runtimes import (Speed, SpeedRuns, gpu_used_bytes, llama_gpu_offload, llama_greedy, llama_logits_fn, llama_bench_tests,
                      load_transformers_model, open_llama, peak_rss_bytes, transformers_device, transformers_dtype_name,
                      transformers_greedy, transformers_logits_fn, transformers_speed)

REPO_DIR = Path(__file__).resolve().parent
WORKER_RUNTIME = {"gguf": "llama_cpp", "transformers": "torch"}


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
    quality_only: bool = False            # only the windows' quality (a further evaluation text)


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
    quality_by_text: dict = field(default_factory=dict)   # evaluation text -> quality on it (the first: `quality`)
    recipe: str | None = None          # the llama.cpp preset this GGUF is, type for type (None: another mix)


def progress_bar(job: ModelJob, what: str):
    """The job's prompts wrapped in a tqdm bar on stderr (silent with --no_progress)."""
    from tqdm import tqdm
    return tqdm(job.prompt_ids, desc=f"{job.name} {what}", unit="prompt", disable=not job.settings.progress,
                file=sys.stderr)


def measure_gguf(job: ModelJob) -> ModelResult:
    """Load time and peak memory, then greedy generations and quality of one GGUF via llama.cpp. Its speed is
    measured later, interleaved with the other GGUFs' (interleaved_speeds); here one pp and one tg run make
    the memory what running the model takes.

    Peak RSS and GPU memory are read after those runs, before the evaluation context (whose n_ctx x vocab
    logit buffer is measurement overhead, not what running the model costs) is created.
    """
    s = job.settings
    speed = None
    if not job.quality_only:
        gpu_before = gpu_used_bytes()
        t0 = time.perf_counter()
        llm = open_llama(job.path, max(s.pp_tokens, s.tg_tokens), max(s.pp_tokens, 1), False, s.n_threads)
        load_s = time.perf_counter() - t0
        for test in llama_bench_tests(llm, s.pp_tokens, s.tg_tokens):
            test()
        gpu_after = gpu_used_bytes()
        speed = Speed(load_s, None, None, peak_rss_bytes(),
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
                       asdict(speed) if speed is not None else None, generations)


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
    speed = None
    if not job.quality_only:
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
                       asdict(quality), asdict(speed) if speed is not None else None, generations)


MEASURE = {"gguf": measure_gguf, "transformers": measure_transformers}


def repo_python_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH: for a fresh Python that imports our modules."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH"))
                                                       if p))


def worker_command(kind: str, job_path: Path, result_path: Path) -> list[str]:
    """The command line of the fresh Python that measures one pickled job (see WORKER_RUNTIME)."""
    code = (f"import {WORKER_RUNTIME[kind]}\nimport sys\nimport workers\n"
            "workers.worker_main(sys.argv[1], sys.argv[2])\n")
    return [sys.executable, "-c", code, str(job_path), str(result_path)]


def worker_main(job_path: str, result_path: str) -> None:
    """Inside the worker: measure the job; write the ModelResult, or the failure as (error type, message)."""
    job = pickle.loads(Path(job_path).read_bytes())
    try:
        outcome = MEASURE[job.kind](job)
    except Exception as exc:  # reported by the parent as one line; the traceback is printed here
        if not isinstance(exc, UserError):
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
            raise UserError(f"the process measuring {job.name} {exit_description(done.returncode)} (out of "
                            f"memory, or a crash in {WORKER_RUNTIME[job.kind]}: its output is above)")
        outcome = pickle.loads(result_path.read_bytes())  # written by our own worker, in our own temp dir
    if isinstance(outcome, ModelResult):
        return outcome
    error_type, message = outcome
    raise UserError(message if error_type == "UserError" else
                    f"measuring {job.name} failed: {error_type}: {message}")


KEEP_LOADED_BYTES = 8 * 2**30     # GGUFs up to this much in all stay loaded through an interleaved benchmark


def interleaved_speeds(paths: list[str], pp_tokens: int, tg_tokens: int, rounds: int, n_threads: int,
                       progress: bool = True) -> list[SpeedRuns]:
    """runtimes.interleaved_llama_speeds of these GGUFs (all loaded at once when they take at most
    KEEP_LOADED_BYTES), in a fresh Python that imports llama.cpp first and never torch (see the module
    docstring); one clear error if that process fails."""
    code = ("import llama_cpp\nimport json, sys\nimport runtimes\n"
            "runs = runtimes.interleaved_llama_speeds(**json.loads(sys.argv[1]))\n"
            "print(json.dumps([vars(r) for r in runs]))\n")
    keep_loaded = sum(os.path.getsize(p) for p in paths) <= KEEP_LOADED_BYTES
    args = {"paths": [str(p) for p in paths], "pp_tokens": pp_tokens, "tg_tokens": tg_tokens, "rounds": rounds,
            "n_threads": n_threads, "keep_loaded": keep_loaded, "progress": progress}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, text=True,
                          env=repo_python_env(), cwd=REPO_DIR)
    if done.returncode != 0:
        raise UserError(f"the speed benchmark of {', '.join(Path(p).name for p in paths)} "
                        f"{exit_description(done.returncode)} (its output is above)")
    return [SpeedRuns(**r) for r in json.loads(done.stdout.strip().splitlines()[-1])]

"""Compare the original model, a uniform Q4_K_M GGUF and the mixed-precision GGUF (and any extra GGUFs).

For every model: perplexity on the evaluation text; KL divergence of its next-token distribution from the
original's (mean, median, 99th percentile) and top-1 agreement over the same token windows; prompt-processing
and decode tok/s; load time; peak memory; file size; greedy answers to the prompts, shown side by side.

How it is measured (details in metrics.py, reference.py, runtimes.py and workers.py):
- Quality follows `llama-perplexity --kl-divergence`: consecutive windows of --seq_len tokens, each from an
  empty cache, BOS first when the tokenizer adds one, only the second half of each window scored.
- The original's logits are computed once (transformers; fp32 on CPU, bf16/fp16 on GPU) and cached under
  --cache_dir keyed by model files, dtype, device and the exact windows: per window the scored positions'
  log-softmax over the whole vocabulary, float32 while the cache stays under 1 GiB and float16 beyond
  (e.g. 64 windows of 512 for a 152k vocabulary: 5 GB, the size of llama-perplexity's own base file), plus the
  exact NLL and argmax per token. With float16 log-probs, renormalised on load, the mean KLD of the demo
  model's Q4_K_M moves by less than 0.5% against the float32 cache.
- GGUFs run through llama-cpp-python with every layer on the GPU when the build supports offload. Each model
  is measured in its own spawned process, so peak RSS (VmHWM, read after one pp and one tg run) is that
  model's; GPU memory is nvidia-smi's used memory after those runs minus before loading (CUDA context
  included). Speed is llama-bench's pp/tg shape (--pp_tokens in one batch, --tg_tokens single-token decodes,
  both from an empty cache), measured afterwards with every GGUF loaded in one process and visited in turn for
  --speed_runs rounds: medians, ± half the interquartile range, and each GGUF's ratio to the first. llama.cpp maps the file (mmap): its load time
  excludes paging weights in (the warm-up run does that), and RSS counts the mapped pages it touched, also
  when the weights were then copied to the GPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

# This process loads torch (transformers' tokenizer) and asks llama.cpp whether it can offload: with CUDA builds
# torch must come first (workers.py); the models themselves are measured in fresh processes.
import torch  # noqa: F401

import cli
import comparison
from cli import UserError

DEFAULTS = {
    "model_id": "Qwen/Qwen2.5-7B-Instruct",
    "q4km_path": "models/Qwen2.5-7B-Instruct-Q4_K_M.gguf",
    "mixed_path": "models/qwen2.5-7b-mixed.gguf",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__doc__.splitlines()[0])
    parser.add_argument("--model_id", default=DEFAULTS["model_id"], help="original model: HF id or local directory")
    parser.add_argument("--q4km_path", default=DEFAULTS["q4km_path"], help="uniform Q4_K_M GGUF")
    parser.add_argument("--mixed_path", default=DEFAULTS["mixed_path"], help="mixed-precision GGUF")
    parser.add_argument("--gguf", nargs="+", default=[], metavar="PATH",
                        help="extra GGUFs of the same model (e.g. other llama.cpp presets)")
    parser.add_argument("--skip_original", action="store_true",
                        help="do not run the transformers model (KLD uses its cached logits, if any)")
    comparison.add_measurement_args(parser)
    return parser.parse_args(argv)


def named_ggufs(args) -> list[tuple[str, str]]:
    """(name, path) of every GGUF to compare: Q4_K_M, mixed, then extras named by file stem (made unique)."""
    ggufs = [("Q4_K_M", args.q4km_path), ("mixed", args.mixed_path)]
    for path in args.gguf:
        name, n = Path(path).stem, 2
        while name in {g[0] for g in ggufs} | {"original"}:
            name, n = f"{Path(path).stem}-{n}", n + 1
        ggufs.append((name, path))
    return ggufs


def check_files_exist(args) -> None:
    """Missing GGUFs stop the run before anything is loaded, with the command that makes each one."""
    if not Path(args.q4km_path).is_file():
        raise UserError(f"--q4km_path {args.q4km_path} not found; make it from the same model with: python "
                        f"export_gguf_official.py --model_id {args.model_id} --preset Q4_K_M --imatrix "
                        f"IMATRIX.gguf --output {args.q4km_path} (imatrix from calib_stats.py --imatrix)")
    if not Path(args.mixed_path).is_file():
        raise UserError(f"--mixed_path {args.mixed_path} not found; make it with: python mixed_precision_ptq.py "
                        f"--model_id {args.model_id}, then python export_gguf_official.py --model_id "
                        f"{args.model_id} --output {args.mixed_path}")
    for path in args.gguf:
        if not Path(path).is_file():
            raise UserError(f"--gguf {path} not found")


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.reported_errors():
        check_files_exist(args)
        comparison.run_comparison(args, named_ggufs(args))


if __name__ == "__main__":
    main()

"""Check our KLD (metrics.py) against llama.cpp's `llama-perplexity --kl-divergence` on the same token windows.

1. llama-perplexity writes the base model's log-probs over the first --n_windows chunks of the text
   (--kl-divergence-base), then scores the candidate GGUF against them (--kl-divergence).
2. The windows are read back from that base file (its header holds every token), so both sides score exactly
   the same tokens; metrics.py then computes the same statistics with the base GGUF as reference (and, with
   --model_id, with the transformers original as reference, the way compare_*.py do).
3. Prints both sets of numbers and their relative differences; exits non-zero when the mean KLD differs by
   more than --tolerance.

Outputs of step 1 are kept in --workdir and reused when present.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import comparison  # noqa: E402
import metrics  # noqa: E402
import reference  # noqa: E402
import runtimes  # noqa: E402

LLAMA_STATS = {  # our Quality field -> llama-perplexity's summary line
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([\d.]+)",
    "kld_median": r"Median\s+KLD:\s*([\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)",
    "top1_agree": r"Same top p:\s*([\d.]+)",
}


def run_llama_perplexity(tool: str, base_gguf: str, gguf: str, eval_file: str, seq_len: int, n_windows: int,
                         threads: int, workdir: Path) -> tuple[Path, str]:
    """(base log-prob file, the --kl-divergence log), computing each only when missing."""
    base = workdir / "base.kld"
    if not base.is_file():
        cmd = [tool, "-m", base_gguf, "-f", eval_file, "-c", str(seq_len), "--chunks", str(n_windows),
               "-t", str(threads), "--kl-divergence-base", str(base)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = workdir / f"kld-{Path(gguf).stem}.log"
    if not log.is_file():
        cmd = [tool, "-m", gguf, "-c", str(seq_len), "-t", str(threads), "--kl-divergence-base", str(base),
               "--kl-divergence"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        log.write_text(out.stdout + out.stderr)
    return base, log.read_text()


def parse_llama_stats(log: str) -> dict:
    """llama-perplexity's final statistics as our Quality fields (top-1 as a fraction)."""
    stats = {}
    for key, pattern in LLAMA_STATS.items():
        m = re.search(pattern, log)
        if m is None:
            raise SystemExit(f"error: no '{pattern}' in the llama-perplexity output")
        stats[key] = float(m.group(1)) / (100 if key == "top1_agree" else 1)
    return stats


def read_base_windows(base: Path) -> np.ndarray:
    """The token windows stored in a --kl-divergence-base file: "_logits_", n_ctx, n_vocab, n_chunk, tokens."""
    with open(base, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"error: {base} is not a llama-perplexity log-prob file")
        n_ctx, _n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return tokens.reshape(n_chunk, n_ctx).astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_gguf", required=True, help="reference GGUF (F32 or F16 of the original)")
    p.add_argument("--gguf", required=True, help="candidate GGUF")
    p.add_argument("--model_id", default=None, help="also use this transformers original as reference")
    p.add_argument("--eval_file", default="../shared/data/wikitext-2/wiki.test.tokens")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--n_windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama_perplexity", default="/tmp/llama-tools/build/bin/llama-perplexity")
    p.add_argument("--workdir", default="models/cache/kld-crosscheck")
    p.add_argument("--reference_dtype", default="auto", choices=["auto", "float32", "float16"])
    p.add_argument("--tolerance", type=float, default=0.03, help="allowed relative difference of the mean KLD")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    base, log = run_llama_perplexity(args.llama_perplexity, args.base_gguf, args.gguf, args.eval_file,
                                     args.seq_len, args.n_windows, args.threads, workdir)
    theirs = parse_llama_stats(log)
    windows = read_base_windows(base)

    def cached_reference(logits_fn, source: str) -> reference.Reference:
        key = reference.reference_key(source, windows, args.reference_dtype)
        return (reference.open_reference(workdir, key)
                or reference.build_reference(logits_fn, windows, workdir, key, source, args.reference_dtype))

    llm = runtimes.open_llama(args.base_gguf, args.seq_len, 512, True, args.threads)
    gguf_ref = cached_reference(runtimes.llama_logits_fn(llm), reference.gguf_source_id(args.base_gguf))
    llm.close()
    llm = runtimes.open_llama(args.gguf, args.seq_len, 512, True, args.threads)
    candidate = runtimes.llama_logits_fn(llm)
    rows = {"llama-perplexity (base: GGUF)": theirs,
            "ours (base: GGUF)": vars(metrics.evaluate_quality(candidate, windows, gguf_ref))}
    if args.model_id:
        original = comparison.load_original(args.model_id)
        hf = runtimes.load_transformers_model(str(original.model_dir), "cpu", "float32")
        hf_ref = cached_reference(runtimes.transformers_logits_fn(hf),
                                  reference.transformers_source_id(original.model_dir, "float32", "cpu"))
        rows["ours (base: transformers)"] = vars(metrics.evaluate_quality(candidate, windows, hf_ref))
        ours_windows = comparison.load_eval_windows(args.eval_file, original.tokenizer, args.seq_len,
                                                    args.n_windows)
        print(f"data_utils windows identical to llama-perplexity's: {np.array_equal(ours_windows, windows)}")
    llm.close()

    keys = list(LLAMA_STATS)
    print(f"{len(windows)} windows of {args.seq_len} tokens; {args.gguf} against {args.base_gguf}")
    print(f"{'':<32}" + "".join(f"{k:>12}" for k in keys))
    for name, stats in rows.items():
        print(f"{name:<32}" + "".join(f"{stats[k]:>12.6f}" for k in keys))
    ours = rows["ours (base: GGUF)"]
    rel = {k: ours[k] / theirs[k] - 1 for k in keys}
    print(f"{'relative difference (GGUF base)':<32}" + "".join(f"{100 * rel[k]:>11.3f}%" for k in keys))
    if abs(rel["kld_mean"]) > args.tolerance:
        sys.exit(f"error: mean KLD differs by {100 * rel['kld_mean']:.2f}% (> {100 * args.tolerance:.1f}%)")


if __name__ == "__main__":
    main()

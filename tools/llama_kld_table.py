"""Mean KLD, top-1 agreement and perplexity of GGUFs against a base GGUF, measured by llama.cpp itself.

Runs `llama-perplexity --kl-divergence-base` once on the base (F32) GGUF over the first --chunks windows of the
evaluation text, then `--kl-divergence` for every candidate, and prints one aligned row per file (size, bpw,
KLD mean/median/p99, same top-1, PPL). The tools come from tools/build_llama_tools.sh.

    python tools/llama_kld_table.py --base models/demo/f32.gguf --gguf a.gguf b.gguf \
        --eval_file ../shared/data/wikitext-2/wiki.test.tokens --workdir models/demo/kld
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import files  # noqa: E402

STATS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([\d.]+)",
    "kld_median": r"Median\s+KLD:\s*([\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)",
    "same_top1_pct": r"Same top p:\s*([\d.]+)",
}


def run(cmd: list[str], log: Path) -> str:
    """Run a llama.cpp tool, keep its log, fail loudly with the log's tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:1])} failed (exit {proc.returncode}); see {log}:\n"
                 + "\n".join((proc.stdout + proc.stderr).splitlines()[-5:]))
    return proc.stdout + proc.stderr


def parse(log: str) -> dict:
    out = {}
    for key, pattern in STATS.items():
        m = re.search(pattern, log)
        out[key] = float(m.group(1)) if m else None
    return out


def n_params(path: Path) -> int:
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_elements) for t in reader.tensors)


def base_logprobs_path(base: Path, eval_file: Path, chunks: int, ctx: int, cache: str | None) -> Path:
    """The base's log-probs file for this text: named by the base and the text's name, keyed by both files'
    identity (name, size, mtime) and the window settings, so one file serves every workdir."""
    key = files.file_stat_signature([base, eval_file])[:10]
    folder = Path(cache) if cache else base.parent / "kld-base"
    return folder / f"{base.stem}-{eval_file.stem}-{chunks}x{ctx}-{key}.kld"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="reference GGUF (F32)")
    p.add_argument("--gguf", nargs="+", required=True, help="GGUFs to score")
    p.add_argument("--eval_file", default="../shared/data/wikitext-2/wiki.test.tokens")
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tools", default="/tmp/llama-tools/build/bin", help="llama.cpp tools directory")
    p.add_argument("--workdir", default="models/kld", help="logs and results.json")
    p.add_argument("--base_cache", default=None,
                   help="where the base's log-probs are kept, one file per (base, text, chunks, context), shared by "
                        "every workdir (default: kld-base/ beside the base GGUF; about 2.4 GB each for a 49k vocabulary)")
    args = p.parse_args()

    missing = [f for f in (args.base, args.eval_file, *args.gguf) if not Path(f).is_file()]
    if missing:
        sys.exit(f"error: no such file: {missing[0]}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tool = str(Path(args.tools) / "llama-perplexity")
    common = ["-f", args.eval_file, "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    base_kld = base_logprobs_path(Path(args.base), Path(args.eval_file), args.chunks, args.ctx, args.base_cache)
    if not base_kld.is_file():
        base_kld.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(base_kld) as tmp:
            run([tool, "-m", args.base, *common, "--kl-divergence-base", str(tmp)], work / "base.log")
    results = {}
    params = n_params(Path(args.base))
    for path in map(Path, args.gguf):
        log = run([tool, "-m", str(path), *common, "--kl-divergence-base", str(base_kld), "--kl-divergence"],
                  work / f"{path.stem}.log")
        size = path.stat().st_size
        results[str(path)] = {"size_bytes": size, "bpw": 8 * size / params, **parse(log)}
        r = results[str(path)]
        print(f"{path.name:<40} {size:>13,} {r['bpw']:>6.3f}  KLD {r['kld_mean']:.5f}  median "
              f"{r['kld_median']:.5f}  p99 {r['kld_p99']:.4f}  top1 {r['same_top1_pct']:.2f}%  PPL {r['ppl']:.3f}",
              flush=True)
    out = work / "results.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    files.write_json(out, {**previous, **results})


if __name__ == "__main__":
    main()

"""Measure the per-tensor sensitivity table of a model (statistics, imatrix GGUF, table, heatmap, additivity).

    python tools/measure_sensitivity.py --model models/smollm2-135m-instruct \
        --calib_file ../shared/data/wikitext-2/wiki.valid.tokens --output out/smollm2

Writes <output>.stats.pt (imatrix sums and counts), <output>.imatrix.gguf, <output>.sensitivity.{pt,json,png} and, with --additivity N,
<output>.additivity.json; prints the time of each phase. Statistics and per-(tensor, type) results are cached
under --cache_dir, so a second run (or one after an interruption) resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import calib_stats  # noqa: E402
import cli  # noqa: E402
import data_utils  # noqa: E402
import files  # noqa: E402
import imatrix_file  # noqa: E402
import kld  # noqa: E402
import model_blocks  # noqa: E402
import placement  # noqa: E402
import sensitivity  # noqa: E402
import sensitivity_table  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    data_utils.add_calib_args(parser)
    parser.add_argument("--gram_samples", type=int, default=128, help="calibration windows summed into Grams")
    parser.add_argument("--kld_samples", type=int, default=4, help="held-out windows for the KLD")
    parser.add_argument("--kld_seq_len", type=int, default=128, help="tokens per held-out window")
    parser.add_argument("--kld_types", default=",".join(sensitivity.DEFAULT_KLD_TYPES),
                        help="types whose KLD is measured (comma list), 'all', or 'none'")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward call (statistics)")
    parser.add_argument("--cache_dir", default="models/cache/sensitivity", help="resumable per-tensor results")
    parser.add_argument("--max_memory", default=None, help=placement.MAX_MEMORY_HELP)
    parser.add_argument("--output", default="models/sensitivity/sensitivity", help="output path prefix")
    parser.add_argument("--additivity", type=int, default=0, help="random mixed assignments to check")
    parser.add_argument("--additivity_file", default=None,
                        help="measure the assignments on this text's first 8 windows instead of the held-out ones")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    kld_types = args.kld_types if args.kld_types in ("all", "none") else tuple(args.kld_types.split(","))
    seconds, cpu_seconds = {}, {}

    def phase_done(name: str, wall_start: float, cpu_start: float) -> None:
        seconds[name] = time.perf_counter() - wall_start
        cpu_seconds[name] = time.process_time() - cpu_start

    with cli.reported_errors(ValueError, RuntimeError, OSError), torch.no_grad():
        max_memory = placement.parse_max_memory(args.max_memory) if args.max_memory else None
        t, c = time.perf_counter(), time.process_time()
        model, tokenizer = model_blocks.load_model_and_tokenizer(args.model)
        if model_blocks.resolve_device(args.device).type == "cpu":
            model = model.float()
        source = args.calib_file or args.calib_dataset
        ids = data_utils.get_calib_dataset(source, tokenizer, args.n_samples + args.kld_samples, args.seq_len,
                                           args.seed, chat=args.calib_chat)
        calib_ids, holdout_ids = ids[:args.n_samples], ids[args.n_samples:, :args.kld_seq_len]
        phase_done("load", t, c)

        t, c = time.perf_counter(), time.process_time()
        stats = calib_stats.cached_statistics(model, calib_ids, args.device, args.batch_size, args.gram_samples,
                                              args.cache_dir)
        phase_done("statistics", t, c)
        out = Path(args.output)
        calib_stats.save_statistics(stats, f"{out}.stats.pt", with_gram=False)
        imatrix_file.write_model_imatrix(model, stats, f"{out}.imatrix.gguf", [data_utils.describe_source(source)],
                                         args.seq_len)

        t, c = time.perf_counter(), time.process_time()
        analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout_ids, cache_dir=args.cache_dir,
                                                        device=args.device, kld_types=kld_types,
                                                        max_memory=max_memory)
        print(f"placement: {placement.describe_device_map(analyzer.device_map)}")
        table = analyzer.run()
        phase_done("sensitivity", t, c)
        table.meta["seconds"] = seconds
        table.meta["cpu_seconds"] = cpu_seconds
        table.save(f"{out}.sensitivity.pt", f"{out}.sensitivity.json")
        sensitivity_table.plot_heatmap(table, f"{out}.sensitivity.png")

        if args.additivity:
            t, c = time.perf_counter(), time.process_time()
            other_ids = None
            if args.additivity_file:
                other_ids = data_utils.get_eval_dataset(args.additivity_file, tokenizer, args.seq_len, 8)
            report = {
                "spread": kld.additivity_report(
                    analyzer, table, kld.random_assignments(table, args.additivity, args.seed),
                    ids=other_ids),
                "same_level": kld.additivity_report(
                    analyzer, table, kld.random_assignments(table, args.additivity, args.seed + 1, level=0.5),
                    ids=other_ids)}
            phase_done("additivity", t, c)
            files.write_json(f"{out}.additivity.json", report)

    computed = table.entries
    print(f"{len(analyzer.tensors)} tensors, {len(table.entries)} (tensor, type) pairs, "
          f"{analyzer.n_computed} computed this run; KLD on {holdout_ids.numel()} held-out tokens "
          f"for {kld_types}")
    print(f"per pair: {sum(e.seconds for e in computed) / max(len(computed), 1):.2f} s mean")
    print(f"{'phase':>12}  {'wall s':>8}  {'cpu s':>8}   (load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    for phase in seconds:
        print(f"{phase:>12}  {seconds[phase]:8.1f}  {cpu_seconds[phase]:8.1f}")
    core = [k for k in seconds if k != "additivity"]
    print(f"{'total':>12}  {sum(seconds[k] for k in core):8.1f}  {sum(cpu_seconds[k] for k in core):8.1f}"
          f"   (load + statistics + sensitivity)")
    if args.additivity:
        for group, r in report.items():
            print(f"additivity, {args.additivity} random mixed assignments ({group}): "
                  f"Spearman {r['spearman']:.3f}")
            for p, m, s in sorted(zip(r["predicted"], r["measured"], r["size_bytes"])):
                print(f"  {s / 1e6:8.2f} MB  predicted {p:.4f}  measured {m:.4f}")


if __name__ == "__main__":
    main()

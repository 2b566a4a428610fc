"""Search a per-tensor GGUF type assignment under an exact file-size budget (genetic algorithm).

Pipeline: load the model and calibration text, collect activation statistics block by block (cached), measure
every tensor's sensitivity to every candidate type with ggml's own quantizers and GPTQ error feedback (cached,
resumable), then run the genetic algorithm on that table with the end-to-end KLD of the fake-quantized model as
the final judge, and save the config (and the chosen tensors' GPTQ bytes) that export_gguf_official.py turns
into a GGUF. The size the search promises is the size of the file the exporter writes, to the byte.

    python mixed_precision_ptq.py --model_id models/smollm2-135m-instruct \
        --calib_file ../shared/data/wikitext-2/wiki.valid.tokens --target_preset Q4_K_M
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: torch's threads and ggml's quantizer threads take turns on the same cores, and
# OpenMP's default spinning after each parallel region keeps a core from ggml (the search ran 14% longer on
# 2 cores). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from tqdm.auto import tqdm

import calib_stats
import data_utils
import decode_speed
import genetic_optim as go
import gguf_plan
import gptq
import quant_utils
import smoothing
from export_gguf_official import (ExportError, resolve_model_dir, save_config, source_fingerprint,
                                  write_quantized_tensors)

# llama.cpp presets offered to the GA as seeds and used as the uniform baseline at the budget.
SEED_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_id", default="Qwen/Qwen2.5-7B-Instruct", help="HF model id or local directory")
    p.add_argument("--output", default="mixed_precision_config.pt", help="config path (.json twin beside it)")
    p.add_argument("--ga_pop", type=int, default=20, help="GA population size")
    p.add_argument("--ga_gen", type=int, default=12, help="GA generations")
    p.add_argument("--ga_measure", type=int, default=1, help="individuals whose KLD is measured per generation")
    budget = p.add_argument_group("size budget (one of them; default --target_compression 0.25)")
    exclusive = budget.add_mutually_exclusive_group()
    exclusive.add_argument("--target_compression", type=float, default=None,
                           help="file size as a fraction of the F16 GGUF's (default 0.25)")
    exclusive.add_argument("--target_bpw", type=float, default=None,
                           help="bits per weight of the tensor data (llama.cpp's BPW)")
    exclusive.add_argument("--target_size", default=None, help="GGUF file size: bytes, or e.g. 4.36GiB, 100MB")
    exclusive.add_argument("--target_preset", default=None,
                           help="the file size of this llama.cpp preset (with imatrix) of the same model")
    p.add_argument("--types", default=None,
                   help="candidate types, comma list: each tensor may take those that fit its rows (default: "
                        "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0; Q4_0,IQ4_NL,Q4_1,Q5_0,Q5_1,Q8_0 where K types do not fit)")
    calib_stats.add_data_args(p)
    p.add_argument("--kld_samples", type=int, default=4, help="held-out windows for single-tensor KLDs")
    p.add_argument("--kld_seq_len", type=int, default=128, help="tokens per held-out window (sensitivity)")
    p.add_argument("--measure_samples", type=int, default=8,
                   help="held-out windows of --seq_len tokens for the GA's measured KLD")
    p.add_argument("--gram_samples", type=int, default=128,
                   help="calibration windows summed into the Grams (GPTQ's Hessian, the output errors)")
    p.add_argument("--gram_max_dim", type=int, default=8192,
                   help="no Gram for inputs wider than this (their output error goes through the imatrix)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward call")
    p.add_argument("--quantizer", default="gptq", choices=go.QUANTIZERS,
                   help="gptq: ggml's quantizer with GPTQ error feedback over block columns (tensors with a Gram; "
                        "their bytes ship in <output>.tensors.gguf); ggml: ggml's imatrix quantization alone")
    p.add_argument("--smooth", default="off", type=smooth_mode,
                   help="SmoothQuant-style exact rescaling before quantization: off, auto (strength searched per "
                        "block, kept only where it lowers the output error) or a fixed strength in (0, 1)")
    p.add_argument("--max_slowdown", type=float, default=None,
                   help="predicted decode time at most this times the uniform preset's of the same size (e.g. 1.0; "
                        "measures a per-type decode cost table on this machine's llama.cpp backend, cached)")
    p.add_argument("--decode_costs", default=None,
                   help="decode cost table (JSON from decode_speed.py) to use instead of measuring one here, "
                        "e.g. one measured on the machine that will run the model")
    p.add_argument("--max_memory", default=None, help=calib_stats.MAX_MEMORY_HELP)
    p.add_argument("--cache_dir", default="models/cache", help="statistics and sensitivity cache (resumable)")
    return p.parse_args(argv)


def smooth_mode(text: str) -> str:
    """off | auto | a strength strictly between 0 and 1."""
    if text in ("off", "auto"):
        return text
    try:
        alpha = float(text)
    except ValueError:
        alpha = -1.0
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"--smooth takes off, auto or a number in (0, 1), not {text!r}")
    return str(alpha)


def parse_size(text: str) -> int:
    """'4.36GiB' / '100MB' / '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}: use bytes or a number with B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def budget_bytes(args, info: gguf_plan.ModelInfo) -> tuple[int, str]:
    """The file-size budget in bytes and how it was asked for (exactly one option wins)."""
    if args.target_size is not None:
        return parse_size(args.target_size), f"--target_size {args.target_size}"
    if args.target_preset is not None:
        types = gguf_plan.preset_types(info, args.target_preset, imatrix_available=True)
        return gguf_plan.gguf_file_size(info, types), f"size of {args.target_preset.upper()} (imatrix)"
    if args.target_bpw is not None:
        return int(args.target_bpw * info.n_params / 8) + metadata_bytes(info), f"--target_bpw {args.target_bpw}"
    fraction = 0.25 if args.target_compression is None else args.target_compression
    f16 = gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, "F16"))
    return int(fraction * f16), f"--target_compression {fraction} of F16 ({f16:,} bytes)"


def metadata_bytes(info: gguf_plan.ModelInfo) -> int:
    """File bytes that are not tensor data (header, metadata, tensor infos, padding)."""
    f32 = gguf_plan.preset_types(info, "F32")
    return gguf_plan.gguf_file_size(info, f32) - 4 * info.n_params


def bits_per_weight(info: gguf_plan.ModelInfo, file_size: int) -> float:
    """llama.cpp's BPW: tensor-data bits over parameters."""
    return 8 * (file_size - metadata_bytes(info)) / info.n_params


def build_problem(info, table: go.SensitivityTable, allowed_types,
                  costs: decode_speed.DecodeCosts | None = None) -> go.AllocationProblem:
    """The allocation table: each tensor's menu, exact file bytes per type and predicted damage (weight
    error plus input rounding, `genetic_optim.entry_damage`); with `costs`, predicted decode seconds too."""
    shapes = gguf_plan.quantizable_tensors(info)
    if set(table.tensors()) != set(shapes):
        missing = sorted(set(shapes) ^ set(table.tensors()))[:3]
        raise ValueError(f"sensitivity table and model disagree on the quantizable tensors (e.g. {missing})")
    by_tensor: dict[str, list[dict]] = {}
    for e in table.entries:
        if e.get("kld_pred") is not None and (allowed_types is None or e["type"] in allowed_types):
            by_tensor.setdefault(e["tensor"], []).append(e)
    names, menus, sizes, damages, blocks = [], [], [], [], []
    for name in table.tensors():
        entries = by_tensor.get(name)
        if not entries:
            raise ValueError(f"no candidate type for {name} (rows of {shapes[name][1]}) in --types")
        names.append(name)
        menus.append([e["type"] for e in entries])
        sizes.append([gguf_plan.gguf_tensor_bytes(info, name, e["type"]) for e in entries])
        damages.append([go.entry_damage(e) for e in entries])
        blocks.append(-1 if entries[0]["block"] is None else entries[0]["block"])
    decode_s = base_s = None
    if costs is not None:
        per_tensor = decode_speed.tensor_decode_s(info, costs)
        decode_s = [{t: per_tensor[name](t) for t in menu} for name, menu in zip(names, menus)]
        base_s = costs.all_reference_s(info.n_layers)
    return go.AllocationProblem.build(names, menus, sizes, damages, gguf_plan.gguf_fixed_bytes(info), blocks,
                                      decode_s, base_s or 0.0)


def decode_costs_for(args, model_dir: Path, info, menus: dict[str, list[str]]) -> decode_speed.DecodeCosts | None:
    """The decode cost table when --max_slowdown asks for one: from --decode_costs, else measured here (cached)
    for every type of the menus and of the presets."""
    if args.max_slowdown is None:
        return None
    if args.decode_costs:
        return decode_speed.DecodeCosts.from_dict(json.loads(Path(args.decode_costs).read_text()))
    types = {t for menu in menus.values() for t in menu}
    for name in SEED_PRESETS:
        types |= set(gguf_plan.preset_types(info, name, imatrix_available=True).values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return decode_speed.cached_decode_costs(model_dir, sorted(types), Path(args.cache_dir), device=device)


def check_feasible(problem: go.AllocationProblem, info, budget: int) -> None:
    low, high = problem.feasible_range()
    if not low <= budget:
        raise ValueError(f"budget {budget:,} bytes is infeasible: the feasible range with these types is "
                         f"{low:,} .. {high:,} bytes ({bits_per_weight(info, low):.3f} .. "
                         f"{bits_per_weight(info, high):.3f} bpw)")
    if budget > high:
        raise ValueError(f"budget {budget:,} bytes is above the largest assignment ({high:,} bytes, "
                         f"{bits_per_weight(info, high):.3f} bpw): nothing to search; raise --types or use F16")


def preset_seeds(info, problem: go.AllocationProblem, budget: int) -> dict[str, dict]:
    """llama.cpp presets whose real file fits the budget: {name: {types, size_bytes}}."""
    out = {}
    for name in SEED_PRESETS:
        types = gguf_plan.preset_types(info, name, imatrix_available=True)
        size = gguf_plan.gguf_file_size(info, types)
        if size <= budget:
            out[name] = {"types": types, "size_bytes": size}
    return out


def convergence_plot(history: list[dict], path: Path) -> None:
    """Best and mean fitness per generation, and the best measured KLD."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(gens, [h["best_fitness"] for h in history], "o-", label="best fitness")
    ax.plot(gens, [h["mean_fitness"] for h in history], "s--", label="mean fitness")
    ax.plot(gens, [h["best_measured_kld"] for h in history], "^-", label="best measured KLD")
    ax.set_xlabel("generation")
    ax.set_ylabel("KLD (measured, or proxy rescaled)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def smoothing_summary(smooth: smoothing.Smoothing, records: list[dict]) -> dict:
    """The JSON twin's view of the smoothing: mode, strength per group, and per type the geometric-mean ratio
    of output error smoothed / unscaled over the groups searched (< 1: it helps that type)."""
    return {"mode": smooth.mode, "alpha": smooth.alpha, "groups_rescaled": len(smooth.alpha),
            "error_ratio_by_type": smoothing.type_gains(records)}


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def print_summary(rows: list[dict], final_types: dict[str, str]) -> None:
    """Closing table: each allocator's size, bpw, predicted and measured KLD; the final type counts."""
    timed = any(r.get("decode_tok_s_predicted") for r in rows)
    print(f"\n{'allocation':<22} {'size_bytes':>14} {'bpw':>7} {'predicted':>10} {'measured KLD':>13}"
          + (f" {'decode tok/s (pred.)':>21}" if timed else ""))
    for r in rows:
        measured = "-" if r["kld_measured"] is None else f"{r['kld_measured']:.5f}"
        predicted = "-" if r["kld_predicted"] is None else f"{r['kld_predicted']:.5f}"
        print(f"{r['name']:<22} {r['size_bytes']:>14,} {r['bpw']:>7.3f} {predicted:>10} "
              f"{measured:>13}" + (f" {r['decode_tok_s_predicted']:>21.1f}" if timed else ""))
    counts: dict[str, int] = {}
    for t in final_types.values():
        counts[t] = counts.get(t, 0) + 1
    print("types chosen: " + ", ".join(f"{t} x{n}" for t, n in
                                      sorted(counts.items(), key=lambda kv: quant_utils.get_type(kv[0]).bits_per_weight)))


def main(argv=None) -> None:
    args = parse_args(argv)
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    torch.set_grad_enabled(False)
    seconds = {}
    try:
        t0 = time.perf_counter()
        model_dir, model_name = resolve_model_dir(args.model_id)
        info = gguf_plan.load_model_info(model_dir, model_name)
        budget, budget_source = budget_bytes(args, info)
        allowed = None if args.types is None else [quant_utils.get_type(t).name for t in args.types.split(",")]
        max_memory = calib_stats.parse_max_memory(args.max_memory) if args.max_memory else None
        model, tokenizer = calib_stats.load_model_and_tokenizer(str(model_dir))
        device = calib_stats.resolve_device(args.device)
        if device.type == "cpu" or args.smooth != "off":
            model = model.float()        # smoothing rescales weights in place: in bf16 that would round them
        source = args.calib_file or args.calib_dataset
        n_total = args.n_samples + args.kld_samples + args.measure_samples
        ids = data_utils.get_calib_dataset(source, tokenizer, n_total, args.seq_len, args.seed,
                                           chat=args.calib_chat)
        calib_ids = ids[:args.n_samples]
        holdout_ids = ids[args.n_samples:args.n_samples + args.kld_samples, :args.kld_seq_len]
        measure_ids = ids[args.n_samples + args.kld_samples:]
        seconds["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        menu_args = {"k_menu": allowed, "block32_menu": allowed} if allowed else {}
        menus = {spec.name: spec.types for spec in go.quantizable_tensors(model, **menu_args)}
        costs = decode_costs_for(args, model_dir, info, menus)
        seconds["decode_costs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = calib_stats.cached_statistics(model, calib_ids, args.device, args.batch_size, args.gram_samples,
                                              args.cache_dir, args.gram_max_dim)
        stats.meta["source"] = data_utils.describe_source(source)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        imatrix_path = out.with_suffix(".imatrix.gguf")
        arch = calib_stats.GGUF_ARCH_OF_MODEL_TYPE.get(model.config.model_type, "llama")
        calib_stats.write_imatrix_gguf(stats, calib_stats.imatrix_entries(model, stats), imatrix_path,
                                       [stats.meta["source"]], args.seq_len, arch)
        seconds["statistics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        fingerprints = {name: source_fingerprint(model.get_parameter(name)) for name in menus}   # as exported
        smooth, smooth_records = smoothing.search_smoothing(model, stats, menus, args.smooth)
        smoothing.apply_to_model(model, smooth)
        smoothing.apply_to_statistics(stats, smooth)
        seconds["smoothing"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        analyzer = go.LayerSensitivityAnalyzer(model, stats, holdout_ids, cache_dir=Path(args.cache_dir) /
                                               "sensitivity", device=args.device, **menu_args,
                                               max_memory=max_memory, eval_tokens=measure_ids.numel(),
                                               quantizer=args.quantizer)
        print(f"placement: {calib_stats.describe_device_map(analyzer.device_map)}")
        table = analyzer.run()
        table.save(out.with_suffix(".sensitivity"))
        go.plot_heatmap(table, out.with_suffix(".sensitivity.png"))
        seconds["sensitivity"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        problem = build_problem(info, table, allowed, costs)
        check_feasible(problem, info, budget)
        presets = preset_seeds(info, problem, budget)
        best_preset = max(presets, key=lambda n: presets[n]["size_bytes"]) if presets else None
        time_limit_s = None
        if costs is not None:
            if best_preset is None:
                raise ValueError("--max_slowdown needs a llama.cpp preset that fits the budget to compare with")
            time_limit_s = args.max_slowdown * decode_speed.predicted_decode_s(info, costs,
                                                                               presets[best_preset]["types"])
        evaluator = go.AssignmentEvaluator(analyzer, measure_ids, args.batch_size)
        bar = tqdm(total=args.ga_gen, desc="GA", unit="gen")

        def progress(generation, stats_row):
            bar.set_postfix_str(f"best KLD {stats_row['best_measured_kld']:.5f}", refresh=False)
            bar.update()

        ga = go.MixedPrecisionGA(problem, budget, pop_size=args.ga_pop, generations=args.ga_gen,
                                 measure_fn=evaluator.kld_mean, measures_per_generation=args.ga_measure,
                                 seed=args.seed, seed_genomes=[problem.genome_of(p["types"])
                                                               for p in presets.values()],
                                 time_limit_s=time_limit_s)
        result = ga.optimize(progress)
        bar.close()
        greedy = go.greedy_allocation(problem, budget, time_limit_s)
        tok_s = lambda types: None if costs is None else 1.0 / decode_speed.predicted_decode_s(info, costs, types)
        rows = []
        if best_preset:
            p = presets[best_preset]
            preset_row = {"size_bytes": p["size_bytes"], "bpw": bits_per_weight(info, p["size_bytes"]),
                          "kld_predicted": problem.predicted_damage(problem.genome_of(p["types"])),
                          "decode_tok_s_predicted": tok_s(p["types"])}
            if args.quantizer != "ggml":     # llama.cpp's own recipe as llama-quantize makes it, then with ours
                rows.append({"name": f"preset {best_preset} ggml", **preset_row, "kld_predicted": None,
                             "kld_measured": evaluator.kld_mean(p["types"], plain=True)})
                analyzer.plain_quantized.clear()
            rows.append({"name": f"preset {best_preset} {args.quantizer}", **preset_row,
                         "kld_measured": evaluator.kld_mean(p["types"])})
        for name, genome, kld in (("greedy", greedy, evaluator.kld_mean(problem.types_of(greedy))),
                                  ("genetic algorithm", result.genome, result.measured_kld)):
            size = problem.file_size_bytes(genome)
            rows.append({"name": name, "size_bytes": size, "bpw": bits_per_weight(info, size),
                         "kld_predicted": problem.predicted_damage(genome), "kld_measured": kld,
                         "decode_tok_s_predicted": tok_s(problem.types_of(genome))})
        seconds["search"] = time.perf_counter() - t0

        final_types = problem.types_of(result.genome)
        final_size = gguf_plan.gguf_file_size(info, final_types)
        assert final_size == problem.file_size_bytes(result.genome) <= budget
        damage = {n: float(problem.damage[i, result.genome[i]]) for i, n in enumerate(problem.tensor_names)}
        record = {
            "model_id": args.model_id, "model_name": info.name,
            "budget": {"size_bytes": budget, "asked_as": budget_source},
            "achieved": {"size_bytes": final_size, "bits_per_weight": bits_per_weight(info, final_size)},
            "kld_measured": result.measured_kld, "kld_predicted": result.predicted_damage,
            "measured_on": {"windows": int(measure_ids.shape[0]), "seq_len": int(measure_ids.shape[1]),
                            "tokens": int(measure_ids.numel())},
            "baseline_preset": best_preset, "comparison": rows,
            "tensor_damage_predicted": damage,
            "calibration": {"source": stats.meta["source"], "n_samples": args.n_samples,
                            "seq_len": args.seq_len, "seed": args.seed, "chat": bool(args.calib_chat)},
            "smoothing": smooth.to_dict(),
            "decode_speed": None if costs is None else {
                "max_slowdown": args.max_slowdown, "time_limit_s": time_limit_s, "costs": costs.to_dict()},
            "ga": {"pop": args.ga_pop, "generations": args.ga_gen, "seed": args.seed, "history": result.history},
            "seconds": seconds,
        }
        imatrix = {spec.name: vec for spec in analyzer.tensors
                   if (vec := analyzer.imatrix_of(spec)) is not None}
        shipped = {spec.name: (final_types[spec.name], analyzer.quantized_bytes(spec, final_types[spec.name]))
                   for spec in analyzer.tensors if analyzer.feedback_of(spec, final_types[spec.name]) is not None}
        tensors_path = out.with_suffix(".tensors.gguf")
        if shipped:
            write_quantized_tensors(tensors_path, info, shipped)
            record["quantized_tensors"] = {"path": tensors_path.name,
                                           "fingerprints": {name: fingerprints[name] for name in shipped}}
        elif tensors_path.exists():
            tensors_path.unlink()                   # a previous run's, which this config does not use
        record["quantizer"] = args.quantizer
        if args.quantizer == "gptq":
            record["refine_sweeps"] = gptq.REFINE_SWEEPS      # the shipped bytes' sweeps (the table's: none)
        save_config(out, info, final_types, imatrix=imatrix, imatrix_path=str(imatrix_path), extra=record)
        write_json({**record, "smoothing": smoothing_summary(smooth, smooth_records), "tensor_types": final_types,
                    "imatrix_path": str(imatrix_path)}, out.with_suffix(".json"))
        convergence_plot(result.history, out.with_suffix(".convergence.png"))
    except (ExportError, data_utils.DataSourceError, ValueError, RuntimeError, OSError) as err:
        sys.exit(f"error: {err}")

    print_summary(rows, final_types)
    print(f"budget {budget:,} bytes ({budget_source}); config {out} (+ .json, .convergence.png, "
          f".sensitivity.*, {imatrix_path.name}" + (f", {tensors_path.name}: {len(shipped)} GPTQ tensors)"
                                                     if shipped else ")"))
    if args.smooth != "off":
        gains = smoothing.type_gains(smooth_records)
        print(f"smoothing ({args.smooth}): {len(smooth.alpha)} of {len(smoothing.smooth_groups(model))} input "
              "groups rescaled; output error smoothed/unscaled by type: "
              + ", ".join(f"{t} {g:.3f}" for t, g in gains.items()))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()

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

import os

# Before torch loads OpenMP: torch's threads and ggml's quantizer threads take turns on the same cores, and
# OpenMP's default spinning after each parallel region keeps a core from ggml (the search ran 14% longer on 2
# cores). Set for this run only, when the environment does not say: not for an importer, and not for the
# llama.cpp processes the run starts (their decode is 3x slower with passive OpenMP threads on 2 cores).
PASSIVE_OPENMP = __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ
if PASSIVE_OPENMP:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if PASSIVE_OPENMP:
    del os.environ["OMP_WAIT_POLICY"]        # read when torch loaded OpenMP; child processes get the default

from tqdm.auto import tqdm

import architectures
import calib_stats
import cli
import config_file
import data_utils
import files
import genetic_optim
import gguf_export
import gguf_plan
import gptq
import imatrix_file
import kld
import llama_recipe
import placement
import quant_utils
import quantized_weights
import self_calibration
import sensitivity
import sensitivity_table
import smoothing
import speed_costs
from cli import UserError
from model_blocks import load_model_and_tokenizer, model_content_hash, resolve_device

# llama.cpp presets offered to the GA as seeds and used as the uniform baseline at the budget.
SEED_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# Below this preset's file size the K menu takes the i-quants and the 32-block types too
# (quantized_weights.LOW_BIT_K_MENU). Above it they gained nothing measurable on the demo model (docs/RESULTS.md),
# and the i-quants are slow to quantize (IQ2_S about 0.5 M weights/s a thread, 16x slower than Q4_K).
LOW_BIT_BELOW = "Q3_K_M"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(__doc__.split("\n\n")[0])
    p.add_argument("--model_id", default="Qwen/Qwen2.5-7B-Instruct", help="HF model id or local directory")
    p.add_argument("--output", default="mixed_precision_config.pt", type=cli.output_file(".pt"),
                   help="config path (.pt); its .json twin and the other outputs go beside it")
    p.add_argument("--ga_pop", type=cli.at_least(3), default=20, help="GA population size")
    p.add_argument("--ga_gen", type=cli.at_least(1), default=12, help="GA generations")
    p.add_argument("--ga_measure", type=cli.at_least(1), default=1,
                   help="individuals whose KLD is measured per generation")
    budget = p.add_argument_group("size budget (one of them; default --target_compression 0.25)")
    exclusive = budget.add_mutually_exclusive_group()
    exclusive.add_argument("--target_compression", type=cli.positive_number, default=None,
                           help="file size as a fraction of the F16 GGUF's (default 0.25)")
    exclusive.add_argument("--target_bpw", type=cli.positive_number, default=None,
                           help="bits per weight of the tensor data (llama.cpp's BPW)")
    exclusive.add_argument("--target_size", type=size_argument, default=None,
                           help="GGUF file size: bytes, or e.g. 4.36GiB, 100MB")
    exclusive.add_argument("--target_preset", type=str.upper, choices=list(gguf_plan.PRESETS), default=None,
                           metavar="PRESET", help="the file size of this llama.cpp preset (with imatrix) of the "
                                                  "same model, e.g. Q4_K_M")
    p.add_argument("--types", type=type_list, default=None,
                   help="candidate types, comma list: each tensor may take those that fit its rows (default: "
                        "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0; Q4_0,IQ4_NL,Q4_1,Q5_0,Q5_1,Q8_0 where K types do not fit; "
                        f"below {LOW_BIT_BELOW}'s size also IQ1_S..IQ4_XS and the 32-block types where they fit)")
    data_utils.add_calib_args(p)
    p.add_argument("--kld_samples", type=cli.at_least(1), default=4, help="held-out windows for single-tensor KLDs")
    p.add_argument("--kld_seq_len", type=cli.at_least(2), default=128,
                   help="tokens per held-out window (sensitivity)")
    p.add_argument("--measure_samples", type=cli.at_least(1), default=8,
                   help="held-out windows of --seq_len tokens for the GA's measured KLD")
    p.add_argument("--gram_samples", type=cli.at_least(1), default=128,
                   help="calibration windows summed into the Grams (GPTQ's Hessian, the output errors)")
    p.add_argument("--gram_max_dim", type=cli.at_least(1), default=8192,
                   help="no Gram for inputs wider than this (their output error goes through the imatrix)")
    p.add_argument("--batch_size", type=cli.at_least(1), default=8, help="windows per forward call")
    p.add_argument("--quantizer", default="gptq", choices=quantized_weights.QUANTIZERS,
                   help="gptq: ggml's quantizer with GPTQ error feedback over block columns (tensors with a Gram; "
                        "their bytes ship in <output>.tensors.gguf); ggml: ggml's imatrix quantization alone")
    p.add_argument("--smooth", default="auto", type=smooth_mode,
                   help="SmoothQuant-style exact rescaling before quantization: auto (strength searched per "
                        "block, kept only where it lowers the output error), off, or a fixed strength in (0, 1)")
    p.add_argument("--max_slowdown", type=slowdown, default=1.0,
                   help="prompt processing and decode each predicted at most this times slower than the uniform "
                        "llama.cpp preset of the budget (1: no slower; 0.97: 3%% faster), on this machine's "
                        "llama.cpp (a cost table measured here and cached) or of --speed_costs; off: no limit")
    p.add_argument("--speed_costs", default=None,
                   help="speed cost table (JSON, speed_costs.py) to use instead of measuring one here, e.g. one "
                        "measured on the machine that will run the model")
    p.add_argument("--max_memory", type=max_memory_argument, default=None, help=placement.MAX_MEMORY_HELP)
    p.add_argument("--cache_dir", default="models/cache", help="statistics and sensitivity cache (resumable)")
    return p.parse_args(argv)


def max_memory_argument(text: str) -> dict[str, int]:
    """--max_memory parsed (placement.parse_max_memory)."""
    try:
        return placement.parse_max_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def type_list(text: str) -> list[str]:
    """--types: known GGUF type names, comma-separated."""
    try:
        return [quant_utils.get_type(t.strip()).name for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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



def slowdown(text: str) -> float | None:
    """off | a positive factor (--max_slowdown)."""
    if text == "off":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not 0 < factor < float("inf"):
        raise argparse.ArgumentTypeError(f"--max_slowdown takes off or a positive number, not {text!r}")
    return factor


def parse_size(text: str) -> int:
    """'4.36GiB' / '100MB' / '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}: use bytes or a number with B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


size_argument = cli.accepted_by(parse_size, (ValueError,))     # --target_size as given, once it reads as a size


def budget_bytes(args, info: architectures.ModelInfo) -> tuple[int, str]:
    """The file-size budget in bytes and how it was asked for (exactly one option wins)."""
    if args.target_size is not None:
        return parse_size(args.target_size), f"--target_size {args.target_size}"
    if args.target_preset is not None:
        types = gguf_plan.preset_types(info, args.target_preset, imatrix_available=True)
        return gguf_plan.gguf_file_size(info, types), f"size of {args.target_preset} (imatrix)"
    if args.target_bpw is not None:
        size = int(args.target_bpw * info.n_params / 8) + gguf_plan.metadata_bytes(info)
        return size, f"--target_bpw {args.target_bpw}"
    fraction = 0.25 if args.target_compression is None else args.target_compression
    f16 = gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, "F16"))
    return int(fraction * f16), f"--target_compression {fraction} of F16 ({f16:,} bytes)"


# ---------------------------------------------------------------------------------------------------------
# The stages, in the order main runs them
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SearchInputs:
    """What every stage reads: the checkpoint, the budget, the menus and the token windows."""
    model_dir: Path
    info: architectures.ModelInfo
    model: torch.nn.Module
    budget_bytes: int
    budget_source: str
    allowed_types: list[str] | None      # --types, or None for the default menus
    menu_args: dict                      # the menus' arguments (`menu_args`)
    menus: dict[str, tuple[str, ...]]    # tensor -> candidate types
    calib_source: str
    calib_ids: torch.Tensor              # statistics windows
    holdout_ids: torch.Tensor            # single-tensor KLD windows (sensitivity)
    measure_ids: torch.Tensor            # the GA's measured-KLD windows
    model_hash: str                      # model_content_hash of the model as loaded (cache keys)
    presets: dict[str, dict]             # llama.cpp presets that fit the budget: {name: {types, size_bytes}}

    @property
    def baseline_preset(self) -> str | None:
        """The uniform preset of the budget: the largest that fits (None below the smallest)."""
        return max(self.presets, key=lambda n: self.presets[n]["size_bytes"]) if self.presets else None


def menu_args(allowed_types: list[str] | None, info: architectures.ModelInfo, budget: int) -> dict:
    """The candidate menus' arguments: --types for every row; else the default K and 32-block menus, the K menu
    widened by the i-quants (`quantized_weights.LOW_BIT_K_MENU`) for a budget below LOW_BIT_BELOW's size."""
    if allowed_types:
        return {"k_menu": allowed_types, "block32_menu": allowed_types}
    low_bit_line = gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, LOW_BIT_BELOW, imatrix_available=True))
    return {"k_menu": quantized_weights.LOW_BIT_K_MENU} if budget < low_bit_line else {}


def load_inputs(args) -> SearchInputs:
    """The checkpoint (float32 on the CPU, or where smoothing needs exact rescaling), its budget and menus, and
    the calibration, held-out and measurement windows, drawn disjointly from one source. The budget is checked
    against what the menus can reach before anything is loaded."""
    model_dir, model_name = files.resolve_model_dir(args.model_id)
    info = architectures.load_model_info(model_dir, model_name)
    budget, budget_source = budget_bytes(args, info)
    menu = menu_args(args.types, info, budget)
    menus = quantized_weights.tensor_menus(info, **menu)
    check_budget(info, budget, menus)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    check_finite(model, menus, model_dir)
    if resolve_device(args.device).type == "cpu" or args.smooth != "off":
        model = model.float()        # smoothing rescales weights in place: in bf16 that would round them
    model_hash = model_content_hash(model)    # here, while the model is in CPU RAM
    sources = ([(args.calib_file, 1.0)] if args.calib_file else data_utils.parse_calib_sources(args.calib_dataset))
    windows = data_utils.draw_windows(
        sources, tokenizer, {"calib": args.n_samples, "kld": args.kld_samples, "measure": args.measure_samples},
        args.seq_len, args.seed, chat=args.calib_chat,
        self_documents=lambda role, n_tokens: self_calibration.self_documents(
            info, tokenizer, role, n_tokens, args.seed, Path(args.cache_dir)))
    return SearchInputs(
        model_dir, info, model, budget, budget_source, args.types, menu, menus, data_utils.describe_sources(sources),
        calib_ids=windows["calib"], holdout_ids=windows["kld"][:, :args.kld_seq_len],
        measure_ids=windows["measure"], model_hash=model_hash, presets=preset_seeds(info, budget))


def check_budget(info: architectures.ModelInfo, budget: int, menus: dict[str, tuple[str, ...]]) -> None:
    """Refuse a budget the menus cannot meet, from the tensors' shapes alone (before any work), with the range
    they can."""
    empty = [name for name, menu in menus.items() if not menu]
    if empty:
        rows = architectures.quantizable_tensors(info)[empty[0]][1]
        raise UserError(f"no type of --types fits {empty[0]} (rows of {rows}; K and IQ types need rows of a "
                        "multiple of 256, the others of 32; the token embedding takes none that needs an imatrix): "
                        "add a 32-block type such as Q8_0")
    low, high = gguf_plan.size_range(info, menus)
    if not low <= budget <= high:
        where = "below the smallest" if budget < low else "above the largest"
        raise UserError(f"budget {budget:,} bytes is {where} file these types make: the feasible range is "
                        f"{low:,} .. {high:,} bytes ({gguf_plan.bits_per_weight(info, low):.3f} .. "
                        f"{gguf_plan.bits_per_weight(info, high):.3f} bpw); choose a budget in it or change --types")


def check_finite(model: torch.nn.Module, names, model_dir: Path) -> None:
    """Every weight to quantize holds finite values (a NaN would make every statistic NaN, far from here)."""
    for name in names:
        param = model.get_parameter(name)
        if not torch.isfinite(param).all():
            raise UserError(f"{name} in {model_dir} holds NaN or Inf values; this checkpoint cannot be quantized")


def speed_costs_for(args, run: SearchInputs) -> speed_costs.SpeedCosts | None:
    """The speed cost table the search keeps to (--max_slowdown): from --speed_costs, else measured on this
    machine's llama.cpp for the menus' types and the baseline preset's (cached). None when there is no limit,
    or no preset fits the budget to compare with."""
    if args.max_slowdown is None:
        return None
    if run.baseline_preset is None:
        print("note: no llama.cpp preset fits the budget, so there is no preset speed to keep to: "
              "searching without a speed limit")
        return None
    head = speed_costs.head_name(run.info)
    baseline = run.presets[run.baseline_preset]["types"]
    types = {t for name, menu in run.menus.items() if name != head for t in menu}
    types |= {t for name, t in baseline.items() if name != head}
    head_types = set(run.menus[head]) | {baseline[head]}
    if args.speed_costs:
        costs = speed_costs.SpeedCosts.load(args.speed_costs)
        missing = sorted(set(types) - set(costs.modes["tg"].delta_s_per_weight))
        missing += [f"{t} (head)" for t in sorted(head_types - set(costs.modes["tg"].head_delta_s_per_weight))]
        if missing:
            raise UserError(f"the speed cost table {args.speed_costs} has no {', '.join(missing)}, which this "
                            "search's menus or its baseline preset use; measure one with these types")
        return costs
    device = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"
    return speed_costs.cached_costs(run.model_dir, sorted(types), sorted(head_types), Path(args.cache_dir),
                                    device=device)


def place_model(args, run: SearchInputs) -> None:
    """The model moved once to where every later stage runs it: whole on the --device GPU when it fits beside
    the analysis' working memory, else spread within --max_memory (the rest streamed from CPU RAM)."""
    device_map = sensitivity.place_for_analysis(run.model, args.device, run.holdout_ids, args.max_memory,
                                                run.measure_ids.numel())
    print(f"placement: {placement.describe_device_map(device_map)}")


def collect_statistics(args, run: SearchInputs) -> calib_stats.CalibStats:
    """Activation statistics (imatrix sums, Grams) of the calibration windows, cached."""
    stats = calib_stats.cached_statistics(run.model, run.calib_ids, args.device, args.batch_size,
                                          args.gram_samples, args.cache_dir, args.gram_max_dim, run.model_hash)
    stats.meta["source"] = run.calib_source
    return stats


def smooth_model(args, run: SearchInputs, stats: calib_stats.CalibStats
                 ) -> tuple[smoothing.Smoothing, list[dict]]:
    """The smoothing transform (--smooth), applied to the model and its statistics alike."""
    smooth, records = smoothing.search_smoothing(run.model, stats, run.menus, args.smooth,
                                                 device=resolve_device(args.device))
    smoothing.apply_to_model(run.model, smooth)
    smoothing.apply_to_statistics(stats, smooth)
    return smooth, records


def measure_sensitivity(args, run: SearchInputs, stats: calib_stats.CalibStats
                        ) -> tuple[sensitivity.LayerSensitivityAnalyzer, sensitivity_table.SensitivityTable]:
    """Every tensor's sensitivity to every type of its menu (cached per tensor and type, resumable)."""
    analyzer = sensitivity.LayerSensitivityAnalyzer(
        run.model, stats, run.holdout_ids, cache_dir=Path(args.cache_dir) / "sensitivity", device=args.device,
        max_memory=args.max_memory, eval_tokens=run.measure_ids.numel(), quantizer=args.quantizer, **run.menu_args)
    return analyzer, analyzer.run()


def build_problem(info, table: sensitivity_table.SensitivityTable, allowed_types,
                  costs: speed_costs.SpeedCosts | None = None) -> genetic_optim.AllocationProblem:
    """The allocation table: each tensor's menu, exact file bytes per type and predicted damage (weight
    error plus input rounding, `SensitivityEntry.damage`); with `costs`, predicted seconds per speed mode."""
    shapes = architectures.quantizable_tensors(info)
    if set(table.tensors()) != set(shapes):
        missing = sorted(set(shapes) ^ set(table.tensors()))[:3]
        raise ValueError(f"sensitivity table and model disagree on the quantizable tensors (e.g. {missing})")
    by_tensor: dict[str, list[sensitivity_table.SensitivityEntry]] = {}
    for e in table.entries:
        if e.kld_pred is not None and (allowed_types is None or e.type in allowed_types):
            by_tensor.setdefault(e.tensor, []).append(e)
    names, menus, sizes, damages, blocks = [], [], [], [], []
    for name in table.tensors():
        entries = by_tensor.get(name)
        if not entries:
            raise ValueError(f"no candidate type for {name} (rows of {shapes[name][1]}) in --types")
        names.append(name)
        menus.append([e.type for e in entries])
        sizes.append([gguf_plan.gguf_tensor_bytes(info, name, e.type) for e in entries])
        damages.append([e.damage for e in entries])
        blocks.append(-1 if entries[0].block is None else entries[0].block)
    seconds = base_seconds = None
    if costs is not None:
        per_tensor = speed_costs.tensor_seconds(info, costs)
        seconds = {mode: [{t: per_tensor[mode][name](t) for t in menu} for name, menu in zip(names, menus)]
                   for mode in per_tensor}
        base_seconds = {mode: c.all_reference_s(info.n_layers) for mode, c in costs.modes.items()}
    return genetic_optim.AllocationProblem.build(names, menus, sizes, damages, gguf_plan.gguf_fixed_bytes(info),
                                                 blocks, seconds, base_seconds)


def preset_seeds(info, budget: int) -> dict[str, dict]:
    """llama.cpp presets whose real file fits the budget: {name: {types, size_bytes}}."""
    out = {}
    for name in SEED_PRESETS:
        types = gguf_plan.preset_types(info, name, imatrix_available=True)
        size = gguf_plan.gguf_file_size(info, types)
        if size <= budget:
            out[name] = {"types": types, "size_bytes": size}
    return out


@dataclass
class SearchOutcome:
    """The GA's answer and the closing table's rows (preset, greedy, GA), all measured."""
    problem: genetic_optim.AllocationProblem
    result: genetic_optim.GAResult
    rows: list[dict]
    best_preset: str | None
    time_limits: dict[str, float] | None      # speed mode -> seconds (prompt: per prompt; decode: per token)

    @property
    def tensor_types(self) -> dict[str, str]:
        return self.problem.types_of(self.result.genome)


def search_assignment(args, run: SearchInputs, analyzer: sensitivity.LayerSensitivityAnalyzer,
                      table: sensitivity_table.SensitivityTable, costs: speed_costs.SpeedCosts | None
                      ) -> SearchOutcome:
    """The GA under the budget (and the speed limits), seeded with the presets that fit and the greedy and
    Lagrangian answers; then the closing table: the best preset that fits (as llama-quantize makes it, and
    with our quantizer), greedy and the GA, each measured end to end."""
    info, budget = run.info, run.budget_bytes
    problem = build_problem(info, table, run.allowed_types, costs)
    presets, best_preset = run.presets, run.baseline_preset
    time_limits = None
    if costs is not None:
        preset_s = speed_costs.predicted_seconds(info, costs, presets[best_preset]["types"])
        time_limits = {mode: args.max_slowdown * preset_s[mode] for mode in problem.modes}
    limits = None if time_limits is None else np.array([time_limits[m] for m in problem.modes])
    evaluator = kld.AssignmentEvaluator(analyzer.weights, analyzer.tensors, run.measure_ids, args.batch_size)
    bar = tqdm(total=args.ga_gen, desc="GA", unit="gen")

    def progress(generation, stats_row):
        bar.set_postfix_str(f"best KLD {stats_row['best_measured_kld']:.5f}", refresh=False)
        bar.update()

    ga = genetic_optim.MixedPrecisionGA(
        problem, budget, pop_size=args.ga_pop, generations=args.ga_gen, measure_fn=evaluator.kld_mean,
        measures_per_generation=args.ga_measure, seed=args.seed,
        seed_genomes=[problem.genome_of(p["types"]) for p in presets.values()], time_limits=limits)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plain-preset") as pool:
        # The closing table's preset as llama-quantize makes it is ggml's work on the CPU alone: on a GPU it is
        # done on a side thread while the GA's measurements keep the GPU busy. (On the CPU that only contends:
        # the demo's search took 235 s instead of 181 s on 2 cores.)
        plain_preset = (pool.submit(evaluator.quantize, presets[best_preset]["types"], True)
                        if best_preset and args.quantizer != "ggml" and analyzer.device.type != "cpu" else None)
        result = ga.optimize(progress)
        bar.close()
        if plain_preset is not None:
            plain_preset.result()
    greedy = genetic_optim.greedy_allocation(problem, budget, limits)

    def row(name, size, kld_predicted, kld_measured, types):
        tok_s = {} if costs is None else speed_costs.predicted_tok_s(info, costs, types)
        return {"name": name, "size_bytes": size, "bpw": gguf_plan.bits_per_weight(info, size),
                "kld_predicted": kld_predicted, "kld_measured": kld_measured,
                "pp_tok_s_predicted": tok_s.get("pp"), "tg_tok_s_predicted": tok_s.get("tg")}

    rows = []
    if best_preset:
        p = presets[best_preset]
        if args.quantizer != "ggml":     # llama.cpp's own recipe as llama-quantize makes it, then with ours
            rows.append(row(f"preset {best_preset} ggml", p["size_bytes"], None,
                            evaluator.kld_mean(p["types"], plain=True), p["types"]))
            analyzer.weights.plain_quantized.clear()
        rows.append(row(f"preset {best_preset} {args.quantizer}", p["size_bytes"],
                        problem.predicted_damage(problem.genome_of(p["types"])), evaluator.kld_mean(p["types"]),
                        p["types"]))
    for name, genome, kld_measured in (("greedy", greedy, evaluator.kld_mean(problem.types_of(greedy))),
                                       ("genetic algorithm", result.genome, result.measured_kld)):
        rows.append(row(name, problem.file_size_bytes(genome), problem.predicted_damage(genome), kld_measured,
                        problem.types_of(genome)))
    print(f"measured {len(evaluator.results)} assignments end to end: quantization "
          f"{evaluator.seconds['quantization']:.0f} s, KLD {evaluator.seconds['kld']:.0f} s")
    return SearchOutcome(problem, result, rows, best_preset, time_limits)


def save_outputs(args, run: SearchInputs, stats: calib_stats.CalibStats, smooth: smoothing.Smoothing,
                 smooth_records: list[dict], analyzer: sensitivity.LayerSensitivityAnalyzer,
                 outcome: SearchOutcome, costs: speed_costs.SpeedCosts | None, seconds: dict,
                 outputs: files.OutputSet) -> tuple[dict, llama_recipe.Recipe]:
    """The config (types, imatrix, smoothing, the search's record), its JSON twin, the shipped GPTQ tensors,
    the convergence plot and the llama-quantize recipe, into the run's output set; returns the shipped tensors
    {name: (type, bytes)} and the recipe."""
    out = Path(args.output)
    imatrix_path = out.with_suffix(".imatrix.gguf")
    final_types = outcome.tensor_types
    final_size = gguf_plan.gguf_file_size(run.info, final_types)
    if final_size != outcome.problem.file_size_bytes(outcome.result.genome) or final_size > run.budget_bytes:
        raise RuntimeError(f"the search's size accounting ({final_size:,} bytes) disagrees with the budget")
    result, problem = outcome.result, outcome.problem
    damage = {n: float(problem.damage[i, result.genome[i]]) for i, n in enumerate(problem.tensor_names)}
    record = {
        "model_id": args.model_id, "model_name": run.info.name,
        "budget": {"size_bytes": run.budget_bytes, "asked_as": run.budget_source},
        "achieved": {"size_bytes": final_size, "bits_per_weight": gguf_plan.bits_per_weight(run.info, final_size)},
        "kld_measured": result.measured_kld, "kld_predicted": result.predicted_damage,
        "measured_on": {"windows": int(run.measure_ids.shape[0]), "seq_len": int(run.measure_ids.shape[1]),
                        "tokens": int(run.measure_ids.numel())},
        "baseline_preset": outcome.best_preset, "comparison": outcome.rows,
        "tensor_damage_predicted": damage,
        "calibration": {"source": stats.meta["source"], "n_samples": args.n_samples,
                        "seq_len": args.seq_len, "seed": args.seed, "chat": bool(args.calib_chat)},
        "smoothing": smooth.to_dict(),
        "speed": None if costs is None else {
            "max_slowdown": args.max_slowdown, "limits_s": outcome.time_limits, "costs": costs.to_dict()},
        "ga": {"pop": args.ga_pop, "generations": args.ga_gen, "seed": args.seed, "history": result.history},
        "seconds": seconds,
    }
    weights = analyzer.weights
    im = {spec.name: vec for spec in analyzer.tensors if (vec := weights.imatrix_of(spec)) is not None}
    shipped = {spec.name: (final_types[spec.name], weights.quantized_bytes(spec, final_types[spec.name]))
               for spec in analyzer.tensors if weights.feedback_of(spec, final_types[spec.name]) is not None}
    tensors_path = out.with_suffix(".tensors.gguf")
    if shipped:
        config_file.write_quantized_tensors(outputs.path(tensors_path), run.info, shipped)
        record["quantized_tensors"] = {"path": tensors_path.name, "tensors": list(shipped)}
    else:
        outputs.remove(tensors_path)            # a previous run's, which this config does not use
    record["quantizer"] = args.quantizer
    if args.quantizer == "gptq":
        record["refine_sweeps"] = gptq.REFINE_SWEEPS      # the shipped bytes' sweeps (the table's: none)
    plan = gguf_export.plan_from_types(run.info, final_types, im)     # what export_gguf_official.py will do
    shapes = architectures.quantizable_tensors(run.info)
    plan.smoothing = smooth
    plan.shipped = {name: np.frombuffer(raw, np.uint8).reshape(shapes[name][0], -1)
                    for name, (_, raw) in shipped.items()}
    recipe = llama_recipe.write_recipe(plan, out, outputs, [run.calib_source])
    record["llama_quantize_recipe"] = {"script": str(llama_recipe.recipe_paths(out)["script"]),
                                       "bytes_identical": recipe.exact}
    config_file.save_config(outputs.path(out), run.info, final_types, imatrix=im, imatrix_path=str(imatrix_path),
                            extra=record)
    files.write_json(outputs.path(out.with_suffix(".json")), {
        **record, "smoothing": smoothing_summary(smooth, smooth_records), "tensor_types": final_types,
        "imatrix_path": str(imatrix_path)})
    convergence_plot(result.history, outputs.path(out.with_suffix(".convergence.png")))
    return shipped, recipe


# ---------------------------------------------------------------------------------------------------------
# Presentation
# ---------------------------------------------------------------------------------------------------------

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
    files.save_figure(fig, path)


def smoothing_summary(smooth: smoothing.Smoothing, records: list[dict]) -> dict:
    """The JSON twin's view of the smoothing: mode, strength per group, and per type the geometric-mean ratio
    of output error smoothed / unscaled over the groups searched (< 1: it helps that type)."""
    return {"mode": smooth.mode, "alpha": smooth.alpha, "groups_rescaled": len(smooth.alpha),
            "error_ratio_by_type": smoothing.type_gains(records)}


def print_summary(rows: list[dict], final_types: dict[str, str]) -> None:
    """Closing table: each allocator's size, bpw, predicted and measured KLD (and predicted speeds); the final
    type counts."""
    timed = any(r.get("tg_tok_s_predicted") for r in rows)
    print(f"\n{'allocation':<22} {'size_bytes':>14} {'bpw':>7} {'predicted':>10} {'measured KLD':>13}"
          + (f" {'pp tok/s (pred.)':>17} {'tg tok/s (pred.)':>17}" if timed else ""))
    for r in rows:
        measured = "-" if r["kld_measured"] is None else f"{r['kld_measured']:.5f}"
        predicted = "-" if r["kld_predicted"] is None else f"{r['kld_predicted']:.5f}"
        print(f"{r['name']:<22} {r['size_bytes']:>14,} {r['bpw']:>7.3f} {predicted:>10} {measured:>13}"
              + (f" {r['pp_tok_s_predicted']:>17.1f} {r['tg_tok_s_predicted']:>17.1f}" if timed else ""))
    counts: dict[str, int] = {}
    for t in final_types.values():
        counts[t] = counts.get(t, 0) + 1
    by_bits = sorted(counts.items(), key=lambda kv: quant_utils.get_type(kv[0]).bits_per_weight)
    print("types chosen: " + ", ".join(f"{t} x{n}" for t, n in by_bits))


@contextlib.contextmanager
def timed(seconds: dict, stage: str):
    """Record a stage's wall time in `seconds`."""
    t0 = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    seconds: dict[str, float] = {}
    out = Path(args.output)
    # Every output is written under a temporary name and renamed into place with the others at the end: an
    # earlier run's files stay as they were until this run's set is complete.
    with cli.reported_errors(ValueError, OSError), torch.no_grad(), files.OutputSet() as outputs:
        with timed(seconds, "load"):
            run = load_inputs(args)
        with timed(seconds, "speed_costs"):
            costs = speed_costs_for(args, run)
        with timed(seconds, "placement"):
            place_model(args, run)
        with timed(seconds, "statistics"):
            stats = collect_statistics(args, run)
            imatrix_file.write_model_imatrix(run.model, stats, outputs.path(out.with_suffix(".imatrix.gguf")),
                                             [run.calib_source], args.seq_len)
        with timed(seconds, "smoothing"):
            smooth, smooth_records = smooth_model(args, run, stats)
        with timed(seconds, "sensitivity"):
            analyzer, table = measure_sensitivity(args, run, stats)
            table.save(outputs.path(out.with_suffix(".sensitivity.pt")),
                       outputs.path(out.with_suffix(".sensitivity.json")))
            sensitivity_table.plot_heatmap(table, outputs.path(out.with_suffix(".sensitivity.png")))
        with timed(seconds, "search"):
            outcome = search_assignment(args, run, analyzer, table, costs)
        shipped, recipe = save_outputs(args, run, stats, smooth, smooth_records, analyzer, outcome, costs, seconds,
                               outputs)

    print_summary(outcome.rows, outcome.tensor_types)
    print(f"budget {run.budget_bytes:,} bytes ({run.budget_source}); config {out} (+ .json, .convergence.png, "
          f".sensitivity.*, {out.with_suffix('.imatrix.gguf').name}"
          + (f", {out.with_suffix('.tensors.gguf').name}: {len(shipped)} GPTQ tensors)" if shipped else ")"))
    print(f"llama-quantize recipe: sh {llama_recipe.recipe_paths(out)['script']} MODEL-F32.gguf OUTPUT.gguf ("
          + ("the exporter's bytes)" if recipe.exact else
             "the same types; the exporter's bytes only with --quantizer ggml and no smoothing)"))
    if args.smooth != "off":
        gains = smoothing.type_gains(smooth_records)
        print(f"smoothing ({args.smooth}): {len(smooth.alpha)} of {len(smoothing.smooth_groups(run.model))} input "
              "groups rescaled; output error smoothed/unscaled by type: "
              + ", ".join(f"{t} {g:.3f}" for t, g in gains.items()))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()

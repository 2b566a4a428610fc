"""Simulated quantization: the original model with a config's fake quantization, checked against the exported GGUF.

Every tensor the config assigns a type is replaced, in the transformers model (after the config's smoothing, if
any), by what the GGUF holds in the plan export_gguf_official.py writes (same types and fallbacks, same imatrix;
for tensors the search quantized with GPTQ, the very bytes it shipped), decoded by ggml:
the values the GGUF holds, computed in float32 by PyTorch. The script measures that simulated model on the
evaluation windows (perplexity, KLD against the original, top-1 agreement, the same conventions and cached
reference as compare_real_quant.py) and answers the prompts greedily. With --gguf_path it measures the exported
GGUF through llama.cpp on the same windows and prompts and exits with status 1 unless the two mean KLDs agree
within --tolerance (5%): the proof that what the search simulated is what ships.

    python test_mixed_precision.py --model_id models/smollm2-135m-instruct \\
        --config models/demo/mixed_precision_config.pt --gguf_path models/demo/smollm2-mixed.gguf \\
        --eval_file ../shared/data/wikitext-2/wiki.test.tokens --n_windows 16

llama.cpp's CPU kernels multiply a quantized weight by its input rounded to 8 bits (Q8_0, Q8_1 or Q8_K blocks,
by weight type); the simulation does the same, bit for bit (activation_rounding.py), unless `--activations
float32`. Without it the simulation misses a floor of about 0.004 mean KLD on the demo model (llama.cpp's Q8_0
file scores 0.0045): 19% apart for the search's Q4_K_M-size config at KLD 0.02. What remains unemulated is
llama.cpp's F16 KV cache and its order of summation.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

import activation_rounding
import architectures
import cli
import compare_report
import comparison
import files
import runtimes
import smoothing
import workers
from cli import UserError
from config_file import load_config
from gguf_export import encode_tensor, plan_from_config
from metrics import Quality, evaluate_quality
from model_blocks import replaced_weights
from quant_utils import dequantize, get_type
from reference import reference_key

DEFAULTS = {"model_id": "Qwen/Qwen2.5-7B-Instruct", "config": "mixed_precision_config.pt",
            "n_windows": 16, "max_tokens": 48, "tolerance": 0.05, "activations": "ggml"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__doc__.splitlines()[0], error_status=2)   # 1 means the KLDs disagree
    parser.add_argument("--model_id", default=DEFAULTS["model_id"], help="original model: HF id or local directory")
    parser.add_argument("--config", default=DEFAULTS["config"], help="mixed-precision config from the search")
    parser.add_argument("--imatrix", default=None, metavar="PATH",
                        help="imatrix GGUF overriding the config's (pass what export_gguf_official.py got)")
    parser.add_argument("--gguf_path", default=None,
                        help="the GGUF exported from this config: measured too, and the KLDs must agree")
    parser.add_argument("--tolerance", type=cli.positive_number, default=DEFAULTS["tolerance"],
                        help="largest relative difference of the mean KLDs (simulated vs GGUF)")
    parser.add_argument("--activations", choices=("ggml", "float32"), default=DEFAULTS["activations"],
                        help="ggml: round each quantized matmul's input as llama.cpp's CPU backend does; "
                             "float32: leave activations unrounded (weights-only simulation)")
    comparison.add_measurement_args(parser)
    parser.set_defaults(n_windows=DEFAULTS["n_windows"], max_tokens=DEFAULTS["max_tokens"])
    return parser.parse_args(argv)


def fake_quantized_weights(plan, model) -> dict:
    """{hf_name: float32 tensor} of every quantized 2-D weight as the GGUF stores it: the config's shipped
    bytes (GPTQ), else quantized by ggml with the plan's stored type and imatrix, decoded by ggml. Rows are
    quantized independently, so HF's row order (before the exporter's q/k permutation for Llama) gives the
    same values."""
    import torch
    imatrix = plan.imatrix or {}
    out = {}
    for name, qtype in plan.tensor_types.items():
        if get_type(qtype).name == "F32":
            continue
        weight = model.get_parameter(name).detach().float().cpu()
        raw = plan.shipped[name] if name in plan.shipped else encode_tensor(weight.numpy(), qtype, imatrix.get(name))
        out[name] = torch.from_numpy(dequantize(raw, qtype, tuple(weight.shape)))
    return out


def check_gguf_follows_plan(gguf_path, plan) -> None:
    """Refuse a GGUF whose tensor types are not the ones this config exports to (another config or preset)."""
    found = {t.name: t.tensor_type.name for t in files.read_gguf(gguf_path, "GGUF file").tensors}
    diffs = [(spec.gguf_name, found.get(spec.gguf_name), plan.stored_types[spec.hf_name])
             for spec in plan.info.tensors if found.get(spec.gguf_name) != plan.stored_types[spec.hf_name]]
    if diffs:
        name, got, want = diffs[0]
        raise UserError(f"{gguf_path} was not exported from this config: {len(diffs)} tensors differ "
                        f"(e.g. {name} is {got}, the config gives {want})")


def measure_simulated(model_dir: Path, plan, windows, reference, prompt_ids, stop_ids, settings,
                      round_activations: bool = True):
    """Quality and greedy generations of the original with the plan's fake quantization, in float32, each
    quantized matmul's input rounded as llama.cpp's CPU backend rounds it (unless `round_activations` is off)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(settings.n_threads)
    device = runtimes.transformers_device(settings.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    smoothing.apply_to_model(model, plan.smoothing)     # the config's exact rescaling, as the exporter does
    weights = fake_quantized_weights(plan, model)
    model.to(device)
    activation_types = plan.stored_types if round_activations else {}
    with replaced_weights(model, {n: w.to(device) for n, w in weights.items()}), \
            activation_rounding.rounded_linear_inputs(model, activation_types):
        quality = evaluate_quality(runtimes.transformers_logits_fn(model), windows, reference,
                                   settings.progress, desc="simulated")
        generations = [runtimes.transformers_greedy(model, ids, settings.max_tokens, stop_ids)
                       for ids in prompt_ids]
    rounding = "activations rounded as llama.cpp's CPU backend" if round_activations else "float32 activations"
    return quality, generations, f"transformers {device} float32, {rounding}"


def measure_gguf(path, windows, model_dir, prompt_ids, stop_ids, settings):
    """Quality and greedy generations of the GGUF through llama.cpp (same windows, same prompts), in a fresh
    Python without torch (workers.run_job: one process cannot hold both with CUDA builds). The worker's memory
    runs are cut to one token: only quality and answers are used here."""
    key = reference_key(comparison.original_reference_source(model_dir, settings), windows,
                        settings.reference_dtype)
    job = workers.ModelJob("GGUF", "gguf", str(path), windows, prompt_ids, stop_ids,
                           dataclasses.replace(settings, pp_tokens=1, tg_tokens=1), key)
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()          # the simulated model's cached memory, for the worker on the same GPU
    result = workers.run_job(job)
    return Quality(**result.quality), result.generations


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to b (the GGUF's, what ships)."""
    return abs(a - b) / max(abs(b), 1e-12)


def format_rows(rows: list[tuple[str, object]]) -> str:
    """Aligned table of (name, Quality) rows."""
    lines = [f"{'model':<11} {'PPL':>9} {'KLD mean':>10} {'KLD median':>11} {'KLD p99':>9} {'same top-1':>11}"]
    for name, q in rows:
        lines.append(f"{name:<11} {q.ppl:>9.3f} {q.kld_mean:>10.5f} {q.kld_median:>11.5f} {q.kld_p99:>9.4f} "
                     f"{100 * q.top1_agree:>10.2f}%")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in vars(args).items():
        print(f"{key:<16} {value}")
    with cli.reported_errors(ValueError, OSError, status=2):
        settings = comparison.settings_from_args(args)
        original = comparison.load_original(args.model_id)
        info = architectures.load_model_info(original.model_dir, name=original.name)
        plan = plan_from_config(info, load_config(args.config, info), args.imatrix)
        if args.gguf_path is not None:
            if not Path(args.gguf_path).is_file():
                raise UserError(f"--gguf_path {args.gguf_path} not found; make it with: python "
                                f"export_gguf_official.py --model_id {args.model_id} --config {args.config} "
                                f"--output {args.gguf_path}")
            comparison.check_gguf_matches_model(args.gguf_path, original.model_dir, original.tokenizer,
                                                args.allow_other_checkpoint)
            check_gguf_follows_plan(args.gguf_path, plan)
        windows = np.concatenate([comparison.load_eval_windows(f, original.tokenizer, settings.seq_len,
                                                               settings.n_windows) for f in args.eval_file or [None]])
        prompts = comparison.load_prompts(args.prompts)
        prompt_ids = [comparison.generation_prompt_ids(original.tokenizer, p) for p in prompts]
        stop_ids = comparison.stop_token_ids(original.tokenizer, original.model_dir)

        reference = comparison.reference_for_model(original.model_dir, windows, settings)
        simulated, simulated_ids, device = measure_simulated(original.model_dir, plan, windows, reference,
                                                             prompt_ids, stop_ids, settings,
                                                             args.activations == "ggml")
        rows, texts = [("simulated", simulated)], {"simulated": simulated_ids}
        if args.gguf_path is not None:
            shipped, texts["GGUF"] = measure_gguf(args.gguf_path, windows, original.model_dir, prompt_ids,
                                                  stop_ids, settings)
            rows.append(("GGUF", shipped))

    print(f"\nsimulated on {device}; GGUF on {comparison.describe_devices(settings).split('; ')[1]}; "
          f"{len(windows)} windows of {settings.seq_len} tokens")
    print(format_rows(rows))
    width = compare_report.terminal_width()
    for i, prompt in enumerate(prompts):
        print()
        print(compare_report.side_by_side(prompt, list(texts), [original.tokenizer.decode(
            texts[n][i], skip_special_tokens=True) for n in texts], width))
    if args.gguf_path is None:
        return
    diff = relative_difference(simulated.kld_mean, shipped.kld_mean)
    same_answers = sum(a == b for a, b in zip(texts["simulated"], texts["GGUF"]))
    verdict = "agree" if diff <= args.tolerance else "DISAGREE"
    print(f"\nmean KLD simulated {simulated.kld_mean:.5f} vs GGUF {shipped.kld_mean:.5f}: {100 * diff:.2f}% apart, "
          f"tolerance {100 * args.tolerance:.1f}%: {verdict}; identical greedy answers {same_answers}/{len(prompts)}")
    if diff > args.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()

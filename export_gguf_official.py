"""Export a Hugging Face checkpoint to a GGUF that llama.cpp runs exactly as planned.

Types per tensor come from the mixed-precision config written by the search (or from a llama.cpp preset);
every weight is quantized by ggml itself (quant_utils), so the file holds bit for bit what the search simulated.
Tensors the search quantized with GPTQ error feedback (gptq.py) are not quantized again: their bytes come from
the config's tensor file (`<config>.tensors.gguf`), checked against the checkpoint they were made from.
Tensors stream one at a time from the safetensors shards: peak memory is about one tensor, not the model.
The file is written under a temporary name, reopened and checked against the plan, then renamed.

    python export_gguf_official.py --model_id models/smollm2-135m-instruct \
        --config models/demo/mixed_precision_config.pt --output models/demo/smollm2-mixed.gguf
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import architectures
import cli
import config_file
import files
import gguf_export
import gguf_plan
import imatrix_file
from cli import UserError
from quant_utils import get_type

DEFAULTS = {
    "model_id": "Qwen/Qwen2.5-7B-Instruct",
    "config": "mixed_precision_config.pt",
    "output": "models/qwen2.5-7b-mixed.gguf",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__doc__.splitlines()[0])
    parser.add_argument("--model_id", default=DEFAULTS["model_id"], help="HF model id or local directory")
    parser.add_argument("--config", default=DEFAULTS["config"], help="mixed-precision config from the search")
    parser.add_argument("--output", default=DEFAULTS["output"], type=cli.output_file(".gguf"), help="output GGUF")
    parser.add_argument("--preset", default=None, type=str.upper, choices=list(gguf_plan.PRESETS), metavar="NAME",
                        help="write llama.cpp's uniform recipe instead of a config: "
                             + ", ".join(gguf_plan.PRESETS))
    parser.add_argument("--imatrix", default=None, metavar="PATH",
                        help="llama.cpp imatrix GGUF; overrides the activation statistics the config carries")
    return parser.parse_args(argv)



def summary_table(plan: gguf_export.ExportPlan, output: Path) -> str:
    """Aligned table: per stored type the tensor count, weights, bytes and bits per weight; then totals."""
    rows: dict[str, list[int]] = {}
    for spec in plan.info.tensors:
        qtype = plan.stored_types[spec.hf_name]
        r = rows.setdefault(qtype, [0, 0, 0])
        r[0] += 1
        r[1] += math.prod(spec.shape)
        r[2] += get_type(qtype).tensor_size_bytes(spec.shape)
    lines = [f"{'type':<8} {'tensors':>8} {'weights':>14} {'MiB':>10} {'bits/weight':>12}"]
    for qtype, (n, weights, size) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{qtype:<8} {n:>8} {weights:>14,} {size / 2**20:>10.2f} {8 * size / weights:>12.3f}")
    n_t, weights, size = (sum(r[i] for r in rows.values()) for i in range(3))
    lines.append(f"{'total':<8} {n_t:>8} {weights:>14,} {size / 2**20:>10.2f} {8 * size / weights:>12.3f}")
    if not plan.smoothing.is_identity():
        lines.append(f"smoothing ({plan.smoothing.mode}): {len(plan.smoothing.alpha)} input groups rescaled, "
                     f"{len(plan.smoothing.columns)} weights' columns, {len(plan.smoothing.rows)} producers folded")
    if plan.shipped:
        lines.append(f"{len(plan.shipped)} tensors shipped as the search quantized them (GPTQ error feedback)")
    file_size = os.path.getsize(output)
    lines.append(f"file {output}: {file_size:,} bytes ({file_size / 2**30:.3f} GiB)")
    if plan.fallbacks:
        shapes = architectures.quantizable_tensors(plan.info)
        groups: dict[tuple, list[str]] = {}
        for name, asked, stored in plan.fallbacks:
            groups.setdefault((asked, stored, shapes[name][1]), []).append(architectures.gguf_name(plan.info, name))
        lines.append(f"fallbacks ({len(plan.fallbacks)} tensors; the row length does not fit the type's blocks):")
        for (asked, stored, row_len), names in groups.items():
            lines.append(f"  {asked:>7} -> {stored:<7} rows of {row_len:<6} {len(names):>4} tensors: "
                         f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return "\n".join(lines)



def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in vars(args).items():
        print(f"{key:<10} {value}")
    with cli.reported_errors(ValueError, OSError):
        if args.preset and args.config != DEFAULTS["config"]:
            raise UserError("pass either --preset or --config, not both")
        model_dir, name = files.resolve_model_dir(args.model_id)
        info = architectures.load_model_info(model_dir, name=name)
        if args.preset:
            im = imatrix_file.load_imatrix(args.imatrix, info) if args.imatrix else None
            plan = gguf_export.plan_from_preset(info, args.preset, im)
        else:
            plan = gguf_export.plan_from_config(info, config_file.load_config(args.config, info), args.imatrix)
        output = gguf_export.write_gguf(plan, args.output)
    print(summary_table(plan, output))


if __name__ == "__main__":
    main()

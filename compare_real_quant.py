"""Compare the original model (transformers) with one GGUF: quality, speed, memory and generations.

The quick path of compare_three_models.py, with the same measurements and options (see its docstring and
metrics.py, runtimes.py and workers.py for how each number is measured).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cli
import comparison
from cli import UserError

DEFAULTS = {
    "model_id": "Qwen/Qwen2.5-7B-Instruct",
    "gguf_path": "models/Qwen2.5-7B-Instruct-Q4_K_M.gguf",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__doc__.splitlines()[0])
    parser.add_argument("--model_id", default=DEFAULTS["model_id"], help="original model: HF id or local directory")
    parser.add_argument("--gguf_path", default=DEFAULTS["gguf_path"], help="GGUF to compare")
    comparison.add_measurement_args(parser)
    args = parser.parse_args(argv)
    args.skip_original = False
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.reported_errors():
        if not Path(args.gguf_path).is_file():
            raise UserError(f"--gguf_path {args.gguf_path} not found; make it from the same model with: python "
                            f"export_gguf_official.py --model_id {args.model_id} --preset Q4_K_M --imatrix "
                            f"IMATRIX.gguf --output {args.gguf_path}")
        comparison.run_comparison(args, [(Path(args.gguf_path).stem, args.gguf_path)])


if __name__ == "__main__":
    main()

"""Decode cost of the head in each type, measured on its own, against the speed cost table's block costs.

The cost table (speed_costs.py) prices every tensor from files whose block matrices are all in one type; the
head (the output matrix, or a tied embedding) is priced with those block costs. This measures the head alone:
files of the model's blocks in the reference type with the head in each type, timed in interleaved llama-bench
rounds, and prints the head's decode seconds per weight (per tg_tokens tokens) beside the table's.

    python tools/head_costs.py --model_id models/smollm2-135m-instruct --table models/cache/speed-costs-X.json
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import architectures  # noqa: E402
import gguf_export  # noqa: E402
import speed_costs  # noqa: E402
import workers  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_id", required=True, help="local checkpoint directory")
    p.add_argument("--table", required=True, help="a speed cost table (JSON) of this model's widths")
    p.add_argument("--types", default="Q4_0,IQ4_NL,Q4_1,Q5_0,Q5_1", help="head types besides the reference")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    info = architectures.load_model_info(Path(args.model_id))
    roles = speed_costs.tensor_roles(info)
    head = next(t for t in info.tensors if roles.get(t.hf_name) == "head")
    table = json.loads(Path(args.table).read_text())["modes"]["tg"]["delta_s_per_weight"]
    types = [speed_costs.REFERENCE_TYPE] + args.types.split(",")
    with tempfile.TemporaryDirectory(prefix="head-costs-") as tmp:
        paths = []
        for qtype in types:
            tensor_types = {t.hf_name: speed_costs.REFERENCE_TYPE for t in info.tensors if t.quantizable}
            tensor_types[head.hf_name] = qtype
            path = Path(tmp) / f"head-{qtype}.gguf"
            gguf_export.write_gguf(speed_costs.bench_plan(info, tensor_types), path, progress=False)
            paths.append(str(path))
        runs = workers.interleaved_speeds(paths, 512, 128, args.rounds, args.threads, progress=True)
    n_weights = head.shape[0] * head.shape[1]
    base_s = 128 / runs[0].summary()["tg"]["median"]
    print(f"head {head.gguf_name} ({n_weights:,} weights), tg128; seconds per weight per 128 tokens")
    print(f"{'type':8s} {'tok/s':>7s} {'head':>10s} {'table':>10s}")
    for qtype, run in zip(types, runs):
        tok_s = run.summary()["tg"]["median"]
        print(f"{qtype:8s} {tok_s:7.1f} {(128 / tok_s - base_s) / n_weights:10.2e} {table.get(qtype, float('nan')):10.2e}")


if __name__ == "__main__":
    main()

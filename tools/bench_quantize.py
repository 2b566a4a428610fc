"""Benchmark ggml quantization throughput per type (weights per second), single- and multi-threaded, and with
GPTQ's error feedback (gptq.py: ggml per block column, float64 updates on the CPU)."""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gptq  # noqa: E402
import quant_utils as qu  # noqa: E402

DEFAULT_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q5_0,IQ4_NL,IQ4_XS"


def time_call(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    imatrix = np.random.default_rng(1).uniform(0.1, 2.0, args.cols).astype(np.float32)
    import torch
    torch.set_num_threads(args.threads)
    inputs = torch.from_numpy(np.random.default_rng(2).standard_normal((2 * args.cols, args.cols)))
    gram = inputs.T @ inputs
    factors = {}
    for block in (32, 256):
        start = time.perf_counter()
        factors[block] = gptq.feedback_factor(gram, block)
        factors[block].block_inverses          # the Cholesky factor and its blocks are computed on first use
        factor_s = time.perf_counter() - start
    weight = torch.from_numpy(w)
    print(f"{args.rows} x {args.cols} Gaussian weights, {args.threads} threads, median of {args.repeats}; "
          f"GPTQ factor of a {args.cols}-wide Gram: {factor_s:.2f} s")
    print(f"{'type':<8} {'bpw':>7} {'Mw/s 1 thr':>11} {f'Mw/s {args.threads} thr':>11} "
          f"{'Mw/s imatrix':>13} {'Mw/s gptq':>10} {'dequant Mw/s':>13}")
    for name in args.types.split(","):
        t = qu.get_type(name)
        one = time_call(lambda: qu.quantize(w, t, n_threads=1), args.repeats)
        many = time_call(lambda: qu.quantize(w, t, n_threads=args.threads), args.repeats)
        weighted = time_call(lambda: qu.quantize(w, t, imatrix, n_threads=args.threads), args.repeats)
        fed_back = time_call(lambda: gptq.quantize(weight, name, factors[t.block_size], n_threads=args.threads),
                             args.repeats)
        raw = qu.quantize(w, t)
        deq = time_call(lambda: qu.dequantize(raw, t, w.shape, n_threads=args.threads), args.repeats)
        mw = w.size / 1e6
        print(f"{name:<8} {t.bits_per_weight:>7.4f} {mw / one:>11.1f} {mw / many:>11.1f} "
              f"{mw / weighted:>13.1f} {mw / fed_back:>10.1f} {mw / deq:>13.1f}")


if __name__ == "__main__":
    main()

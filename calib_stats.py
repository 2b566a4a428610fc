"""Activation statistics of every quantizable linear layer, collected block by block on real calibration text.

For each linear weight W (q/k/v/o/gate/up/down of every decoder block, and the output head) we collect over the
calibration tokens x:
- `in_sum2[name]` = sum over tokens of x_j^2 per input channel j, and `counts[name]` = number of tokens:
  llama.cpp's importance matrix; the quantizer is given `in_sum2 / counts` (what llama-quantize passes).
- `gram[key]` = H = X^T X, the input Gram matrix, shared by the weights that read the same input (q/k/v read
  one, gate/up read one). With it the output error of any weight change is exact:
  E_x ||dW x||^2 = tr(dW H dW^T) / N. Grams may cover only the first windows (`gram_samples`); then N is
  their token count, while `in_sum2` always covers every window. Inputs wider than `gram_max_dim` get no Gram
  (Qwen2.5-7B's ffn_down input is 18944 wide: 1.4 GB per block in float32, 40 GB for the model); their
  output error is measured through the diagonal of H, the imatrix, instead.
- `token_counts`: how often each token id occurs (the token embedding is a row lookup, not a matmul).

The model is walked one decoder block at a time (model_blocks.py): each block is moved to `--device` in
float32, run on all calibration windows, and its outputs become the next block's inputs; only one block is on
the device at a time. Statistics are saved with torch.save as plain tensors (`torch.load(...,
weights_only=True)` reads them), cached per model, windows and settings; imatrix_file.py writes them as a llama.cpp
imatrix GGUF.

    python calib_stats.py --model models/smollm2-135m-instruct \
        --calib_file ../shared/data/wikitext-2/wiki.valid.tokens --imatrix out.imatrix.gguf
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import files
from model_blocks import (block_linears, block_on_device, block_prefix, catch_block_inputs, decoder_blocks,
                          final_norm_on, load_model_and_tokenizer, model_content_hash, output_weight_name,
                          resolve_device, run_block)

STATS_FORMAT_VERSION = 1


@dataclass
class CalibStats:
    """Per-weight activation statistics; keys are HF weight names ("model.layers.0.self_attn.q_proj.weight").

    `gram` holds X^T X over the first `gram_tokens[key]` calibration tokens (all of them by default); weights
    reading the same input share one entry, found through `gram_key`.
    """
    in_sum2: dict[str, torch.Tensor]        # float64 [n_in]: sum over tokens of x^2
    counts: dict[str, int]                  # tokens seen
    gram: dict[str, torch.Tensor]           # input key -> [n_in, n_in] X^T X (empty when not collected)
    gram_tokens: dict[str, int]             # input key -> tokens summed into its Gram
    gram_key: dict[str, str]                # weight name -> input key of its Gram
    token_counts: torch.Tensor              # int64 [vocab]: occurrences of each calibration token
    meta: dict = field(default_factory=dict)

    def imatrix(self, name: str) -> torch.Tensor:
        """The importance vector handed to the quantizer: mean squared input, float32 (llama-quantize's)."""
        return (self.in_sum2[name] / max(self.counts[name], 1)).to(torch.float32)

    def gram_of(self, name: str) -> tuple[torch.Tensor, int]:
        """(H, number of tokens in H) of the input of weight `name`."""
        if name not in self.gram_key:
            raise KeyError(f"no Gram matrix for {name}: statistics were collected without Grams")
        key = self.gram_key[name]
        return self.gram[key], self.gram_tokens[key]

    def to_dict(self) -> dict:
        return {"format_version": STATS_FORMAT_VERSION, "in_sum2": self.in_sum2, "counts": self.counts,
                "gram": self.gram, "gram_tokens": self.gram_tokens, "gram_key": self.gram_key,
                "token_counts": self.token_counts, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> CalibStats:
        if d.get("format_version") != STATS_FORMAT_VERSION:
            raise ValueError(f"statistics format {d.get('format_version')} is not {STATS_FORMAT_VERSION}")
        return cls(d["in_sum2"], d["counts"], d["gram"], d["gram_tokens"], d["gram_key"], d["token_counts"],
                   d["meta"])


class _InputRecorder:
    """Forward pre-hooks that keep a reference to the input of every linear of one block during a forward."""

    def __init__(self, linears: list[tuple[str, nn.Linear]]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears]

    def _hook(self, name: str):
        def hook(_module, args):
            self.inputs[name] = args[0]
        return hook

    def take(self) -> dict[str, tuple[torch.Tensor, list[str]]]:
        """The distinct inputs seen, keyed by their first reader, with all their readers; clears the record.

        Inputs are the same when they share memory, shape and strides: references are held during the
        forward, so an address cannot have been reused by another tensor.
        """
        groups: dict[tuple, list[str]] = {}
        for name, x in self.inputs.items():
            groups.setdefault((x.data_ptr(), tuple(x.shape), tuple(x.stride())), []).append(name)
        taken = {names[0]: (self.inputs[names[0]], names) for names in groups.values()}
        self.inputs = {}
        return taken

    def remove(self):
        for h in self.handles:
            h.remove()


class _Accumulator:
    """Running sums of one input on the compute device: x^2 per channel always, X^T X for the first
    `gram_tokens` tokens when Grams are wanted. Each micro-batch's product is formed in `product_dtype`
    (float32: fast; float64: exact) and added into float64 sums."""

    def __init__(self, n_in: int, device, with_gram: bool, gram_tokens: int | None,
                 product_dtype: torch.dtype):
        self.sum2 = torch.zeros(n_in, device=device, dtype=torch.float64)
        self.gram = torch.zeros(n_in, n_in, device=device, dtype=torch.float64) if with_gram else None
        self.gram_tokens = gram_tokens
        self.product_dtype = product_dtype
        self.count = 0
        self.gram_count = 0

    def add(self, x: torch.Tensor):
        x2d = x.reshape(-1, x.shape[-1])
        self.count += x2d.shape[0]
        if self.gram is None or (self.gram_tokens is not None and self.gram_count >= self.gram_tokens):
            self.sum2 += x2d.square().sum(0)     # a micro-batch's sum in float32, running sum in float64
            return
        product = gram_product(x2d.to(self.product_dtype))
        self.gram += product
        self.sum2 += product.diagonal()          # the squares come free with the Gram
        self.gram_count += x2d.shape[0]

    def gram_result(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.gram is None else self.gram.to(dtype).cpu()


def gram_product(x: torch.Tensor) -> torch.Tensor:
    """X^T X of a (tokens, channels) matrix. On the CPU through numpy, whose BLAS call for a product with its
    own transpose (syrk) does half the work of a general product and runs 2-3x faster than torch's here."""
    if x.device.type != "cpu":
        return x.T @ x
    xn = x.contiguous().numpy()
    return torch.from_numpy(xn.T @ xn)


@torch.no_grad()
def collect_statistics(model: nn.Module, calib_ids: torch.Tensor, device="auto", batch_size: int = 8,
                       with_gram: bool = True, gram_samples: int | None = None,
                       gram_max_dim: int | None = None, gram_product_dtype: torch.dtype = torch.float32,
                       gram_dtype: torch.dtype = torch.float32, progress: bool = True,
                       model_hash: str | None = None) -> CalibStats:
    """Run the calibration windows through the model block by block and collect every linear's statistics.

    Sums of squares use every window. Grams use the first `gram_samples` windows (default all): they cost as
    much as the forward pass itself on a CPU, and a few tens of thousands of tokens pin an output-error ratio
    down well. Micro-batch products are formed in `gram_product_dtype` and summed in float64; Grams are stored
    as `gram_dtype` (float64 with a float64 product for exactness tests). Inputs wider than `gram_max_dim`
    (None: no limit) get only their sums of squares. `model_hash`: the model's content hash when the caller
    has it already.
    """
    device = resolve_device(device)
    calib_ids = calib_ids.to(torch.long)
    seq_len = calib_ids.shape[1]
    gram_tokens_max = None if gram_samples is None else gram_samples * seq_len
    batches = catch_block_inputs(model, calib_ids, batch_size, device)
    in_sum2, counts, gram, gram_tokens, gram_key = {}, {}, {}, {}, {}

    def store(acc: _Accumulator, input_key: str, weight_names: list[str]):
        for weight in weight_names:
            in_sum2[weight], counts[weight] = acc.sum2.cpu(), acc.count
            if acc.gram is not None:
                gram_key[weight] = input_key
        if acc.gram is not None:
            gram[input_key], gram_tokens[input_key] = acc.gram_result(gram_dtype), acc.gram_count

    blocks = decoder_blocks(model)
    for index in tqdm(range(len(blocks)), desc="statistics", unit="block", disable=not progress):
        prefix = block_prefix(model, index)
        with block_on_device(blocks[index], device) as block:
            recorder = _InputRecorder(block_linears(block))
            accumulators: dict[str, _Accumulator] = {}
            readers: dict[str, list[str]] = {}
            try:
                for batch in batches:
                    batch.hidden = run_block(block, batch)
                    for key, (x, names) in recorder.take().items():
                        if key not in accumulators:
                            wants_gram = with_gram and (gram_max_dim is None or x.shape[-1] <= gram_max_dim)
                            accumulators[key] = _Accumulator(x.shape[-1], device, wants_gram, gram_tokens_max,
                                                             gram_product_dtype)
                            readers[key] = names
                        accumulators[key].add(x)
            finally:
                recorder.remove()
        for key, names in readers.items():
            store(accumulators[key], f"{prefix}{key}.input", [f"{prefix}{n}.weight" for n in names])
    # The output head reads the final-normed hidden states; its logits are not needed for statistics.
    norm = final_norm_on(model, device)
    n_hidden = batches[0].hidden.shape[-1]
    head = _Accumulator(n_hidden, device, with_gram and (gram_max_dim is None or n_hidden <= gram_max_dim),
                        gram_tokens_max, gram_product_dtype)
    for batch in batches:
        head.add(norm(batch.hidden))
    head_name = output_weight_name(model)
    store(head, head_name + ".input", [head_name])
    vocab = model.get_input_embeddings().weight.shape[0]
    token_counts = torch.bincount(calib_ids.reshape(-1).cpu(), minlength=vocab)
    meta = {"n_samples": int(calib_ids.shape[0]), "seq_len": int(seq_len), "n_tokens": int(calib_ids.numel()),
            "calib_ids_hash": files.token_ids_hash(calib_ids),
            "model_content_hash": model_hash or model_content_hash(model),
            "gram_samples": gram_samples, "gram_max_dim": gram_max_dim}
    return CalibStats(in_sum2, counts, gram, gram_tokens, gram_key, token_counts, meta)


def save_statistics(stats: CalibStats, path: str | os.PathLike, with_gram: bool = True) -> None:
    """torch.save of plain tensors and dicts; without Grams the file holds only the imatrix (small)."""
    d = stats.to_dict()
    if not with_gram:
        d.update(gram={}, gram_tokens={}, gram_key={})
    files.torch_save(d, path)


def load_statistics(path: str | os.PathLike) -> CalibStats:
    return CalibStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def cached_statistics(model: nn.Module, calib_ids: torch.Tensor, device="auto", batch_size: int = 8,
                      gram_samples: int | None = None, cache_dir=None, gram_max_dim: int | None = None,
                      model_hash: str | None = None) -> CalibStats:
    """Statistics from `cache_dir` when this model and these windows were seen before, else collected and
    saved there (an interrupted run resumes without collecting again). `model_hash`: the model's
    model_content_hash when the caller has it already."""
    model_hash = model_hash or model_content_hash(model)      # a pass over every parameter: once
    collect = lambda: collect_statistics(model, calib_ids, device, batch_size, gram_samples=gram_samples,
                                         gram_max_dim=gram_max_dim, model_hash=model_hash)
    if cache_dir is None:
        return collect()
    key = files.record_key({"format": STATS_FORMAT_VERSION, "model": model_hash,
                            "windows": files.token_ids_hash(calib_ids), "gram_samples": gram_samples,
                            "gram_max_dim": gram_max_dim})
    path = Path(cache_dir) / f"stats-{key}.pt"
    if path.is_file():
        try:
            return load_statistics(path)
        except Exception as exc:   # a cache file cut short or altered, whatever torch.load makes of it
            print(f"warning: discarding unreadable cache entry {path} ({type(exc).__name__}); collecting the "
                  "statistics again", file=sys.stderr)
            path.unlink(missing_ok=True)
    stats = collect()
    save_statistics(stats, path)
    return stats


def main(argv=None) -> None:
    """Statistics and an imatrix GGUF from the command line, like llama-imatrix."""
    import time

    import cli
    import data_utils
    import imatrix_file
    parser = cli.Parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    data_utils.add_calib_args(parser)
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward call")
    parser.add_argument("--gram_samples", type=int, default=None, help="windows summed into the Grams (all)")
    parser.add_argument("--gram_max_dim", type=int, default=None,
                        help="no Gram for inputs wider than this (default: no limit)")
    parser.add_argument("--with_gram", action="store_true",
                        help="also collect and save the input Gram matrices (large: hidden^2 floats per input)")
    parser.add_argument("--output", default="calib_stats.pt", help="statistics file (torch, weights_only)")
    parser.add_argument("--imatrix", default=None, help="also write a llama.cpp imatrix GGUF here")
    args = parser.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    with cli.reported_errors(ValueError, OSError):
        t0 = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(args.model)
        source = args.calib_file or args.calib_dataset
        ids = data_utils.get_calib_dataset(source, tokenizer, args.n_samples, args.seq_len, args.seed,
                                           chat=args.calib_chat)
        stats = collect_statistics(model, ids, args.device, args.batch_size, with_gram=args.with_gram,
                                   gram_samples=args.gram_samples, gram_max_dim=args.gram_max_dim)
        stats.meta["source"] = data_utils.describe_source(source)
        save_statistics(stats, args.output)
        if args.imatrix:
            imatrix_file.write_model_imatrix(model, stats, args.imatrix, [stats.meta["source"]], args.seq_len)
    print(f"statistics of {len(stats.in_sum2)} tensors over {stats.meta['n_tokens']} tokens in "
          f"{time.perf_counter() - t0:.1f} s -> {args.output}" + (f", {args.imatrix}" if args.imatrix else ""))


if __name__ == "__main__":
    main()

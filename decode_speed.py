"""Decode cost of each GGUF type on the llama.cpp backend that will run the model: a measured table, cached, and
the predicted decode time of a type assignment.

Bytes are not time: llama.cpp's decode kernels differ by type and backend (on an H100, Qwen2.5-7B-shaped: Q4_K_M
266 tok/s at 4.36 GiB, Q3_K_M 211 tok/s at 3.54 GiB, Q6_K 200 tok/s at 5.82 GiB), so a mix that meets a size
budget can still decode slower than the preset of that size. The search takes `--max_slowdown` from this table.

The microbenchmark: random checkpoints with the model's exact widths (its config, fewer decoder blocks) and the
model's tokenizer. The reference type (Q8_0, which fits any row of a multiple of 32) at 1 and at `bench_layers`
blocks gives the cost of a block and of everything else; for each other type, a GGUF with every block matrix in
that type gives its cost per weight relative to the reference. Decode tok/s is measured through llama-cpp-python
as llama-bench's tg test measures it. Only differences between types are per weight, so the blocks' type-
independent work (norms, attention, kernel launches) stays in the per-block time and is never spread over
weights:

    decode_s(assignment) = all_reference_s(n_layers) + sum over tensors of n_weights * delta_s_per_weight[type]

with delta_s_per_weight[Q8_0] = 0. The token embedding is a row lookup and costs nothing per weight; a tied
embedding is also the head. The table is cached as JSON keyed by the model's widths, the types, and the backend
(llama-cpp-python version, GPU or CPU threads).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import torch
from tqdm.auto import tqdm

import files
import gguf_export
import gguf_plan
import quant_utils
import runtimes
import workers
from architectures import ModelInfo, load_model_info, quantizable_tensors

REFERENCE_TYPE = "Q8_0"          # fits every row length that is a multiple of 32
MIN_BENCH_LAYERS = 4
# The benchmark blocks must outgrow the caches, or a small model's blocks decode from cache at speeds the whole
# model never sees (SmolLM2-135M on 2 CPU cores: 4 blocks, 15 MB, predicted 157 tok/s; the model runs at 89).
MIN_BENCH_BLOCK_BYTES = 512 * 2**20
SKIP_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class DecodeCosts:
    """Measured decode cost on one backend (see the module docstring)."""
    one_block_s: float                        # per token, the model cut to 1 block, all in the reference type
    per_block_s: float                        # per token, each further block in the reference type
    delta_s_per_weight: dict[str, float]      # per token per weight, relative to the reference type
    backend: str
    measured: list[dict] = field(default_factory=list)   # the raw tok/s of each benchmark GGUF

    def all_reference_s(self, n_layers: int) -> float:
        """Decode seconds per token of the whole model with every matrix in the reference type."""
        return self.one_block_s + (n_layers - 1) * self.per_block_s

    def tensor_delta_s(self, name: str, n_weights: int, qtype: str, lookup_only: bool) -> float:
        """Decode seconds per token one tensor adds (or saves) stored as `qtype` instead of the reference."""
        if lookup_only:
            return 0.0
        if qtype not in self.delta_s_per_weight:
            raise KeyError(f"no decode cost measured for {qtype} (tensor {name})")
        return n_weights * self.delta_s_per_weight[qtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecodeCosts:
        return cls(float(d["one_block_s"]), float(d["per_block_s"]),
                   {k: float(v) for k, v in d["delta_s_per_weight"].items()}, d["backend"],
                   list(d.get("measured", [])))


def lookup_only_tensors(info: ModelInfo) -> set[str]:
    """Tensors decode reads a row of, not the whole: the token embedding of an untied model."""
    return set() if info.tied else {t.hf_name for t in info.tensors if t.quantizable and
                                    t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD}


def tensor_decode_s(info: ModelInfo, costs: DecodeCosts) -> dict[str, Callable[[str], float]]:
    """{tensor: seconds per token it adds as a given type}, for the allocation table."""
    shapes = quantizable_tensors(info)
    lookup = lookup_only_tensors(info)
    return {n: (lambda t, n=n, r=r, c=c: costs.tensor_delta_s(n, r * c, t, n in lookup))
            for n, (r, c) in shapes.items()}


def predicted_decode_s(info: ModelInfo, costs: DecodeCosts, tensor_types: dict[str, str]) -> float:
    """Predicted decode seconds per token of the model with these types (llama-bench's tg on the cost
    table's backend)."""
    per_tensor = tensor_decode_s(info, costs)
    return costs.all_reference_s(info.n_layers) + sum(per_tensor[n](t) for n, t in tensor_types.items())


# ---------------------------------------------------------------------------------------------------------
# The microbenchmark
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def write_random_checkpoint(config: dict, tokenizer_dir: Path, out_dir: Path, device: str = "cpu",
                            seed: int = 0) -> Path:
    """A bf16 checkpoint of `config` (a config.json dict) with seeded normal(0, initializer_range) weights and
    unit norms, plus every tokenizer file of `tokenizer_dir`; written to a temp name, then renamed."""
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = dict(config)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    if len(fields.get("layer_types") or []) != fields["num_hidden_layers"]:
        fields.pop("layer_types", None)          # per-layer attention kinds: rebuilt for the new layer count
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    with files.atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size="4GB")
        del model
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIP_FILES) \
                    and not f.name.endswith(".index.json") and not (tmp / f.name).exists():
                shutil.copy(f, tmp / f.name)
    return Path(out_dir)


def uniform_block_types(info: ModelInfo, qtype: str) -> tuple[dict[str, str], int]:
    """Every block matrix in `qtype` where its rows fit (else the reference type), the rest in the reference
    type; and the number of weights stored as `qtype`."""
    types, n_weights = {}, 0
    for t in info.tensors:
        if not t.quantizable:
            continue
        fits = t.layer is not None and quant_utils.get_type(qtype).fits(t.shape[1])
        types[t.hf_name] = qtype if fits else REFERENCE_TYPE
        n_weights += t.shape[0] * t.shape[1] if fits else 0
    return types, n_weights


def backend_description(n_threads: int) -> str:
    """What the decode speed depends on besides the model: llama.cpp build and the device it runs on."""
    import llama_cpp
    if runtimes.llama_gpu_offload():
        where = "GPU " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "offload")
    else:
        where = f"CPU {platform.machine()} {os.cpu_count()} cores, {n_threads} threads"
    return f"llama-cpp-python {llama_cpp.__version__}, {where}"


def decode_tok_s(gguf_path: Path, tg_tokens: int, runs: int, n_threads: int) -> float:
    """Decode tok/s of a GGUF, llama-bench's tg test (single-token decodes from an empty cache), measured in a
    fresh Python that loads llama.cpp before numpy and never torch (on the H100, a process that had imported
    numpy, or torch, first died with a segfault at the model load: see workers.py)."""
    code = ("import llama_cpp\nimport runtimes, json, sys\n"
            "llm = runtimes.open_llama(sys.argv[1], int(sys.argv[2]) + 8, 8, False, int(sys.argv[4]))\n"
            "print(json.dumps(runtimes.llama_speed(llm, 1, int(sys.argv[2]), int(sys.argv[3]))[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(gguf_path), str(tg_tokens), str(runs), str(n_threads)],
                          capture_output=True, text=True, env=workers.repo_python_env(), cwd=workers.REPO_DIR)
    if done.returncode != 0:
        raise RuntimeError(f"decode benchmark of {gguf_path.name} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    return float(done.stdout.strip().splitlines()[-1])


def bench_layers(info: ModelInfo) -> int:
    """Blocks in the benchmark model: at least MIN_BENCH_LAYERS and MIN_BENCH_BLOCK_BYTES of block weights in
    the reference type, at most the model's own."""
    block_bytes = sum(gguf_plan.gguf_tensor_bytes(info, t.hf_name, REFERENCE_TYPE)
                      for t in info.tensors if t.quantizable and t.layer == 0)
    wanted = max(MIN_BENCH_LAYERS, -(-MIN_BENCH_BLOCK_BYTES // max(block_bytes, 1)))
    return max(2, min(info.n_layers, wanted))


def measure_decode_costs(model_dir: Path, types: list[str], work_dir: Path, tg_tokens: int = 128, runs: int = 5,
                         n_threads: int | None = None, device: str = "cpu", progress: bool = True) -> DecodeCosts:
    """Run the microbenchmark (module docstring) for `types` on the model at `model_dir`."""
    n_threads = n_threads or os.cpu_count() or 1
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = bench_layers(load_model_info(Path(model_dir)))
    types = [REFERENCE_TYPE] + sorted(set(types) - {REFERENCE_TYPE},
                                      key=lambda t: quant_utils.get_type(t).bits_per_weight)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    measured = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="decode-bench-") as tmp:
        tmp = Path(tmp)
        jobs = [(1, REFERENCE_TYPE)] + [(layers, t) for t in types]
        infos = {}
        for n_layers in sorted({n for n, _ in jobs}):
            ckpt = write_random_checkpoint(dict(config, num_hidden_layers=n_layers), Path(model_dir),
                                           tmp / f"layers{n_layers}", device=device)
            infos[n_layers] = load_model_info(ckpt, f"decode-bench-{n_layers}")
        for n_layers, qtype in tqdm(jobs, desc="decode cost", unit="gguf", disable=not progress):
            info = infos[n_layers]
            tensor_types, n_weights = uniform_block_types(info, qtype)
            path = tmp / f"{qtype}-{n_layers}.gguf"
            gguf_export.write_gguf(gguf_export.plan_from_types(info, tensor_types), path, progress=False)
            tok_s = decode_tok_s(path, tg_tokens, runs, n_threads)
            path.unlink()
            measured.append({"type": qtype, "layers": n_layers, "weights_in_type": n_weights, "tok_s": tok_s})
    return costs_from_measurements(measured, layers, backend_description(n_threads))


def costs_from_measurements(measured: list[dict], layers: int, backend: str) -> DecodeCosts:
    """Solve the cost model from the benchmark rows (module docstring)."""
    seconds = {(m["type"], m["layers"]): 1.0 / m["tok_s"] for m in measured}
    one, many = seconds[(REFERENCE_TYPE, 1)], seconds[(REFERENCE_TYPE, layers)]
    delta = {REFERENCE_TYPE: 0.0}
    for m in measured:
        if m["layers"] == layers and m["type"] != REFERENCE_TYPE and m["weights_in_type"] > 0:
            delta[m["type"]] = (seconds[(m["type"], layers)] - many) / m["weights_in_type"]
    return DecodeCosts(one, (many - one) / (layers - 1), delta, backend, measured)


def cached_decode_costs(model_dir: Path, types: list[str], cache_dir: Path, n_threads: int | None = None,
                        device: str = "cpu", progress: bool = True) -> DecodeCosts:
    """The cost table for these widths, types and backend from `cache_dir`, measured on the first call."""
    n_threads = n_threads or os.cpu_count() or 1
    config = json.loads((Path(model_dir) / "config.json").read_text())
    widths = {k: v for k, v in config.items() if k != "num_hidden_layers" and isinstance(v, (int, float, str))}
    backend = backend_description(n_threads)
    layers = bench_layers(load_model_info(Path(model_dir)))
    key = hashlib.sha256(json.dumps([widths, sorted(types), backend, layers], sort_keys=True).encode())
    path = Path(cache_dir) / f"decode-costs-{key.hexdigest()[:16]}.json"
    if path.is_file():
        return DecodeCosts.from_dict(json.loads(path.read_text()))
    t0 = time.perf_counter()
    costs = measure_decode_costs(Path(model_dir), types, Path(cache_dir), n_threads=n_threads, device=device,
                                 progress=progress)
    record = dict(costs.to_dict(), seconds=time.perf_counter() - t0)
    files.write_json(path, record)
    return costs

"""How fast each GGUF type runs on the llama.cpp backend that will run the model: a measured cost table for
prompt processing and decode, cached per machine, and the predicted speed of a type assignment.

Bytes are not time. llama.cpp's kernels differ by type, by tensor shape and by backend, and prompts differ
most: on a CPU some types are repacked into interleaved layouts or multiplied by AMX tiles or llamafile's
sgemm, others by a generic dot product a row at a time (on the 2-core Xeon this project is developed on, a
SmolLM2 mix of Q5_1 processed prompts at 0.7x of Q4_K_M's speed while decoding at 0.94x). So the search takes
both speeds from this table, measured where the model will run.

The microbenchmark: random checkpoints with the model's exact widths (its config, fewer decoder blocks when the
model is large) and its tokenizer. The reference type (Q8_0, which fits any row of a multiple of 32) at 1 and
at `bench_layers` blocks gives the cost of a block and of everything else; for each other type, a GGUF with
every block matrix its rows fit in that type gives its cost per weight relative to the reference. All the
GGUFs are loaded together and timed in interleaved rounds (llama-bench's pp and tg tests; see
runtimes.interleaved_llama_speeds), so a machine whose speed drifts slows every one alike; the medians make the
table and the quartiles stay with it. For each test (pp: seconds per prompt, tg: seconds per token):

    seconds(assignment) = all_reference_s(n_layers) + sum over tensors of n_weights * delta_s_per_weight[type]

with delta[Q8_0] = 0: only differences between types are per weight, so the blocks' type-independent work
(norms, attention) stays in the per-block time. A token embedding is a row lookup and costs nothing. The output
head (or a tied embedding) has costs of its own: one wide matrix does not run at the speed per weight of the
block matrices (on an H100, Qwen2.5-7B's head in Q4_K instead of Q6_K saves 1.2e-11 s a weight per 128 tokens,
where the block matrices save 3.3e-11), so for each of its types a file of reference blocks with the head in
that type gives its decode delta. A prompt runs the head on its last token only, so its prompt cost is that
delta for one token.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

import files
import gguf_export
import gguf_plan
import quant_utils
import runtimes
import workers
from architectures import ModelInfo, load_model_info
from cli import UserError

COSTS_FORMAT_VERSION = 3         # 3: the head's own costs; 2: prompt processing and decode; 1: decode only
REFERENCE_TYPE = "Q8_0"          # fits every row length that is a multiple of 32
MODES = ("pp", "tg")             # llama-bench's prompt-processing and decode tests
MIN_BENCH_LAYERS = 4
# The benchmark blocks must outgrow the caches, or a small model's blocks run from cache at speeds the whole
# model never sees (SmolLM2-135M on 2 CPU cores: 4 blocks, 15 MB, predicted 157 tok/s decode; the model runs 89).
MIN_BENCH_BLOCK_BYTES = 512 * 2**20
BENCH_SAMPLE_ROWS = 64           # rows of each benchmark matrix quantized (then repeated: see bench_plan)
SKIP_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class ModeCosts:
    """One test's costs (module docstring): seconds per prompt (pp) or per token (tg)."""
    one_block_s: float                        # the model cut to 1 block, every matrix in the reference type
    per_block_s: float                        # each further block in the reference type
    delta_s_per_weight: dict[str, float]      # per weight, relative to the reference type
    head_delta_s_per_weight: dict[str, float]  # the same for the head's weights (module docstring)

    def all_reference_s(self, n_layers: int) -> float:
        return self.one_block_s + (n_layers - 1) * self.per_block_s


@dataclass
class SpeedCosts:
    """A measured cost table of one backend: per test mode, the costs; the raw runs behind them."""
    modes: dict[str, ModeCosts]
    pp_tokens: int
    tg_tokens: int
    backend: str
    measured: list[dict] = field(default_factory=list)   # per benchmark GGUF: type, layers, tok/s quartiles
    seconds: float = 0.0                                  # time the measurement took

    def tokens(self, mode: str) -> int:
        return self.pp_tokens if mode == "pp" else self.tg_tokens

    def to_dict(self) -> dict:
        return {"format_version": COSTS_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "the cost table") -> "SpeedCosts":
        if d.get("format_version") != COSTS_FORMAT_VERSION:
            raise UserError(f"{source} is not a format {COSTS_FORMAT_VERSION} speed cost table (prompt, "
                            "decode and the head's own costs); measure it again with this version "
                            "(mixed_precision_ptq.py measures and caches one)")
        modes = {m: ModeCosts(float(c["one_block_s"]), float(c["per_block_s"]),
                              {t: float(v) for t, v in c["delta_s_per_weight"].items()},
                              {t: float(v) for t, v in c["head_delta_s_per_weight"].items()})
                 for m, c in d["modes"].items()}
        return cls(modes, int(d["pp_tokens"]), int(d["tg_tokens"]), d["backend"], list(d.get("measured", [])),
                   float(d.get("seconds", 0.0)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpeedCosts":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the speed cost table {path}: {exc}") from None
        return cls.from_dict(d, str(path))


# ---------------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------------

def tensor_roles(info: ModelInfo) -> dict[str, str]:
    """How each quantizable tensor is used per token: "lookup" (an untied token embedding: one row read),
    "head" (the output matrix, which a prompt runs on its last token only) or "matmul"."""
    roles = {}
    for t in info.tensors:
        if not t.quantizable:
            continue
        if t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            roles[t.hf_name] = "head" if info.tied else "lookup"
        elif t.kind == gguf.MODEL_TENSOR.OUTPUT:
            roles[t.hf_name] = "head"
        else:
            roles[t.hf_name] = "matmul"
    return roles


def head_name(info: ModelInfo) -> str:
    """The HF name of the tensor whose role is "head"."""
    return next(name for name, role in tensor_roles(info).items() if role == "head")


def tensor_seconds(info: ModelInfo, costs: SpeedCosts) -> dict[str, dict[str, Callable[[str], float]]]:
    """{mode: {tensor: seconds it adds (or saves) as a given type instead of the reference}}."""
    roles = tensor_roles(info)
    shapes = {t.hf_name: t.shape for t in info.tensors if t.quantizable}

    def cost(mode: str, name: str, qtype: str) -> float:
        role = roles[name]
        if role == "lookup":
            return 0.0
        deltas = costs.modes[mode].head_delta_s_per_weight if role == "head" else costs.modes[mode].delta_s_per_weight
        if qtype not in deltas:
            raise UserError(f"the speed cost table has no {qtype} for {name}; measure it again with the "
                            "types of this search")
        return shapes[name][0] * shapes[name][1] * deltas[qtype]

    return {mode: {name: (lambda t, m=mode, n=name: cost(m, n, t)) for name in roles} for mode in costs.modes}


def predicted_seconds(info: ModelInfo, costs: SpeedCosts, tensor_types: dict[str, str]) -> dict[str, float]:
    """{mode: predicted seconds} of the model with these types: per prompt (pp), per token (tg)."""
    per_tensor = tensor_seconds(info, costs)
    return {mode: costs.modes[mode].all_reference_s(info.n_layers)
            + sum(per_tensor[mode][n](t) for n, t in tensor_types.items()) for mode in costs.modes}


def predicted_tok_s(info: ModelInfo, costs: SpeedCosts, tensor_types: dict[str, str]) -> dict[str, float]:
    """{mode: predicted tokens per second} (llama-bench's pp and tg on the table's backend)."""
    return {mode: costs.tokens(mode) / s for mode, s in predicted_seconds(info, costs, tensor_types).items()}


# ---------------------------------------------------------------------------------------------------------
# The microbenchmark
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def write_random_checkpoint(config: dict, tokenizer_dir: Path, out_dir: Path, device: str = "cpu",
                            seed: int = 0) -> Path:
    """A bf16 checkpoint of `config` (a config.json dict) with seeded normal(0, initializer_range) weights and
    unit norms, plus every tokenizer file of `tokenizer_dir`; written atomically."""
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


def bench_plan(info: ModelInfo, tensor_types: dict[str, str],
               sample_rows: int = BENCH_SAMPLE_ROWS) -> gguf_export.ExportPlan:
    """The export plan of one benchmark file. A file's speed does not depend on its values, so each quantized
    matrix is `sample_rows` of its rows quantized by ggml (unit importances for the types that need an imatrix)
    and repeated to its height: the i-quants' quantizers (IQ2_S about 0.5 M weights/s a thread) take seconds,
    not minutes."""
    plan = gguf_export.plan_from_types(info, tensor_types)
    for spec in info.tensors:
        qtype = plan.stored_types[spec.hf_name]
        if not spec.quantizable or quant_utils.get_type(qtype).is_float:
            continue
        values = gguf_export.tensor_values(info, spec)[:sample_rows]
        unit = np.ones(values.shape[1], dtype=np.float32)
        rows = gguf_export.encode_tensor(values, qtype, unit).reshape(values.shape[0], -1)
        plan.shipped[spec.hf_name] = np.resize(rows, (spec.shape[0], rows.shape[1]))
    return plan


def backend_description(n_threads: int) -> str:
    """What the speed depends on besides the model: the llama.cpp build and the device it runs on."""
    import llama_cpp
    if runtimes.llama_gpu_offload():
        where = "GPU " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "offload")
    else:
        where = f"CPU {cpu_model_name()} ({platform.machine()}, {os.cpu_count()} cores), {n_threads} threads"
    return f"llama-cpp-python {llama_cpp.__version__}, {where}"


def cpu_model_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform.processor())."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def bench_layers(info: ModelInfo) -> int:
    """Blocks in the benchmark model: at least MIN_BENCH_LAYERS and MIN_BENCH_BLOCK_BYTES of block weights in
    the reference type, at most the model's own."""
    block_bytes = sum(gguf_plan.gguf_tensor_bytes(info, t.hf_name, REFERENCE_TYPE)
                      for t in info.tensors if t.quantizable and t.layer == 0)
    wanted = max(MIN_BENCH_LAYERS, -(-MIN_BENCH_BLOCK_BYTES // max(block_bytes, 1)))
    return max(2, min(info.n_layers, wanted))


def head_file_types(info: ModelInfo, qtype: str) -> tuple[dict[str, str], int]:
    """Every matrix in the reference type but the head, in `qtype`; and the head's number of weights."""
    head = head_name(info)
    types = {t.hf_name: REFERENCE_TYPE for t in info.tensors if t.quantizable}
    rows, row_length = next(t.shape for t in info.tensors if t.hf_name == head)
    return {**types, head: qtype}, rows * row_length


def by_bits(types) -> list[str]:
    """The reference type first, then the others by bits per weight."""
    others = set(types) - {REFERENCE_TYPE}
    return [REFERENCE_TYPE] + sorted(others, key=lambda t: quant_utils.get_type(t).bits_per_weight)


def measure_costs(model_dir: Path, types: list[str], head_types: list[str], work_dir: Path, pp_tokens: int = 512,
                  tg_tokens: int = 128, rounds: int = 5, n_threads: int | None = None, device: str = "cpu",
                  progress: bool = True) -> SpeedCosts:
    """Run the microbenchmark (module docstring) for the block matrices' `types` and the head's `head_types` on
    the model at `model_dir`."""
    t0 = time.perf_counter()
    n_threads = n_threads or os.cpu_count() or 1
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = bench_layers(load_model_info(Path(model_dir)))
    jobs = [(1, REFERENCE_TYPE, "blocks")] + [(layers, t, "blocks") for t in by_bits(types)]
    jobs += [(layers, t, "head") for t in by_bits(head_types)[1:]]
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="speed-bench-") as tmp:
        tmp = Path(tmp)
        infos = {}
        for n_layers in sorted({n for n, _, _ in jobs}):
            ckpt = write_random_checkpoint(dict(config, num_hidden_layers=n_layers), Path(model_dir),
                                           tmp / f"layers{n_layers}", device=device)
            infos[n_layers] = load_model_info(ckpt, f"speed-bench-{n_layers}")
        paths, rows = [], []
        for n_layers, qtype, part in tqdm(jobs, desc="speed cost GGUFs", unit="gguf", disable=not progress):
            if part == "head":
                tensor_types, n_weights = head_file_types(infos[n_layers], qtype)
            else:
                tensor_types, n_weights = uniform_block_types(infos[n_layers], qtype)
            path = tmp / f"{part}-{qtype}-{n_layers}.gguf"
            gguf_export.write_gguf(bench_plan(infos[n_layers], tensor_types), path, progress=False)
            paths.append(str(path))
            rows.append({"part": part, "type": qtype, "layers": n_layers, "weights_in_type": n_weights})
        runs = workers.interleaved_speeds(paths, pp_tokens, tg_tokens, rounds, n_threads, progress)
    for row, r in zip(rows, runs):
        row.update(r.summary())
    costs = costs_from_measurements(rows, layers, backend_description(n_threads), pp_tokens, tg_tokens)
    costs.seconds = time.perf_counter() - t0
    return costs


def costs_from_measurements(measured: list[dict], layers: int, backend: str, pp_tokens: int,
                            tg_tokens: int) -> SpeedCosts:
    """Solve the cost model from the benchmark rows' median tok/s (module docstring)."""
    modes = {}
    for mode, n_tokens in zip(MODES, (pp_tokens, tg_tokens)):
        seconds = {(m["part"], m["type"], m["layers"]): n_tokens / m[mode]["median"] for m in measured}
        one, many = seconds[("blocks", REFERENCE_TYPE, 1)], seconds[("blocks", REFERENCE_TYPE, layers)]
        parts = ("blocks",) if mode == "pp" else ("blocks", "head")   # a prompt's head: below
        delta = {"blocks": {REFERENCE_TYPE: 0.0}, "head": {REFERENCE_TYPE: 0.0}}
        for m in measured:
            if (m["part"] in parts and m["layers"] == layers and m["type"] != REFERENCE_TYPE
                    and m["weights_in_type"] > 0):
                delta[m["part"]][m["type"]] = (seconds[(m["part"], m["type"], layers)] - many) / m["weights_in_type"]
        modes[mode] = ModeCosts(one, (many - one) / (layers - 1), delta["blocks"], delta["head"])
    # a prompt runs the head on its last token only: its decode delta for one token
    modes["pp"].head_delta_s_per_weight = {t: d / tg_tokens for t, d in modes["tg"].head_delta_s_per_weight.items()}
    return SpeedCosts(modes, pp_tokens, tg_tokens, backend, measured)


def cached_costs(model_dir: Path, types: list[str], head_types: list[str], cache_dir: Path,
                 n_threads: int | None = None, device: str = "cpu", rounds: int = 5,
                 progress: bool = True) -> SpeedCosts:
    """The cost table for these widths, types (of the block matrices and of the head), backend and threads from
    `cache_dir`, measured on first use."""
    n_threads = n_threads or os.cpu_count() or 1
    config = json.loads((Path(model_dir) / "config.json").read_text())
    widths = {k: v for k, v in config.items() if k != "num_hidden_layers" and isinstance(v, (int, float, str))}
    layers = bench_layers(load_model_info(Path(model_dir)))
    fields = {"format": COSTS_FORMAT_VERSION, "widths": widths, "types": sorted(types),
              "head_types": sorted(head_types), "backend": backend_description(n_threads), "layers": layers,
              "rounds": rounds}
    path = Path(cache_dir) / f"speed-costs-{files.record_key(fields)}.json"
    if path.is_file():
        try:
            return SpeedCosts.from_dict(json.loads(path.read_text()), str(path))
        except (ValueError, KeyError, TypeError, UserError):
            print(f"warning: discarding unreadable cache entry {path}; measuring it again", file=sys.stderr)
    for other in sorted(Path(cache_dir).glob("speed-costs-*.json")):
        try:
            d = json.loads(other.read_text())
            if serves(d.get("key"), fields):
                return SpeedCosts.from_dict(d, str(other))
        except (ValueError, KeyError, TypeError, UserError, AttributeError):
            continue            # not a table this run can use (the one it measures replaces nothing)
    costs = measure_costs(Path(model_dir), types, head_types, Path(cache_dir), rounds=rounds, n_threads=n_threads,
                          device=device, progress=progress)
    files.write_json(path, {**costs.to_dict(), "key": fields})
    return costs


def serves(cached: dict | None, wanted: dict) -> bool:
    """A cached table measured as `wanted` asks, for these types and maybe more (each type's cost is measured on
    its own file, so a wider table holds the same costs)."""
    listed = ("types", "head_types")
    if not isinstance(cached, dict) or not all(set(wanted[k]) <= set(cached.get(k, ())) for k in listed):
        return False
    return all(cached.get(k) == v for k, v in wanted.items() if k not in listed)

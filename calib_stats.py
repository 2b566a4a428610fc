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

The model is walked one decoder block at a time, GPTQ's `llama_sequential` pattern: the inputs of block 0 are
caught once, each block is moved to `--device` in float32, run on all calibration windows, and its outputs become
the next block's inputs; only one block is on the device at a time. Llama-family decoders (Llama, Mistral,
Qwen2/3, SmolLM): `model.model.layers`, `model.model.norm`, `model.lm_head`.

The sensitivity analysis and the GA keep the model resident instead (place_model): whole on the GPU when it
fits beside their working memory, else an accelerate-style device map within --max_memory: blocks over the
GPUs, the rest in pinned CPU RAM streamed to the GPU as each block runs (run_block follows the block).

Statistics are saved with torch.save as plain tensors (`torch.load(..., weights_only=True)` reads them) and
as a llama.cpp imatrix GGUF (`llama-quantize --imatrix`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

COMPUTE_DTYPE = torch.float32
STATS_FORMAT_VERSION = 1

# config.json model_type -> gguf-py architecture name (for GGUF tensor names). Llama-family decoders only.
GGUF_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


# ---------------------------------------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit name must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps requested but MPS is not available")
    return dev


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, blocks, final norm) of a *ForCausalLM model."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ValueError(f"{type(model).__name__} is not a Llama-family decoder (model.model.layers / .norm)")
    return inner


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers of one decoder block, in module order, by name relative to the block."""
    return [(name, mod) for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def block_prefix(model: nn.Module, index: int) -> str:
    """The HF parameter-name prefix of block `index` (e.g. "model.layers.3.")."""
    blocks = decoder_blocks(model)
    for name, mod in model.named_modules():
        if mod is blocks[index]:
            return name + "."
    raise ValueError(f"block {index} not found in the model")


def is_tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the token embedding."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def output_weight_name(model: nn.Module) -> str:
    """The name the statistics of the output head's input are kept under (also for tied heads)."""
    for name, mod in model.named_modules():
        if mod is model.get_output_embeddings():
            return name + ".weight"
    raise ValueError("the model has no output head")


def embedding_weight_name(model: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is model.get_input_embeddings():
            return name + ".weight"
    raise ValueError("the model has no input embedding")


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of all parameters and the config (cache keys: same weights, same hash)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        h.update(name.encode())
        h.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Block-by-block execution (shared with the sensitivity analysis)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class BlockBatch:
    """One micro-batch of hidden states entering a block, with the keyword arguments blocks are called with."""
    hidden: torch.Tensor
    kwargs: dict


class _CatchBlockInputs(nn.Module):
    """Stands in for block 0 and stops the forward pass once it has seen the block's inputs (GPTQ's Catcher)."""

    class Caught(Exception):
        pass

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.caught: BlockBatch | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ValueError("decoder blocks are expected to take their extra inputs by keyword")
        self.caught = BlockBatch(hidden_states, kwargs)
        raise self.Caught


def _to_device(value, device: torch.device):
    """Move tensors (also inside tuples/lists/dicts) to `device`; floating tensors become float32."""
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(COMPUTE_DTYPE) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def catch_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device
                       ) -> list[BlockBatch]:
    """The hidden states entering block 0 for `ids` [n, seq_len], in micro-batches, on `device` in float32.

    The embedding runs where the model lives; its output is cast to float32 and passed as `inputs_embeds`, so
    rotary tables and masks are built in float32 as well.
    """
    inner = decoder(model)
    blocks = inner.layers
    embed = model.get_input_embeddings()
    catcher = _CatchBlockInputs(blocks[0])
    blocks[0] = catcher
    batches = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch_ids = ids[start:start + batch_size].to(embed.weight.device)
            embeds = embed(batch_ids).to(COMPUTE_DTYPE)
            with contextlib.suppress(_CatchBlockInputs.Caught):
                inner(inputs_embeds=embeds, use_cache=False)
            if catcher.caught is None:
                raise RuntimeError("the decoder did not call its first block")
            batches.append(BlockBatch(_to_device(catcher.caught.hidden, device),
                                      _to_device(catcher.caught.kwargs, device)))
            catcher.caught = None
    finally:
        blocks[0] = catcher.block
    return batches


@contextlib.contextmanager
def block_on_device(block: nn.Module, device: torch.device):
    """Run a block on `device` in float32, then put it back where and how it was (lossless for bf16/f16)."""
    param = next(block.parameters())
    home_device, home_dtype = param.device, param.dtype
    if home_device == device and home_dtype == COMPUTE_DTYPE:
        yield block
        return
    block.to(device=device, dtype=COMPUTE_DTYPE)
    try:
        yield block
    finally:
        block.to(device=home_device, dtype=home_dtype)


@contextlib.contextmanager
def float32_params(module: nn.Module):
    """Run `module` with float32 parameters while its model keeps its own storage dtype: bf16/f16 parameters
    are swapped for float32 copies (exact) and put back after, float32 ones are used as they are. A 7B model
    then sits on the GPU in bf16 (15 GB) and still computes in float32, one block's copies at a time."""
    saved = [(p, p.data) for p in module.parameters() if p.is_floating_point() and p.dtype != COMPUTE_DTYPE]
    try:
        for p, data in saved:
            p.data = data.to(COMPUTE_DTYPE)
        yield module
    finally:
        for p, data in saved:
            p.data = data


def run_block(block: nn.Module, batch: BlockBatch) -> torch.Tensor:
    """The block's output hidden states for one micro-batch, computed in float32 on the block's execution
    device (where its weights are, or where a CPU-held block is streamed: see place_model); the inputs follow
    the block there, and the output stays there."""
    device = execution_device(block)
    batch = BlockBatch(_to_device(batch.hidden, device), _to_device(batch.kwargs, device))  # no-op when there
    with streamed_to(block, device), float32_params(block):
        out = block(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------
# Placement: the whole model on one device, or a device map when it does not fit there
# ---------------------------------------------------------------------------------------------------------

EXECUTION_DEVICE_ATTR = "_quant_execution_device"


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the device place_model streams it to, else where its parameters are."""
    return getattr(module, EXECUTION_DEVICE_ATTR, None) or next(module.parameters()).device


@contextlib.contextmanager
def streamed_to(module: nn.Module, device: torch.device):
    """Run `module` on `device` while its weights are held elsewhere (pinned CPU RAM): copied there in their
    own dtype for the duration and dropped after (the held copy is never written back). A no-op for a module
    that lives on `device`."""
    held = [t for t in [*module.parameters(), *module.buffers()] if t.device != device]
    saved = [t.data for t in held]
    try:
        for t in held:
            t.data = t.data.to(device, non_blocking=True)
        yield module
    finally:
        for t, data in zip(held, saved):
            t.data = data


MAX_MEMORY_HELP = ("memory the sensitivity analysis and the GA may use per device, weights plus working memory, in "
                   "accelerate's form: GPU index or device = size, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: the "
                   "free memory of every GPU). A model that does not fit the --device GPU is spread over the GPUs, "
                   "and what fits none is held in CPU RAM and streamed to the GPU block by block")


def pin_in_one_buffer(module: nn.Module, pin_memory: bool = True, align: int = 64) -> None:
    """Make a CPU module's parameters and buffers views into one page-locked buffer (`pin_memory` False: a
    plain one, for machines without a GPU). One allocation per block, because torch's pinned-memory allocator
    rounds every allocation up to a power of two: pinned tensor by tensor, a 7B block's 466 MB took nearly
    twice that (a 45 GB peak RSS on the H100)."""
    tensors = list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0, *itertools.accumulate(-(-n // align) * align for n in sizes[:-1])]
    buffer = torch.empty(offsets[-1] + sizes[-1], dtype=torch.uint8, pin_memory=pin_memory)
    for t, offset, n in zip(tensors, offsets, sizes):
        view = buffer[offset:offset + n].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view


def parse_max_memory(text: str) -> dict[str, int]:
    """"0=20GiB,1=20GiB,cpu=64GiB" (accelerate's max_memory: GPU index or device name = size) ->
    {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes}."""
    from accelerate.utils import convert_file_size_to_int
    budget = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, size = item.partition("=")
        if not sep:
            raise ValueError(f"--max_memory item {item!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB)")
        name = name.strip()
        device = f"cuda:{name}" if name.isdigit() else str(torch.device(name))
        try:
            budget[device] = convert_file_size_to_int(size.strip())
        except ValueError:
            raise ValueError(f"--max_memory size {size!r} is not a size (e.g. 20GiB, 1.5GB)") from None
    return budget


def available_memory() -> dict[str, int]:
    """Free bytes on every visible GPU and available CPU RAM (accelerate's get_max_memory)."""
    from accelerate.utils import get_max_memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()         # memory torch keeps cached (e.g. from the statistics) counts as free
    return {(f"cuda:{k}" if isinstance(k, int) else str(k)): int(v) for k, v in get_max_memory().items()}


def plan_device_map(resident: dict[str, int], blocks: list[tuple[str, int]], device: str,
                    capacity: dict[str, int], reserve_bytes: int, other_reserve_bytes: int | None = None
                    ) -> dict[str, str]:
    """Module name -> device, in accelerate's device-map form, for a model that computes on `device`.

    `resident` (embedding, final norm, rotary tables, output head: every measurement uses them) goes to
    `device`; the blocks (name, bytes), in order and each whole, fill `device` and then the other GPUs of
    `capacity`, keeping `reserve_bytes` of working memory free on `device` and `other_reserve_bytes` (default
    the same) on the others; blocks that fit no GPU are held in CPU RAM ("cpu", at most capacity["cpu"] when
    given) and streamed to `device` when they run. Everything on `device` when it all fits there.
    """
    if device not in capacity:
        raise ValueError(f"--max_memory gives no size for {device}, the device the model computes on")
    need = sum(resident.values()) + sum(b for _, b in blocks) + reserve_bytes
    if need <= capacity[device]:
        return {name: device for name in [*resident, *(n for n, _ in blocks)]}
    other_reserve_bytes = reserve_bytes if other_reserve_bytes is None else other_reserve_bytes
    free = {d: c - (reserve_bytes if d == device else other_reserve_bytes)
            for d, c in capacity.items() if d.startswith("cuda")}
    free[device] -= sum(resident.values())
    if free[device] < 0:
        raise ValueError(f"{device} has {capacity[device] / 2**30:.1f} GiB for this run: less than the "
                         f"embedding, output head and working memory need "
                         f"({(sum(resident.values()) + reserve_bytes) / 2**30:.1f} GiB); fewer held-out "
                         f"tokens need less (--measure_samples, --kld_samples)")
    gpus = [device] + sorted(d for d in free if d != device)
    cpu_free = capacity.get("cpu")
    mapping, gpu = {name: device for name in resident}, 0
    for name, size in blocks:
        while gpu < len(gpus) and free[gpus[gpu]] < size:
            gpu += 1
        if gpu < len(gpus):
            mapping[name], free[gpus[gpu]] = gpus[gpu], free[gpus[gpu]] - size
        elif cpu_free is None or cpu_free >= size:
            mapping[name] = "cpu"
            cpu_free = None if cpu_free is None else cpu_free - size
        else:
            raise ValueError(f"the model does not fit the memory given ({sum(capacity.values()) / 2**30:.1f} "
                             f"GiB in all, {need / 2**30:.1f} GiB needed): raise --max_memory")
    return mapping


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers in their storage dtype (shared tensors once)."""
    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def place_model(model: nn.Module, device: torch.device, capacity: dict[str, int] | None = None,
                reserve_bytes: int = 0, other_reserve_bytes: int | None = None) -> dict[str, str]:
    """Put the model, in its storage dtype, where plan_device_map says for compute device `device`
    (capacity: bytes per device, default the free memory of every GPU; only a CUDA `device` is split), and
    mark the CPU-held blocks to be streamed to `device`. Returns the device map."""
    device = torch.device(device)
    blocks = decoder_blocks(model)
    names = [block_prefix(model, i)[:-1] for i in range(len(blocks))]
    if device.type != "cuda":
        mapping = {"": str(device)}
    else:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        capacity = capacity or available_memory()
        block_bytes = [module_bytes(b) for b in blocks]
        mapping = plan_device_map({"": module_bytes(model) - sum(block_bytes)}, list(zip(names, block_bytes)),
                                  str(device), capacity, reserve_bytes, other_reserve_bytes)
    inner = decoder(model)
    layers, inner.layers = inner.layers, nn.ModuleList()
    try:
        model.to(device)                            # everything but the blocks
    finally:
        inner.layers = layers
    for name, block in zip(names, blocks):
        target = torch.device(mapping.get(name, mapping.get("", str(device))))
        block.to(target)
        if target.type == "cpu" and device.type != "cpu":
            setattr(block, EXECUTION_DEVICE_ATTR, device)
            pin_in_one_buffer(block)             # host-to-device copies at full speed, asynchronous
        elif hasattr(block, EXECUTION_DEVICE_ATTR):
            delattr(block, EXECUTION_DEVICE_ATTR)
    return mapping


def describe_device_map(mapping: dict[str, str]) -> str:
    """Where the blocks went: 'cuda:0 (all)', or e.g. 'cuda:0: embeddings, head and 19 blocks; cpu (streamed
    to the GPU): 9 blocks'."""
    devices = list(dict.fromkeys(mapping.values()))
    if len(devices) == 1:
        return f"{devices[0]} (all)"
    parts = []
    for dev in devices:
        n_blocks = sum(1 for name, d in mapping.items() if d == dev and name)
        what = f"embeddings, head and {n_blocks} blocks" if mapping.get("") == dev else f"{n_blocks} blocks"
        parts.append(f"{'cpu (streamed to the GPU)' if dev == 'cpu' else dev}: {what}")
    return "; ".join(parts)


def final_norm_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The final norm as a float32 module on `device` (a copy when the model lives elsewhere)."""
    norm = decoder(model).norm
    p = next(norm.parameters())
    if p.device == device and p.dtype == COMPUTE_DTYPE:
        return norm
    return copy.deepcopy(norm).to(device=device, dtype=COMPUTE_DTYPE)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------

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
    def from_dict(cls, d: dict) -> "CalibStats":
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


def ids_fingerprint(ids: torch.Tensor) -> str:
    """A short content hash of token windows."""
    arr = ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(arr.shape)).encode())
    h.update(arr.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_statistics(model: nn.Module, calib_ids: torch.Tensor, device="auto", batch_size: int = 8,
                       with_gram: bool = True, gram_samples: int | None = None,
                       gram_max_dim: int | None = None, gram_product_dtype: torch.dtype = torch.float32,
                       gram_dtype: torch.dtype = torch.float32,
                       progress: bool = True) -> CalibStats:
    """Run the calibration windows through the model block by block and collect every linear's statistics.

    Sums of squares use every window. Grams use the first `gram_samples` windows (default all): they cost as
    much as the forward pass itself on a CPU, and a few tens of thousands of tokens pin an output-error ratio
    down well. Micro-batch products are formed in `gram_product_dtype` and summed in float64; Grams are stored
    as `gram_dtype` (float64 with a float64 product for exactness tests). Inputs wider than `gram_max_dim`
    (None: no limit) get only their sums of squares.
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
            "calib_fingerprint": ids_fingerprint(calib_ids), "model_fingerprint": model_fingerprint(model)}
    return CalibStats(in_sum2, counts, gram, gram_tokens, gram_key, token_counts, meta)


# ---------------------------------------------------------------------------------------------------------
# Saving: torch file and llama.cpp imatrix GGUF
# ---------------------------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_statistics(stats: CalibStats, path: str | os.PathLike, with_gram: bool = True) -> None:
    """torch.save of plain tensors and dicts; without Grams the file holds only the imatrix (small)."""
    d = stats.to_dict()
    if not with_gram:
        d.update(gram={}, gram_tokens={}, gram_key={})
    atomic_torch_save(d, path)


def load_statistics(path: str | os.PathLike) -> CalibStats:
    return CalibStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def gguf_tensor_names(model: nn.Module, hf_names) -> dict[str, str]:
    """GGUF tensor names ("blk.0.attn_q.weight") of HF weight names, by gguf-py's TensorNameMap table."""
    import gguf
    model_type = model.config.model_type
    if model_type not in GGUF_ARCH_OF_MODEL_TYPE:
        raise ValueError(f"no GGUF architecture known for model_type {model_type!r}")
    arch_name = GGUF_ARCH_OF_MODEL_TYPE[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.TensorNameMap(arch, model.config.num_hidden_layers)
    out = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"{hf_name} has no GGUF name for architecture {arch_name}")
        out[hf_name] = gguf_name
    return out


def imatrix_entries(model: nn.Module, stats: CalibStats) -> dict[str, str]:
    """HF weight name -> GGUF name of the tensors the imatrix GGUF describes.

    Like llama-imatrix: every block linear, and `output.weight` when the head has its own weight. A tied head
    reads token_embd, which llama-imatrix never records (its other use is a row lookup), so it is left out.
    """
    names = [n for n in stats.in_sum2 if not (n == output_weight_name(model) and is_tied(model))]
    return gguf_tensor_names(model, names)


def write_imatrix_gguf(stats: CalibStats, gguf_names: dict[str, str], path: str | os.PathLike,
                       datasets: list[str], chunk_size: int, arch: str = "llama") -> None:
    """Write llama.cpp's imatrix GGUF (tools/imatrix save_imatrix): `<name>.in_sum2` (F32 [1, n_in]) and
    `<name>.counts` (F32 [1, 1]) per tensor in sorted name order; general.type = imatrix, imatrix.datasets,
    imatrix.chunk_count (tokens / chunk_size), imatrix.chunk_size."""
    import gguf
    import numpy as np
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n_tokens = max(stats.counts.values())
    writer = gguf.GGUFWriter(tmp, arch=arch)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, n_tokens // chunk_size)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    by_gguf = {gguf_names[hf]: hf for hf in gguf_names}
    for gguf_name in sorted(by_gguf):
        hf = by_gguf[gguf_name]
        sums = stats.in_sum2[hf].to(torch.float32).numpy().reshape(1, -1)
        writer.add_tensor(f"{gguf_name}.in_sum2", np.ascontiguousarray(sums))
        writer.add_tensor(f"{gguf_name}.counts", np.array([[stats.counts[hf]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


def read_imatrix_gguf(path: str | os.PathLike) -> tuple[dict[str, "np.ndarray"], dict[str, float], dict]:
    """(in_sum2 by GGUF weight name, counts by name, metadata) of an imatrix GGUF, read with gguf-py."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = t.data.reshape(-1).copy()
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = float(t.data.reshape(-1)[0])
    meta = {}
    for key in (gguf.Keys.General.TYPE, gguf.Keys.IMatrix.CHUNK_COUNT, gguf.Keys.IMatrix.CHUNK_SIZE,
                gguf.Keys.IMatrix.DATASETS):
        f = reader.get_field(key)
        if f is not None:
            meta[key] = f.contents()
    return sums, counts, meta


# ---------------------------------------------------------------------------------------------------------
# Command line: statistics and an imatrix GGUF, like llama-imatrix
# ---------------------------------------------------------------------------------------------------------

def cached_statistics(model: nn.Module, calib_ids: torch.Tensor, device="auto", batch_size: int = 8,
                      gram_samples: int | None = None, cache_dir=None, gram_max_dim: int | None = None
                      ) -> CalibStats:
    """Statistics from `cache_dir` when this model and these windows were seen before, else collected and
    saved there (an interrupted run resumes without collecting again)."""
    collect = lambda: collect_statistics(model, calib_ids, device, batch_size, gram_samples=gram_samples,
                                         gram_max_dim=gram_max_dim)
    if cache_dir is None:
        return collect()
    cap = "" if gram_max_dim is None else f"-d{gram_max_dim}"
    key = f"{model_fingerprint(model)}-{ids_fingerprint(calib_ids)}-g{gram_samples}{cap}"
    path = Path(cache_dir) / f"stats-{key}.pt"
    if path.is_file():
        return load_statistics(path)
    stats = collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(stats, path)
    return stats


def add_data_args(parser) -> None:
    """The calibration-data options shared by every script that calibrates."""
    parser.add_argument("--calib", "--calib_dataset", dest="calib_dataset", default="wikitext2",
                        help="hub calibration source (datasets)")
    parser.add_argument("--calib_file", nargs="+", default=None,
                        help="local calibration text (.txt/.tokens, .jsonl, .parquet; several allowed); "
                             "overrides --calib_dataset")
    parser.add_argument("--calib_chat", action="store_true", help="wrap samples in the model's chat template")
    parser.add_argument("--n_samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="window sampling seed")
    parser.add_argument("--device", default="auto", help="cuda | mps | cpu | auto")


def load_model_and_tokenizer(path: str):
    """A Hugging Face causal LM on the CPU in its checkpoint dtype (blocks go to the device one at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    return model, tokenizer


def main(argv=None) -> None:
    import argparse
    import sys
    import time

    import data_utils
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    add_data_args(parser)
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
    try:
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
            arch = GGUF_ARCH_OF_MODEL_TYPE.get(model.config.model_type, "llama")
            write_imatrix_gguf(stats, imatrix_entries(model, stats), args.imatrix,
                               [data_utils.describe_source(source)], args.seq_len, arch)
    except (data_utils.DataSourceError, ValueError, RuntimeError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"statistics of {len(stats.in_sum2)} tensors over {stats.meta['n_tokens']} tokens in "
          f"{time.perf_counter() - t0:.1f} s -> {args.output}" + (f", {args.imatrix}" if args.imatrix else ""))


if __name__ == "__main__":
    main()

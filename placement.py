"""Where the model lives while the sensitivity analysis and the GA measure it.

Whole on the `--device` GPU when it fits there beside the working memory those stages need (`working_bytes`);
otherwise an accelerate-style device map within --max_memory: embeddings and head on that GPU, the blocks
filling it and then the other GPUs, and the blocks that fit no GPU held in pinned CPU RAM and streamed to the
GPU as they run (model_blocks.run_block follows a block's execution device).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from model_blocks import EXECUTION_DEVICE_ATTR, block_prefix, decoder, decoder_blocks

MAX_MEMORY_HELP = ("memory the sensitivity analysis and the GA may use per device, weights plus working memory, in "
                   "accelerate's form: GPU index or device = size, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: the "
                   "free memory of every GPU). A model that does not fit the --device GPU is spread over the GPUs, "
                   "and what fits none is held in CPU RAM and streamed to the GPU block by block")


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
        try:
            device = f"cuda:{name}" if name.isdigit() else str(torch.device(name))
        except RuntimeError:
            raise ValueError(f"--max_memory device {name!r} is not a device (a GPU index, cpu, cuda:N)") from None
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


def working_bytes(model: nn.Module, held_out_tokens: int, stack_tokens: int, with_logits: bool = True) -> int:
    """GPU memory the sensitivity analysis and the GA use beside the weights, from the model's widths: the
    reference logits and probabilities of `held_out_tokens` (with_logits: on the GPU holding the head), every
    block's inputs for them, one stacked pass of `stack_tokens` through an MLP, float32 copies of six blocks
    (compute copies, replaced and decoded weights, a streamed block's copy) and 1 GiB of CUDA context, plus
    15% for the allocator. What place_model keeps free on each GPU. (7B shape, defaults: 16.8 GB; measured on
    the H100, 14.6 GB beside the weights with the model on the GPU, 15.7 GB with every block streamed.)"""
    cfg = model.config
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in decoder_blocks(model))
    f32 = 4
    total = (2 * held_out_tokens * cfg.vocab_size * f32 * with_logits
             + (cfg.num_hidden_layers + 1) * held_out_tokens * cfg.hidden_size * f32
             + 4 * stack_tokens * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size) * f32
             + 6 * largest_block * f32 + 2**30)
    return int(1.15 * total)


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

"""The decoder as a sequence of blocks: its structure, and running it one block at a time.

Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM, Gemma 3): `model.model.layers`, `model.model.norm`,
`model.lm_head`. The inputs of block 0 are caught once (GPTQ's `llama_sequential` pattern), with the keyword
arguments of each layer type (Gemma 3's sliding-window and global layers differ); each block then
runs in float32 on its execution device, whatever the model's storage dtype and wherever its weights are held
(placement.py may keep a block in CPU RAM and stream it to the GPU when it runs).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from architectures import architecture_of
from cli import UserError

COMPUTE_DTYPE = torch.float32
EXECUTION_DEVICE_ATTR = "_quant_execution_device"


# ---------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit name must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps requested but MPS is not available")
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


def model_content_hash(model: nn.Module) -> str:
    """A content hash of all parameters and the config (cache keys: same weights, same hash), wherever the
    checkpoint was loaded from (the config's `_name_or_path` is left out)."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    named = list(model.named_parameters())          # a shared (tied) parameter once

    def digest(param: torch.Tensor) -> bytes:      # hashlib reads the buffer in place and lets go of the GIL
        return hashlib.sha256(param.detach().to("cpu").contiguous().view(torch.uint8).numpy()).digest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for (name, _), param_digest in zip(named, pool.map(digest, [p for _, p in named])):
            h.update(name.encode())
            h.update(param_digest)
    return h.hexdigest()[:16]


def load_model_and_tokenizer(path: str):
    """A Hugging Face causal LM on the CPU in its checkpoint dtype (blocks go to the device one at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Block-by-block execution
# ---------------------------------------------------------------------------------------------------------

@dataclass
class BlockBatch:
    """One micro-batch of hidden states entering a block, with the keyword arguments blocks are called with, by
    layer type (Gemma 3's sliding-window and global layers get different masks and rotary tables; a model with
    one kind of layer has one entry)."""
    hidden: torch.Tensor
    kwargs: dict              # layer type -> keyword arguments


LAYER_TYPE_ATTR = "_quant_layer_type"


def layer_type(block: nn.Module) -> str:
    """The layer type a block was called as when its inputs were caught (catch_block_inputs)."""
    return getattr(block, LAYER_TYPE_ATTR, "default")


class _RecordBlockInputs(nn.Module):
    """Stands in for a block while the decoder runs once: records the hidden states entering block 0 and the
    keyword arguments of each layer type, and passes the hidden states on untouched (GPTQ's Catcher, for
    decoders whose layers are called with different masks or rotary tables)."""

    def __init__(self, block: nn.Module, kind: str, record: dict):
        super().__init__()
        self.block, self.kind, self.record = block, kind, record

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ValueError("decoder blocks are expected to take their extra inputs by keyword")
        self.record.setdefault("hidden", hidden_states)
        self.record["kwargs"].setdefault(self.kind, kwargs)
        return hidden_states


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


def layer_types(model: nn.Module) -> list[str]:
    """Each block's layer type (config.layer_types, e.g. Gemma 3's sliding_attention / full_attention)."""
    n = len(decoder_blocks(model))
    types = getattr(model.config, "layer_types", None) or ["default"] * n
    if len(types) < n:
        raise ValueError(f"config.layer_types names {len(types)} layers, the model has {n}")
    return list(types[:n])


def token_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings of `ids` in float32, as llama.cpp computes them: Gemma's scaled by sqrt(hidden size)
    in float32 (transformers rounds the scale and the product to a bf16 model's dtype: 25.25 for 25.298)."""
    embed = model.get_input_embeddings()
    if not architecture_of(model).scales_embedding:
        return embed(ids).to(COMPUTE_DTYPE)
    return F.embedding(ids, embed.weight).to(COMPUTE_DTYPE) * math.sqrt(model.config.hidden_size)


@torch.no_grad()
def catch_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device
                       ) -> list[BlockBatch]:
    """The hidden states entering block 0 for `ids` [n, seq_len], in micro-batches, on `device` in float32,
    with the keyword arguments of each layer type (every block is marked with its type for run_block).

    The embedding runs where the model lives; its output is cast to float32 and passed as `inputs_embeds`, so
    rotary tables and masks are built in float32 as well.
    """
    inner = decoder(model)
    blocks = inner.layers
    embed = model.get_input_embeddings()
    kinds = layer_types(model)
    originals = list(blocks)
    batches = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            record: dict = {"kwargs": {}}
            for i, (block, kind) in enumerate(zip(originals, kinds)):
                setattr(block, LAYER_TYPE_ATTR, kind)
                blocks[i] = _RecordBlockInputs(block, kind, record)
            batch_ids = ids[start:start + batch_size].to(embed.weight.device)
            inner(inputs_embeds=token_embeddings(model, batch_ids), use_cache=False)
            if "hidden" not in record:
                raise RuntimeError("the decoder did not call its first block")
            batches.append(BlockBatch(_to_device(record["hidden"], device), _to_device(record["kwargs"], device)))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
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
    hidden = _to_device(batch.hidden, device)
    kwargs = batch.kwargs.get(layer_type(block))
    if kwargs is None:
        if len(batch.kwargs) != 1:
            raise ValueError(f"no block inputs for layer type {layer_type(block)!r}; caught: {list(batch.kwargs)}")
        (kwargs,) = batch.kwargs.values()
    kwargs = _to_device(kwargs, device)     # no-ops when they are there
    with streamed_to(block, device), float32_params(block):
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


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


def final_norm_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The final norm as a float32 module on `device` (a copy when the model lives elsewhere)."""
    norm = decoder(model).norm
    p = next(norm.parameters())
    if p.device == device and p.dtype == COMPUTE_DTYPE:
        return norm
    return copy.deepcopy(norm).to(device=device, dtype=COMPUTE_DTYPE)


@contextlib.contextmanager
def replaced_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily give parameters new values, kept in float32 whatever the model's storage dtype (a
    quantized weight rounded to bf16 would not be the weight llama.cpp holds); a tied embedding changes in
    both of its uses. A value goes to its parameter's GPU; one for a parameter held in CPU RAM stays where it
    is (a streamed block runs on the GPU: streamed_to then leaves it there)."""
    saved = {}
    try:
        for name, value in weights.items():
            param = model.get_parameter(name)
            saved[name] = param.data
            device = value.device if param.device.type == "cpu" else param.device
            param.data = value.to(device=device, dtype=COMPUTE_DTYPE)
        yield model
    finally:
        for name, data in saved.items():
            model.get_parameter(name).data = data

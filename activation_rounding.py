"""llama.cpp's activation rounding, emulated in PyTorch.

llama.cpp's CPU backend does not multiply a quantized weight by float32 activations: each matmul first rounds
its input rows to the weight type's `vec_dot_type` (quant_utils.activation_type), 8-bit blocks with one scale
each: Q8_0/Q8_1 per 32 values (fp16 scale) for the 32-block weight types, Q8_K per 256 values (float scale)
for the K- and IQ-quants; F16 weights see fp16 activations, F32 weights the float32 ones. On the demo model
this costs about 0.004 mean KLD by itself (llama.cpp's all-Q8_0 file scores 0.0045), as much as a whole
Q5-size allocation's weight error, so a simulation that means to match the GGUF has to do it too.

`round_activations` is bit for bit ggml's CPU quantizer (tests/test_activation_rounding.py checks it against
libggml-cpu); `rounded_linear_inputs` applies it to the input of every linear layer whose weight an
assignment quantizes, the way the GGUF will run. Embedding lookups (get_rows) read the weight directly and
round nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from quant_utils import activation_type

BLOCK_SIZES = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}


def _divide(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t correctly rounded, as C divides (torch computes `scalar / tensor` as
    `scalar * reciprocal(tensor)`, which rounds twice and moves some scales by one ulp)."""
    return torch.full_like(t, numerator).div_(t)


def _round_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0/Q8_1 (quantize_row_q8_0/1): d = amax/127 kept as fp16, q = round-half-even(x * 127/amax)."""
    amax = blocks.abs().amax(-1, keepdim=True)
    inv_scale = torch.where(amax > 0, _divide(127.0, amax), torch.zeros_like(amax))
    q = torch.round(blocks * inv_scale)
    return q * (amax / 127.0).half().float()


def _round_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_K (quantize_row_q8_K_ref): scale from the signed value of largest magnitude, iscale = -127/max,
    q = min(127, round-half-even(iscale * x)), d = 1/iscale kept as float32."""
    idx = blocks.abs().argmax(-1, keepdim=True)
    signed_max = blocks.gather(-1, idx)
    nonzero = signed_max != 0
    # an all-zero block divides by 1 instead: its q are 0 whatever the scale, as ggml's are
    iscale = _divide(-127.0, torch.where(nonzero, signed_max, torch.ones_like(signed_max)))
    q = torch.round(iscale * blocks).clamp_max(127.0)
    return q * _divide(1.0, iscale)


def round_activations(x: torch.Tensor, act_type: str) -> torch.Tensor:
    """`x` (any shape, rows along the last axis) as llama.cpp's CPU matmul reads it after rounding to
    `act_type`; float32 out. The last axis must be a multiple of the block size, as it is for every weight
    type that fits the row."""
    x = x.float()
    if act_type == "F32":
        return x
    if act_type == "F16":
        return x.half().float()
    if act_type == "BF16":
        return x.bfloat16().float()
    if act_type not in BLOCK_SIZES:
        raise ValueError(f"unknown activation type {act_type}")
    block = BLOCK_SIZES[act_type]
    if x.shape[-1] % block:
        raise ValueError(f"rows of {x.shape[-1]} cannot be rounded to {act_type} blocks of {block}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    out = _round_q8_k(blocks) if act_type == "Q8_K" else _round_q8_0(blocks)
    return out.reshape(x.shape)


def linear_layers_by_weight(model: nn.Module) -> dict[str, list[nn.Module]]:
    """{parameter name: the nn.Linear modules that multiply by it} (a tied embedding's is the output head;
    the parameter takes its first name, the one named_parameters and the configs use)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in names:
            out.setdefault(names[id(module.weight)], []).append(module)
    return out


def value_format(act_type: str) -> str:
    """The activation format as far as the values go: Q8_1 rounds exactly as Q8_0 (it only adds block sums)."""
    return "Q8_0" if act_type == "Q8_1" else act_type


def rounding_of(qtype: str) -> str:
    """How llama.cpp rounds the input of a matmul by a `qtype` weight, as far as the values go."""
    return value_format(activation_type(qtype))


@contextlib.contextmanager
def rounded_linear_inputs(model: nn.Module, tensor_types: dict[str, str]):
    """While active, every linear layer whose weight `tensor_types` assigns a type sees its input rounded to
    that type's activation format, as llama.cpp's CPU backend runs the GGUF. Tensors left out stay float32."""
    with rounded_inputs(model, {name: activation_type(t) for name, t in tensor_types.items()}):
        yield model


@contextlib.contextmanager
def rounded_inputs(model: nn.Module, act_types: dict[str, str]):
    """As `rounded_linear_inputs`, given each weight's activation format directly ({weight name: "Q8_K"})."""
    handles = []
    try:
        for name, modules in linear_layers_by_weight(model).items():
            act = act_types.get(name, "F32")
            if act == "F32":
                continue
            for module in modules:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, act=act: (round_activations(args[0], act).to(args[0].dtype), *args[1:])))
        yield model
    finally:
        for handle in handles:
            handle.remove()

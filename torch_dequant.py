"""ggml's dequantization (its `to_float`) in torch, so GGUF tensor bytes decode where the model runs.

A 7B assignment measured end to end needs 7.6 billion weights decoded; on the CPU that plus moving the float32
result to the GPU costs seconds per candidate, on the GPU milliseconds. The bytes still come from ggml's own
quantizer (quant_utils.quantize): only the decoding is ours, and tests/test_torch_dequant.py holds it equal,
bit for bit, to ggml's `to_float` for every type here. Each decoder follows the C reference in ggml-quants.c
(dequantize_row_*) and its order of float operations. Every product there is exact in float32 (a float16
scale, 11 significant bits, times integers of at most 13 bits together: sub-scale and quant), so only a final
`- m` or `+ m` rounds, and it rounds the same whether or not a compiler fuses it into a multiply-add.
"""
from __future__ import annotations

import math
import warnings

import torch

import quant_utils

QK_K = 256
# ggml's kvalues_iq4nl: the IQ4_NL code book.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _half(raw: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32 [n_blocks, 1]."""
    return raw[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return qs & 0xF, qs >> 4


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in a Q4_K/Q5_K block's 12 bytes (ggml's get_scale_min_k4)."""
    s = scales.to(torch.int32)
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], 1), torch.cat([low_m, high_m], 1)


def _q8_0(raw):
    d = _half(raw, 0)
    return raw[:, 2:34].contiguous().view(torch.int8).float() * d


def _q4_0(raw):
    d = _half(raw, 0)
    lo, hi = _nibbles(raw[:, 2:18])
    return torch.cat([lo, hi], 1).to(torch.int32).sub(8).float() * d


def _q4_1(raw):
    d, m = _half(raw, 0), _half(raw, 2)
    lo, hi = _nibbles(raw[:, 4:20])
    return torch.cat([lo, hi], 1).float() * d + m


def _q5_high_bits(qh_bytes: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block, bit j for element j, as 0 or 16."""
    qh = qh_bytes.to(torch.int64)
    word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    bits = (word[:, None] >> torch.arange(32, device=qh.device)) & 1
    return bits.to(torch.int32) << 4


def _q5_0(raw):
    d = _half(raw, 0)
    lo, hi = _nibbles(raw[:, 6:22])
    q = torch.cat([lo, hi], 1).to(torch.int32) | _q5_high_bits(raw[:, 2:6])
    return (q - 16).float() * d


def _q5_1(raw):
    d, m = _half(raw, 0), _half(raw, 2)
    lo, hi = _nibbles(raw[:, 8:24])
    q = torch.cat([lo, hi], 1).to(torch.int32) | _q5_high_bits(raw[:, 4:8])
    return q.float() * d + m


def _iq4_nl(raw):
    d = _half(raw, 0)
    lo, hi = _nibbles(raw[:, 2:18])
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=raw.device)
    return d * values[torch.cat([lo, hi], 1).long()]


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """The 2-bit quants of a Q2_K/Q3_K block's 64 `qs` bytes as [block, half, j, 32]: value l of sub-block
    pair (half, j) is bits 2j..2j+1 of byte 32 * half + l."""
    shifts = torch.arange(0, 8, 2, device=qs.device, dtype=torch.int32)
    return (qs.to(torch.int32).view(-1, 2, 1, 32) >> shifts.view(1, 1, 4, 1)) & 3


def _q2_k(raw):
    n = raw.shape[0]
    d, dmin = _half(raw, 80), _half(raw, 82)
    q = _two_bit_planes(raw[:, 16:80])
    sc = raw[:, 0:16].to(torch.int32).view(n, 2, 4, 2, 1)      # scale index 8 * half + 2 * j + (value >= 16)
    dl = d.view(n, 1, 1, 1, 1) * (sc & 0xF).float()
    ml = dmin.view(n, 1, 1, 1, 1) * (sc >> 4).float()
    return (dl * q.view(n, 2, 4, 2, 16).float() - ml).reshape(n, QK_K)


def _q3_k(raw):
    n = raw.shape[0]
    hmask = raw[:, 0:32].to(torch.int32)
    b = raw[:, 96:108].to(torch.int32)
    d = _half(raw, 108)
    scales = torch.cat([(b[:, 0:4] & 0xF) | ((b[:, 8:12] & 3) << 4),
                        (b[:, 4:8] & 0xF) | (((b[:, 8:12] >> 2) & 3) << 4),
                        (b[:, 0:4] >> 4) | (((b[:, 8:12] >> 4) & 3) << 4),
                        (b[:, 4:8] >> 4) | (((b[:, 8:12] >> 6) & 3) << 4)], 1) - 32
    low = _two_bit_planes(raw[:, 32:96])
    bit = torch.arange(8, device=raw.device, dtype=torch.int32).view(1, 2, 4, 1)      # 4 * half + j
    high = ((hmask.view(n, 1, 1, 32) >> bit) & 1) == 0
    q = low - 4 * high.to(torch.int32)
    dl = d.view(n, 1, 1, 1, 1) * scales.view(n, 2, 4, 2, 1).float()
    return (dl * q.view(n, 2, 4, 2, 16).float()).reshape(n, QK_K)


def _scaled_k4(raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale * q - dmin * min for a Q4_K/Q5_K block (d, dmin, 12 scale bytes first) and its quants
    q [block, 64-value chunk, low/high nibble, 32]."""
    n = raw.shape[0]
    d, dmin = _half(raw, 0), _half(raw, 2)
    sc, m = _scale_min_k4(raw[:, 4:16])
    d1 = d.view(n, 1, 1, 1) * sc.view(n, 4, 2, 1).float()
    m1 = dmin.view(n, 1, 1, 1) * m.view(n, 4, 2, 1).float()
    return (d1 * q.float() - m1).reshape(n, QK_K)


def _q4_k(raw):
    lo, hi = _nibbles(raw[:, 16:144].view(-1, 4, 1, 32))
    return _scaled_k4(raw, torch.cat([lo, hi], 2))


def _q5_k(raw):
    qh = raw[:, 16:48].to(torch.int32)
    lo, hi = _nibbles(raw[:, 48:176].view(-1, 4, 1, 32))
    bit = torch.arange(8, device=raw.device, dtype=torch.int32).view(1, 4, 2, 1)      # 2 * chunk + high
    q = torch.cat([lo, hi], 2).to(torch.int32) + 16 * ((qh.view(-1, 1, 1, 32) >> bit) & 1)
    return _scaled_k4(raw, q)


def _q6_k(raw):
    n = raw.shape[0]
    ql, qh = raw[:, 0:128].to(torch.int32).view(n, 2, 2, 32), raw[:, 128:192].to(torch.int32).view(n, 2, 1, 32)
    sc = raw[:, 192:208].contiguous().view(torch.int8).float().view(n, 2, 2, 2, 2)   # [half, hi-nibble, ql-part, is]
    d = _half(raw, 208)
    # [block, half, nibble (low: values 0-63, high: 64-127), ql part (l, l + 32), 32]
    nib = torch.stack([ql & 0xF, ql >> 4], 2)
    shift = torch.tensor([[0, 2], [4, 6]], device=raw.device, dtype=torch.int32).view(1, 1, 2, 2, 1)
    q = (nib | (((qh.view(n, 2, 1, 1, 32) >> shift) & 3) << 4)) - 32
    scale = d.view(n, 1, 1, 1, 1, 1) * sc.view(n, 2, 2, 2, 2, 1)          # [.., is (l // 16), 1]
    return (scale * q.view(n, 2, 2, 2, 2, 16).float()).reshape(n, QK_K)


# type name -> decoder of [n_blocks, block bytes] uint8 (block sizes: quant_utils' catalog, read from ggml)
DECODERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def supports(qtype: str) -> bool:
    return qtype in DECODERS


def bytes_on(raw: bytes, device: torch.device) -> torch.Tensor:
    """GGUF tensor bytes as a uint8 tensor on `device`, copied once straight from the buffer (which torch
    would warn is read-only; it is only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=torch.uint8).to(device)


def dequantize(raw: torch.Tensor, qtype: str, shape, max_blocks: int = 1 << 18) -> torch.Tensor:
    """Decode a tensor's GGUF bytes (a uint8 torch tensor, on any device) to float32 of `shape` there;
    `max_blocks` blocks at a time bound the temporaries."""
    t, decode = quant_utils.get_type(qtype), DECODERS[qtype]
    n_values = math.prod(int(s) for s in shape)
    if n_values % t.block_size or raw.numel() != n_values // t.block_size * t.block_bytes:
        raise ValueError(f"{raw.numel()} bytes do not hold a {qtype} tensor of shape {tuple(shape)}")
    blocks = raw.reshape(-1, t.block_bytes)
    out = torch.empty(blocks.shape[0], t.block_size, dtype=torch.float32, device=raw.device)
    for start in range(0, blocks.shape[0], max_blocks):
        out[start:start + max_blocks] = decode(blocks[start:start + max_blocks])
    return out.reshape(tuple(int(s) for s in shape))

"""llama.cpp's importance matrix as a GGUF file: written from our statistics (what `llama-quantize --imatrix`
reads), and read back per Hugging Face weight name exactly as llama-quantize computes the quantizer's weights.
"""
from __future__ import annotations

import math
import os

import gguf
import numpy as np
import torch
from torch import nn

import files
from architectures import ModelInfo, architecture_of
from calib_stats import CalibStats
from cli import UserError
from model_blocks import is_tied, output_weight_name


def gguf_tensor_names(model: nn.Module, hf_names) -> dict[str, str]:
    """GGUF tensor names ("blk.0.attn_q.weight") of HF weight names, by gguf-py's TensorNameMap table."""
    arch = architecture_of(model).gguf_arch
    name_map = gguf.TensorNameMap(arch, model.config.num_hidden_layers)
    out = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"{hf_name} has no GGUF name for architecture {gguf.MODEL_ARCH_NAMES[arch]}")
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
    n_tokens = max(stats.counts.values())
    with files.atomic_path(path) as tmp:
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


def write_model_imatrix(model: nn.Module, stats: CalibStats, path: str | os.PathLike, datasets: list[str],
                        chunk_size: int) -> None:
    """The imatrix GGUF of a model's statistics, under the model's GGUF architecture and tensor names."""
    arch = gguf.MODEL_ARCH_NAMES[architecture_of(model).gguf_arch]
    write_imatrix_gguf(stats, imatrix_entries(model, stats), path, datasets, chunk_size, arch)


def load_imatrix(path, info: ModelInfo) -> dict[str, np.ndarray]:
    """Per-column importance {hf_name: float32 vector} from a llama.cpp imatrix GGUF.

    The file holds `<gguf tensor name>.in_sum2` (sums of squared activations) and `.counts`; the value given to
    ggml is sum / count in float32 with the count rounded to an integer, exactly as llama-quantize's
    load_imatrix computes it (count 0 gives ones). Entries for tensors not in the model are ignored, as
    llama.cpp does; a size mismatch is an error (the token embedding's is ignored, as llama.cpp does).
    """
    reader = files.read_gguf(path, "imatrix GGUF (the legacy .dat format is not read: convert it with "
                                   "llama-imatrix)")
    parts: dict[str, dict] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, np.float32).reshape(-1)
    if not parts:
        raise UserError(f"imatrix {path} has no .in_sum2/.counts tensors: not a llama.cpp imatrix GGUF")
    by_gguf = {t.gguf_name: t for t in info.tensors if t.quantizable}
    out = {}
    for name, p in parts.items():
        if set(p) != {".in_sum2", ".counts"}:
            raise UserError(f"imatrix {path}: {name} lacks its sums or its counts")
        spec = by_gguf.get(name)
        if spec is None:
            continue
        sums, counts = p[".in_sum2"], p[".counts"]
        if counts.size != 1 or sums.size != spec.shape[1]:
            if spec.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
                continue
            raise UserError(f"imatrix {path}: {name} has {sums.size} values for rows of {spec.shape[1]}")
        count = np.float32(math.floor(float(counts[0]) + 0.5))
        out[spec.hf_name] = sums / count if count > 0 else np.ones_like(sums)
    return out

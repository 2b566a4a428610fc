"""Write a GGUF that llama.cpp runs exactly as planned: the plan (stored type of every tensor, the file's
label, imatrix, smoothing, the config's shipped GPTQ tensors), then the file, streamed one tensor at a time
from the safetensors shards (peak memory about one tensor), written atomically and verified against the plan.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

import files
import gguf_plan
import quant_utils
from architectures import (GGUFTensor, ModelInfo, SourceTensor, llama3_rope_factors, to_gguf_row_order,
                           to_stored_values)
from cli import UserError
from config_file import imatrix_from_config, read_quantized_tensors
from imatrix_file import load_imatrix
from quant_utils import get_type
from smoothing import Smoothing, transform_tensor


@dataclass
class ExportPlan:
    """Everything decided before writing: the stored type of every tensor and how the file is labelled."""
    info: ModelInfo
    stored_types: dict                 # hf_name -> stored type, every tensor of the file
    file_type: int                     # general.file_type (llama_ftype)
    fallbacks: list = field(default_factory=list)   # (hf_name, asked, stored)
    imatrix: dict | None = None        # hf_name -> float32 per-column importance
    smoothing: Smoothing = field(default_factory=Smoothing)   # exact rescaling applied to the tensors first
    shipped: dict = field(default_factory=dict)        # hf_name -> uint8 [rows, row bytes], HF row order

    @property
    def tensor_types(self) -> dict:
        """{hf_name: stored type} of the quantizable tensors: what gguf_plan.gguf_file_size takes."""
        return {t.hf_name: self.stored_types[t.hf_name] for t in self.info.tensors if t.quantizable}


def plan_from_types(info, tensor_types: dict, imatrix=None) -> ExportPlan:
    stored, fallbacks = gguf_plan.plan_types(info, tensor_types)
    return ExportPlan(info, stored, int(gguf_plan.mixed_file_type(info, stored)), fallbacks, imatrix)


def plan_from_preset(info, preset: str, imatrix=None) -> ExportPlan:
    """llama-quantize's recipe `preset`, with the imatrix if given; a recipe that stores a type llama.cpp will not
    quantize without an imatrix (IQ1-IQ3_XXS, Q2_K_S's Q2_K) is refused without one, naming the tensor."""
    choices = gguf_plan.preset_choices(info, preset, imatrix_available=imatrix is not None)
    stored, fallbacks = gguf_plan.plan_types(info, choices)
    quantized = {t.hf_name: stored[t.hf_name] for t in info.tensors if t.quantizable}
    lacking = [name for name in gguf_plan.imatrix_required(info, quantized, preset) if name not in (imatrix or {})]
    if lacking:
        raise UserError(f"preset {preset.upper()} stores {lacking[0]} as {quantized[lacking[0]]}, which llama.cpp "
                        f"quantizes only with an imatrix ({len(lacking)} tensors): pass --imatrix FILE (from "
                        "llama-imatrix, or a search's .imatrix.gguf)")
    return ExportPlan(info, stored, int(gguf_plan.PRESETS[preset.upper()].file_type), fallbacks, imatrix)


def plan_from_config(info, cfg: dict, imatrix_path=None) -> ExportPlan:
    """The plan for a search config: its types (with fallbacks) and the imatrix it carries, or the imatrix
    GGUF at `imatrix_path` instead (test_mixed_precision.py simulates exactly this plan)."""
    if imatrix_path:
        imatrix = load_imatrix(imatrix_path, info)
    elif cfg.get("imatrix") is not None:
        imatrix = imatrix_from_config(cfg, info)
    elif cfg.get("imatrix_path"):
        imatrix = load_imatrix(cfg["imatrix_path"], info)
    else:
        imatrix = None
    plan = plan_from_types(info, cfg["tensor_types"], imatrix)
    plan.smoothing = Smoothing.from_dict(cfg.get("smoothing"))
    if cfg.get("quantized_tensors"):
        shipped = cfg["quantized_tensors"]
        plan.shipped = read_quantized_tensors(shipped["path"], info, plan.stored_types, shipped["tensors"])
    return plan


def _read_float32(src: SourceTensor, name: str):
    """One checkpoint tensor as float32, its shard opened just for it (so no mapping outlives the tensor)."""
    from safetensors import safe_open
    with safe_open(str(src.file), framework="pt") as f:
        return f.get_tensor(name).float()


def tensor_values(info, spec: GGUFTensor, smoothing: Smoothing | None = None) -> np.ndarray:
    """The float32 values of one GGUF tensor (after the config's smoothing), in the row order llama.cpp expects."""
    if spec.kind == gguf.MODEL_TENSOR.ROPE_FREQS:
        return llama3_rope_factors(info)
    src = info.sources[spec.hf_name]
    w = _read_float32(src, spec.hf_name)
    if smoothing is not None:
        w = transform_tensor(spec.hf_name, w, smoothing)
    return to_stored_values(info, spec.hf_name, w, half=src.dtype == "F16").numpy()


def shipped_tensor(info, spec: GGUFTensor, rows: np.ndarray) -> np.ndarray:
    """The tensor file's bytes of one tensor in llama.cpp's row order (the config was checked to be of this
    checkpoint by its content hash)."""
    return np.ascontiguousarray(to_gguf_row_order(info, spec.hf_name, rows)).reshape(-1)


def encode_tensor(values: np.ndarray, qtype: str, imatrix=None) -> np.ndarray:
    """The bytes of one tensor as the GGUF stores it (ggml's own conversion for every type)."""
    if values.ndim == 1:
        return np.ascontiguousarray(values, dtype=np.float32)
    im = imatrix if not get_type(qtype).is_float else None
    return np.frombuffer(quant_utils.quantize(values, qtype, imatrix=im), dtype=np.uint8)


def verify_gguf(path, plan: ExportPlan) -> None:
    """Reopen the written file with gguf-py and check every tensor's name, type and shape and the file size."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    if len(reader.tensors) != len(plan.info.tensors):
        raise UserError(f"written file holds {len(reader.tensors)} tensors, the plan {len(plan.info.tensors)}")
    for spec in plan.info.tensors:
        t = found.get(spec.gguf_name)
        want_type = plan.stored_types[spec.hf_name]
        if t is None:
            raise UserError(f"tensor {spec.gguf_name} is missing from the written file")
        if t.tensor_type.name != want_type:
            raise UserError(f"tensor {spec.gguf_name} was written as {t.tensor_type.name}, planned {want_type}")
        if tuple(int(n) for n in t.shape) != tuple(reversed(spec.shape)):
            raise UserError(f"tensor {spec.gguf_name} has shape {list(t.shape)}, planned "
                            f"{list(reversed(spec.shape))}")
    del reader, found
    promised = gguf_plan.gguf_file_size(plan.info, plan.tensor_types)
    if os.path.getsize(path) != promised:
        raise UserError(f"written file has {os.path.getsize(path)} bytes, gguf_file_size promised {promised}")


def write_gguf(plan: ExportPlan, output, progress: bool = True) -> Path:
    """Write the planned GGUF to `output` atomically (temp file in the same directory, verified, renamed).

    Any failure removes the temp file and leaves an existing `output` untouched; errors name the tensor.
    """
    from tqdm import tqdm
    info, output = plan.info, Path(output)
    with files.atomic_path(output) as tmp:             # a failed write is a UserError naming `output`
        writer = gguf_plan.new_writer(info, plan.stored_types, tmp, plan.file_type)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(info.tensors, desc="export", unit="tensor", disable=not progress, file=sys.stderr) as bar:
                for spec in bar:
                    writer.write_tensor_data(_tensor_data(plan, spec, bar))
        finally:
            writer.close()
        verify_gguf(tmp, plan)
    return output


def _tensor_data(plan: ExportPlan, spec: GGUFTensor, bar) -> np.ndarray:
    """One tensor's bytes as the file stores them: the config's shipped bytes, or quantized by ggml here."""
    qtype = plan.stored_types[spec.hf_name]
    bar.set_postfix_str(f"{spec.gguf_name} {qtype}", refresh=False)
    try:
        if spec.hf_name in plan.shipped:
            return shipped_tensor(plan.info, spec, plan.shipped[spec.hf_name])
        return encode_tensor(tensor_values(plan.info, spec, plan.smoothing), qtype,
                             (plan.imatrix or {}).get(spec.hf_name))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"tensor {spec.gguf_name} ({spec.hf_name}) as {qtype}: {exc}") from None

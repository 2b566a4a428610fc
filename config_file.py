"""The search's config file, what export_gguf_official.py and test_mixed_precision.py read: the type of every
tensor, the imatrix, the smoothing, and the GPTQ tensors it ships in a tensor file beside it
(`<config>.tensors.gguf`). Every read is checked against the checkpoint it is applied to.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

import files
import gguf_plan
from architectures import ModelInfo, checkpoint_content_hash, quantizable_tensors, shape_signature
from cli import UserError
from quant_utils import get_type

CONFIG_FORMAT_VERSION = 3        # 2: shape_signature (was model_fingerprint); 3: checkpoint_content_hash


def load_config(path, info: ModelInfo) -> dict:
    """Read the mixed-precision config (the search's output) and check that it was made for this model.

    Format: a plain dict saved with torch.save, loadable with torch.load(weights_only=True):
      "format_version":    3
      "shape_signature":   architectures.shape_signature(info) of the model the config was made for
      "checkpoint_content_hash": architectures.checkpoint_content_hash(info) of that checkpoint: another
                           checkpoint of the same shape (a fine-tune, its base) is refused
      "tensor_types":      {hf_name: ggml type name} for every tensor of architectures.quantizable_tensors(info);
                           a type that does not fit a row length falls back by gguf_plan.resolve_type
      "imatrix":           optional {hf_name: 1-D float tensor}, per input column the mean squared activation
                           (llama.cpp's imatrix: sum of squares / count), used when quantizing that tensor
      "imatrix_path":      optional path of a llama.cpp imatrix GGUF (used if "imatrix" is absent)
      "quantized_tensors": optional {"path": tensor file name beside the config (write_quantized_tensors),
                           "tensors": [hf_name, ...]}: these tensors ship as the file holds them
    --imatrix on the command line overrides both (not the tensor file's tensors). Returns the dict with type
    names normalised and the tensor file's path resolved.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} not found: run mixed_precision_ptq.py first, or pass --preset NAME")
    try:
        cfg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # any way a user's file fails to unpickle (empty, cut short, not ours) is one line
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"config {path} cannot be read with torch.load(weights_only=True): {first_line}") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != CONFIG_FORMAT_VERSION:
        raise UserError(f"config {path} is not a format_version {CONFIG_FORMAT_VERSION} mixed-precision config")
    want = shape_signature(info)
    if cfg.get("shape_signature") != want:
        raise UserError(f"config {path} was made for another model (shape {cfg.get('shape_signature')}, "
                        f"{info.name} has {want}); rerun the search for this model")
    content = checkpoint_content_hash(info)
    if cfg.get("checkpoint_content_hash") != content:
        raise UserError(f"config {path} was made from another checkpoint of this shape (content hash "
                        f"{cfg.get('checkpoint_content_hash')}, {info.model_dir} has {content}); rerun the search "
                        "for this checkpoint")
    types = cfg.get("tensor_types")
    if not isinstance(types, dict):
        raise UserError(f"config {path} has no tensor_types dict")
    try:
        cfg["tensor_types"] = {name: get_type(t).name for name, t in types.items()}
        gguf_plan.plan_types(info, cfg["tensor_types"])
    except ValueError as exc:
        raise UserError(f"config {path}: {exc}") from None
    check_smoothing(cfg.get("smoothing"), info, path)
    shipped = cfg.get("quantized_tensors")
    if shipped:
        if not isinstance(shipped, dict) or not isinstance(shipped.get("tensors"), list):
            raise UserError(f"config {path}: quantized_tensors must name a tensor file and its tensors")
        unknown = set(shipped["tensors"]) - set(cfg["tensor_types"])
        if unknown:
            raise UserError(f"config {path}: quantized_tensors names {sorted(unknown)[0]}, which has no type")
        tensor_file = path.parent / str(shipped.get("path"))
        if not tensor_file.is_file():
            raise UserError(f"config {path} ships {len(shipped['tensors'])} tensors from {tensor_file}, which is "
                            "missing: keep the search's outputs together, or rerun the search")
        cfg["quantized_tensors"] = dict(shipped, path=str(tensor_file))
    return cfg


def check_smoothing(record: dict | None, info: ModelInfo, path) -> None:
    """A config's smoothing must name tensors of this model with vectors of the right length."""
    if not record:
        return
    shapes = {t.hf_name: t.shape for t in info.tensors}
    for part, axis in (("columns", 1), ("rows", 0)):
        for name, vec in record.get(part, {}).items():
            if name not in shapes:
                raise UserError(f"config {path}: smoothing names {name}, which this model does not have")
            if axis >= len(shapes[name]) or len(vec) != shapes[name][axis]:
                raise UserError(f"config {path}: smoothing {part} of {name} has {len(vec)} values for a tensor "
                                f"of shape {list(shapes[name])}")


def save_config(path, info: ModelInfo, tensor_types: dict, imatrix: dict | None = None,
                imatrix_path: str | None = None, extra: dict | None = None) -> None:
    """Write a config in load_config's format (checked first; temp file then rename). `extra` adds the
    search's record (budget, measured KLD, history...): plain values only, so weights_only loading works."""
    gguf_plan.plan_types(info, tensor_types)
    cfg = {"format_version": CONFIG_FORMAT_VERSION, "shape_signature": shape_signature(info),
           "checkpoint_content_hash": checkpoint_content_hash(info),
           "tensor_types": {n: get_type(t).name for n, t in tensor_types.items()}}
    if imatrix is not None:
        cfg["imatrix"] = {n: torch.as_tensor(v, dtype=torch.float32).reshape(-1) for n, v in imatrix.items()}
    if imatrix_path is not None:
        cfg["imatrix_path"] = str(imatrix_path)
    for key, value in (extra or {}).items():
        cfg.setdefault(key, value)
    files.torch_save(cfg, path)


def write_quantized_tensors(path, info: ModelInfo, tensors: dict[str, tuple[str, bytes]]) -> Path:
    """Write {hf_name: (type, GGUF bytes in HF row order)} as a GGUF of those tensors under their GGUF names,
    atomically: the search's GPTQ-quantized tensors, which the exporter ships as they are."""
    specs = {t.hf_name: t for t in info.tensors}
    for name, (qtype, raw) in tensors.items():
        t = get_type(qtype)
        if len(raw) != t.tensor_size_bytes(specs[name].shape):
            raise UserError(f"{len(raw)} bytes do not hold {name} {list(specs[name].shape)} as {t.name}")
    with files.atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, info.arch)
        try:
            for name, (qtype, raw) in tensors.items():
                writer.add_tensor_info(specs[name].gguf_name, specs[name].shape, np.dtype(np.float32), len(raw),
                                       raw_dtype=gguf.GGMLQuantizationType[get_type(qtype).name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, raw in tensors.values():
                writer.write_tensor_data(np.frombuffer(raw, dtype=np.uint8))
        finally:
            writer.close()
    return Path(path)


def read_quantized_tensors(path, info: ModelInfo, tensor_types: dict[str, str],
                           names) -> dict[str, np.ndarray]:
    """{hf_name: uint8 [rows, row bytes]} of `names` from a tensor file (write_quantized_tensors), each checked
    to be there with the planned type and shape (memory-mapped: nothing is read until used)."""
    by_gguf = {t.name: t for t in files.read_gguf(path, "tensor file of the search's config").tensors}
    specs = {t.hf_name: t for t in info.tensors}
    out = {}
    for name in names:
        spec, qtype = specs[name], get_type(tensor_types[name])
        t = by_gguf.get(spec.gguf_name)
        if t is None:
            raise UserError(f"{path} does not hold {spec.gguf_name} ({name})")
        if t.tensor_type.name != qtype.name or tuple(int(n) for n in t.shape) != tuple(reversed(spec.shape)):
            raise UserError(f"{path}: {spec.gguf_name} is {t.tensor_type.name} {list(t.shape)}, the config "
                            f"plans {qtype.name} {list(reversed(spec.shape))}")
        out[name] = t.data.reshape(spec.shape[0], qtype.row_size_bytes(spec.shape[1]))
    return out


def imatrix_from_config(cfg: dict, info: ModelInfo) -> dict[str, np.ndarray]:
    shapes = quantizable_tensors(info)
    out = {}
    for name, values in cfg["imatrix"].items():
        if name not in shapes:
            raise UserError(f"config imatrix names {name}, which is not a quantizable weight of this model")
        vec = np.asarray(values.float().numpy() if hasattr(values, "numpy") else values, np.float32).reshape(-1)
        if vec.size != shapes[name][1]:
            raise UserError(f"config imatrix for {name} has {vec.size} values for rows of {shapes[name][1]}")
        out[name] = vec
    return out

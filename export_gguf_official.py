"""Export a Hugging Face Qwen2/Llama checkpoint to a GGUF that llama.cpp runs exactly as planned.

Types per tensor come from the mixed-precision config written by the search (or from a llama.cpp preset);
every weight is quantized by ggml itself (quant_utils), so the file holds bit for bit what the search simulated.
Tensors the search quantized with GPTQ error feedback (gptq.py) are not quantized again: their bytes come from
the config's tensor file (`<config>.tensors.gguf`), checked against the checkpoint they were made from.
Tensors stream one at a time from the safetensors shards: peak memory is about one tensor, not the model.
The file is written under a temporary name, reopened and checked against the plan, then renamed.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

import gguf_plan
import quant_utils
from quant_utils import get_type
from smoothing import Smoothing, transform_tensor

DEFAULTS = {
    "model_id": "Qwen/Qwen2.5-7B-Instruct",
    "config": "mixed_precision_config.pt",
    "output": "models/qwen2.5-7b-mixed.gguf",
}
CONFIG_FORMAT_VERSION = 1
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


class ExportError(Exception):
    """A problem with the user's inputs or environment, reported as one line."""


# --------------------------------------------------------------------------------------------------------------
# Inputs: model directory, config, imatrix
# --------------------------------------------------------------------------------------------------------------


def resolve_model_dir(model_id: str) -> tuple[Path, str]:
    """(local directory, general.name) for a local path or a Hugging Face model id (cache first, then Hub)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ExportError(f"--model_id {model_id!r} is not a model directory")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_FILES, local_files_only=True)), model_id
    except Exception:
        pass
    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_FILES)), model_id
    except Exception as exc:
        raise ExportError(f"cannot fetch {model_id!r} from the Hugging Face Hub (not cached here, and the Hub is "
                          f"unreachable or has no such model: {type(exc).__name__}); download it elsewhere and "
                          "pass the local directory with --model_id") from None


def load_config(path, info: gguf_plan.ModelInfo) -> dict:
    """Read the mixed-precision config (the search's output) and check that it was made for this model.

    Format: a plain dict saved with torch.save, loadable with torch.load(weights_only=True):
      "format_version":    1
      "model_fingerprint": gguf_plan.model_fingerprint(info) of the model the config was made for
      "tensor_types":      {hf_name: ggml type name} for every tensor of gguf_plan.quantizable_tensors(info);
                           a type that does not fit a row length falls back by gguf_plan.resolve_type
      "imatrix":           optional {hf_name: 1-D float tensor}, per input column the mean squared activation
                           (llama.cpp's imatrix: sum of squares / count), used when quantizing that tensor
      "imatrix_path":      optional path of a llama.cpp imatrix GGUF (used if "imatrix" is absent)
      "quantized_tensors": optional {"path": tensor file name beside the config (write_quantized_tensors),
                           "fingerprints": {hf_name: source_fingerprint of the weight it was made from}}:
                           these tensors ship as the file holds them
    --imatrix on the command line overrides both (not the tensor file's tensors). Returns the dict with type
    names normalised and the tensor file's path resolved.
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"config {path} not found: run mixed_precision_ptq.py first, or pass --preset NAME")
    try:
        cfg = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"config {path} cannot be read with torch.load(weights_only=True): "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != CONFIG_FORMAT_VERSION:
        raise ExportError(f"config {path} is not a format_version {CONFIG_FORMAT_VERSION} mixed-precision config")
    want = gguf_plan.model_fingerprint(info)
    if cfg.get("model_fingerprint") != want:
        raise ExportError(f"config {path} was made for another model (fingerprint {cfg.get('model_fingerprint')}, "
                          f"{info.name} has {want}); rerun the search for this model")
    types = cfg.get("tensor_types")
    if not isinstance(types, dict):
        raise ExportError(f"config {path} has no tensor_types dict")
    try:
        cfg["tensor_types"] = {name: get_type(t).name for name, t in types.items()}
        gguf_plan.plan_types(info, cfg["tensor_types"])
    except ValueError as exc:
        raise ExportError(f"config {path}: {exc}") from None
    check_smoothing(cfg.get("smoothing"), info, path)
    shipped = cfg.get("quantized_tensors")
    if shipped:
        if not isinstance(shipped, dict) or not isinstance(shipped.get("fingerprints"), dict):
            raise ExportError(f"config {path}: quantized_tensors must name a tensor file and fingerprints")
        unknown = set(shipped["fingerprints"]) - set(cfg["tensor_types"])
        if unknown:
            raise ExportError(f"config {path}: quantized_tensors names {sorted(unknown)[0]}, which has no type")
        tensor_file = path.parent / str(shipped.get("path"))
        if not tensor_file.is_file():
            raise ExportError(f"config {path} ships {len(shipped['fingerprints'])} tensors from {tensor_file}, "
                              "which is missing: keep the search's outputs together, or rerun the search")
        cfg["quantized_tensors"] = dict(shipped, path=str(tensor_file))
    return cfg


def check_smoothing(record: dict | None, info: gguf_plan.ModelInfo, path) -> None:
    """A config's smoothing must name tensors of this model with vectors of the right length."""
    if not record:
        return
    shapes = {t.hf_name: t.shape for t in info.tensors}
    for part, axis in (("columns", 1), ("rows", 0)):
        for name, vec in record.get(part, {}).items():
            if name not in shapes:
                raise ExportError(f"config {path}: smoothing names {name}, which this model does not have")
            if axis >= len(shapes[name]) or len(vec) != shapes[name][axis]:
                raise ExportError(f"config {path}: smoothing {part} of {name} has {len(vec)} values for a tensor "
                                  f"of shape {list(shapes[name])}")


def save_config(path, info: gguf_plan.ModelInfo, tensor_types: dict, imatrix: dict | None = None,
                imatrix_path: str | None = None, extra: dict | None = None) -> None:
    """Write a config in load_config's format (checked first; temp file then rename). `extra` adds the
    search's record (budget, measured KLD, history...): plain values only, so weights_only loading works."""
    import torch
    gguf_plan.plan_types(info, tensor_types)
    cfg = {"format_version": CONFIG_FORMAT_VERSION, "model_fingerprint": gguf_plan.model_fingerprint(info),
           "tensor_types": {n: get_type(t).name for n, t in tensor_types.items()}}
    if imatrix is not None:
        cfg["imatrix"] = {n: torch.as_tensor(v, dtype=torch.float32).reshape(-1) for n, v in imatrix.items()}
    if imatrix_path is not None:
        cfg["imatrix_path"] = str(imatrix_path)
    for key, value in (extra or {}).items():
        cfg.setdefault(key, value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    torch.save(cfg, tmp)
    os.replace(tmp, path)


def source_fingerprint(weight) -> str:
    """Of a checkpoint weight as float32, before any smoothing: the hash of 8 evenly spread rows. Enough to
    tell apart the same tensor of two checkpoints (a fine-tune changes every row), cheap at 7B scale."""
    import torch
    rows = torch.linspace(0, weight.shape[0] - 1, 8).round().long().unique()
    sample = weight.detach()[rows.to(weight.device)].float().cpu().contiguous().numpy()
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


def write_quantized_tensors(path, info: gguf_plan.ModelInfo, tensors: dict[str, tuple[str, bytes]]) -> Path:
    """Write {hf_name: (type, GGUF bytes in HF row order)} as a GGUF of those tensors under their GGUF names,
    atomically (temp file, then rename): the search's GPTQ-quantized tensors, which the exporter ships as is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    specs = {t.hf_name: t for t in info.tensors}
    writer = gguf.GGUFWriter(tmp, info.arch)
    try:
        for name, (qtype, raw) in tensors.items():
            t = get_type(qtype)
            if len(raw) != t.tensor_size_bytes(specs[name].shape):
                raise ExportError(f"{len(raw)} bytes do not hold {name} {list(specs[name].shape)} as {t.name}")
            writer.add_tensor_info(specs[name].gguf_name, specs[name].shape, np.dtype(np.float32), len(raw),
                                   raw_dtype=gguf.GGMLQuantizationType[t.name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, raw in tensors.values():
            writer.write_tensor_data(np.frombuffer(raw, dtype=np.uint8))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_quantized_tensors(path, info: gguf_plan.ModelInfo, tensor_types: dict[str, str],
                           names) -> dict[str, np.ndarray]:
    """{hf_name: uint8 [rows, row bytes]} of `names` from a tensor file (write_quantized_tensors), each checked
    to be there with the planned type and shape (memory-mapped: nothing is read until used)."""
    by_gguf = {t.name: t for t in gguf.GGUFReader(path).tensors}
    specs = {t.hf_name: t for t in info.tensors}
    out = {}
    for name in names:
        spec, qtype = specs[name], get_type(tensor_types[name])
        t = by_gguf.get(spec.gguf_name)
        if t is None:
            raise ExportError(f"{path} does not hold {spec.gguf_name} ({name})")
        if t.tensor_type.name != qtype.name or tuple(int(n) for n in t.shape) != tuple(reversed(spec.shape)):
            raise ExportError(f"{path}: {spec.gguf_name} is {t.tensor_type.name} {list(t.shape)}, the config "
                              f"plans {qtype.name} {list(reversed(spec.shape))}")
        out[name] = t.data.reshape(spec.shape[0], qtype.row_size_bytes(spec.shape[1]))
    return out


def load_imatrix(path, info: gguf_plan.ModelInfo) -> dict[str, np.ndarray]:
    """Per-column importance {hf_name: float32 vector} from a llama.cpp imatrix GGUF.

    The file holds `<gguf tensor name>.in_sum2` (sums of squared activations) and `.counts`; the value given to
    ggml is sum / count in float32 with the count rounded to an integer, exactly as llama-quantize's
    load_imatrix computes it (count 0 gives ones). Entries for tensors not in the model are ignored, as
    llama.cpp does; a size mismatch is an error (the token embedding's is ignored, as llama.cpp does).
    """
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise ExportError(f"imatrix {path} is not a GGUF file ({type(exc).__name__}); the legacy .dat "
                          "format is not supported, convert it with llama-imatrix") from None
    parts: dict[str, dict] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, np.float32).reshape(-1)
    if not parts:
        raise ExportError(f"imatrix {path} has no .in_sum2/.counts tensors: not a llama.cpp imatrix GGUF")
    by_gguf = {t.gguf_name: t for t in info.tensors if t.quantizable}
    out = {}
    for name, p in parts.items():
        if set(p) != {".in_sum2", ".counts"}:
            raise ExportError(f"imatrix {path}: {name} lacks its sums or its counts")
        spec = by_gguf.get(name)
        if spec is None:
            continue
        sums, counts = p[".in_sum2"], p[".counts"]
        if counts.size != 1 or sums.size != spec.shape[1]:
            if spec.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
                continue
            raise ExportError(f"imatrix {path}: {name} has {sums.size} values for rows of {spec.shape[1]}")
        count = np.float32(math.floor(float(counts[0]) + 0.5))
        out[spec.hf_name] = sums / count if count > 0 else np.ones_like(sums)
    return out


def imatrix_from_config(cfg: dict, info: gguf_plan.ModelInfo) -> dict[str, np.ndarray]:
    shapes = gguf_plan.quantizable_tensors(info)
    out = {}
    for name, values in cfg["imatrix"].items():
        if name not in shapes:
            raise ExportError(f"config imatrix names {name}, which is not a quantizable weight of this model")
        vec = np.asarray(values.float().numpy() if hasattr(values, "numpy") else values, np.float32).reshape(-1)
        if vec.size != shapes[name][1]:
            raise ExportError(f"config imatrix for {name} has {vec.size} values for rows of {shapes[name][1]}")
        out[name] = vec
    return out


# --------------------------------------------------------------------------------------------------------------
# Plan and write
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExportPlan:
    """Everything decided before writing: the stored type of every tensor and how the file is labelled."""
    info: gguf_plan.ModelInfo
    stored_types: dict                 # hf_name -> stored type, every tensor of the file
    file_type: int                     # general.file_type (llama_ftype)
    fallbacks: list = field(default_factory=list)   # (hf_name, asked, stored)
    imatrix: dict | None = None        # hf_name -> float32 per-column importance
    smoothing: Smoothing = field(default_factory=Smoothing)   # exact rescaling applied to the tensors first
    shipped: dict = field(default_factory=dict)        # hf_name -> uint8 [rows, row bytes], HF row order
    source_fingerprints: dict = field(default_factory=dict)   # hf_name -> source_fingerprint, for `shipped`

    @property
    def tensor_types(self) -> dict:
        """{hf_name: stored type} of the quantizable tensors: what gguf_plan.gguf_file_size takes."""
        return {t.hf_name: self.stored_types[t.hf_name] for t in self.info.tensors if t.quantizable}


def plan_from_types(info, tensor_types: dict, imatrix=None) -> ExportPlan:
    stored, fallbacks = gguf_plan.plan_types(info, tensor_types)
    return ExportPlan(info, stored, int(gguf_plan.mixed_file_type(info, stored)), fallbacks, imatrix)


def plan_from_preset(info, preset: str, imatrix=None) -> ExportPlan:
    choices = gguf_plan.preset_choices(info, preset, imatrix_available=imatrix is not None)
    stored, fallbacks = gguf_plan.plan_types(info, choices)
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
        plan.source_fingerprints = dict(shipped["fingerprints"])
        plan.shipped = read_quantized_tensors(shipped["path"], info, plan.stored_types, plan.source_fingerprints)
    return plan


def _permute_rows(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half row order to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(info) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors for rope_type llama3."""
    rope, dim = info.rope, info.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _read_float32(src: gguf_plan.SourceTensor, name: str):
    """One checkpoint tensor as float32, its shard opened just for it (so no mapping outlives the tensor)."""
    from safetensors import safe_open
    with safe_open(str(src.file), framework="pt") as f:
        return f.get_tensor(name).float()


def tensor_values(info, spec: gguf_plan.TensorSpec, smoothing: Smoothing | None = None) -> np.ndarray:
    """The float32 values of one GGUF tensor (after the config's smoothing), in the row order llama.cpp expects."""
    if spec.kind == gguf.MODEL_TENSOR.ROPE_FREQS:
        return _llama3_rope_factors(info)
    w = _read_float32(info.sources[spec.hf_name], spec.hf_name)
    if smoothing is not None:
        w = transform_tensor(spec.hf_name, w, smoothing)
    if info.spec.permute_qk:
        if spec.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute_rows(w, info.n_heads)
        elif spec.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute_rows(w, info.n_kv_heads)
    return w.numpy()


def shipped_tensor(info, spec: gguf_plan.TensorSpec, rows: np.ndarray, fingerprint: str) -> np.ndarray:
    """The tensor file's bytes of one tensor in llama.cpp's row order, after checking that the checkpoint holds
    the weight they were made from."""
    found = source_fingerprint(_read_float32(info.sources[spec.hf_name], spec.hf_name))
    if found != fingerprint:
        raise ExportError(f"the config's quantized {spec.hf_name} was made from another checkpoint (fingerprint "
                          f"{fingerprint}, this one has {found}); rerun the search for this model")
    if info.spec.permute_qk and spec.hf_name.endswith("q_proj.weight"):
        rows = _permute_rows(rows, info.n_heads)
    elif info.spec.permute_qk and spec.hf_name.endswith("k_proj.weight"):
        rows = _permute_rows(rows, info.n_kv_heads)
    return np.ascontiguousarray(rows).reshape(-1)


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
        raise ExportError(f"written file holds {len(reader.tensors)} tensors, the plan {len(plan.info.tensors)}")
    for spec in plan.info.tensors:
        t = found.get(spec.gguf_name)
        want_type = plan.stored_types[spec.hf_name]
        if t is None:
            raise ExportError(f"tensor {spec.gguf_name} is missing from the written file")
        if t.tensor_type.name != want_type:
            raise ExportError(f"tensor {spec.gguf_name} was written as {t.tensor_type.name}, planned {want_type}")
        if tuple(int(n) for n in t.shape) != tuple(reversed(spec.shape)):
            raise ExportError(f"tensor {spec.gguf_name} has shape {list(t.shape)}, planned "
                              f"{list(reversed(spec.shape))}")
    del reader, found
    promised = gguf_plan.gguf_file_size(plan.info, plan.tensor_types)
    if os.path.getsize(path) != promised:
        raise ExportError(f"written file has {os.path.getsize(path)} bytes, gguf_file_size promised {promised}")


def write_gguf(plan: ExportPlan, output, progress: bool = True) -> Path:
    """Write the planned GGUF to `output` atomically (temp file in the same directory, verified, renamed).

    Any failure removes the temp file and leaves an existing `output` untouched; errors name the tensor.
    """
    from tqdm import tqdm
    info, output = plan.info, Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    writer = None
    try:
        writer = gguf_plan.new_writer(info, plan.stored_types, tmp, plan.file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(info.tensors, desc="export", unit="tensor", disable=not progress, file=sys.stderr) as bar:
            for spec in bar:
                qtype = plan.stored_types[spec.hf_name]
                bar.set_postfix_str(f"{spec.gguf_name} {qtype}", refresh=False)
                try:
                    if spec.hf_name in plan.shipped:
                        data = shipped_tensor(info, spec, plan.shipped[spec.hf_name],
                                              plan.source_fingerprints[spec.hf_name])
                    else:
                        data = encode_tensor(tensor_values(info, spec, plan.smoothing), qtype,
                                             (plan.imatrix or {}).get(spec.hf_name))
                except (ValueError, RuntimeError) as exc:
                    raise ExportError(f"tensor {spec.gguf_name} ({spec.hf_name}) as {qtype}: {exc}") from None
                writer.write_tensor_data(data)
                del data
        writer.close()
        verify_gguf(tmp, plan)
        os.replace(tmp, output)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return output


def summary_table(plan: ExportPlan, output: Path) -> str:
    """Aligned table: per stored type the tensor count, weights, bytes and bits per weight; then totals."""
    rows: dict[str, list[int]] = {}
    for spec in plan.info.tensors:
        qtype = plan.stored_types[spec.hf_name]
        r = rows.setdefault(qtype, [0, 0, 0])
        r[0] += 1
        r[1] += math.prod(spec.shape)
        r[2] += get_type(qtype).tensor_size_bytes(spec.shape)
    lines = [f"{'type':<8} {'tensors':>8} {'weights':>14} {'MiB':>10} {'bits/weight':>12}"]
    for qtype, (n, weights, size) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{qtype:<8} {n:>8} {weights:>14,} {size / 2**20:>10.2f} {8 * size / weights:>12.3f}")
    n_t, weights, size = (sum(r[i] for r in rows.values()) for i in range(3))
    lines.append(f"{'total':<8} {n_t:>8} {weights:>14,} {size / 2**20:>10.2f} {8 * size / weights:>12.3f}")
    if not plan.smoothing.is_identity():
        lines.append(f"smoothing ({plan.smoothing.mode}): {len(plan.smoothing.alpha)} input groups rescaled, "
                     f"{len(plan.smoothing.columns)} weights' columns, {len(plan.smoothing.rows)} producers folded")
    if plan.shipped:
        lines.append(f"{len(plan.shipped)} tensors shipped as the search quantized them (GPTQ error feedback)")
    file_size = os.path.getsize(output)
    lines.append(f"file {output}: {file_size:,} bytes ({file_size / 2**30:.3f} GiB)")
    if plan.fallbacks:
        shapes = gguf_plan.quantizable_tensors(plan.info)
        groups: dict[tuple, list[str]] = {}
        for name, asked, stored in plan.fallbacks:
            groups.setdefault((asked, stored, shapes[name][1]), []).append(gguf_plan.gguf_name(plan.info, name))
        lines.append(f"fallbacks ({len(plan.fallbacks)} tensors; the row length does not fit the type's blocks):")
        for (asked, stored, row_len), names in groups.items():
            lines.append(f"  {asked:>7} -> {stored:<7} rows of {row_len:<6} {len(names):>4} tensors: "
                         f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_id", default=DEFAULTS["model_id"], help="HF model id or local directory")
    parser.add_argument("--config", default=DEFAULTS["config"], help="mixed-precision config from the search")
    parser.add_argument("--output", default=DEFAULTS["output"], help="output GGUF")
    parser.add_argument("--preset", default=None, type=str.upper, choices=list(gguf_plan.PRESETS), metavar="NAME",
                        help="write llama.cpp's uniform recipe instead of a config: "
                             + ", ".join(gguf_plan.PRESETS))
    parser.add_argument("--imatrix", default=None, metavar="PATH",
                        help="llama.cpp imatrix GGUF; overrides the activation statistics the config carries")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in vars(args).items():
        print(f"{key:<10} {value}")
    try:
        if args.preset and args.config != DEFAULTS["config"]:
            raise ExportError("pass either --preset or --config, not both")
        model_dir, name = resolve_model_dir(args.model_id)
        info = gguf_plan.load_model_info(model_dir, name=name)
        if args.preset:
            plan = plan_from_preset(info, args.preset, load_imatrix(args.imatrix, info) if args.imatrix else None)
        else:
            plan = plan_from_config(info, load_config(args.config, info), args.imatrix)
        output = write_gguf(plan, args.output)
    except (ExportError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary_table(plan, output))


if __name__ == "__main__":
    main()

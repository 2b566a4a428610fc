"""Files: the one atomic writer, the content hashes (each named for what it covers), model directories.

Every output is written under a hidden temporary name beside its final path (`.<name>.<pid>.part`) and renamed
into place when complete, so a reader never sees half a file and an interrupted run leaves the old one intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from cli import UserError

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------

def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name `path` is written under: same directory, so the rename is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file (or a directory) to; on success it replaces `path` (an existing
    directory there is removed first), on any failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, **savefig_args) -> None:
    """A matplotlib figure as PNG, atomically, then closed."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **savefig_args)
    plt.close(fig)


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save of plain tensors and containers (loadable with weights_only=True), atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------------------------------------------------
# Hashes: each named for what it covers
# ---------------------------------------------------------------------------------------------------------

def record_key(record: dict, n_chars: int = 16) -> str:
    """Cache key of one record of every input a cached result depends on (JSON, keys sorted)."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n_chars]


def token_ids_hash(ids) -> str:
    """Content hash of token windows (a torch tensor or numpy array of ids): their shape and values."""
    import numpy as np
    arr = ids.detach().to("cpu").numpy() if hasattr(ids, "detach") else np.asarray(ids)
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    h = hashlib.sha256(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]


def file_stat_signature(paths: Sequence[str | os.PathLike]) -> str:
    """Names, sizes and modification times of files: a cheap identity of weights without hashing gigabytes."""
    items = sorted((Path(p).name, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def weight_sample_hash(weight) -> str:
    """Of a checkpoint weight as float32, before any smoothing: the hash of 8 evenly spread rows. Tells apart
    the same tensor of two checkpoints (a fine-tune changes every row), cheap at 7B scale."""
    import torch
    rows = torch.linspace(0, weight.shape[0] - 1, 8).round().long().unique()
    sample = weight.detach()[rows.to(weight.device)].float().cpu().contiguous().numpy()
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------------------

def resolve_model_dir(model_id: str) -> tuple[Path, str]:
    """(local directory, model name) for a local path or a Hugging Face model id: the local hub cache
    first, then the hub. Offline and not cached: one error naming the local option."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise UserError(f"--model_id {model_id}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(model_id, allow_patterns=HUB_FILES, local_files_only=True)), model_id
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(model_id, allow_patterns=HUB_FILES)), model_id
    except (OSError, ValueError) as exc:  # connection, offline mode and not-found errors
        raise UserError(f"cannot fetch {model_id} from the Hugging Face hub ({type(exc).__name__}); download "
                        "it elsewhere and pass the local directory with --model_id") from None

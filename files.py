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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove temporary files of `path` left by runs that were killed (`.<name>.<pid>.part` of a process that
    no longer runs)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.part"):
        pid = stale.name[len(path.name) + 2:-len(".part")]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(stale)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file (or a directory) to; on success it replaces `path` (an existing
    directory there is removed first), on any failure it is removed and `path` is left as it was. A write that
    fails for the file system's reasons (full, read-only, not permitted) is a UserError naming `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        _remove(tmp)
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if not _writing_error(exc, path, tmp):
            raise
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


def _writing_error(exc: OSError, path: Path, tmp: Path) -> bool:
    """Whether an OSError inside an atomic write is the write's own (no file named, or the output, its
    temporary name or a file under it, or its directory), not a failure to read some input."""
    if exc.filename is None:
        return True
    failed = Path(exc.filename)
    return failed in (path, path.parent) or failed == tmp or tmp in failed.parents


class OutputSet:
    """Files a run writes as one set: each is written under a temporary name (`path(final)`), and `commit`
    renames them all into place once every one is complete; until then, and after a failure (`discard`),
    the files of an earlier run stay as they were. Use as a context manager: commit on success."""

    def __init__(self):
        self.pending: dict[Path, Path] = {}     # final path -> temporary path
        self.removed: list[Path] = []           # earlier outputs this set does not have

    def path(self, final: str | os.PathLike) -> Path:
        """Where to write `final` for now."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        self.pending[final] = temp_path(final)
        return self.pending[final]

    def remove(self, final: str | os.PathLike) -> None:
        """An earlier run's output that this set replaces with nothing (removed on commit)."""
        self.removed.append(Path(final))

    def commit(self) -> None:
        try:
            for final, tmp in self.pending.items():
                os.replace(tmp, final)
            for final in self.removed:
                final.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write the outputs beside {next(iter(self.pending))}: "
                            f"{exc.strerror or exc}") from exc

    def discard(self) -> None:
        for tmp in self.pending.values():
            _remove(tmp)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


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


def read_gguf(path: str | os.PathLike, what: str = "GGUF"):
    """gguf-py's reader of a file the user named; a file that is not a GGUF, or is cut short, is one UserError
    naming it (`what` says what the file should have been)."""
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as exc:   # gguf-py's ways of meeting a broken file
        raise UserError(f"{path} is not a readable {what} ({type(exc).__name__}: {exc})") from None


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

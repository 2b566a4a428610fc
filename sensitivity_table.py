"""The sensitivity table: one typed record per (tensor, type), the KLD predicted for types not measured, the
per-(tensor, type) disk cache that lets an interrupted run resume, and the table's files (matrices, JSON,
heatmap).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import files
from quant_utils import get_type

SENSITIVITY_FORMAT_VERSION = 5   # 2: tied embeddings quantized with the head's imatrix; 3: row samples;
                                 # 4: GPTQ before its refinement sweep (`draft_bytes`); 5: typed records
IRREGULAR_ERROR_FACTOR = 2.0
TABLE_FIELDS = ("bits_per_weight", "size_bytes", "rel_out_err", "kld_mean", "kld_pred", "act_kld")


@dataclass
class SensitivityEntry:
    """What one tensor suffers under one type, measured with only that tensor quantized."""
    tensor: str                        # HF weight name
    type: str                          # GGUF type
    kind: str                          # q_proj ... down_proj, embed_tokens, lm_head
    block: int | None                  # decoder block; None for the embedding and the head
    bits_per_weight: float
    size_bytes: int
    rel_out_err: float                 # output error relative to the output energy (through the Gram, or
                                       # its diagonal when out_err_diagonal; a lone embedding: its lookups)
    error_rows: int                    # rows the output error was measured on
    seconds: float                     # time spent measuring this entry
    rel_rows_err: float | None = None  # embeddings: lookup error weighted by token frequency
    out_err_diagonal: bool = False     # input too wide for a Gram: error through the imatrix
    kld_mean: float | None = None      # measured mean KLD on the held-out windows (None: not measured)
    kld_tokens: int = 0
    kld_pred: float | None = None      # kld_mean, or predicted from rel_out_err (predict_kld)
    act_kld: float = 0.0               # KLD of rounding this tensor's input to the type's activation format

    @property
    def damage(self) -> float | None:
        """Predicted model damage: the weight error's KLD plus the input rounding's."""
        return None if self.kld_pred is None else self.kld_pred + self.act_kld


def irregular_tensors(entries: list[SensitivityEntry], factor: float = IRREGULAR_ERROR_FACTOR) -> set[str]:
    """Tensors whose output error is more than `factor` times larger at some type than at a type of fewer
    bits. Normally the error falls about 4x per bit; an inversion means a few weights or channels dominate
    (e.g. a massive-activation channel into a down_proj that one grid stores well and another badly), and then
    one measured type does not predict the others: all get measured."""
    by_tensor: dict[str, list[SensitivityEntry]] = {}
    for e in entries:
        by_tensor.setdefault(e.tensor, []).append(e)
    out = set()
    for name, es in by_tensor.items():
        for low in es:
            if any(high.bits_per_weight > low.bits_per_weight and high.rel_out_err > factor * low.rel_out_err
                   for high in es):
                out.add(name)
                break
    return out


def predict_kld(entries: list[SensitivityEntry]) -> list[SensitivityEntry]:
    """Every entry with `kld_pred`: the measured KLD where there is one; otherwise the tensor's gain
    (geometric mean over its measured types of kld_mean / rel_out_err) times the entry's rel_out_err.
    Near a small perturbation both are quadratic in the weight error, so the ratio is the tensor's
    downstream sensitivity per unit of output error."""
    gains: dict[str, list[float]] = {}
    for e in entries:
        if e.kld_mean is not None and e.rel_out_err > 0 and e.kld_mean > 0:
            gains.setdefault(e.tensor, []).append(math.log(e.kld_mean / e.rel_out_err))
    out = []
    for e in entries:
        if e.kld_mean is not None:
            pred = e.kld_mean
        elif e.tensor in gains:
            pred = math.exp(sum(gains[e.tensor]) / len(gains[e.tensor])) * e.rel_out_err
        else:
            pred = None
        out.append(dataclasses.replace(e, kld_pred=pred))
    return out


@dataclass
class SensitivityTable:
    entries: list[SensitivityEntry]
    meta: dict

    def tensors(self) -> list[str]:
        return list(dict.fromkeys(e.tensor for e in self.entries))

    def types(self) -> list[str]:
        names = dict.fromkeys(e.type for e in self.entries)
        return sorted(names, key=lambda t: (get_type(t).bits_per_weight, t))

    def lookup(self) -> dict[tuple[str, str], SensitivityEntry]:
        return {(e.tensor, e.type): e for e in self.entries}

    def to_tensors(self) -> dict:
        """Plain matrices [n_tensors, n_types] (NaN where a type does not fit), loadable with weights_only."""
        tensors, types, table = self.tensors(), self.types(), self.lookup()
        out = {"format_version": SENSITIVITY_FORMAT_VERSION, "tensors": tensors, "types": types,
               "meta": self.meta}
        for name in TABLE_FIELDS:
            m = torch.full((len(tensors), len(types)), float("nan"), dtype=torch.float64)
            for i, tensor in enumerate(tensors):
                for j, qtype in enumerate(types):
                    entry = table.get((tensor, qtype))
                    value = None if entry is None else getattr(entry, name)
                    if value is not None:
                        m[i, j] = float(value)
            out[name] = m
        return out

    def save(self, pt_path: str | os.PathLike, json_path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the matrices (torch, weights_only) and the entries (JSON), each atomically."""
        files.torch_save(self.to_tensors(), pt_path)
        files.write_json(json_path, {"meta": self.meta, "entries": [dataclasses.asdict(e) for e in self.entries]})
        return pt_path, json_path


def plot_heatmap(table: SensitivityTable, path: str | os.PathLike, field: str = "kld_pred") -> None:
    """log10(field) as blocks x tensor kinds, one panel per type; embedding/head values in the panel titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    block_entries = [e for e in table.entries if e.block is not None]
    kinds = list(dict.fromkeys(e.kind for e in block_entries))
    n_blocks = max(e.block for e in block_entries) + 1
    types = table.types()
    grids = {t: np.full((n_blocks, len(kinds)), np.nan) for t in types}
    extras = {t: [] for t in types}
    for e in table.entries:
        value = getattr(e, field)
        if value is None or value <= 0:
            continue
        if e.block is None:
            extras[e.type].append(f"{e.kind} {value:.1e}")
        else:
            grids[e.type][e.block, kinds.index(e.kind)] = math.log10(value)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-6.0, 0.0)
    n_cols = min(6, len(types))
    n_rows = -(-len(types) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 0.16 * n_blocks * n_rows + 1.5),
                             squeeze=False, constrained_layout=True)
    for ax, qtype in zip(axes.flat, types):
        im = ax.imshow(grids[qtype], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"{qtype}\n" + "; ".join(extras[qtype]), fontsize=7)
        ax.set_xticks(range(len(kinds)), [k.replace("_proj", "") for k in kinds], fontsize=6, rotation=90)
        ax.set_yticks(range(0, n_blocks, 5), [str(b) for b in range(0, n_blocks, 5)], fontsize=6)
        ax.set_ylabel("block", fontsize=6)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"log10 {field}")
    files.save_figure(fig, path, dpi=110)


class ResultCache:
    """One small JSON file per (tensor, type): <root>/<run key>/<tensor name>/<TYPE>.json, written atomically
    with a checksum of its record. An entry that cannot be read, or whose checksum does not match (edited or
    cut short), is named on stderr, removed and measured again."""

    def __init__(self, root: str | os.PathLike | None, run_key: str):
        self.dir = Path(root) / run_key if root is not None else None
        self.memory: dict[tuple[str, str], dict] = {}

    def _path(self, tensor: str, qtype: str) -> Path:
        return self.dir / tensor / f"{qtype}.json"


    def get(self, tensor: str, qtype: str) -> dict | None:
        """The cached record of (tensor, type), or None."""
        if (tensor, qtype) in self.memory:
            return self.memory[(tensor, qtype)]
        if self.dir is None:
            return None
        path = self._path(tensor, qtype)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            record = stored["record"]
            valid = stored["checksum"] == files.record_key(record) and record.get("tensor") == tensor
        except (ValueError, KeyError, TypeError, OSError):
            valid = False
        if not valid:
            print(f"warning: discarding unreadable or altered cache entry {path}; measuring it again",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        self.memory[(tensor, qtype)] = record
        return record

    def put(self, record: dict) -> None:
        """Keep a record (a dict with "tensor" and "type") in memory and on disk."""
        self.memory[(record["tensor"], record["type"])] = record
        if self.dir is not None:
            files.write_json(self._path(record["tensor"], record["type"]),
                             {"record": record, "checksum": files.record_key(record)}, indent=None)

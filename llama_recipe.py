"""A recipe stock `llama-quantize` applies: the stored type of every tensor in the format `--tensor-type-file`
reads, the imatrix our exporter quantized with, and the command line that puts them together.

    <stem>.tensor-types.txt     one `^blk\\.0\\.attn_q\\.weight$=q4_K` per block tensor (anchored regular
                                expressions, as llama-quantize matches them; first match wins)
    <stem>.recipe-imatrix.gguf  the exporter's imatrix as a llama.cpp imatrix GGUF: each vector is written as its
                                own sum with a count of 1, so llama-quantize's sum / count gives back the same
                                float32 values (a tied embedding's entry, weighted by the head, included)
    <stem>.llama-quantize.sh    `sh <stem>.llama-quantize.sh MODEL-F32.gguf OUT.gguf [THREADS]`: runs
                                $LLAMA_QUANTIZE (default llama-quantize) with the above, and the token-embedding
                                and output types as flags (llama-quantize applies those without its fallback,
                                so every type written is the stored one, after the row-length fallback)

Given the F32 GGUF of the same checkpoint (convert_hf_to_gguf.py --outtype f32, or export_gguf_official.py
--preset F32), llama-quantize then writes every tensor byte for byte as export_gguf_official.py does for a
config made with `--quantizer ggml` and no smoothing. GPTQ's bytes (and smoothed weights) are the search's own:
for those configs the recipe reproduces the types, not the bytes.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

import files
from gguf_export import ExportPlan
from quant_utils import get_type

SUFFIXES = {"types": ".tensor-types.txt", "imatrix": ".recipe-imatrix.gguf", "script": ".llama-quantize.sh"}


@dataclass(frozen=True)
class Recipe:
    block_types: dict[str, str]           # GGUF name -> stored type, for --tensor-type-file
    token_embedding_type: str | None      # --token-embedding-type
    output_tensor_type: str | None        # --output-tensor-type (None when the head is tied)
    file_type: str                        # llama-quantize's type argument (labels the file; quantized)
    imatrix: dict[str, np.ndarray]        # GGUF name -> float32 vector handed to ggml
    exact: bool                           # llama-quantize reproduces the bytes, not only the types


def file_type_argument(file_type: int) -> str:
    """llama-quantize's type argument for a plan's general.file_type. Its default type must be quantized
    (llama-quantize applies --tensor-type only then), so a mostly-float mix is labelled Q8_0."""
    name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return "Q8_0" if name in ("F32", "F16", "BF16") else name


def make_recipe(plan: ExportPlan) -> Recipe:
    """The recipe of an export plan (gguf_export.plan_from_config / plan_from_types)."""
    block, embedding, output = {}, None, None
    for t in plan.info.tensors:
        if not t.quantizable:
            continue
        stored = plan.stored_types[t.hf_name]
        if t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            embedding = stored
        elif t.kind == gguf.MODEL_TENSOR.OUTPUT:
            output = stored
        else:
            block[t.gguf_name] = stored
    names = {t.hf_name: t.gguf_name for t in plan.info.tensors}
    imatrix = {names[n]: np.asarray(v, np.float32).reshape(-1) for n, v in (plan.imatrix or {}).items()}
    exact = not plan.shipped and plan.smoothing.is_identity()
    return Recipe(block, embedding, output, file_type_argument(plan.file_type), imatrix, exact)


def tensor_type_lines(recipe: Recipe) -> str:
    """The --tensor-type-file text: one anchored, escaped pattern per tensor (llama-quantize lower-cases the
    pattern and regex-searches the tensor name, so `blk.1.` must not also match `blk.11.`)."""
    return "".join(f"^{re.escape(name)}$={get_type(t).name.lower()}\n" for name, t in recipe.block_types.items())


def script_text(recipe: Recipe, stem: Path) -> str:
    """The shell script that runs llama-quantize with the recipe's files beside it."""
    flags = ["--imatrix", '"$HERE"/' + shlex.quote(stem.name + SUFFIXES["imatrix"]),
             "--tensor-type-file", '"$HERE"/' + shlex.quote(stem.name + SUFFIXES["types"])]
    if recipe.token_embedding_type:
        flags += ["--token-embedding-type", recipe.token_embedding_type.lower()]
    if recipe.output_tensor_type:
        flags += ["--output-tensor-type", recipe.output_tensor_type.lower()]
    what = ("every tensor byte-identical to export_gguf_official.py --config" if recipe.exact else
            "the same types as export_gguf_official.py --config; not its bytes (GPTQ or smoothing)")
    return (f"#!/bin/sh\n"
            f"# llama-quantize recipe of {shlex.quote(stem.name)} (mixed_precision_ptq.py): {what}.\n"
            f"# usage: sh {shlex.quote(stem.name + SUFFIXES['script'])} MODEL-F32.gguf OUTPUT.gguf [THREADS]\n"
            f"# MODEL-F32.gguf: convert_hf_to_gguf.py --outtype f32 (or export_gguf_official.py --preset F32) of\n"
            f"# the same checkpoint. LLAMA_QUANTIZE names the binary (default: llama-quantize on the PATH).\n"
            f"set -eu\n"
            f"[ $# -ge 2 ] || {{ echo \"usage: $0 MODEL-F32.gguf OUTPUT.gguf [THREADS]\" >&2; exit 2; }}\n"
            f"HERE=$(dirname \"$0\")\n"
            f"exec \"${{LLAMA_QUANTIZE:-llama-quantize}}\" {' '.join(flags)} \\\n"
            f"  \"$1\" \"$2\" {recipe.file_type} ${{3:-}}\n")


def write_imatrix(path: Path, recipe: Recipe, arch: str, datasets: list[str]) -> None:
    """The recipe's imatrix GGUF: sums = the float32 vectors, counts = 1 (see the module docstring)."""
    with files.atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, 1)
        for name in sorted(recipe.imatrix):
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(recipe.imatrix[name].reshape(1, -1)))
            writer.add_tensor(f"{name}.counts", np.ones((1, 1), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def recipe_paths(stem: Path) -> dict[str, Path]:
    """The recipe's files for a config path (its suffix replaced)."""
    return {part: stem.with_suffix(suffix) for part, suffix in SUFFIXES.items()}


def write_recipe(plan: ExportPlan, config_path: Path, outputs: files.OutputSet, datasets: list[str]) -> Recipe:
    """Write the recipe of `plan` beside `config_path` into the run's output set; returns it."""
    recipe = make_recipe(plan)
    stem = Path(config_path).with_suffix("")
    paths = recipe_paths(Path(config_path))
    files.write_text(outputs.path(paths["types"]), tensor_type_lines(recipe))
    write_imatrix(outputs.path(paths["imatrix"]), recipe, plan.info.arch, datasets)
    files.write_text(outputs.path(paths["script"]), script_text(recipe, stem))
    return recipe


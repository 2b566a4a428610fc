"""A comparison: the original and any number of GGUFs of it, measured over the same evaluation windows and
prompts, each model in its own process (workers.py), then printed and reported (compare_report.py).

The shared pipeline of compare_real_quant.py and compare_three_models.py; test_mixed_precision.py uses its
inputs (windows, prompts, the cached reference).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

import architectures
import compare_report
import files
import gguf_plan
from cli import UserError, at_least
from metrics import first_scored
from reference import Reference, build_reference, open_reference, reference_key, transformers_source_id
from runtimes import (Speed, llama_gpu_offload, load_transformers_model, transformers_device,
                      transformers_dtype_name, transformers_logits_fn)
from workers import REPO_DIR, ModelJob, Settings, interleaved_speeds, run_job

DEFAULT_PROMPTS_FILE = REPO_DIR / "prompts.txt"
LOCAL_EVAL_HINT = "pass local text with --eval_file (e.g. ../shared/data/wikitext-2/wiki.test.tokens)"


def load_eval_windows(eval_file: str | None, tokenizer, seq_len: int, n_windows: int | None) -> np.ndarray:
    """The first `n_windows` consecutive windows of the evaluation text as int64 [n_windows, seq_len].

    `eval_file` None means wikitext-2-raw-v1 test through `datasets`; a path is read by data_utils (.txt,
    .tokens, .raw, .jsonl, .parquet). An unreachable hub is one error naming --eval_file.
    """
    import data_utils
    source = eval_file or "wikitext2"
    if eval_file is not None and not Path(eval_file).is_file():
        raise UserError(f"--eval_file {eval_file} not found")
    try:
        windows = data_utils.get_eval_dataset(source, tokenizer, seq_len=seq_len, n_samples=n_windows)
    except data_utils.DataSourceError as exc:
        if eval_file is None:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else str(exc)
            raise UserError(f"cannot load wikitext-2-raw-v1 (test split) through datasets ({cause}); "
                            f"{LOCAL_EVAL_HINT}") from None
        raise UserError(f"--eval_file {eval_file}: {exc}") from None
    return windows.numpy().astype(np.int64)


def preset_recipe(gguf_path, info) -> str | None:
    """The llama.cpp preset a GGUF is (its file type's recipe, with or without an imatrix, type for type), or
    None for any other mix: the report draws the presets as llama.cpp's size/quality ladder."""
    reader = files.read_gguf(gguf_path, "GGUF file")
    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, preset in gguf_plan.PRESETS.items():
        if int(preset.file_type) != int(field.contents()):
            continue
        for imatrix in (True, False):
            planned = gguf_plan.preset_types(info, name, imatrix_available=imatrix)
            if all(stored.get(architectures.gguf_name(info, n)) == t for n, t in planned.items()):
                return name
    return None


def eval_text_name(eval_file: str | None) -> str:
    """How an evaluation text is named in the tables: its file name, or the hub's wikitext-2 test split."""
    return Path(eval_file).name if eval_file else "wikitext-2 test"


def load_prompts(extra_file: str | None = None, default_file: Path = DEFAULT_PROMPTS_FILE) -> list[str]:
    """The repository's generation prompts followed by those of `extra_file` (--prompts).

    One prompt per line; blank lines and lines starting with '#' are skipped; a literal "\\n" in a line stands
    for a newline, so a prompt may span lines.
    """
    prompts = []
    for path in [default_file] + ([Path(extra_file)] if extra_file else []):
        if not Path(path).is_file():
            raise UserError(f"prompts file {path} not found")
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(line.strip().replace("\\n", "\n"))
    return prompts


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF of this model must say about itself (read from config.json)."""
    arch: str             # GGUF architecture name
    n_layers: int
    hidden_size: int
    n_vocab: int


def model_facts(model_dir: Path) -> ModelFacts:
    """Architecture facts of a Hugging Face checkpoint, named as GGUF metadata names them (via the architecture
    table; other architectures by their model_type, which llama.cpp mostly shares)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"no config.json in {model_dir}")
    cfg = json.loads(cfg_path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    hf_arch = (cfg.get("architectures") or [""])[0]
    spec = architectures.ARCHITECTURES.get(hf_arch)
    arch = gguf.MODEL_ARCH_NAMES[spec.gguf_arch] if spec else str(cfg.get("model_type"))
    return ModelFacts(arch, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["vocab_size"]))


def check_gguf_matches_model(gguf_path, model_dir: Path, tokenizer, allow_other_checkpoint: bool = False) -> None:
    """Refuse a GGUF that is not a quantization of this model: architecture, block count, embedding size and
    vocabulary size must equal the checkpoint's, every regular (non-added) token must be the same string at the
    same id, and a GGUF our exporter wrote must name this checkpoint's content hash (another checkpoint of the
    same shape scores nonsense against it) unless `allow_other_checkpoint`. Raises one UserError listing every
    difference."""
    reader = files.read_gguf(gguf_path, "GGUF file")

    def field(name):
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    facts = model_facts(model_dir)
    arch = field("general.architecture")
    tokens = field("tokenizer.ggml.tokens") or []
    found = {"architecture": arch, "block_count": field(f"{arch}.block_count"),
             "embedding_length": field(f"{arch}.embedding_length"), "vocabulary size": len(tokens)}
    wanted = {"architecture": facts.arch, "block_count": facts.n_layers, "embedding_length": facts.hidden_size,
              "vocabulary size": facts.n_vocab}
    diffs = [f"{k} {found[k]} (model: {wanted[k]})" for k in wanted if found[k] != wanted[k]]
    if not diffs:
        added = tokenizer.get_added_vocab()
        bad = [(i, t) for t, i in tokenizer.get_vocab().items()
               if t not in added and (i >= len(tokens) or tokens[i] != t)]
        if bad:
            i, t = min(bad)
            in_gguf = repr(tokens[i]) if i < len(tokens) else "nothing"
            diffs.append(f"tokenizer differs at {len(bad)} tokens (id {i}: {in_gguf} in the GGUF, {t!r} in "
                         "the model)")
    made_from = field(gguf_plan.CHECKPOINT_HASH_KEY)
    if not diffs and made_from is not None and not allow_other_checkpoint:
        content = architectures.checkpoint_content_hash(architectures.load_model_info(model_dir))
        if made_from != content:
            diffs.append(f"it was made from another checkpoint of this shape (content hash {made_from}, the model "
                         f"has {content}; --allow_other_checkpoint compares them anyway)")
    if diffs:
        raise UserError(f"{gguf_path} is not a GGUF of {model_dir}: " + "; ".join(diffs))


def generation_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user turn in the model's chat template, ready for the assistant's answer; for a base
    model without a chat template (Gemma 3 270M), the prompt as text to continue, with the tokenizer's BOS."""
    if not getattr(tokenizer, "chat_template", None):
        return [int(t) for t in tokenizer(prompt)["input_ids"]]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """Tokens that end a generation: the tokenizer's EOS and generation_config.json's eos_token_id(s)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(int(i) for i in ids)


@dataclass
class Original:
    """The model every GGUF is compared with: its directory, name and tokenizer (weights load in the child)."""
    model_id: str
    model_dir: Path
    name: str
    tokenizer: object


def load_original(model_id: str) -> Original:
    """Resolve --model_id to a local directory and load its tokenizer (the weights are loaded later, in the
    process that measures the original)."""
    from transformers import AutoTokenizer
    model_dir, name = files.resolve_model_dir(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    return Original(model_id, model_dir, name, tokenizer)


def original_reference_source(model_dir: Path, settings: Settings) -> str:
    """Identity of the original's logits as this machine computes them (device and dtype included)."""
    device = transformers_device(settings.device)
    return transformers_source_id(model_dir, transformers_dtype_name(device), device.split(":")[0])


def reference_for_model(model_dir, windows: np.ndarray, settings: Settings | None = None) -> Reference:
    """The original's cached reference over these windows (the one compare_*.py use), built here if missing."""
    settings = settings or Settings()
    source = original_reference_source(Path(model_dir), settings)
    key = reference_key(source, windows, settings.reference_dtype)
    reference = open_reference(settings.cache_dir, key)
    if reference is None:
        device = transformers_device(settings.device)
        model = load_transformers_model(str(model_dir), device, transformers_dtype_name(device))
        reference = build_reference(transformers_logits_fn(model), windows, settings.cache_dir, key, source,
                                    settings.reference_dtype, settings.progress)
    return reference


def compare_models(original: Original, ggufs: list[tuple[str, str]], windows: np.ndarray, prompts: list[str],
                   settings: Settings, skip_original: bool = False, isolate: bool = True,
                   quality_only: bool = False):
    """Measure the original (unless skipped) and every (name, path) GGUF; returns (results, texts, notes).
    `quality_only`: the windows' quality alone (no speed, memory or generations), for a further text.

    The original runs first and leaves its logits in the reference cache; every GGUF is then compared with
    that reference. With skip_original, a reference cached by an earlier run over the same windows is used;
    without one, KLD and top-1 are not measured (noted). `texts` maps model name -> decoded generations.
    """
    source = original_reference_source(original.model_dir, settings)
    key = reference_key(source, windows, settings.reference_dtype)
    prompt_ids = [generation_prompt_ids(original.tokenizer, p) for p in prompts]
    stop_ids = stop_token_ids(original.tokenizer, original.model_dir)
    jobs = []
    if not skip_original:
        jobs.append(ModelJob("original", "transformers", str(original.model_dir), windows, prompt_ids, stop_ids,
                             settings, key, source, quality_only))
    jobs += [ModelJob(name, "gguf", str(path), windows, prompt_ids, stop_ids, settings, key, source, quality_only)
             for name, path in ggufs]
    results, notes = [], []
    for i, job in enumerate(jobs, 1):
        if job.kind == "gguf" and open_reference(settings.cache_dir, key) is None:
            job.reference_key = None
            if not notes:
                notes.append("no cached logits of the original for these windows: KLD and top-1 not measured "
                             "(run once without --skip_original)")
        print(f"[{i}/{len(jobs)}] {job.name}: {job.path}", file=sys.stderr, flush=True)
        results.append(run_job(job, isolate))
    if not quality_only:
        measure_speeds_interleaved([r for r in results if r.kind == "gguf"], settings)
    texts = {r.name: [original.tokenizer.decode(ids, skip_special_tokens=True) for ids in r.generations]
             for r in results}
    return results, texts, notes


def measure_speeds_interleaved(results: list, settings: Settings) -> None:
    """Every GGUF's pp and tg speed, measured in `speed_runs` interleaved rounds (each round runs every model's
    tests once, so a drifting machine slows them alike), medians and quartiles into each result's speed."""
    if not results:
        return
    print(f"speed: {len(results)} GGUFs, {settings.speed_runs} interleaved rounds", file=sys.stderr, flush=True)
    runs = interleaved_speeds([r.path for r in results], settings.pp_tokens, settings.tg_tokens,
                              settings.speed_runs, settings.n_threads, settings.progress)
    for result, r in zip(results, runs):
        result.speed = asdict(Speed(**result.speed).with_runs(r))


def add_measurement_args(parser) -> None:
    """Options shared by compare_real_quant.py, compare_three_models.py and test_mixed_precision.py."""
    d = Settings()
    parser.add_argument("--max_tokens", type=at_least(0), default=d.max_tokens, help="tokens to generate per prompt")
    parser.add_argument("--eval_file", nargs="+", default=None, metavar="FILE",
                        help="evaluation text (.txt/.tokens/.raw/.jsonl/.parquet), or several: each is scored and "
                             "reported, the first also in the main table; default wikitext-2-raw-v1 test through "
                             "datasets")
    parser.add_argument("--seq_len", type=at_least(4), default=d.seq_len, help="tokens per evaluation window")
    parser.add_argument("--n_windows", type=at_least(1), default=d.n_windows,
                        help="evaluation windows (consecutive, from the start of the text)")
    parser.add_argument("--prompts", default=None,
                        help=f"file of extra prompts, one per line (added to {DEFAULT_PROMPTS_FILE.name})")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write results.json, report.md and PNG plots here")
    parser.add_argument("--pp_tokens", type=at_least(1), default=d.pp_tokens,
                        help="prompt length for the pp speed test")
    parser.add_argument("--tg_tokens", type=at_least(1), default=d.tg_tokens,
                        help="decoded tokens for the tg speed test")
    parser.add_argument("--speed_runs", type=at_least(1), default=d.speed_runs,
                        help="interleaved rounds of the GGUFs' speed tests (medians and quartiles reported)")
    parser.add_argument("--threads", type=at_least(1), default=d.n_threads, help="CPU threads (llama.cpp and torch)")
    parser.add_argument("--device", default=d.device, help="device of the transformers model: auto|cuda|mps|cpu")
    parser.add_argument("--cache_dir", default=d.cache_dir, help="cache of the original's logits")
    parser.add_argument("--reference_dtype", default=d.reference_dtype, choices=["auto", "float32", "float16"],
                        help="storage of cached log-probs (auto: float32 up to 1 GiB, else float16)")
    parser.add_argument("--allow_other_checkpoint", action="store_true",
                        help="compare a GGUF our exporter made from another checkpoint of this shape anyway")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def settings_from_args(args) -> Settings:
    """Settings from parsed add_measurement_args options (their ranges are checked when parsed)."""
    return Settings(seq_len=args.seq_len, n_windows=args.n_windows, pp_tokens=args.pp_tokens,
                    tg_tokens=args.tg_tokens, speed_runs=args.speed_runs, max_tokens=args.max_tokens,
                    n_threads=args.threads, device=args.device, cache_dir=args.cache_dir,
                    reference_dtype=args.reference_dtype, progress=not args.no_progress)


def describe_devices(settings: Settings) -> str:
    """Where each kind of model runs, for the log."""
    device = transformers_device(settings.device)
    gguf = ("GPU, all layers offloaded" if llama_gpu_offload() else f"CPU, {settings.n_threads} threads")
    return f"transformers on {device} ({transformers_dtype_name(device)}); llama.cpp on {gguf}"


def run_comparison(args, ggufs: list[tuple[str, str]]) -> None:
    """The pipeline shared with compare_real_quant.py: load, check, measure, print, report."""
    settings = settings_from_args(args)
    for key, value in vars(args).items():
        print(f"{key:<16} {value}")
    print(f"{'devices':<16} {describe_devices(settings)}")

    original = load_original(args.model_id)
    for _, path in ggufs:
        check_gguf_matches_model(path, original.model_dir, original.tokenizer, args.allow_other_checkpoint)
    eval_texts = {}
    for f in args.eval_file or [None]:
        name, n = eval_text_name(f), 2
        while name in eval_texts:                  # two files of the same name in different directories
            name, n = f"{eval_text_name(f)} ({n})", n + 1
        eval_texts[name] = load_eval_windows(f, original.tokenizer, settings.seq_len, settings.n_windows)
    prompts = load_prompts(args.prompts)
    for name, windows in eval_texts.items():
        print(f"{'evaluation':<16} {name}: {len(windows)} windows of {settings.seq_len} tokens, "
              f"{len(windows) * (settings.seq_len - 1 - first_scored(settings.seq_len))} scored")

    (first, windows), *further = eval_texts.items()
    results, texts, notes = compare_models(original, ggufs, windows, prompts, settings,
                                           skip_original=args.skip_original)
    for r in results:
        r.quality_by_text[first] = r.quality
    for name, more_windows in further:
        print(f"quality on {name}", file=sys.stderr, flush=True)
        more, _, more_notes = compare_models(original, ggufs, more_windows, [], settings,
                                             skip_original=args.skip_original, quality_only=True)
        notes += [n for n in more_notes if n not in notes]
        for r, m in zip(results, more):
            r.quality_by_text[name] = m.quality

    try:
        info = architectures.load_model_info(original.model_dir, name=original.name)
    except ValueError:               # an architecture the exporter does not know: no preset ladder to draw
        info = None
    for r in results:
        if r.kind == "gguf" and info is not None:
            r.recipe = preset_recipe(r.path, info)

    print()
    print(compare_report.format_table(results))
    if further:
        print()
        print(compare_report.quality_by_text_table(results))
    print(compare_report.speed_ratios(results))
    for note in notes:
        print(f"note: {note}")
    width = compare_report.terminal_width()
    for i, prompt in enumerate(prompts):
        print()
        print(compare_report.side_by_side(prompt, [r.name for r in results], [texts[r.name][i] for r in results],
                                          width))
    if args.report:
        settings_record = {**vars(args), "devices": describe_devices(settings),
                           "n_windows": len(windows), "scored_tokens_per_window":
                           settings.seq_len - 1 - first_scored(settings.seq_len)}
        paths = compare_report.write_report(args.report, results, prompts, texts, settings_record, notes)
        print(f"\nreport: {', '.join(str(p) for p in paths)}")

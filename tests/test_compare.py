"""Comparison scripts: KLD/top-1/perplexity numerics, the reference cache, input checks and the report.

Tiny random Llama checkpoints with a small byte-level BPE tokenizer (BOS added, ChatML template) are built here
and exported to F32 and Q4_K_M GGUFs with our exporter; llama.cpp runs through llama-cpp-python and the
original through transformers, as in real use.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from scipy.special import log_softmax as scipy_log_softmax  # noqa: E402

import compare_real_quant  # noqa: E402
import compare_three_models  # noqa: E402
from cli import UserError  # noqa: E402
import architectures  # noqa: E402
import comparison  # noqa: E402
import gguf_export  # noqa: E402
import metrics  # noqa: E402
import reference  # noqa: E402
import runtimes  # noqa: E402
import workers  # noqa: E402

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SEQ_LEN = 64
N_WINDOWS = 4


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------

def eval_text() -> str:
    """The start of wikitext-2 test (the real evaluation text), or a stand-in when ../shared is absent."""
    if WIKI_TEST.is_file():
        return WIKI_TEST.read_text(encoding="utf-8")[:30_000]
    return " ".join(f"Sentence {i} says that the value of item {i % 17} is {i * 7 % 101}." for i in range(3000))


def build_tokenizer(out_dir: Path, vocab_size: int, seed_text: str) -> None:
    """A byte-level BPE (SmolLM pre-tokenizer, which llama.cpp knows) that adds BOS, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([seed_text], trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|begin_of_text|>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)


def build_model(out_dir: Path, tokenizer_dir: Path, n_rows: int, layers: int, seed: int) -> Path:
    """A random bf16 Llama checkpoint (tied embeddings, hidden 128) with the tokenizer files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=n_rows, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that the output is not just the input embedding
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(2 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    model.to(torch.bfloat16).save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


def export(model_dir: Path, out: Path, preset: str) -> Path:
    plan = gguf_export.plan_from_preset(architectures.load_model_info(model_dir), preset)
    return gguf_export.write_gguf(plan, out, progress=False)


def n_tokens(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The model under test, its F32 and Q4_K_M GGUFs and an evaluation text file."""
    base = tmp_path_factory.mktemp("compare")
    text = eval_text()
    (base / "eval.txt").write_text(text, encoding="utf-8")
    build_tokenizer(base / "tok", 400, text)
    model_dir = build_model(base / "model", base / "tok", n_tokens(base / "tok"), layers=2, seed=0)
    return {"dir": model_dir, "eval": base / "eval.txt", "f32": export(model_dir, base / "f32.gguf", "F32"),
            "q4km": export(model_dir, base / "q4km.gguf", "Q4_K_M")}


@pytest.fixture(scope="session")
def original(tiny):
    return comparison.load_original(str(tiny["dir"]))


@pytest.fixture(scope="session")
def windows(tiny, original) -> np.ndarray:
    return comparison.load_eval_windows(str(tiny["eval"]), original.tokenizer, SEQ_LEN, N_WINDOWS)


@pytest.fixture(scope="session")
def hf_model(tiny):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny["dir"], dtype=torch.float32).eval()


def llama(path: Path, n_ctx: int = SEQ_LEN):
    """One thread: ggml's thread barriers crawl on a shared, oversubscribed CPU."""
    return runtimes.open_llama(str(path), n_ctx, 512, True, 1)


# ----------------------------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------------------------

def test_windows_follow_llama_perplexity_convention(windows, original):
    """BOS first in every window (this tokenizer adds one); the second half of each window is scored."""
    assert windows.shape == (N_WINDOWS, SEQ_LEN)
    assert (windows[:, 0] == original.tokenizer.bos_token_id).all()
    assert metrics.first_scored(512) == 256
    assert metrics.scored_targets(np.arange(512)).tolist() == list(range(257, 512))  # 255 tokens, as llama.cpp


def same_logits_each_time(logits_fn):
    """The logits a function gave a window the first time, every time (a CPU's BLAS may pick another thread
    split on a busy machine and round differently; the KLD's zero is what is under test here)."""
    seen = {}
    return lambda window: seen.setdefault(np.asarray(window).tobytes(), logits_fn(window))


def test_kld_of_a_model_against_itself_is_zero(tiny, windows, hf_model, tmp_path):
    hf = same_logits_each_time(runtimes.transformers_logits_fn(hf_model))
    ref = reference.build_reference(hf, windows, tmp_path, "hf", "hf", progress=False)
    q = metrics.evaluate_quality(hf, windows, ref, progress=False)
    assert (q.kld_mean, q.kld_median, q.kld_p99, q.top1_agree) == (0.0, 0.0, 0.0, 1.0)
    assert q.ppl == pytest.approx(ref.quality().ppl, rel=1e-6)
    assert q.n_tokens == N_WINDOWS * (SEQ_LEN - 1 - SEQ_LEN // 2)

    llm = llama(tiny["q4km"])
    cpp = runtimes.llama_logits_fn(llm)
    ref = reference.build_reference(cpp, windows, tmp_path, "cpp", "cpp", progress=False)
    q = metrics.evaluate_quality(cpp, windows, ref, progress=False)
    assert (q.kld_mean, q.kld_p99, q.top1_agree) == (0.0, 0.0, 1.0)

    # float16 storage (large references) is renormalised on load: still almost exactly zero, top-1 exact
    ref16 = reference.build_reference(cpp, windows, tmp_path, "cpp16", "cpp", store_dtype="float16",
                                      progress=False)
    assert ref16.manifest["dtype"] == "float16"
    q16 = metrics.evaluate_quality(cpp, windows, ref16, progress=False)
    llm.close()
    assert abs(q16.kld_mean) < 1e-5 and q16.top1_agree == 1.0


def test_kld_and_top1_agree_with_numpy_on_llama_and_transformers_logits(tiny, windows, hf_model, tmp_path):
    """Reference: transformers; candidate: the Q4_K_M GGUF in llama.cpp. Direct float64 computation from the
    full logits of both libraries, over the scored half of each window."""
    hf = runtimes.transformers_logits_fn(hf_model)
    ref = reference.build_reference(hf, windows, tmp_path, "hf", "hf", progress=False)
    llm = llama(tiny["q4km"])
    got = metrics.evaluate_quality(runtimes.llama_logits_fn(llm), windows, ref, progress=False)

    first = SEQ_LEN // 2
    kld, same, nll = [], [], []
    for window in windows:
        with torch.no_grad():
            p_logits = hf_model(torch.tensor(window[None])).logits[0].double().numpy()
        llm.reset()
        llm.eval(window.tolist())
        q_logits = np.asarray(llm.scores[:SEQ_LEN], dtype=np.float64)
        rows, targets = slice(first, SEQ_LEN - 1), window[first + 1:]
        log_p = scipy_log_softmax(p_logits[rows], axis=-1)
        log_q = scipy_log_softmax(q_logits[rows], axis=-1)
        kld.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        same.append(p_logits[rows].argmax(-1) == q_logits[rows].argmax(-1))
        nll.append(-log_q[np.arange(len(targets)), targets])
    llm.close()
    kld, same, nll = np.concatenate(kld), np.concatenate(same), np.concatenate(nll)

    assert got.n_tokens == kld.size == N_WINDOWS * (SEQ_LEN - 1 - first)
    assert got.kld_mean > 1e-3  # the quantization is visible
    assert got.kld_mean == pytest.approx(kld.mean(), rel=1e-4)
    assert got.kld_median == pytest.approx(np.median(kld), rel=1e-3)
    assert got.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=1e-3)
    assert got.top1_agree == pytest.approx(same.mean(), abs=1.5 / kld.size)
    assert got.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Inputs that must stop the run
# ----------------------------------------------------------------------------------------------------------------

def run_main(main, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err  # one clear line
    return err


def test_transformers_greedy_with_kv_cache_equals_full_recompute(hf_model, windows):
    """The KV cache is handed back under the name this transformers version uses (runtimes.kv_cache_name):
    without it each step would see one token alone and the continuation would differ."""
    prompt = [int(t) for t in windows[0][:16]]
    cached = runtimes.transformers_greedy(hf_model, prompt, 8, stop_ids=[])
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(hf_model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]
    assert len(set(cached)) > 1          # a real continuation, not one token repeated


@pytest.mark.parametrize("kind", ["gguf", "transformers"])
def test_each_model_is_measured_in_a_python_that_loads_only_its_runtime(kind, tiny, windows, tmp_path):
    """torch and a CUDA llama.cpp cannot share a process (workers.WORKER_RUNTIME): the GGUF's worker loads
    llama.cpp's library before numpy and never imports torch; the original's never imports llama_cpp."""
    settings = workers.Settings(seq_len=SEQ_LEN, pp_tokens=8, tg_tokens=4, speed_runs=1, max_tokens=4,
                                n_threads=1, device="cpu", cache_dir=str(tmp_path / "cache"), progress=False)
    path = tiny["q4km"] if kind == "gguf" else tiny["dir"]
    job = workers.ModelJob("m", kind, str(path), windows[:1], [[1, 2, 3]], [], settings)
    job_path, result_path = tmp_path / "job.pkl", tmp_path / "result.pkl"
    job_path.write_bytes(pickle.dumps(job))
    python, *rest = workers.worker_command(kind, job_path, result_path)
    done = subprocess.run([python, "-X", "importtime", *rest], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    result = pickle.loads(result_path.read_bytes())
    assert isinstance(result, workers.ModelResult) and result.quality["ppl"] > 1
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")]
    packages = [name.split(".")[0] for name in imported]
    if kind == "gguf":
        assert "torch" not in packages
        assert imported.index("llama_cpp.llama_cpp") < packages.index("numpy")
    else:
        assert "torch" in packages and "llama_cpp" not in packages


def test_a_failing_worker_is_one_clear_error(tiny, windows, tmp_path):
    """A GGUF llama.cpp cannot parse fails in the worker and comes back as one line naming the file; a worker
    killed by a signal is named by the signal."""
    settings = workers.Settings(seq_len=SEQ_LEN, pp_tokens=8, tg_tokens=4, speed_runs=1, max_tokens=4,
                                n_threads=1, device="cpu", cache_dir=str(tmp_path / "cache"), progress=False)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(tiny["q4km"].read_bytes()[:4096])
    with pytest.raises(UserError, match="broken"):
        workers.run_job(workers.ModelJob("broken", "gguf", str(bad), windows[:1], [], [], settings))
    assert workers.exit_description(-11) == "was killed by SIGSEGV"
    assert workers.exit_description(1) == "exited with status 1"


def test_missing_files_fail_with_the_command_that_makes_them(tiny, tmp_path, capsys):
    model = str(tiny["dir"])
    err = run_main(compare_three_models.main, ["--model_id", model, "--q4km_path", str(tmp_path / "no.gguf"),
                                               "--mixed_path", str(tiny["f32"])], capsys)
    assert "no.gguf not found" in err
    assert f"export_gguf_official.py --model_id {model} --preset Q4_K_M --imatrix" in err
    err = run_main(compare_three_models.main, ["--model_id", model, "--q4km_path", str(tiny["q4km"]),
                                               "--mixed_path", str(tmp_path / "mixed.gguf")], capsys)
    assert "mixed.gguf not found" in err and "mixed_precision_ptq.py" in err
    err = run_main(compare_real_quant.main, ["--model_id", model, "--gguf_path", str(tmp_path / "x.gguf")], capsys)
    assert "x.gguf not found" in err and "--preset Q4_K_M" in err
    err = run_main(compare_real_quant.main, ["--model_id", model, "--gguf_path", str(tiny["q4km"]),
                                             "--eval_file", str(tmp_path / "none.txt")], capsys)
    assert "--eval_file" in err and "none.txt not found" in err
    err = run_main(compare_real_quant.main, ["--model_id", str(tmp_path / "nomodel"), "--gguf_path",
                                             str(tiny["q4km"])], capsys)
    assert "--model_id" in err


def test_gguf_of_another_model_is_refused(tiny, original, tmp_path, capsys):
    deeper = build_model(tmp_path / "deeper", tiny["dir"].parent / "tok", n_tokens(tiny["dir"].parent / "tok"),
                         layers=3, seed=1)
    with pytest.raises(UserError, match=r"block_count 3 \(model: 2\)"):
        comparison.check_gguf_matches_model(export(deeper, tmp_path / "deeper.gguf", "F32"), original.model_dir,
                                            original.tokenizer)

    # same shape, same vocabulary size, another tokenizer
    build_tokenizer(tmp_path / "tok2", 400, eval_text()[::-1])
    other = build_model(tmp_path / "other", tmp_path / "tok2", n_tokens(tiny["dir"].parent / "tok"), layers=2,
                        seed=0)
    other_gguf = export(other, tmp_path / "other.gguf", "F32")
    err = run_main(compare_real_quant.main, ["--model_id", str(tiny["dir"]), "--gguf_path", str(other_gguf)],
                   capsys)
    assert "is not a GGUF of" in err and "tokenizer differs" in err

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        comparison.check_gguf_matches_model(tmp_path / "junk.gguf", original.model_dir, original.tokenizer)


def test_unreachable_hub_names_the_local_alternative(tiny, tmp_path):
    """Offline: the default model id and the default evaluation text each fail with one line naming the flag.
    (A subprocess, because the hub libraries read the offline switches when imported.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("import cli, comparison, files\n"
            "from transformers import AutoTokenizer\n"
            "try:\n    files.resolve_model_dir('Qwen/Qwen2.5-7B-Instruct')\n"
            "except cli.UserError as exc:\n    print(exc)\n"
            f"tok = AutoTokenizer.from_pretrained({str(tiny['dir'])!r})\n"
            "try:\n    comparison.load_eval_windows(None, tok, 64, 2)\n"
            "except cli.UserError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    model_error, data_error = proc.stdout.splitlines()
    assert "Qwen/Qwen2.5-7B-Instruct" in model_error and "--model_id" in model_error
    assert "wikitext-2" in data_error and "--eval_file" in data_error


# ----------------------------------------------------------------------------------------------------------------
# End to end: table, report and the reference cache
# ----------------------------------------------------------------------------------------------------------------

def test_report_is_written_and_the_reference_is_reused(tiny, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# extra\nSay hello.\n", encoding="utf-8")
    common = ["--model_id", str(tiny["dir"]), "--q4km_path", str(tiny["q4km"]), "--mixed_path", str(tiny["f32"]),
              "--eval_file", str(tiny["eval"]), "--seq_len", str(SEQ_LEN), "--n_windows", "3", "--pp_tokens", "32",
              "--tg_tokens", "8", "--speed_runs", "2", "--max_tokens", "6", "--threads", "1", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache"), "--prompts", str(tmp_path / "prompts.txt"), "--no_progress"]
    report = tmp_path / "report"
    other = tmp_path / "other.txt"      # a second evaluation text: the first's words in reverse order
    other.write_text(" ".join(reversed(tiny["eval"].read_text(encoding="utf-8").split())), encoding="utf-8")
    compare_three_models.main(common + ["--gguf", str(tiny["q4km"]), "--report", str(report), "--eval_file",
                                        str(tiny["eval"]), str(other)])
    out = capsys.readouterr().out
    assert "model" in out and "KLD mean" in out and "tg tok/s" in out and "prompt: Say hello." in out
    assert "KLD other.txt" in out and "KLD eval.txt" in out

    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    models = {m["name"]: m for m in results["models"]}
    assert list(models) == ["original", "Q4_K_M", "mixed", "q4km"]
    n_prompts = len(comparison.load_prompts()) + 1
    for m in models.values():
        assert m["speed"]["pp_tok_per_s"] > 0 and m["speed"]["tg_tok_per_s"] > 0
        assert m["speed"]["peak_rss_bytes"] > 0 and m["size_bytes"] > 0
        assert len(m["generations"]) == n_prompts and m["quality"]["ppl"] > 1
    assert models["original"]["quality"]["kld_mean"] == 0.0
    assert 0 < models["mixed"]["quality"]["kld_mean"] < models["Q4_K_M"]["quality"]["kld_mean"]  # F32 vs Q4_K_M
    assert models["q4km"]["quality"] == models["Q4_K_M"]["quality"]  # llama.cpp is deterministic
    for m in models.values():                                          # every model scored on both texts
        assert list(m["quality_by_text"]) == ["eval.txt", "other.txt"]
        assert m["quality_by_text"]["eval.txt"] == m["quality"]
        assert m["quality_by_text"]["other.txt"]["ppl"] != m["quality"]["ppl"]
    assert [m["recipe"] for m in models.values()] == [None, "Q4_K_M", "F32", "Q4_K_M"]   # the presets' ladder
    for name in ("Q4_K_M", "mixed", "q4km"):                           # GGUF speeds: 2 interleaved rounds
        speed = models[name]["speed"]
        assert speed["speed_runs"] == 2 and speed["pp_q25"] <= speed["pp_tok_per_s"] <= speed["pp_q75"]
    assert "speed vs Q4_K_M (medians of 2 interleaved rounds): mixed pp " in out

    md = (report / "report.md").read_text(encoding="utf-8")
    assert "| model | size MiB | PPL | KLD mean |" in md and "| Q4_K_M |" in md and "speed.png" in md
    import matplotlib.image
    assert "Quality on each evaluation text" in md and "KLD other.txt" in md
    for name in ("kld_vs_size.png", "kld_vs_speed.png", "speed.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(report / name).ndim == 3
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temporary files left

    # The original's logits are cached: a run without it still measures KLD, with the same numbers.
    compare_three_models.main(common + ["--skip_original"])
    out = capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("ref-*"))) == 2     # one per evaluation text
    q4_line = next(line for line in out.splitlines() if line.startswith("Q4_K_M "))
    assert f"{models['Q4_K_M']['quality']['kld_mean']:.5f}" in q4_line
    assert not [line for line in out.splitlines() if line.startswith("original ")]  # not run

    # Without the original and without its cached logits: perplexity only, and a note saying why.
    common[common.index("--cache_dir") + 1] = str(tmp_path / "empty-cache")
    compare_three_models.main(common + ["--skip_original"])
    out = capsys.readouterr().out
    assert "note: no cached logits of the original" in out
    q4_line = next(line for line in out.splitlines() if line.startswith("Q4_K_M "))
    assert q4_line.split()[3:7] == ["-", "-", "-", "-"]  # KLD mean, median, p99, top-1


def test_generation_prompts_use_the_chat_template_and_a_base_model_continues_the_text(tiny):
    """An instruct model answers a user turn; a base model without a chat template (Gemma 3 270M) continues
    the prompt, after its BOS."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["dir"])
    prompt = "The capital of France is"
    chat = comparison.generation_prompt_ids(tok, prompt)
    assert chat == tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"]
    tok.chat_template = None
    assert comparison.generation_prompt_ids(tok, prompt) == tok(prompt)["input_ids"]
    assert comparison.generation_prompt_ids(tok, prompt) != chat

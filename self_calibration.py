"""--calib self: calibration text the model writes itself, for a model with no text of its kind at hand.

The prompts of calib_prompts.txt (instructions, questions, code, tool calls, several languages) are split once,
by a fixed permutation, into a calibration part (three quarters) and a held-out part; each part is answered in
its own draw. Every conversation is the prompt in the model's chat template (a base model without one simply
continues the prompt) followed by the model's sampled answer, and is one document of the draw. Calibration
windows come from the calibration draw, the held-out windows (sensitivity, the GA's measured KLD) from the
other: no prompt and no generated token is shared.

Sampling: temperature 0.8, the 100 most likely tokens, then the smallest set of them holding 95% of the
probability (top-p), until an end-of-turn token or 384 new tokens. It runs in llama.cpp on an F16 GGUF of the
checkpoint (on the GPU when llama-cpp-python was built with offload), in a fresh Python, with `PARALLEL`
conversations decoded as one batch and a finished one replaced at once (continuous batching); conversation k
samples with its own generator (seed, draw, k), so a draw is reproducible on a given llama.cpp build.
Conversations are cached as they finish (`self-calib-*.json` in the cache directory): a longer draw extends a
shorter one, and an interrupted run resumes. On 2 CPU cores SmolLM2-135M writes about 100-200 tokens/s; a 7B
model wants the GPU build.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import files
from architectures import ModelInfo, checkpoint_content_hash
from cli import UserError

PROMPTS_FILE = Path(__file__).resolve().with_name("calib_prompts.txt")
SAMPLING = {"temperature": 0.8, "top_k": 100, "top_p": 0.95, "max_new_tokens": 384}
PARALLEL = 32                    # conversations per round (one llama.cpp batch)
HELD_OUT_FRACTION = 0.25         # of the prompts, answered in the held-out draw
FORMAT_VERSION = 2
ROLES = ("calib", "heldout")


def read_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """One prompt per line; '#' comments and blank lines skipped; a literal \\n is a newline."""
    if not path.is_file():
        raise UserError(f"self-calibration prompts {path} not found")
    return [line.strip().replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def prompts_of(role: str, prompts: list[str]) -> list[str]:
    """The prompts a draw answers: a fixed permutation, the last quarter held out."""
    order = np.random.default_rng(20261205).permutation(len(prompts))
    n_held = max(1, round(len(prompts) * HELD_OUT_FRACTION))
    part = order[len(order) - n_held:] if role == "heldout" else order[:len(order) - n_held]
    return [prompts[i] for i in part]


def sample_token(logits: np.ndarray, rng: np.random.Generator) -> int:
    """One token by SAMPLING: temperature, top-k, then top-p, from float32 logits."""
    k = min(SAMPLING["top_k"], len(logits))
    top = np.argpartition(logits, -k)[-k:]
    top = top[np.argsort(-logits[top], kind="stable")]
    z = logits[top].astype(np.float64) / SAMPLING["temperature"]
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = min(int(np.searchsorted(np.cumsum(p), SAMPLING["top_p"])) + 1, k)   # the sum may stop short of 1
    p = p[:keep] / p[:keep].sum()
    return int(top[rng.choice(keep, p=p)])


class BatchedSampler:
    """llama.cpp decoding PARALLEL sequences at once through llama-cpp-python's C API."""

    def __init__(self, gguf_path: Path, max_tokens: int, n_threads: int):
        import llama_cpp as L
        from llama_cpp._logger import set_verbose
        set_verbose(False)                      # errors only (the default prints every graph build)
        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = -1 if L.llama_supports_gpu_offload() else 0
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise UserError(f"llama.cpp cannot load {gguf_path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = PARALLEL * max_tokens
        cparams.n_batch = cparams.n_ctx
        cparams.n_ubatch = 512
        cparams.n_seq_max = PARALLEL
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = n_threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise UserError(f"llama.cpp cannot make a context for {gguf_path} ({cparams.n_ctx} tokens)")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cparams.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) entries as one batch."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed while generating the self-calibration text")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).copy()

    def generate(self, next_prompt: Callable[[], tuple[int, list[int]] | None], stop_ids: set[int],
                 seed: Sequence[int], done: Callable[[int, list[int], list[int]], None]) -> None:
        """Continuous batching: PARALLEL slots decoded together, each refilled with `next_prompt()` ((index,
        token ids), or None: start no more) as soon as its conversation ends; `done(index, prompt, answer)` per
        conversation. Conversation k samples with its own generator (seed + [k]), whatever shares its batch."""
        memory = self.L.llama_get_memory(self.ctx)
        active: dict[int, dict] = {}                   # slot -> conversation state
        follow: list[tuple[int, int, int, bool]] = []  # the next token of every continuing conversation
        while True:
            entries = list(follow)
            for slot in range(PARALLEL):
                if slot in active:
                    continue
                nxt = next_prompt()
                if nxt is None:
                    break
                k, ids = nxt
                self.L.llama_memory_seq_rm(memory, slot, -1, -1)
                entries += [(t, pos, slot, pos == len(ids) - 1) for pos, t in enumerate(ids)]
                active[slot] = {"k": k, "prompt": ids, "answer": [], "rng": np.random.default_rng([*seed, k])}
            if not entries:
                return
            self._decode(entries)
            at = {e[2]: i for i, e in enumerate(entries) if e[3]}    # slot -> its logits row in this batch
            follow = []
            for slot in sorted(active):
                c = active[slot]
                token = sample_token(self._logits(at[slot]), c["rng"])
                c["answer"].append(token)
                if token in stop_ids or len(c["answer"]) == SAMPLING["max_new_tokens"]:
                    done(c["k"], c["prompt"], c["answer"])
                    del active[slot]
                else:
                    follow.append((token, len(c["prompt"]) + len(c["answer"]) - 1, slot, True))

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def cache_path(cache_dir: Path, info: ModelInfo, role: str, seed: int, prompts: list[str]) -> Path:
    record = {"format": FORMAT_VERSION, "checkpoint": checkpoint_content_hash(info), "role": role, "seed": seed,
              "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "sampling": SAMPLING,
              "parallel": PARALLEL}
    return Path(cache_dir) / f"self-calib-{files.record_key(record)}.json"


def read_draw(path: Path) -> dict[int, str]:
    """The cached conversations of a draw, {index: text}."""
    if not path.is_file():
        return {}
    try:
        conversations = json.loads(path.read_text(encoding="utf-8"))["conversations"]
        return {int(k): str(v) for k, v in conversations.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"warning: discarding unreadable cache entry {path}; generating the self-calibration text again")
        return {}


def documents_of(draw: dict[int, str]) -> list[str]:
    """The draw's documents: conversations 0, 1, ... as far as they go without a gap."""
    docs = []
    while len(docs) in draw:
        docs.append(draw[len(docs)])
    return docs


def text_tokens(tokenizer, docs: list[str]) -> int:
    """Tokens of the documents as one stream (data_utils.tokenize_documents)."""
    return len(tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"]) if docs else 0


def self_documents(info: ModelInfo, tokenizer, role: str, n_tokens: int, seed: int, cache_dir: Path,
                   isolate: bool = True) -> list[str]:
    """The conversations of one draw (`role` calib or heldout), enough that their text holds `n_tokens` tokens
    when tokenized as one stream (data_utils.tokenize_documents). Missing ones are generated in a fresh Python
    (`isolate`): llama.cpp's OpenMP threads must not share the search's passive OpenMP runtime, which makes them
    several times slower."""
    prompts = prompts_of(role, read_prompts())
    path = cache_path(cache_dir, info, role, seed, prompts)
    docs = documents_of(read_draw(path))
    if text_tokens(tokenizer, docs) >= n_tokens:
        return docs
    if isolate:
        from workers import repo_python_env
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(info.model_dir), role,
                               str(n_tokens), str(seed), str(cache_dir)], env=repo_python_env())
        if done.returncode != 0:
            raise UserError(f"writing the self-calibration text failed (exit status {done.returncode}: its "
                            "output is above)")
        docs = documents_of(read_draw(path))
        if text_tokens(tokenizer, docs) < n_tokens:
            raise RuntimeError(f"the self-calibration draw in {path} holds fewer than {n_tokens} tokens")
        return docs
    generate_draw(info, tokenizer, role, n_tokens, seed, cache_dir, prompts, path)
    return documents_of(read_draw(path))


def generate_draw(info: ModelInfo, tokenizer, role: str, n_tokens: int, seed: int, cache_dir: Path,
                  prompts: list[str], path: Path) -> None:
    """Generate conversations 0, 1, ... (those not cached) until their text holds `n_tokens` tokens, saving
    each as it ends. Conversation k answers prompts[k % len(prompts)]; no new one starts once the finished
    and running ones hold enough tokens (counted per conversation; the exact count decides at the end)."""
    from comparison import generation_prompt_ids, stop_token_ids
    draw = read_draw(path)
    stop_ids = set(stop_token_ids(tokenizer, info.model_dir))
    bar = tqdm(total=n_tokens, desc=f"self-calibration ({role})", unit="tok")
    running: dict[int, int] = {}                     # conversation -> its prompt's tokens
    counted = {k: len(tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]) for k, d in draw.items()}
    bar.update(min(sum(counted.values()), n_tokens))

    def next_prompt():
        if sum(counted.values()) + sum(running.values()) >= n_tokens:
            if running or text_tokens(tokenizer, documents_of(draw)) >= n_tokens:
                return None
        k = next(i for i in range(len(draw) + len(running) + 1) if i not in draw and i not in running)
        ids = generation_prompt_ids(tokenizer, prompts[k % len(prompts)])
        running[k] = len(ids)
        return k, ids

    def done(k: int, prompt: list[int], answer: list[int]) -> None:
        draw[k] = tokenizer.decode(prompt + answer, skip_special_tokens=False)
        del running[k]
        counted[k] = len(prompt) + len(answer) + 1
        bar.update(max(0, min(sum(counted.values()), n_tokens) - bar.n))
        files.write_json(path, {"record": {"role": role, "seed": seed, "sampling": SAMPLING},
                                "conversations": {str(i): draw[i] for i in sorted(draw)}}, indent=None)

    gguf_path, sampler = open_generator(info, cache_dir)
    try:
        sampler.generate(next_prompt, stop_ids, [seed, ROLES.index(role)], done)
    finally:
        bar.close()
        sampler.close()
        gguf_path.unlink(missing_ok=True)


def open_generator(info: ModelInfo, cache_dir: Path) -> tuple[Path, BatchedSampler]:
    """An F16 GGUF of the checkpoint (removed after the draw) loaded for batched sampling."""
    import gguf_export
    path = Path(cache_dir) / f"self-calib-f16-{checkpoint_content_hash(info)[:16]}.gguf"
    gguf_export.write_gguf(gguf_export.plan_from_preset(info, "F16"), path, progress=False)
    max_prompt = 256
    return path, BatchedSampler(path, max_prompt + SAMPLING["max_new_tokens"], os.cpu_count() or 1)


def main(argv=None) -> None:
    """The fresh Python of self_documents(isolate=True): MODEL_DIR ROLE N_TOKENS SEED CACHE_DIR."""
    import cli
    from architectures import load_model_info
    from transformers import AutoTokenizer
    model_dir, role, n_tokens, seed, cache_dir = (argv or sys.argv[1:])
    with cli.reported_errors(ValueError, OSError):
        info = load_model_info(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self_documents(info, tokenizer, role, int(n_tokens), int(seed), Path(cache_dir), isolate=False)


if __name__ == "__main__":
    main()

"""Calibration/evaluation data: real tokenizer, real WikiText files from ../shared, no network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data_utils  # noqa: E402

WIKI = REPO.parent / "shared" / "data" / "wikitext-2"
CALIB_FILE = WIKI / "wiki.valid.tokens"
EVAL_FILE = WIKI / "wiki.test.tokens"
TOKENIZER_DIR = REPO / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip("demo model not built (make test builds it)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def excerpt() -> str:
    """The first ~150 kB of the calibration text: enough windows, quick to tokenize."""
    return CALIB_FILE.read_text(encoding="utf-8")[:150_000]


def test_calibration_windows_are_deterministic_per_seed(tokenizer, tmp_path, excerpt):
    path = tmp_path / "calib.tokens"
    path.write_text(excerpt, encoding="utf-8")
    a = data_utils.get_calib_dataset(str(path), tokenizer, n_samples=16, seq_len=256, seed=3)
    b = data_utils.get_calib_dataset(str(path), tokenizer, n_samples=16, seq_len=256, seed=3)
    c = data_utils.get_calib_dataset(str(path), tokenizer, n_samples=16, seq_len=256, seed=4)
    assert a.shape == (16, 256) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_window_draws_do_not_overlap_and_extend_as_prefixes():
    starts = data_utils.sample_window_starts(100_000, 512, 150, seed=1)
    s = sorted(starts.tolist())
    assert all(b - a >= 512 for a, b in zip(s, s[1:]))
    assert s[-1] + 512 <= 100_000
    # calibration = first k of a draw of k + held-out: adding held-out windows leaves the first k unchanged
    assert (data_utils.sample_window_starts(100_000, 512, 120, seed=1) == starts[:120]).all()


def test_held_out_windows_share_no_token_with_the_calibration_windows(tokenizer):
    """The search draws its calibration, held-out and measurement windows as one draw and splits it: no token
    of a held-out window is in a calibration window (by position in the stream, and by content)."""
    n_tokens = len(tokenizer(CALIB_FILE.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    starts = data_utils.sample_window_starts(n_tokens, 128, 64 + 12, seed=0)
    calibration = set().union(*(range(s, s + 128) for s in starts[:64]))
    assert not any(calibration & set(range(s, s + 128)) for s in starts[64:])
    windows = data_utils.get_calib_dataset(str(CALIB_FILE), tokenizer, n_samples=64 + 12, seq_len=128, seed=0)
    calib_rows = {tuple(r) for r in windows[:64].tolist()}
    assert not calib_rows & {tuple(r) for r in windows[64:].tolist()}


def test_evaluation_windows_are_consecutive_chunks_from_the_start(tokenizer, tmp_path, excerpt):
    path = tmp_path / "eval.txt"
    path.write_text(excerpt, encoding="utf-8")
    stream = tokenizer(excerpt, add_special_tokens=False)["input_ids"]
    windows = data_utils.get_eval_dataset(str(path), tokenizer, seq_len=100)
    assert windows.shape == (len(stream) // 100, 100)
    assert windows.reshape(-1).tolist() == stream[: windows.numel()]


def test_txt_jsonl_parquet_and_file_lists_give_the_same_tokens(tokenizer, tmp_path, excerpt):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [d for d in excerpt.split("\n \n") if d.strip()][:40]
    text = "\n\n".join(docs)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    half = len(docs) // 2
    (tmp_path / "p1.txt").write_text("\n\n".join(docs[:half]), encoding="utf-8")
    (tmp_path / "p2.txt").write_text("\n\n".join(docs[half:]), encoding="utf-8")

    def draw(source):
        return data_utils.get_calib_dataset(source, tokenizer, n_samples=8, seq_len=64, seed=0)

    reference = draw(str(tmp_path / "a.txt"))
    assert torch.equal(draw(str(tmp_path / "a.jsonl")), reference)
    assert torch.equal(draw(str(tmp_path / "a.parquet")), reference)
    assert torch.equal(draw([str(tmp_path / "p1.txt"), str(tmp_path / "p2.txt")]), reference)


def test_bad_sources_fail_with_a_clear_message(tokenizer, tmp_path):
    with pytest.raises(data_utils.DataSourceError, match="unknown data source"):
        data_utils.load_documents(str(tmp_path / "x.csv"))
    with pytest.raises(data_utils.DataSourceError, match="not found"):
        data_utils.load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(data_utils.DataSourceError, match="text"):
        data_utils.load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(data_utils.DataSourceError, match="holds only"):
        data_utils.get_calib_dataset(str(tmp_path / "short.txt"), tokenizer, n_samples=4, seq_len=512)


def test_offline_hub_source_names_calib_file(tmp_path):
    """With the hub unreachable (offline mode, empty cache) `wikitext2` fails with one clear error."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("import data_utils\n"
            "try:\n    data_utils.load_documents('wikitext2', 'calib')\n"
            "except data_utils.DataSourceError as err:\n    print('ERROR:', err)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout and "--calib_file" in result.stdout


def test_chat_calibration_wraps_paragraphs_in_the_chat_template(tokenizer, tmp_path, excerpt):
    path = tmp_path / "c.txt"
    path.write_text(excerpt, encoding="utf-8")
    rendered = data_utils.chat_documents(data_utils.load_documents(str(path)), tokenizer)
    assert rendered and all(r.startswith("<|im_start|>") for r in rendered)
    assert "<|im_start|>assistant\n" in rendered[0]
    windows = data_utils.get_calib_dataset(str(path), tokenizer, n_samples=4, seq_len=256, seed=0, chat=True)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (windows == im_start).any(dim=1).all()


# ---------------------------------------------------------------------------------------------------------
# Mixed sources (--calib a:w,b:w): parse, split by weight, one source alone is exactly the old draw
# ---------------------------------------------------------------------------------------------------------

def test_calib_spec_parses_weights_and_refuses_bad_ones(tmp_path):
    assert data_utils.parse_calib_sources("wikitext2") == [("wikitext2", 1.0)]
    assert data_utils.parse_calib_sources("self:3, notes.txt:0.5") == [("self", 3.0), ("notes.txt", 0.5)]
    for bad, says in [("self:0", "positive"), ("self:-1", "positive"), ("self,self", "twice"),
                      ("novel.docx", "unknown calibration source"), ("self,", "empty")]:
        with pytest.raises(data_utils.DataSourceError, match=says):
            data_utils.parse_calib_sources(bad)


def test_split_counts_follows_the_weights_exactly():
    assert data_utils.split_counts(128, [1.0]) == [128]
    assert data_utils.split_counts(128, [3.0, 1.0]) == [96, 32]
    assert data_utils.split_counts(8, [1.0, 1.0, 1.0]) == [3, 3, 2]
    assert data_utils.split_counts(1, [1.0, 1.0]) == [1, 0]


def test_mixed_draw_takes_each_role_from_each_source_by_weight(tokenizer, tmp_path, excerpt):
    (tmp_path / "a.txt").write_text(excerpt[:70_000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(excerpt[70_000:], encoding="utf-8")
    counts = {"calib": 12, "kld": 3, "measure": 4}
    alone = data_utils.draw_windows([(str(tmp_path / "a.txt"), 1.0)], tokenizer, counts, 64, 0)
    old = data_utils.get_calib_dataset(str(tmp_path / "a.txt"), tokenizer, 19, 64, 0)
    assert torch.equal(torch.cat([alone["calib"], alone["kld"], alone["measure"]]), old)
    mixed = data_utils.draw_windows([(str(tmp_path / "a.txt"), 1.0), (str(tmp_path / "b.txt"), 3.0)],
                                    tokenizer, counts, 64, 0)
    assert {r: len(w) for r, w in mixed.items()} == counts
    from_b = data_utils.get_calib_dataset(str(tmp_path / "b.txt"), tokenizer, 9 + 2 + 3, 64, 0)
    assert torch.equal(mixed["calib"][3:], from_b[:9])        # a gives 3 of 12 calibration windows, b 9
    with pytest.raises(data_utils.DataSourceError, match="self"):
        data_utils.draw_windows([("self", 1.0)], tokenizer, counts, 64, 0)

"""Bad inputs and faults: each ends in one line naming its culprit and the documented exit status, no traceback,
and leaves an earlier run's outputs as they were; nothing made for one checkpoint is accepted for another."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import architectures  # noqa: E402
import calib_stats  # noqa: E402
import comparison  # noqa: E402
import compare_real_quant  # noqa: E402
import config_file  # noqa: E402
import data_utils  # noqa: E402
import export_gguf_official as exporter  # noqa: E402
import files  # noqa: E402
import gguf_export  # noqa: E402
import gguf_plan  # noqa: E402
import mixed_precision_ptq as ptq  # noqa: E402
from cli import UserError  # noqa: E402
from sensitivity_table import ResultCache  # noqa: E402

CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
EARLIER = {".pt": b"an earlier config", ".json": b"{}", ".imatrix.gguf": b"an earlier imatrix",
           ".sensitivity.pt": b"an earlier table", ".tensors.gguf": b"earlier tensors"}


def earlier_outputs(out: Path) -> dict[Path, bytes]:
    """Stand-ins for an earlier run's files beside `out`, to check that a failed run leaves them alone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    for suffix, data in EARLIER.items():
        path = out.with_suffix(suffix) if suffix != ".pt" else out
        path.write_bytes(data)
        written[path] = data
    return written


def run_main(main, argv, capsys) -> tuple[int, str]:
    """A script's main in-process: (exit status, stderr); a traceback would fail the test on its own."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip()


def one_line(err: str) -> str:
    """The one error line of a run's stderr (progress bars aside), which must be its last, with no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The search: arguments and budgets refused before any work, earlier outputs untouched
# ---------------------------------------------------------------------------------------------------------

BAD_SEARCH_ARGS = [
    (["--output", "{dir}/cfg.json"], "--output"),
    (["--output", "{dir}"], "is a directory"),
    (["--output", "{file}/cfg.pt"], "not a writable directory"),
    (["--target_bpw", "inf"], "--target_bpw"),
    (["--target_bpw", "nan"], "--target_bpw"),
    (["--target_size", "12 parsecs"], "--target_size"),
    (["--target_preset", "Q9_K"], "--target_preset"),
    (["--types", "Q4_K,Q9"], "Q9"),
    (["--seq_len", "0"], "--seq_len"),
    (["--batch_size", "0"], "--batch_size"),
    (["--n_samples", "0"], "--n_samples"),
    (["--ga_pop", "0"], "--ga_pop"),
    (["--measure_samples", "0"], "--measure_samples"),
    (["--kld_samples", "0"], "--kld_samples"),
    (["--gram_samples", "0"], "--gram_samples"),
    (["--smooth", "1.5"], "--smooth"),
    (["--max_slowdown", "-1"], "--max_slowdown"),
    (["--device", "gpu"], "--device"),
    (["--max_memory", "gpu=20GiB"], "--max_memory"),
    (["--speed_costs", "{file}", "--target_preset", "Q4_K_M"], "a-file"),   # not a cost table: refused before the statistics
    (["--target_size", "1000"], "feasible range"),          # parses, but no assignment is that small
    (["--target_compression", "5"], "feasible range"),      # five times F16: above every assignment
    (["--types", "Q4_K,Q6_K"], "no type of --types fits"),  # K types do not fit 192-wide rows
]


@pytest.mark.parametrize("argv, culprit", BAD_SEARCH_ARGS, ids=[" ".join(a) for a, _ in BAD_SEARCH_ARGS])
def test_bad_search_arguments_are_one_line_and_touch_nothing(argv, culprit, tiny_llama, tmp_path, capsys):
    out = tmp_path / "run" / "cfg.pt"
    before = earlier_outputs(out)
    (tmp_path / "a-file").write_text("x")
    argv = [a.format(dir=out.parent, file=tmp_path / "a-file") for a in argv]
    started = time.perf_counter()
    status, err = run_main(ptq.main, ["--model_id", str(tiny_llama), "--calib_file", str(CALIB), "--output",
                                      str(out), "--cache_dir", str(tmp_path / "cache"), *argv], capsys)
    assert time.perf_counter() - started < 10            # refused before statistics or sensitivity
    assert status == 1 and culprit in one_line(err)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_nan_weight_is_named_and_leaves_no_outputs(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run" / "cfg.pt"
    before = earlier_outputs(out)
    status, err = run_main(ptq.main, ["--model_id", str(broken), "--calib_file", str(CALIB), "--output", str(out),
                                      "--cache_dir", str(tmp_path / "cache"), "--n_samples", "4",
                                      "--target_preset", "Q4_K_M"], capsys)
    assert status == 1 and "model.layers.1.mlp.up_proj.weight" in one_line(err) and "NaN" in err
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]      # no temporary files left


def test_ctrl_c_is_one_line_exit_130_and_touches_nothing(tiny_llama, tmp_path):
    out = tmp_path / "run" / "cfg.pt"
    before = earlier_outputs(out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "mixed_precision_ptq.py"), "--model_id", str(tiny_llama),
                             "--calib_file", str(CALIB), "--output", str(out), "--cache_dir",
                             str(tmp_path / "cache"), "--device", "cpu", "--target_preset", "Q4_K_M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            # a test run started in the background inherits SIGINT ignored; a user's shell does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("settings: ")      # imports done, main running
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted; rerunning resumes from what was cached"
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before


# ---------------------------------------------------------------------------------------------------------
# Configs and GGUFs of another checkpoint, broken files
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with other values in one tensor: the same architecture, shapes and tokenizer."""
    from safetensors.torch import load_file, save_file
    other = tmp_path_factory.mktemp("twin") / "model"
    shutil.copytree(tiny_llama, other)
    weights = load_file(other / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"] *= 1.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return other


def test_a_plain_ggml_config_of_another_checkpoint_is_refused(tiny_llama, twin, tmp_path, capsys):
    """A config without GPTQ tensors (--quantizer ggml) carries the checkpoint's content hash too."""
    info = architectures.load_model_info(tiny_llama)
    config_file.save_config(tmp_path / "cfg.pt", info, gguf_plan.preset_types(info, "Q4_K_M"))
    assert architectures.shape_signature(info) == architectures.shape_signature(architectures.load_model_info(twin))
    status, err = run_main(exporter.main, ["--model_id", str(twin), "--config", str(tmp_path / "cfg.pt"),
                                           "--output", str(tmp_path / "x.gguf")], capsys)
    assert status == 1 and "made from another checkpoint" in one_line(err) and str(tmp_path / "cfg.pt") in err
    assert not (tmp_path / "x.gguf").exists()
    exporter.main(["--model_id", str(tiny_llama), "--config", str(tmp_path / "cfg.pt"), "--output",
                   str(tmp_path / "x.gguf")])                   # its own checkpoint: exported
    assert (tmp_path / "x.gguf").is_file()


def test_a_gguf_of_another_checkpoint_is_refused_by_the_comparison(tiny_llama, twin, tmp_path, capsys):
    info = architectures.load_model_info(tiny_llama)
    gguf_export.write_gguf(gguf_export.plan_from_preset(info, "Q8_0"), tmp_path / "a.gguf", progress=False)
    argv = ["--model_id", str(twin), "--gguf_path", str(tmp_path / "a.gguf"), "--eval_file", str(CALIB),
            "--n_windows", "2", "--seq_len", "32", "--max_tokens", "2", "--no_progress"]
    status, err = run_main(compare_real_quant.main, argv, capsys)
    assert status == 1 and "made from another checkpoint" in one_line(err) and "--allow_other_checkpoint" in err
    original = comparison.load_original(str(twin))
    comparison.check_gguf_matches_model(tmp_path / "a.gguf", twin, original.tokenizer, allow_other_checkpoint=True)


@pytest.mark.parametrize("content", [b"", b"\x00" * 40, b"GGUF\x03\x00\x00\x00" + b"\xff" * 20])
def test_broken_files_are_named(content, tiny_llama, tmp_path, capsys):
    """An empty or cut-short config, tensor file and GGUF: one line naming the file, not a traceback."""
    info = architectures.load_model_info(tiny_llama)
    (tmp_path / "cfg.pt").write_bytes(content)
    status, err = run_main(exporter.main, ["--model_id", str(tiny_llama), "--config", str(tmp_path / "cfg.pt"),
                                           "--output", str(tmp_path / "x.gguf")], capsys)
    assert status == 1 and str(tmp_path / "cfg.pt") in one_line(err)

    config_file.save_config(tmp_path / "cfg.pt", info, gguf_plan.preset_types(info, "Q4_K_M"),
                            extra={"quantized_tensors": {"path": "cfg.tensors.gguf",
                                                         "tensors": ["model.layers.0.mlp.up_proj.weight"]}})
    (tmp_path / "cfg.tensors.gguf").write_bytes(content)
    status, err = run_main(exporter.main, ["--model_id", str(tiny_llama), "--config", str(tmp_path / "cfg.pt"),
                                           "--output", str(tmp_path / "x.gguf")], capsys)
    assert status == 1 and str(tmp_path / "cfg.tensors.gguf") in one_line(err)

    (tmp_path / "cut.gguf").write_bytes(content)
    original = comparison.load_original(str(tiny_llama))
    with pytest.raises(UserError, match=str(tmp_path / "cut.gguf")):
        comparison.check_gguf_matches_model(tmp_path / "cut.gguf", tiny_llama, original.tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Data files, caches, writes
# ---------------------------------------------------------------------------------------------------------

def test_unreadable_calibration_text_is_named(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(data_utils.DataSourceError, match=f"{latin1} is not UTF-8 text"):
        data_utils.load_documents(str(latin1))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(data_utils.DataSourceError, match=f"{jsonl}:4: not JSON"):
        data_utils.load_documents(str(jsonl))


def test_broken_cache_entries_are_discarded_and_measured_again(tiny_llama, tmp_path, capsys):
    cache = ResultCache(tmp_path, "key")
    cache.put({"tensor": "w", "type": "Q4_0", "kld_mean": 0.5})
    path = tmp_path / "key" / "w" / "Q4_0.json"
    stored = json.loads(path.read_text())
    stored["record"]["kld_mean"] = 0.01                          # edited by hand: the checksum no longer fits
    path.write_text(json.dumps(stored))
    assert ResultCache(tmp_path, "key").get("w", "Q4_0") is None and not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"record": {"tensor"')                    # cut short
    assert ResultCache(tmp_path, "key").get("w", "Q4_0") is None
    assert capsys.readouterr().err.count("discarding unreadable or altered cache entry") == 2

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = data_utils.get_calib_dataset(str(CALIB), AutoTokenizer.from_pretrained(tiny_llama), 2, 32, 0)
    first = calib_stats.cached_statistics(model, ids, "cpu", cache_dir=tmp_path / "stats")
    (entry,) = (tmp_path / "stats").glob("stats-*.pt")
    entry.write_bytes(b"")                                        # an empty statistics cache
    again = calib_stats.cached_statistics(model, ids, "cpu", cache_dir=tmp_path / "stats")
    assert f"discarding unreadable cache entry {entry}" in capsys.readouterr().err
    assert torch.equal(again.in_sum2[next(iter(first.in_sum2))], first.in_sum2[next(iter(first.in_sum2))])


def test_a_full_disk_is_named_and_the_old_file_stays(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(UserError, match=f"cannot write {target}: No space left on device"):
        with files.atomic_path(target) as tmp:
            tmp.write_text("new")
            with open("/dev/full", "w") as full:                   # the kernel's always-full device
                full.write("x" * 65536)
                full.flush()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_read_inside_a_write_is_not_called_a_failed_write(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        with files.atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text((tmp_path / "missing.txt").read_text())
    assert not list(tmp_path.iterdir())


def test_a_killed_runs_temporary_file_is_removed_by_the_next_write(tiny_llama, tmp_path):
    stale = tmp_path / ".x.gguf.999999999.part"                  # no such process
    stale.write_bytes(b"\x00" * 1000)
    mine = tmp_path / f".x.gguf.{os.getppid()}.part"            # a live process's: left alone
    mine.write_bytes(b"\x00")
    info = architectures.load_model_info(tiny_llama)
    gguf_export.write_gguf(gguf_export.plan_from_preset(info, "Q8_0"), tmp_path / "x.gguf", progress=False)
    assert not stale.exists() and mine.exists() and (tmp_path / "x.gguf").is_file()

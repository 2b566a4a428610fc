"""mixed_precision_ptq.py end to end on a tiny model: the budget is exact, runs are reproducible, errors clear."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import export_gguf_official as exporter
import gguf_plan
import mixed_precision_ptq as ptq

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
FAST = ["--n_samples", "8", "--seq_len", "64", "--kld_samples", "2", "--kld_seq_len", "32",
        "--measure_samples", "2", "--gram_samples", "8", "--ga_pop", "8", "--ga_gen", "3", "--device", "cpu"]


def run_search(model_dir: Path, out: Path, cache: Path, *extra: str) -> dict:
    ptq.main(["--model_id", str(model_dir), "--calib_file", str(CALIB), "--output", str(out),
              "--cache_dir", str(cache), *FAST, *extra])
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def searched(tiny_llama, tmp_path_factory):
    base = tmp_path_factory.mktemp("ptq")
    info = gguf_plan.load_model_info(tiny_llama)
    q4km = gguf_plan.gguf_file_size(info, gguf_plan.preset_types(info, "Q4_K_M", imatrix_available=True))
    cfg = run_search(tiny_llama, base / "a.pt", base / "cache", "--target_size", str(q4km))
    return tiny_llama, base, q4km, cfg


def test_config_within_budget_and_exported_file_has_the_promised_size(searched):
    model_dir, base, budget, cfg = searched
    info = gguf_plan.load_model_info(model_dir)
    assert set(cfg["tensor_types"]) == set(gguf_plan.quantizable_tensors(info))
    assert cfg["achieved"]["size_bytes"] <= budget == cfg["budget"]["size_bytes"]
    assert cfg["kld_measured"] is not None and cfg["kld_measured"] > 0
    assert cfg["model_fingerprint"] == gguf_plan.model_fingerprint(info)
    assert len(cfg["ga"]["history"]) == 3
    exporter.main(["--model_id", str(model_dir), "--config", str(base / "a.pt"), "--output",
                   str(base / "mixed.gguf")])
    assert (base / "mixed.gguf").stat().st_size == cfg["achieved"]["size_bytes"]
    twin = json.loads((base / "a.json").read_text())
    assert twin["tensor_types"] == cfg["tensor_types"]
    assert (base / "a.convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_config_from_the_cache(searched):
    model_dir, base, budget, cfg = searched
    again = run_search(model_dir, base / "b.pt", base / "cache", "--target_size", str(budget))
    assert again["tensor_types"] == cfg["tensor_types"]
    assert again["kld_measured"] == pytest.approx(cfg["kld_measured"], rel=1e-6)


def test_ga_is_never_worse_than_the_uniform_preset_or_greedy(searched):
    _, _, _, cfg = searched
    measured = {row["name"]: row["kld_measured"] for row in cfg["comparison"]}
    assert measured["genetic algorithm"] <= min(v for v in measured.values() if v is not None) + 1e-12


@pytest.mark.parametrize("flag, value", [("--target_size", "1000"), ("--target_bpw", "40")])
def test_infeasible_budget_prints_the_feasible_range(searched, flag, value, capsys):
    model_dir, base, _, _ = searched
    with pytest.raises(SystemExit) as exc:
        run_search(model_dir, base / "bad.pt", base / "cache", flag, value)
    assert "feasible range" in str(exc.value) or "above the largest" in str(exc.value)
    assert not (base / "bad.pt").exists()


def test_config_for_another_model_is_refused_by_the_exporter(searched, tiny_qwen2, tmp_path):
    _, base, _, _ = searched
    with pytest.raises(SystemExit) as exc:
        exporter.main(["--model_id", str(tiny_qwen2), "--config", str(base / "a.pt"),
                       "--output", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()


def test_parse_size_units():
    assert ptq.parse_size("4.36GiB") == int(4.36 * 2**30)
    assert ptq.parse_size("100MB") == 100_000_000
    assert ptq.parse_size("12345") == 12345
    with pytest.raises(ValueError, match="cannot read size"):
        ptq.parse_size("4 parsecs")


def test_smooth_auto_is_recorded_and_exported(searched, capsys):
    """--smooth auto: the config carries the scales the search used and the exporter folds them in (the GGUF's
    norm weights are the smoothed ones), and the budget still holds to the byte."""
    import gguf
    model_dir, base, budget, _ = searched
    cfg = run_search(model_dir, base / "smooth.pt", base / "cache", "--target_size", str(budget), "--smooth", "auto")
    record = cfg["smoothing"]
    assert record["mode"] == "auto" and record["alpha"] and record["columns"] and record["rows"]
    exporter.main(["--model_id", str(model_dir), "--config", str(base / "smooth.pt"), "--output",
                   str(base / "smooth.gguf")])
    assert (base / "smooth.gguf").stat().st_size == cfg["achieved"]["size_bytes"] <= budget
    norms = {n: v for n, v in record["rows"].items() if n.endswith("layernorm.weight")}
    assert norms
    name, inverse_scale = next(iter(norms.items()))
    from safetensors import safe_open
    with safe_open(str(next(model_dir.glob("*.safetensors"))), framework="pt") as f:
        original = f.get_tensor(name).float()
    block = name.split(".")[2]
    kind = "attn_norm" if "input_layernorm" in name else "ffn_norm"
    stored = {t.name: t for t in gguf.GGUFReader(base / "smooth.gguf").tensors}[f"blk.{block}.{kind}.weight"]
    assert np.array_equal(np.asarray(stored.data), (original * inverse_scale).numpy())


def test_smooth_strength_must_be_off_auto_or_in_the_unit_interval(searched, capsys):
    model_dir, base, budget, _ = searched
    with pytest.raises(SystemExit) as exc:
        run_search(model_dir, base / "x.pt", base / "cache", "--smooth", "1.5")
    assert exc.value.code == 2 and "--smooth takes off, auto or a number in (0, 1)" in capsys.readouterr().err

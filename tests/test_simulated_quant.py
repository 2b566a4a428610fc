"""test_mixed_precision.py: the fake-quantized original agrees with the exported GGUF run by llama.cpp.

A mixed config (tensors cycling through K and 32-block types, an imatrix for each tensor) is written for the demo
model, the real SmolLM2-135M (tied embedding, rows of 576 that only 32-blocks fit, ffn_down rows that K-quants
fit), exported with our exporter, and the script measures both on wikitext-2 test windows: the mean KLDs must
agree within the script's 5% tolerance. (Tiny random models are no use here: their KLD saturates near 2 nats at
any 4-bit type, where no simulation error would show.)
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import export_gguf_official as exporter
import test_mixed_precision as simulate
import architectures
import config_file

REPO = Path(__file__).resolve().parents[1]
WIKI_TEST = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"
DEMO_MODEL = REPO / "models" / "smollm2-135m-instruct"
MENU = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "Q4_0", "Q5_1", "Q3_K", "F16")
# 5 to 8.5 bits: little weight error, so llama.cpp's rounding of the activations is a large part of the KLD.
HIGH_BITS_MENU = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0")
FAST = ["--eval_file", str(WIKI_TEST), "--seq_len", "256", "--n_windows", "6", "--max_tokens", "12",
        "--threads", "2", "--no_progress"]


def write_config(model_dir: Path, path: Path, offset: int = 0, menu=MENU, with_imatrix: bool = True) -> dict:
    """A config cycling every tensor through `menu` (fallbacks where a row does not fit), with a positive imatrix
    per tensor that is far from uniform, so a simulation that dropped it would quantize differently."""
    info = architectures.load_model_info(model_dir)
    shapes = architectures.quantizable_tensors(info)
    rng = np.random.default_rng(offset)
    types = {name: menu[(i + offset) % len(menu)] for i, name in enumerate(sorted(shapes))}
    imatrix = {name: rng.lognormal(0.0, 1.5, shape[1]).astype(np.float32) for name, shape in shapes.items()}
    config_file.save_config(path, info, types, imatrix=imatrix if with_imatrix else None)
    return types


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not DEMO_MODEL.is_dir():
        pytest.skip("demo model not built (make test builds it)")
    model_dir = DEMO_MODEL
    base = tmp_path_factory.mktemp("simulated")
    write_config(model_dir, base / "mixed.pt")
    exporter.main(["--model_id", str(model_dir), "--config", str(base / "mixed.pt"), "--output",
                   str(base / "mixed.gguf")])
    return model_dir, base


@pytest.fixture(scope="module")
def exported_high_bits(exported):
    model_dir, base = exported
    write_config(model_dir, base / "high.pt", menu=HIGH_BITS_MENU, with_imatrix=False)
    exporter.main(["--model_id", str(model_dir), "--config", str(base / "high.pt"), "--output",
                   str(base / "high.gguf")])
    return model_dir, base


def kld_comparison(out: str) -> tuple[float, float, float]:
    """(simulated, GGUF, percent apart) from the script's verdict line."""
    return tuple(map(float, re.search(r"mean KLD simulated ([\d.]+) vs GGUF ([\d.]+): ([\d.]+)% apart",
                                      out).groups()))


def run_script(model_dir, base, *extra) -> None:
    simulate.main(["--model_id", str(model_dir), "--config", str(base / "mixed.pt"), "--cache_dir",
                   str(base / "cache"), *FAST, *extra])


def test_simulated_kld_agrees_with_the_exported_gguf(exported, capsys):
    model_dir, base = exported
    run_script(model_dir, base, "--gguf_path", str(base / "mixed.gguf"))  # exits 1 on disagreement
    out = capsys.readouterr().out
    sim, gguf_kld, apart = kld_comparison(out)
    assert sim > 1e-3 and gguf_kld > 1e-3          # the quantization is visible, not lost in float noise
    assert apart <= 5.0 and "agree" in out


def test_high_bit_config_agrees_only_with_activations_rounded_as_llama_cpp(exported_high_bits, capsys):
    """At 5-8.5 bits llama.cpp's 8-bit rounding of the activations is a large share of the KLD: the simulation
    that emulates it agrees with the GGUF, the weights-only one misses by far more than the tolerance."""
    model_dir, base = exported_high_bits
    args = ["--model_id", str(model_dir), "--config", str(base / "high.pt"), "--gguf_path",
            str(base / "high.gguf"), "--cache_dir", str(base / "cache"), *FAST]
    simulate.main(args)
    sim, gguf_kld, apart = kld_comparison(capsys.readouterr().out)
    assert apart <= 5.0 and gguf_kld > 1e-4
    with pytest.raises(SystemExit) as exc:
        simulate.main(args + ["--activations", "float32"])
    out = capsys.readouterr().out
    sim_float, gguf_again, apart_float = kld_comparison(out)
    assert exc.value.code == 1 and "DISAGREE" in out
    assert sim_float < sim and apart_float > 3 * apart, (apart, apart_float)


def test_simulation_without_the_imatrix_is_not_what_ships(exported, tmp_path, capsys):
    """The check can fail: simulating the same types without the config's imatrix misses the GGUF's KLD."""
    model_dir, base = exported
    info = architectures.load_model_info(model_dir)
    cfg = config_file.load_config(base / "mixed.pt", info)
    config_file.save_config(tmp_path / "no_imatrix.pt", info, cfg["tensor_types"])
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--model_id", str(model_dir), "--config", str(tmp_path / "no_imatrix.pt"),
                       "--gguf_path", str(base / "mixed.gguf"), "--cache_dir", str(base / "cache"),
                       *FAST])
    assert exc.value.code == 1 and "DISAGREE" in capsys.readouterr().out


def test_a_gguf_of_another_config_is_refused(exported, tmp_path, capsys):
    model_dir, base = exported
    write_config(model_dir, tmp_path / "other.pt", offset=3)
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--model_id", str(model_dir), "--config", str(tmp_path / "other.pt"),
                       "--gguf_path", str(base / "mixed.gguf"), "--cache_dir", str(base / "cache"), *FAST])
    assert exc.value.code == 2
    assert "was not exported from this config" in capsys.readouterr().err


def test_a_config_of_another_model_is_refused(tiny_qwen2, tiny_llama, tmp_path, capsys):
    write_config(tiny_qwen2, tmp_path / "qwen.pt")
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--model_id", str(tiny_llama), "--config", str(tmp_path / "qwen.pt"), *FAST])
    assert exc.value.code == 2 and "made for another model" in capsys.readouterr().err

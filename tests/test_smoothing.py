"""SmoothQuant-style rescaling: exact in float32, applied identically by the exporter, searched consistently.

Tiny random Qwen2 (untied head, q/k/v biases, GQA 4:2) and Llama (tied embedding, GQA 3:1) checkpoints from
conftest; statistics collected by calib_stats on token windows; llama.cpp through llama-cpp-python.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import calib_stats
import export_gguf_official as exporter
import smoothing
import architectures
import config_file
import model_blocks
import quantized_weights

MODELS = ["tiny_qwen2", "tiny_llama"]


def load(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def windows(model, n: int = 6, seq_len: int = 48, seed: int = 0) -> torch.Tensor:
    n_vocab = model.get_input_embeddings().weight.shape[0] - 40
    return torch.from_numpy(np.random.default_rng(seed).integers(0, n_vocab, (n, seq_len)))


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    model_dir = request.getfixturevalue(request.param)
    model = load(model_dir)
    stats = calib_stats.collect_statistics(model, windows(model), device="cpu", batch_size=3,
                                           gram_product_dtype=torch.float64, gram_dtype=torch.float64,
                                           progress=False)
    return request.param, model_dir, model, stats


def test_groups_cover_exactly_the_equivalent_paths(setup):
    which, _, model, _ = setup
    kinds = [g.kind for g in smoothing.smooth_groups(model)]
    n_blocks = len(model_blocks.decoder_blocks(model))
    for kind in ("attn_in", "v_o", "mlp_in", "up_down"):
        assert kinds.count(kind) == n_blocks
    assert kinds.count("head") == (1 if which == "tiny_qwen2" else 0)    # never through a tied embedding


def strong_transform(model, seed: int = 0) -> smoothing.Smoothing:
    """Every group rescaled by scales spread over two orders of magnitude (exactness must not depend on
    gentle scales)."""
    gen = torch.Generator().manual_seed(seed)
    transform = smoothing.Smoothing(mode="test")
    for group in smoothing.smooth_groups(model):
        n = model.get_parameter(group.producers[0]).shape[0]
        smoothing.add_group(transform, group, torch.exp(1.2 * torch.randn(n, generator=gen)), 0.5)
    return transform


def test_transformed_model_computes_the_same_logits(setup):
    which, _, model, stats = setup
    ids = windows(model, n=2, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    transform = strong_transform(model)
    smoothed = load(setup[1])
    smoothing.apply_to_model(smoothed, transform)
    changed = [n for n, p in smoothed.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert len(changed) >= 5 * len(model_blocks.decoder_blocks(model))       # norms, v, o, up, down, q/k/v...
    scales = torch.cat([v for v in transform.columns.values()])
    assert scales.max() / scales.min() > 100                                 # far from the identity
    with torch.no_grad():
        got = smoothed(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_exported_f32_gguf_holds_the_transformed_model(setup, tmp_path):
    which, model_dir, model, stats = setup
    from llama_cpp import GGML_TYPE_F32, Llama
    info = architectures.load_model_info(model_dir)
    transform = strong_transform(model, seed=1)
    types = {name: "F32" for name in architectures.quantizable_tensors(info)}
    config_file.save_config(tmp_path / "smooth.pt", info, types, extra={"smoothing": transform.to_dict()})
    out = tmp_path / "smooth.gguf"
    exporter.main(["--model_id", str(model_dir), "--config", str(tmp_path / "smooth.pt"), "--output", str(out)])

    smoothed = load(model_dir)
    smoothing.apply_to_model(smoothed, transform)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    norm = smoothed.get_parameter("model.layers.1.input_layernorm.weight").detach().numpy()
    assert np.array_equal(np.asarray(tensors["blk.1.attn_norm.weight"].data), norm)   # g / s, bit for bit

    ids = windows(model, n=1, seq_len=64, seed=3)[0].tolist()
    with torch.no_grad():
        ref = smoothed(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(out), n_ctx=128, n_batch=128, n_threads=2, verbose=False, logits_all=True,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    llm.close()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_auto_search_predicts_the_error_of_the_transformed_model(setup):
    """What the search measured for a rescaled group is what the transformed model and statistics give, and
    auto only keeps strengths that lower the error."""
    which, model_dir, model, stats = setup
    menus = {s.name: s.types for s in quantized_weights.quantizable_weights(model)}
    transform, records = smoothing.search_smoothing(model, stats, menus, "auto", progress=False)
    assert records and transform.alpha
    groups = {g.name: g for g in smoothing.smooth_groups(model)}
    smoothed, new_stats = load(model_dir), calib_stats.CalibStats.from_dict(
        {k: (dict(v) if isinstance(v, dict) else v) for k, v in stats.to_dict().items()})
    smoothing.apply_to_model(smoothed, transform)
    smoothing.apply_to_statistics(new_stats, transform)
    checked = 0
    for r in records:
        if r["alpha"] is None:
            continue
        group = groups[r["group"]]
        again = smoothing.consumer_errors(smoothed, new_stats, group, None, r["type"])
        # bit-identical quantizer inputs, unless a consumer's rows were also rescaled as the producer of the
        # next group (up_proj, v_proj): quantization is only nearly invariant to a row scale (fp16 block scales)
        rows_rescaled = any(c in transform.rows for c in group.consumers)
        assert again == pytest.approx(r["rel_err_smooth"], rel=2e-2 if rows_rescaled else 1e-6)
        checked += not rows_rescaled
    assert checked >= 5
    by_group: dict[str, list[float]] = {}
    for r in records:
        by_group.setdefault(r["group"], []).append(np.log(r["rel_err_smooth"] / r["rel_err_off"]))
    for name, logs in by_group.items():
        assert (np.mean(logs) < 0) == (name in transform.alpha)


def test_config_smoothing_for_another_shape_is_refused(tiny_llama, tmp_path, capsys):
    info = architectures.load_model_info(tiny_llama)
    types = {name: "Q8_0" for name in architectures.quantizable_tensors(info)}
    bad = {"mode": "0.5", "columns": {"model.layers.0.mlp.down_proj.weight": torch.ones(7)}, "rows": {}}
    config_file.save_config(tmp_path / "bad.pt", info, types, extra={"smoothing": bad})
    with pytest.raises(SystemExit):
        exporter.main(["--model_id", str(tiny_llama), "--config", str(tmp_path / "bad.pt"), "--output",
                       str(tmp_path / "x.gguf")])
    assert "smoothing columns of model.layers.0.mlp.down_proj.weight has 7 values" in capsys.readouterr().err

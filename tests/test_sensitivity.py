"""Activation statistics, the imatrix GGUF and per-tensor sensitivity, on tiny Llama models built here,
fed real WikiText tokens, with ggml's own quantizers."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import calib_stats  # noqa: E402
from quant_utils import dequantize, fake_quantize  # noqa: E402
import imatrix_file  # noqa: E402
import kld  # noqa: E402
import model_blocks  # noqa: E402
import quantized_weights  # noqa: E402
import sensitivity  # noqa: E402
import sensitivity_table  # noqa: E402

WIKI = REPO.parent / "shared" / "data" / "wikitext-2"
TOKENIZER_DIR = REPO / "models" / "smollm2-135m-instruct"
SEQ_LEN = 64


def tiny_llama(tied: bool, seed: int = 0):
    """Two Llama blocks: rows of 64 (32-block types) and an FFN of 256 (K-quants fit down_proj)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=tied, initializer_range=0.08, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows():
    """12 real-text windows of 64 tokens: 8 for statistics, 4 held out for the KLD."""
    if not TOKENIZER_DIR.is_dir():
        pytest.skip("demo model not built (make test builds it)")
    from transformers import AutoTokenizer
    import data_utils
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = data_utils.get_calib_dataset(str(WIKI / "wiki.valid.tokens"), tokenizer, n_samples=12,
                                       seq_len=SEQ_LEN, seed=0)
    return ids[:8], ids[8:]


@pytest.fixture(scope="module")
def tied_setup(windows):
    calib, holdout = windows
    model = tiny_llama(tied=True)
    stats = calib_stats.collect_statistics(model, calib, device="cpu", batch_size=3,
                                           gram_product_dtype=torch.float64, gram_dtype=torch.float64,
                                           progress=False)
    return model, stats, holdout


def linear_inputs(model, ids, names):
    """Inputs of the named linears during one ordinary full-model forward (float64, [tokens, n_in])."""
    captured, handles = {}, []
    for name in names:
        module = model.get_submodule(name.removesuffix(".weight"))
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, name=name: captured.setdefault(name, []).append(args[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double() for n, xs in captured.items()}


def test_candidate_menus_fall_back_to_32_weight_blocks():
    assert quantized_weights.candidate_types(576) == quantized_weights.BLOCK32_MENU
    assert quantized_weights.candidate_types(1536) == quantized_weights.K_MENU
    assert "Q4_0" in quantized_weights.candidate_types(64) and "Q4_K" not in quantized_weights.candidate_types(64)
    # --types gives one list as both menus: rows K-blocks fit take all of it, the others its 32-block part
    types = ("Q4_K", "Q5_K", "Q5_0", "Q5_1", "Q8_0")
    assert quantized_weights.candidate_types(1536, types, types) == types
    assert quantized_weights.candidate_types(576, types, types) == ("Q5_0", "Q5_1", "Q8_0")
    # the token embedding gets no imatrix from llama-imatrix, so no type that ggml quantizes only with one
    low = quantized_weights.LOW_BIT_K_MENU
    assert {"IQ1_S", "IQ2_XXS", "IQ3_XXS", "IQ3_S"} <= set(quantized_weights.candidate_types(1536, low))
    embedding = quantized_weights.candidate_types(1536, low, is_embedding=True)
    assert "IQ3_S" in embedding and not {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"} & set(embedding)


def test_checkpoint_menus_keep_imatrix_only_types_off_the_token_embedding(tiny_qwen2):
    """tensor_menus, from the checkpoint's shapes alone: the architecture table's token embedding takes no
    IQ1-IQ3_XXS, the block matrices and the untied head of the same row length do."""
    import architectures
    info = architectures.load_model_info(tiny_qwen2)
    menus = quantized_weights.tensor_menus(info, quantized_weights.LOW_BIT_K_MENU)
    assert "IQ2_XXS" not in menus["model.embed_tokens.weight"] and "IQ3_S" in menus["model.embed_tokens.weight"]
    assert "IQ2_XXS" in menus["lm_head.weight"] and "IQ2_XXS" in menus["model.layers.0.self_attn.q_proj.weight"]


def test_cache_keys_follow_the_weights_not_the_checkpoint_path(tmp_path):
    """The statistics and sensitivity caches are keyed by the model's content: the same checkpoint saved in two
    places hashes the same (the config's _name_or_path once made a relative and an absolute path two models)."""
    from transformers import AutoModelForCausalLM
    model = tiny_llama(tied=True)
    for where in ("a", "b/c"):
        model.save_pretrained(tmp_path / where)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / where) for where in ("a", "b/c"))
    assert a.config._name_or_path != b.config._name_or_path
    assert model_blocks.model_content_hash(a) == model_blocks.model_content_hash(b)
    b.model.norm.weight.data[0] += 1
    assert model_blocks.model_content_hash(a) != model_blocks.model_content_hash(b)


def test_gram_output_error_equals_measured_output_mse(tied_setup, windows):
    """tr(dW H dW^T)/N from the block-by-block statistics equals the mean squared output change of the
    quantized layer measured on the same tokens in an ordinary forward pass (float64)."""
    model, stats, _ = tied_setup
    calib, _ = windows
    cases = {"model.layers.0.self_attn.k_proj.weight": "Q4_0",   # reads the q/k/v shared input
             "model.layers.1.mlp.up_proj.weight": "IQ4_NL",      # reads the gate/up shared input
             "model.layers.1.mlp.down_proj.weight": "Q3_K",
             "lm_head.weight": "Q5_0"}                           # tied: the embedding matrix on normed states
    inputs = linear_inputs(model, calib, list(cases))
    for name, qtype in cases.items():
        weight = model.get_submodule(name.removesuffix(".weight")).weight.detach()
        new_weight = fake_quantize(weight, qtype, stats.imatrix(name))
        gram, n_tokens = stats.gram_of(name)
        err = sensitivity.gram_output_error(weight, new_weight, gram)
        energy = sensitivity.gram_output_energy(weight, gram)
        x = inputs[name]
        dw = (new_weight.double() - weight.double())
        measured_mse = (x @ dw.T).square().sum().item() / x.shape[0]
        measured_energy = (x @ weight.double().T).square().sum().item() / x.shape[0]
        assert n_tokens == x.shape[0] == calib.numel()
        assert abs(err / n_tokens - measured_mse) / measured_mse < 1e-4, name
        assert abs(energy / n_tokens - measured_energy) / measured_energy < 1e-4, name
        # and the imatrix is llama.cpp's: mean squared input per channel
        torch.testing.assert_close(stats.imatrix(name).double(), x.square().mean(0), rtol=1e-5, atol=0)


def test_single_tensor_kld_is_zero_unquantized_and_grows_as_bits_fall(tied_setup):
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    specs = {s.name: s for s in analyzer.tensors}
    for name, ladder in {"model.layers.0.mlp.down_proj.weight": ("Q8_0", "Q4_K", "Q2_K"),
                         "model.layers.1.self_attn.q_proj.weight": ("Q8_0", "Q5_0", "Q4_0"),
                         "model.embed_tokens.weight": ("Q8_0", "Q5_0", "Q4_0")}.items():
        weight = model.get_parameter(name).detach().clone()
        assert analyzer.kld_mean({name: weight}) == 0.0, name
        klds = [analyzer.kld_mean({name: analyzer.weights.quantized_weight(specs[name], t)}) for t in ladder]
        assert 0 < klds[0] < klds[1] < klds[2], (name, klds)


def test_cached_tail_kld_matches_a_full_forward(tied_setup):
    """Recomputing only from the perturbed block, batched, gives the KL of two ordinary forward passes."""
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", kld_batch_size=3,
                                                    progress=False)
    name = "model.layers.1.self_attn.o_proj.weight"
    spec = next(s for s in analyzer.tensors if s.name == name)
    new_weight = analyzer.weights.quantized_weight(spec, "Q4_0")
    with torch.no_grad():
        ref = torch.log_softmax(model(holdout).logits.double(), -1)
        with model_blocks.replaced_weights(model, {name: new_weight}):
            quant = torch.log_softmax(model(holdout).logits.double(), -1)
    direct = (ref.exp() * (ref - quant)).sum(-1).mean().item()
    assert abs(analyzer.kld_mean({name: new_weight}) - direct) / direct < 1e-3


def test_imatrix_gguf_round_trips_through_gguf_py(windows, tmp_path):
    """An untied model: every block linear and output.weight, under GGUF names, read back by gguf-py."""
    import gguf
    calib, _ = windows
    model = tiny_llama(tied=False, seed=1)
    stats = calib_stats.collect_statistics(model, calib, device="cpu", batch_size=4, with_gram=False,
                                           progress=False)
    names = imatrix_file.imatrix_entries(model, stats)
    path = tmp_path / "tiny.imatrix.gguf"
    imatrix_file.write_imatrix_gguf(stats, names, path, datasets=["wiki.valid.tokens"], chunk_size=SEQ_LEN)

    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["wiki.valid.tokens"]
    assert reader.get_field("imatrix.chunk_size").contents() == SEQ_LEN
    assert reader.get_field("imatrix.chunk_count").contents() == calib.shape[0]
    tensors = {t.name: t for t in reader.tensors}
    expected = {"output.weight"} | {f"blk.{b}.{k}.weight" for b in range(2) for k in
                                    ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert {n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2")} == expected
    assert len(tensors) == 2 * len(expected)
    for hf_name, gguf_name in names.items():
        sums = tensors[f"{gguf_name}.in_sum2"]
        assert sums.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(sums.shape) == [stats.in_sum2[hf_name].numel(), 1]   # ggml ne: [n_in, n_mat]
        assert torch.equal(torch.from_numpy(sums.data.reshape(-1).copy()), stats.in_sum2[hf_name].float())
        assert float(tensors[f"{gguf_name}.counts"].data.reshape(-1)[0]) == calib.numel()


def test_tied_head_has_no_imatrix_entry(tied_setup):
    model, stats, _ = tied_setup
    names = imatrix_file.imatrix_entries(model, stats)
    assert "output.weight" not in names.values() and "token_embd.weight" not in names.values()
    assert len(names) == 14


def test_tied_embedding_is_quantized_with_the_head_imatrix(tied_setup, windows):
    """The imatrix GGUF leaves a tied head out (as llama-imatrix does), but our own quantization of the tied
    embedding weights its columns by the final hidden state's energy; an untied embedding, a pure lookup,
    gets none."""
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    embed = next(s for s in analyzer.tensors if s.is_embedding)
    assert embed.feeds_logits
    head_imatrix = stats.imatrix(model_blocks.output_weight_name(model))
    assert torch.equal(analyzer.weights.imatrix_of(embed), head_imatrix)
    assert head_imatrix.std() > 0.1 * head_imatrix.mean()      # not uniform: the weighting changes the result
    weight = model.get_input_embeddings().weight.detach()
    assert not torch.equal(analyzer.weights.quantized_weight(embed, "Q4_0"), fake_quantize(weight, "Q4_0"))
    untied = quantized_weights.quantizable_weights(tiny_llama(tied=False))
    assert quantized_weights.quantizer_imatrix(untied[0], stats, "lm_head.weight") is None


def test_interrupted_run_resumes_without_recomputing(tied_setup, tmp_path):
    model, stats, holdout = tied_setup

    class Interrupted(Exception):
        pass

    def interrupt_after(n):
        seen = []

        def on_entry(entry):
            seen.append(entry)
            if len(seen) == n:
                raise Interrupted
        return on_entry

    def analyzer():
        return sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, cache_dir=tmp_path, device="cpu",
                                                    kld_types=("Q4_0", "Q4_K"), progress=False)

    first = analyzer()
    with pytest.raises(Interrupted):
        first.run(on_entry=interrupt_after(25))
    assert first.n_computed == 25
    second = analyzer()
    table = second.run()
    n_pairs = sum(len(s.types) for s in second.tensors)
    assert second.n_computed == n_pairs - 25
    third = analyzer()
    assert third.run().entries == table.entries and third.n_computed == 0
    assert all(e.kld_pred is not None for e in table.entries)
    assert all(e.kld_mean is not None for e in table.entries if e.type in ("Q4_0", "Q4_K"))


def test_table_files_and_additivity_report(tied_setup, tmp_path):
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", kld_types="all",
                                                    progress=False)
    analyzer.tensors = analyzer.tensors[1:5]         # four block-0 linears keep it quick
    table = analyzer.run()
    pt_path, json_path = table.save(tmp_path / "sens.pt", tmp_path / "sens.json")
    loaded = torch.load(pt_path, weights_only=True)
    assert loaded["kld_mean"].shape == (4, len(loaded["types"]))
    assert not loaded["kld_mean"].isnan().any()
    assert json.loads(json_path.read_text())["entries"] == [dataclasses.asdict(e) for e in table.entries]
    sensitivity_table.plot_heatmap(table, tmp_path / "sens.png")
    assert (tmp_path / "sens.png").stat().st_size > 1000
    assignments = kld.random_assignments(table, 4, seed=0)
    report = kld.additivity_report(analyzer, table, assignments)
    assert len(report["measured"]) == 4 and all(m > 0 for m in report["measured"])
    assert report["spearman"] >= 0.8      # assignments from low to high bits: the sums rank like the KLDs
    assert kld.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kld.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


@pytest.mark.parametrize("name, qtype", [("model.layers.0.mlp.up_proj.weight", "Q5_0"),
                                         ("model.layers.1.mlp.down_proj.weight", "Q4_0")])
def test_table_measures_gptq_drafts_and_the_search_ships_them_refined(tied_setup, name, qtype):
    """The table's output error is GPTQ's before its refinement sweep (the draft); what a search measures and
    ships is the draft after the sweep, bit for bit gptq.quantize's, with a lower output error."""
    import gptq
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", kld_types="none",
                                                    progress=False)
    spec = next(s for s in analyzer.tensors if s.name == name)
    weight = model.get_parameter(name).detach()
    feedback = analyzer.weights.feedback_of(spec, qtype)
    entry, _ = analyzer.measure_errors(spec, qtype)
    assert analyzer.weights.draft_bytes(spec, qtype) == gptq.quantize(weight, qtype, feedback, sweeps=0)
    assert entry.rel_out_err == analyzer.output_error(spec, analyzer.weights.draft_weight(spec, qtype))["rel_out_err"]
    assert analyzer.weights.quantized_bytes(spec, qtype) == gptq.quantize(weight, qtype, feedback)
    assert (name, qtype) not in analyzer.weights.drafts                 # refined: the draft left memory
    shipped_err = analyzer.output_error(spec, analyzer.weights.quantized_weight(spec, qtype))["rel_out_err"]
    assert shipped_err < entry.rel_out_err
    analyzer.weights.quantized.clear()                                  # as after resuming from a cached table
    assert analyzer.weights.quantized_bytes(spec, qtype) == gptq.quantize(weight, qtype, feedback)


def test_statistics_save_and_load_with_weights_only(tied_setup, tmp_path):
    _, stats, _ = tied_setup
    calib_stats.save_statistics(stats, tmp_path / "stats.pt")
    loaded = calib_stats.load_statistics(tmp_path / "stats.pt")
    assert loaded.counts == stats.counts and loaded.gram_key == stats.gram_key
    for name in stats.in_sum2:
        assert torch.equal(loaded.in_sum2[name], stats.in_sum2[name])


def test_stacked_block_klds_equal_one_at_a_time(tied_setup):
    """Several perturbations of one block run as one stacked batch give each one's own KLD."""
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", kld_batch_size=2,
                                                    kld_stack=3, progress=False)
    specs = [s for s in analyzer.tensors if s.block == 0]
    variants = [{s.name: analyzer.weights.quantized_weight(s, "Q4_0")} for s in specs[:4]]
    variants.append({specs[0].name: model.get_parameter(specs[0].name).detach().clone()})
    stacked = analyzer.kld_means_in_block(0, variants)
    single = [analyzer.kld_mean(v) for v in variants]
    for a, b in zip(stacked[:4], single[:4]):
        assert abs(a - b) / b < 1e-4
    assert single[4] == 0.0 and abs(stacked[4]) < 1e-9


def test_error_inversions_flag_a_tensor_for_full_kld_measurement():
    def entry(tensor, qtype, bits, err):
        return sensitivity_table.SensitivityEntry(tensor, qtype, "down_proj", 0, bits, 0, err, 1, 0.0)
    regular = [entry("a", "Q2_K", 2.6, 4e-2), entry("a", "Q4_K", 4.5, 3e-3), entry("a", "Q6_K", 6.6, 2e-4)]
    inverted = [entry("b", "Q2_K", 2.6, 8e-5), entry("b", "Q3_K", 3.4, 3e-3), entry("b", "Q4_K", 4.5, 5e-6)]
    assert sensitivity_table.irregular_tensors(regular + inverted) == {"b"}


def test_activation_rounding_terms_are_measured_per_format_and_cached(tied_setup, tmp_path):
    """Each tensor's input rounding costs its own KLD per activation format of its menu (Q8_K and Q8_0 for a
    K-quant row; the tied embedding's is the head's matmul), added to every type of that format; a rerun
    reads them from the cache. A menu whose types all round the input alike (Q8_0 alone, 32-block rows)
    measures nothing: that term is the same for every choice."""
    import activation_rounding
    import quant_utils
    model, stats, holdout = tied_setup

    def analyzer(block32_menu=quantized_weights.BLOCK32_MENU):
        return sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, cache_dir=tmp_path, device="cpu",
                                                    block32_menu=block32_menu, progress=False)
    table = analyzer().run()
    an = analyzer()
    specs = {s.name: s for s in an.tensors}
    down = next(s for s in specs.values() if s.kind == "down_proj")
    q_proj = next(s for s in specs.values() if s.kind == "q_proj")
    embd = next(s for s in specs.values() if s.is_embedding)
    assert an.activation_formats(down) == ["Q8_0", "Q8_K"]
    assert an.activation_formats(q_proj) == [] == an.activation_formats(embd)
    by_key = table.lookup()
    for t in down.types:
        fmt = activation_rounding.value_format(quant_utils.activation_type(t))
        act = by_key[(down.name, t)].act_kld
        assert act > 0 and act == an.cache.get(down.name, f"act_{fmt}")["kld_mean"]
        assert by_key[(down.name, t)].damage == by_key[(down.name, t)].kld_pred + act
    for spec in (q_proj, embd):
        assert all(by_key[(spec.name, t)].act_kld == 0.0 for t in spec.types)
        assert an.cache.get(spec.name, "act_Q8_0") is None
    rerun = analyzer()
    assert rerun.run().entries == table.entries and rerun.n_computed == 0

    # With F16 on the 32-block menu the input is rounded (Q8_0) or not (F16): the Q8_0 term is measured.
    wide = analyzer(("F16",) + quantized_weights.BLOCK32_MENU)
    embd_f16 = next(s for s in wide.tensors if s.is_embedding)
    assert wide.activation_formats(embd_f16) == ["Q8_0"]
    act = wide.activation_klds([embd_f16])[(embd.name, "Q8_0")]
    held_out = wide.held_out                         # reference logits first, from the unrounded model
    with activation_rounding.rounded_inputs(model, {embd.name: "Q8_0"}):
        direct = held_out.kld_mean(None)             # whole forward, only the head's input rounded
    assert direct > 0 and abs(act - direct) / direct < 1e-4


def test_assignment_kld_includes_llama_cpp_activation_rounding(tied_setup):
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    evaluator = kld.AssignmentEvaluator(analyzer.weights, analyzer.tensors, holdout, batch_size=2)
    assert evaluator.kld_mean({s.name: "F32" for s in analyzer.tensors}) == 0.0
    q8 = {s.name: "Q8_0" for s in analyzer.tensors}
    weights_only = analyzer.kld_mean({n: evaluator.weight(n, t) for n, t in q8.items()})
    assert evaluator.kld_mean(q8) > 1.5 * weights_only > 0


def test_bf16_model_measures_like_its_float32_copy(windows):
    """A model kept in bf16 (a 7B on the GPU) computes in float32 one block at a time: the same output errors
    and, to float32 rounding, the same KLDs as a float32 copy of the same weights (measured 2e-5 apart, 7e-4
    with the inputs rounded to Q8_K, whose rounding boundaries amplify the last bits)."""
    calib, holdout = windows
    bf16 = tiny_llama(tied=False, seed=3).to(torch.bfloat16)
    fp32 = tiny_llama(tied=False, seed=3)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    stats = calib_stats.collect_statistics(fp32, calib, device="cpu", batch_size=4, progress=False)
    results = []
    for model in (bf16, fp32):
        analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
        assert next(analyzer.model.parameters()).dtype == model.dtype     # no float32 copy of the model
        spec = next(s for s in analyzer.tensors if s.kind == "down_proj")
        entry, new_weight = analyzer.measure_errors(spec, "Q4_K")
        klds = analyzer.kld_means_in_block(spec.block, [{spec.name: new_weight}], [{spec.name: "Q8_K"}])
        results.append((entry.rel_out_err, klds[0], analyzer.kld_mean({spec.name: new_weight})))
    assert bf16.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16   # put back after each run
    (err_bf16, rounded_bf16, kld_bf16), (err_fp32, rounded_fp32, kld_fp32) = results
    assert err_bf16 == err_fp32
    assert kld_bf16 == pytest.approx(kld_fp32, rel=1e-4) and kld_bf16 > 0
    assert rounded_bf16 == pytest.approx(rounded_fp32, rel=3e-3)


def test_wide_inputs_get_no_gram_and_a_diagonal_output_error(windows):
    """gram_max_dim: inputs wider than it keep only their sums of squares; their output error goes through the
    diagonal of H (the imatrix), and smoothing's auto search leaves their groups alone."""
    import smoothing
    calib, holdout = windows
    model = tiny_llama(tied=False, seed=4)
    stats = calib_stats.collect_statistics(model, calib, device="cpu", batch_size=4, gram_max_dim=128,
                                           progress=False)
    down = "model.layers.0.mlp.down_proj.weight"                  # reads the 256-wide FFN activation
    assert down not in stats.gram_key and "model.layers.0.mlp.up_proj.weight" in stats.gram_key
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    spec = next(s for s in analyzer.tensors if s.name == down)
    entry, new_weight = analyzer.measure_errors(spec, "Q4_K")
    w = model.get_parameter(down).detach().double()
    h = stats.in_sum2[down].double() / stats.counts[down]
    expected = float(((new_weight.double() - w).square().sum(0) * h).sum() / (w.square().sum(0) * h).sum())
    assert entry.out_err_diagonal and entry.rel_out_err == pytest.approx(expected, rel=1e-9)
    menus = {s.name: s.types for s in analyzer.tensors}
    smooth, records = smoothing.search_smoothing(model, stats, menus, "auto", progress=False)
    assert records and not any(r["kind"] == "up_down" for r in records)


def test_row_sample_errors_are_the_whole_tensors_rows(tied_setup, monkeypatch):
    """A row sample is quantized bit for bit like those rows of the whole tensor (ggml quantizes rows
    independently), so a sampled output error is the whole-tensor error restricted to the sample."""
    model, stats, holdout = tied_setup
    monkeypatch.setattr(sensitivity, "SAMPLE_ABOVE_WEIGHTS", 1000)
    monkeypatch.setattr(sensitivity, "SAMPLE_WEIGHTS", 2048)
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    spec = next(s for s in analyzer.tensors if s.kind == "gate_proj")
    rows = analyzer.error_rows(spec)
    assert rows is not None and 0 < rows.numel() < spec.shape[0]
    sampled, none = analyzer.measure_errors(spec, "Q4_0", whole=False)
    whole_entry, whole = analyzer.measure_errors(spec, "Q4_0", whole=True)
    assert none is None and sampled.error_rows == rows.numel() == whole_entry.error_rows
    sample_bytes = analyzer.weights.encode(spec, "Q4_0", rows, sweeps=0)   # the table's draft: rows independent
    assert torch.equal(torch.from_numpy(dequantize(sample_bytes, "Q4_0", (rows.numel(), spec.shape[1]))), whole[rows])
    assert sampled.rel_out_err == whole_entry.rel_out_err


def test_bytes_come_from_the_original_weights_while_a_measurement_swaps_them(tied_setup):
    """The plain preset is quantized on a side thread while the GA's measurements swap quantized values into the
    model (replaced_weights): every path that quantizes must read the weights as they were given."""
    model, stats, holdout = tied_setup
    analyzer = sensitivity.LayerSensitivityAnalyzer(model, stats, holdout, device="cpu", progress=False)
    spec = next(s for s in analyzer.tensors if s.block == 1 and s.kind == "q_proj")
    qtype = spec.types[0]
    reference = quantized_weights.QuantizedWeights(model, stats, torch.device("cpu"))
    expected = (reference.quantized_bytes(spec, qtype, plain=True), reference.quantized_bytes(spec, qtype))
    swapped = analyzer.weights.quantized_weight(spec, spec.types[-1]) * 0.5
    with model_blocks.replaced_weights(model, {spec.name: swapped}):
        assert not torch.equal(model.get_parameter(spec.name), reference.original(spec.name))
        got = (analyzer.weights.quantized_bytes(spec, qtype, plain=True), analyzer.weights.quantized_bytes(spec, qtype))
    assert got == expected

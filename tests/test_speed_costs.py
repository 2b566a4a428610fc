"""Speed-aware allocation: the prompt and decode cost model, its microbenchmark through real llama.cpp
(llama-cpp-python, interleaved rounds), and the GA and repair under predicted time limits in both modes."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import architectures  # noqa: E402
import gguf_plan  # noqa: E402
import speed_costs  # noqa: E402
from genetic_optim import MixedPrecisionGA, pareto_menu, repair  # noqa: E402
from test_allocation import synthetic_problem  # noqa: E402

# Seconds per weight relative to Q8_0, per mode. Decode is shaped like the H100's (Q3_K and Q6_K slow per byte);
# prompts like a CPU's where the 5- and 6-bit K types have no fast kernel (Q5_K, Q6_K slow) and Q2_K does.
DELTAS = {"tg": {"Q2_K": -1.5e-13, "Q3_K": 1.2e-13, "Q4_K": -1.5e-13, "Q5_K": -1.0e-13, "Q6_K": 1.3e-13,
                 "Q8_0": 0.0},
          "pp": {"Q2_K": -2e-12, "Q3_K": 4e-12, "Q4_K": -1e-12, "Q5_K": 6e-12, "Q6_K": 5e-12, "Q8_0": 0.0}}
# The head's own decode deltas: bandwidth-bound, unlike the blocks' (Q4_K saves a quarter of Q6_K's credit there).
HEAD_TG = {"Q4_K": -0.4e-13, "Q6_K": -0.2e-13, "Q8_0": 0.0}


def test_cost_model_recovers_its_parameters_and_predicts_a_whole_model(tiny_qwen2):
    """Benchmark rows generated from known costs give those costs back in both modes, the head's from its own
    files, and the prediction for the real model is the all-reference time plus each tensor's weights times its
    type's delta: none for the untied embedding (a row lookup), the head's own decode delta per token, for one
    token in a prompt (a prompt runs the head on its last token)."""
    info = architectures.load_model_info(tiny_qwen2)
    layers, w_type = 4, 1_000_000
    one = {"pp": 0.2, "tg": 2e-3}
    per_block = {"pp": 0.03, "tg": 3e-4}
    tokens = {"pp": 512, "tg": 128}

    def row(part, qtype, n_layers, n_weights, delta):
        out = {"part": part, "type": qtype, "layers": n_layers, "weights_in_type": n_weights}
        for m in ("pp", "tg"):
            seconds = one[m] + (n_layers - 1) * per_block[m] + n_weights * delta[m]
            out[m] = {"median": tokens[m] / seconds, "q25": 0.0, "q75": 0.0, "runs": 5}
        return out

    none = {"pp": 0, "tg": 0}
    rows = [row("blocks", "Q8_0", 1, w_type // layers, none), row("blocks", "Q8_0", layers, w_type, none)]
    rows += [row("blocks", t, layers, w_type, {m: DELTAS[m][t] for m in DELTAS}) for t in DELTAS["tg"] if t != "Q8_0"]
    rows += [row("head", t, layers, w_type // 3, {"tg": d, "pp": d / tokens["tg"]}) for t, d in HEAD_TG.items()
             if t != "Q8_0"]
    costs = speed_costs.costs_from_measurements(rows, layers, "synthetic", tokens["pp"], tokens["tg"])
    head = {"tg": HEAD_TG, "pp": {t: d / tokens["tg"] for t, d in HEAD_TG.items()}}
    for m in ("pp", "tg"):
        assert costs.modes[m].one_block_s == pytest.approx(one[m])
        assert costs.modes[m].per_block_s == pytest.approx(per_block[m])
        for t, d in DELTAS[m].items():
            assert costs.modes[m].delta_s_per_weight[t] == pytest.approx(d, rel=1e-6, abs=1e-20)
        assert costs.modes[m].head_delta_s_per_weight == pytest.approx(head[m], rel=1e-6, abs=1e-20)
    types = gguf_plan.preset_types(info, "Q4_K_M")
    shapes = architectures.quantizable_tensors(info)
    roles = speed_costs.tensor_roles(info)
    assert roles["model.embed_tokens.weight"] == "lookup" and roles["lm_head.weight"] == "head"
    assert types["lm_head.weight"] == "Q6_K"
    predicted = speed_costs.predicted_seconds(info, costs, types)
    for m in ("pp", "tg"):
        expected = one[m] + (info.n_layers - 1) * per_block[m] + sum(
            shapes[n][0] * shapes[n][1] * (head[m] if roles[n] == "head" else DELTAS[m])[t]
            for n, t in types.items() if roles[n] != "lookup")
        assert predicted[m] == pytest.approx(expected, rel=1e-12)
    assert speed_costs.SpeedCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs


def test_an_old_decode_only_table_is_refused_by_name(tmp_path):
    path = tmp_path / "decode-costs.json"
    path.write_text(json.dumps({"one_block_s": 1.0, "per_block_s": 0.1, "delta_s_per_weight": {}, "backend": "x"}))
    with pytest.raises(speed_costs.UserError, match="decode-costs.json is not a format 3 speed cost table"):
        speed_costs.SpeedCosts.load(path)


def test_microbenchmark_runs_on_llama_cpp_interleaved_and_is_cached(tiny_qwen2, tmp_path):
    """The real benchmark: random checkpoints of the model's widths, one GGUF per type of the block matrices
    and one per type of the head, timed in interleaved rounds through llama.cpp; every run is kept (quartiles
    beside the median) and the table is cached per widths, types, backend and threads."""
    types, head_types = ["Q4_K", "Q4_0", "Q8_0"], ["Q6_K", "Q8_0"]
    costs = speed_costs.cached_costs(tiny_qwen2, types, head_types, tmp_path, n_threads=2, rounds=3,
                                     progress=False)
    info = architectures.load_model_info(tiny_qwen2)
    layers = speed_costs.bench_layers(info)
    assert {(m["part"], m["type"], m["layers"]) for m in costs.measured} == \
        {("blocks", "Q8_0", 1), ("head", "Q6_K", layers)} | {("blocks", t, layers) for t in types}
    rows, row_length = architectures.quantizable_tensors(info)["lm_head.weight"]
    for m in costs.measured:
        assert m["weights_in_type"] == rows * row_length if m["part"] == "head" else m["weights_in_type"] > 0
        for mode in ("pp", "tg"):
            assert m[mode]["runs"] == 3 and 0 < m[mode]["q25"] <= m[mode]["median"] <= m[mode]["q75"]
    for mode in ("pp", "tg"):
        assert set(costs.modes[mode].delta_s_per_weight) == set(types)
        assert set(costs.modes[mode].head_delta_s_per_weight) == set(head_types)
        assert costs.modes[mode].delta_s_per_weight["Q8_0"] == costs.modes[mode].head_delta_s_per_weight["Q8_0"] == 0
    assert "llama-cpp-python" in costs.backend and "2 threads" in costs.backend
    cached = list(tmp_path.glob("speed-costs-*.json"))
    assert len(cached) == 1 and not list(tmp_path.glob("speed-bench-*"))     # temp GGUFs removed
    again = speed_costs.cached_costs(tiny_qwen2, types, head_types, tmp_path, n_threads=2, rounds=3, progress=False)
    assert again == costs                                    # read back, not measured again (timings differ)
    # a narrower menu reads the wider table (each type's cost comes from its own file); another thread count
    # or a type the table lacks is measured
    assert speed_costs.cached_costs(tiny_qwen2, ["Q4_K"], ["Q8_0"], tmp_path, n_threads=2, rounds=3) == costs
    cached_key = json.loads(cached[0].read_text())["key"]
    wanted = dict(cached_key, types=["Q4_K"], head_types=["Q6_K"])
    assert speed_costs.serves(cached_key, wanted)
    assert not speed_costs.serves(cached_key, dict(wanted, types=["Q4_K", "Q5_K"]))
    assert not speed_costs.serves(cached_key, dict(wanted, head_types=["Q4_K"]))
    assert not speed_costs.serves(cached_key, dict(wanted, backend=cached_key["backend"].replace("2 threads", "1")))


def test_benchmark_files_repeat_a_sample_of_rows_quantized_by_ggml(tiny_qwen2, tmp_path):
    """A benchmark matrix is its first rows quantized by ggml (with unit importances: IQ2_XXS needs some),
    repeated to the matrix's height; the file has the promised size and runs in llama.cpp."""
    import gguf_export
    import quant_utils
    from test_export import llama_cpp_model
    info = architectures.load_model_info(tiny_qwen2)
    types, _ = speed_costs.uniform_block_types(info, "IQ2_XXS")
    plan = speed_costs.bench_plan(info, types, sample_rows=8)
    gguf_export.write_gguf(plan, tmp_path / "bench.gguf", progress=False)    # checks the size and types
    spec = next(t for t in info.tensors if types.get(t.hf_name) == "IQ2_XXS")
    values = gguf_export.tensor_values(info, spec)[:8]
    sample = quant_utils.quantize(values, "IQ2_XXS", imatrix=np.ones(values.shape[1], dtype=np.float32))
    rows = plan.shipped[spec.hf_name]
    assert rows.shape[0] == spec.shape[0] > 8 and rows[:8].tobytes() == sample
    assert (rows[8:16] == rows[:8]).all()
    model = llama_cpp_model(tmp_path / "bench.gguf")
    model.eval([1, 2, 3])


def test_pareto_front_keeps_a_dominated_type_only_when_it_is_faster():
    sizes, damage = [100, 100, 120], [2.0, 1.0, 0.5]
    assert [e[0] for e in pareto_menu(["Q4_0", "IQ4_NL", "Q5_0"], sizes, damage)] == ["IQ4_NL", "Q5_0"]
    faster = pareto_menu(["Q4_0", "IQ4_NL", "Q5_0"], sizes, damage, [(1.0,), (2.0,), (2.0,)])
    assert [e[0] for e in faster] == ["IQ4_NL", "Q4_0", "Q5_0"]      # by size, then damage


def test_repair_and_ga_keep_to_both_time_limits():
    """With limits set to a Q4_K-only assignment's prompt and decode times, repaired genomes and the GA's answer
    stay within the byte budget and both limits; without them the best answer is slower (the limits bind)."""
    p = synthetic_problem(n_blocks=4, deltas=DELTAS, fixed_bytes=1000)
    assert p.modes == ("tg", "pp")
    q4k = np.array([m.index("Q4_K") for m in p.menus])
    budget = p.file_size_bytes(q4k)
    limits = p.predicted_seconds(q4k)
    rng = np.random.default_rng(3)
    for _ in range(20):
        genome = (rng.random(len(p.menus)) * p.menu_lengths).astype(np.int64)
        fixed = repair(p, genome, budget, limits)
        assert p.file_size_bytes(fixed) <= budget and (p.predicted_seconds(fixed) <= limits * (1 + 1e-12)).all()
    measure = lambda types: p.predicted_damage(p.genome_of(types))
    free = MixedPrecisionGA(p, budget, pop_size=12, generations=6, seed=0, measure_fn=measure).optimize()
    bound = MixedPrecisionGA(p, budget, pop_size=12, generations=6, seed=0, time_limits=limits,
                             measure_fn=measure).optimize()
    assert (p.predicted_seconds(free.genome) > limits).any()        # 5/6-bit mixes win on damage alone
    assert (p.predicted_seconds(bound.genome) <= limits * (1 + 1e-12)).all()
    assert p.file_size_bytes(bound.genome) <= budget
    assert bound.measured_kld <= p.predicted_damage(q4k)        # never worse than the uniform choice

"""Speed-aware allocation: the decode cost model, its microbenchmark through real llama.cpp (llama-cpp-python),
and the GA and repair under a predicted decode-time limit."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import decode_speed  # noqa: E402
import gguf_plan  # noqa: E402
from genetic_optim import MixedPrecisionGA, repair  # noqa: E402
from test_allocation import synthetic_problem  # noqa: E402
import architectures  # noqa: E402
# Decode seconds per token per weight relative to Q8_0, shaped like the H100's (Q3_K and Q6_K slow per byte).
DELTA = {"Q2_K": -1.5e-13, "Q3_K": 1.2e-13, "Q4_K": -1.5e-13, "Q5_K": -1.0e-13, "Q6_K": 1.3e-13, "Q8_0": 0.0}


def test_cost_model_recovers_its_parameters_and_predicts_a_whole_model(tiny_qwen2):
    """Benchmark rows generated from known costs give those costs back, and the prediction for the real model is
    the all-reference time plus each tensor's weights times its type's delta."""
    info = architectures.load_model_info(tiny_qwen2)
    one, per_block, layers, w_type = 2e-3, 3e-4, 4, 1_000_000
    rows = [{"type": "Q8_0", "layers": 1, "weights_in_type": w_type // layers, "tok_s": 1 / one},
            {"type": "Q8_0", "layers": layers, "weights_in_type": w_type, "tok_s": 1 / (one + 3 * per_block)}]
    rows += [{"type": t, "layers": layers, "weights_in_type": w_type,
              "tok_s": 1 / (one + 3 * per_block + w_type * d)} for t, d in DELTA.items() if t != "Q8_0"]
    costs = decode_speed.costs_from_measurements(rows, layers, "synthetic")
    assert costs.one_block_s == pytest.approx(one) and costs.per_block_s == pytest.approx(per_block)
    for t, d in DELTA.items():
        assert costs.delta_s_per_weight[t] == pytest.approx(d, rel=1e-6, abs=1e-20)
    types = gguf_plan.preset_types(info, "Q4_K_M")
    shapes = architectures.quantizable_tensors(info)
    lookup = decode_speed.lookup_only_tensors(info)
    assert lookup == {"model.embed_tokens.weight"}           # untied: a row lookup per token
    expected = one + (info.n_layers - 1) * per_block + sum(
        shapes[n][0] * shapes[n][1] * DELTA[t] for n, t in types.items() if n not in lookup)
    assert decode_speed.predicted_decode_s(info, costs, types) == pytest.approx(expected, rel=1e-12)
    assert decode_speed.DecodeCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs


def test_microbenchmark_runs_on_llama_cpp_and_is_cached(tiny_qwen2, tmp_path):
    """The real benchmark: random checkpoints of the model's widths, one GGUF per type, decode tok/s through
    llama.cpp; the table is cached per widths, types and backend."""
    types = ["Q4_K", "Q4_0", "Q8_0"]
    costs = decode_speed.cached_decode_costs(tiny_qwen2, types, tmp_path, n_threads=2, progress=False)
    layers = decode_speed.bench_layers(architectures.load_model_info(tiny_qwen2))
    assert {(m["type"], m["layers"]) for m in costs.measured} == {("Q8_0", 1)} | {(t, layers) for t in types}
    assert all(m["tok_s"] > 0 and m["weights_in_type"] > 0 for m in costs.measured)
    assert set(costs.delta_s_per_weight) == set(types) and costs.delta_s_per_weight["Q8_0"] == 0.0
    assert "llama-cpp-python" in costs.backend
    cached = list(tmp_path.glob("decode-costs-*.json"))
    assert len(cached) == 1 and not list(tmp_path.glob("decode-bench-*"))     # temp GGUFs removed
    again = decode_speed.cached_decode_costs(tiny_qwen2, types, tmp_path, n_threads=2, progress=False)
    assert again == costs                                    # read back, not measured again (timings differ)


def test_repair_and_ga_keep_to_the_decode_time_limit():
    """With a limit set to a Q4_K-only assignment's time, repaired genomes and the GA's answer stay within both
    the byte budget and the limit; without the limit the best answer is slower (the limit binds)."""
    p = synthetic_problem(n_blocks=4, decode_delta=DELTA, fixed_bytes=1000)
    q4k = np.array([m.index("Q4_K") for m in p.menus])
    budget = p.file_size_bytes(q4k)
    limit = p.decode_seconds(q4k)
    rng = np.random.default_rng(3)
    for _ in range(20):
        genome = (rng.random(len(p.menus)) * p.menu_lengths).astype(np.int64)
        fixed = repair(p, genome, budget, limit)
        assert p.file_size_bytes(fixed) <= budget and p.decode_seconds(fixed) <= limit * (1 + 1e-12)
    free = MixedPrecisionGA(p, budget, pop_size=12, generations=6, seed=0,
                            measure_fn=lambda types: p.predicted_damage(p.genome_of(types))).optimize()
    bound = MixedPrecisionGA(p, budget, pop_size=12, generations=6, seed=0, time_limit_s=limit,
                             measure_fn=lambda types: p.predicted_damage(p.genome_of(types))).optimize()
    assert p.decode_seconds(free.genome) > limit                 # Q3_K/Q6_K mixes win on damage alone
    assert p.decode_seconds(bound.genome) <= limit * (1 + 1e-12)
    assert p.file_size_bytes(bound.genome) <= budget
    assert bound.measured_kld <= p.predicted_damage(q4k)        # never worse than the uniform choice

"""Allocators on a synthetic sensitivity table: feasibility, exactness of the budget, determinism."""
import numpy as np
import pytest

from genetic_optim import (AllocationProblem, MixedPrecisionGA, greedy_allocation, lagrangian_allocation,
                           repair, seeds_to_measure)
import quant_utils as qu

MENU = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def synthetic_problem(n_blocks=6, seed=0, deltas=None, fixed_bytes=12345):
    """A table shaped like a small model: 7 linears per block with real ggml sizes and a damage that falls
    with bits at a per-tensor rate; with `deltas` ({mode: {type: seconds per weight}}), speed costs too (each
    mode on a base of 1 ms)."""
    rng = np.random.default_rng(seed)
    names, menus, sizes, damages, blocks = [], [], [], [], []
    seconds = {mode: [] for mode in deltas or {}}
    kinds = {"q": (512, 512), "k": (128, 512), "v": (128, 512), "o": (512, 512),
             "gate": (1536, 512), "up": (1536, 512), "down": (512, 1536)}
    for b in range(n_blocks):
        for kind, shape in kinds.items():
            names.append(f"model.layers.{b}.{kind}.weight")
            menus.append(list(MENU))
            sizes.append([qu.get_type(t).tensor_size_bytes(shape) for t in MENU])
            scale = rng.lognormal(0, 1)
            damages.append([scale * 4.0 ** -qu.get_type(t).bits_per_weight for t in MENU])
            for mode, delta in (deltas or {}).items():
                seconds[mode].append({t: shape[0] * shape[1] * delta[t] for t in MENU})
            blocks.append(b)
    return AllocationProblem.build(names, menus, sizes, damages, fixed_bytes=fixed_bytes, block_ids=blocks,
                                   seconds=seconds or None, base_seconds={mode: 1e-3 for mode in seconds})


def test_repair_always_yields_a_feasible_genome_within_budget():
    p = synthetic_problem()
    low, high = p.feasible_range()
    rng = np.random.default_rng(1)
    for budget in np.linspace(low, high, 9).astype(int):
        for _ in range(5):
            genome = (rng.random(len(p.menus)) * p.menu_lengths).astype(np.int64)
            fixed = repair(p, genome, int(budget))
            assert ((0 <= fixed) & (fixed < p.menu_lengths)).all()
            assert p.file_size_bytes(fixed) <= budget
            # no single move to any entry of a menu fits the spare bytes and helps: the budget is used
            spare = budget - p.file_size_bytes(fixed)
            rows = np.arange(len(fixed))[:, None]
            extra = p.size_bytes - p.size_bytes[rows, fixed[:, None]]
            gain = p.damage[rows, fixed[:, None]] - p.damage
            assert not (np.isfinite(p.size_bytes) & (extra <= spare) & (gain > 0)).any()


def test_infeasible_budget_is_a_clear_error():
    p = synthetic_problem()
    low, high = p.feasible_range()
    with pytest.raises(ValueError, match="below the smallest"):
        MixedPrecisionGA(p, low - 1)
    with pytest.raises(ValueError, match="below the smallest"):
        repair(p, p.largest(), low - 1)


def test_allocators_fit_budget_and_ga_never_loses_to_its_seeds():
    p = synthetic_problem()
    low, high = p.feasible_range()
    budget = int(low + 0.4 * (high - low))
    greedy, lagrange = greedy_allocation(p, budget), lagrangian_allocation(p, budget)
    for g in (greedy, lagrange):
        assert p.file_size_bytes(g) <= budget
    measure = lambda types: p.predicted_damage(p.genome_of(types)) * 1.1  # a measured KLD stand-in
    result = MixedPrecisionGA(p, budget, pop_size=12, generations=5, measure_fn=measure, seed=3).optimize()
    assert p.file_size_bytes(result.genome) <= budget
    assert result.measured_kld <= min(measure(p.types_of(greedy)), measure(p.types_of(lagrange))) + 1e-15
    assert len(result.history) == 5


def test_seeds_a_larger_seed_beats_are_not_measured_up_front():
    p = synthetic_problem()
    uniform = {t: p.genome_of({n: t for n in p.tensor_names}) for t in ("Q2_K", "Q3_K", "Q4_K")}
    budget = p.file_size_bytes(uniform["Q4_K"])
    # Q2_K and Q3_K are smaller and predicted worse than Q4_K; a larger but worse seed would be kept
    assert [g.tolist() for g in seeds_to_measure(p, list(uniform.values()))] == [uniform["Q4_K"].tolist()]
    worse_larger = uniform["Q4_K"].copy()
    worse_larger[0] = p.menus[0].index("Q8_0")
    worse_larger[1] = p.menus[1].index("Q2_K")
    p.damage[1, worse_larger[1]] = 1e3
    assert len(seeds_to_measure(p, [uniform["Q4_K"], worse_larger])) == 2
    measured = []
    ga = MixedPrecisionGA(p, budget, pop_size=8, generations=0, seed=0, seed_genomes=list(uniform.values()),
                          measure_fn=lambda types: measured.append(types) or p.predicted_damage(p.genome_of(types)))
    ga.optimize()
    measured_genomes = [p.genome_of(t).tolist() for t in measured]
    assert uniform["Q4_K"].tolist() in measured_genomes
    assert uniform["Q2_K"].tolist() not in measured_genomes


def test_same_seed_same_result_and_different_seed_may_differ():
    p = synthetic_problem()
    low, high = p.feasible_range()
    budget = int(low + 0.5 * (high - low))
    measure = lambda types: p.predicted_damage(p.genome_of(types))
    run = lambda seed: MixedPrecisionGA(p, budget, pop_size=10, generations=4, measure_fn=measure,
                                        seed=seed).optimize()
    a, b = run(7), run(7)
    np.testing.assert_array_equal(a.genome, b.genome)
    assert a.history == b.history


def test_crossover_blockwise_keeps_blocks_together_and_mutation_steps_by_one():
    p = synthetic_problem()
    ga = MixedPrecisionGA(p, p.feasible_range()[1], seed=0)
    a, b = p.smallest(), p.largest()
    for _ in range(20):
        child = ga.crossover(a, b)
        assert set(np.unique(child)) <= {0, len(MENU) - 1}
        g = ga.mutate(np.full(len(a), 2))
        assert set(np.unique(g)) <= {1, 2, 3} and (g != 2).any()
    # block-wise children: some child must have every block homogeneous
    homogeneous = 0
    for _ in range(40):
        child = ga.crossover(a, b)
        homogeneous += all(len(set(child[p.block_ids == blk])) == 1 for blk in np.unique(p.block_ids))
    assert homogeneous > 0

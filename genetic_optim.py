"""Bit allocation: one GGUF type per tensor under an exact file-size budget (numpy only).

`AllocationProblem` is the table every allocator works on: each tensor's menu of types with its exact bytes in
the file and its predicted damage (and, with a decode cost table, its predicted decode seconds). `repair` fits
any assignment to the budget; `greedy_allocation` and `lagrangian_allocation` are the classical knapsack
answers; `MixedPrecisionGA` searches from them and from llama.cpp's presets with the end-to-end KLD of the
fake-quantized model as its final judge (multi-fidelity, in the spirit of EvoPress).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import quant_utils


def pareto_menu(types, size_bytes, damage) -> list[tuple[str, float, float]]:
    """(type, bytes, damage) sorted by size, keeping only types that beat every smaller one on damage: a
    type no smaller and no better than another is never worth choosing (e.g. Q4_0 beside IQ4_NL)."""
    entries = sorted(zip(types, map(float, size_bytes), map(float, damage)), key=lambda e: (e[1], e[2]))
    kept = []
    for entry in entries:
        if not kept or entry[2] < kept[-1][2]:
            kept.append(entry)
    return kept


@dataclass
class AllocationProblem:
    """One type per tensor under a byte budget: the table every allocator works on.

    `menus[i]` lists tensor i's candidate types in ascending size; `size_bytes[i, j]` is the bytes the tensor
    takes in the file as menu entry j (alignment padding included), `damage[i, j]` its predicted damage
    (single-tensor KLD); entries past a menu's end are inf. `fixed_bytes` is the rest of the file (header,
    metadata, unquantized tensors), so `fixed_bytes + sum(size)` is the exact file size. With a decode cost
    table, `decode_s[i, j]` is the predicted decode seconds per token the entry adds and `base_decode_s` the
    rest (decode_speed.py), so `base_decode_s + sum(decode_s)` is the predicted decode time.
    """
    tensor_names: list[str]
    menus: list[list[str]]
    size_bytes: np.ndarray
    damage: np.ndarray
    fixed_bytes: int
    block_ids: np.ndarray  # decoder block of each tensor; -1 for embedding and output
    decode_s: np.ndarray | None = None
    base_decode_s: float = 0.0

    @classmethod
    def build(cls, tensor_names, menus, size_bytes, damage, fixed_bytes, block_ids,
              decode_s: Sequence[dict[str, float]] | None = None, base_decode_s: float = 0.0):
        menus = [pareto_menu(m, s, d) for m, s, d in zip(menus, size_bytes, damage)]
        n, width = len(tensor_names), max(len(m) for m in menus)
        sizes = np.full((n, width), np.inf)
        dmg = np.full((n, width), np.inf)
        times = None if decode_s is None else np.full((n, width), np.inf)
        for i, menu in enumerate(menus):
            sizes[i, :len(menu)] = [size for _, size, _ in menu]
            dmg[i, :len(menu)] = [d for _, _, d in menu]
            if times is not None:
                times[i, :len(menu)] = [decode_s[i][t] for t, _, _ in menu]
        return cls(list(tensor_names), [[t for t, _, _ in m] for m in menus], sizes, dmg, int(fixed_bytes),
                   np.asarray(block_ids), times, float(base_decode_s))

    def decode_seconds(self, genome: np.ndarray) -> float | None:
        """Predicted decode seconds per token (None without a decode cost table)."""
        if self.decode_s is None:
            return None
        return self.base_decode_s + float(self.decode_s[np.arange(len(genome)), genome].sum())

    @property
    def menu_lengths(self) -> np.ndarray:
        return np.array([len(m) for m in self.menus])

    def file_size_bytes(self, genome: np.ndarray) -> int:
        return self.fixed_bytes + int(self.size_bytes[np.arange(len(genome)), genome].sum())

    def predicted_damage(self, genome: np.ndarray) -> float:
        return float(self.damage[np.arange(len(genome)), genome].sum())

    def smallest(self) -> np.ndarray:
        return np.zeros(len(self.menus), dtype=np.int64)

    def largest(self) -> np.ndarray:
        return self.menu_lengths - 1

    def feasible_range(self) -> tuple[int, int]:
        return self.file_size_bytes(self.smallest()), self.file_size_bytes(self.largest())

    def types_of(self, genome: np.ndarray) -> dict[str, str]:
        return {name: self.menus[i][int(g)] for i, (name, g) in enumerate(zip(self.tensor_names, genome))}

    def genome_of(self, tensor_types: dict[str, str]) -> np.ndarray:
        """The genome of an assignment by name; a type missing from a tensor's menu takes the nearest size."""
        genome = np.zeros(len(self.menus), dtype=np.int64)
        for i, name in enumerate(self.tensor_names):
            wanted = tensor_types[name]
            if wanted in self.menus[i]:
                genome[i] = self.menus[i].index(wanted)
            else:
                bpw = quant_utils.get_type(wanted).bits_per_weight
                bpws = [quant_utils.get_type(t).bits_per_weight for t in self.menus[i]]
                genome[i] = int(np.argmin(np.abs(np.array(bpws) - bpw)))
        return genome


def repair(problem: AllocationProblem, genome: np.ndarray, budget_bytes: int,
           time_limit_s: float | None = None) -> np.ndarray:
    """Fit a genome to the budget: downgrade where predicted damage per byte saved is least; with a decode
    time limit, then swap types where the most time is saved per damage added (within the budget); then
    spend the spare bytes on the upgrades with the most damage removed per byte that keep to the limit. The
    result is always within budget (the budget is checked to be feasible up front); within the time limit
    when some swap sequence gets there (`decode_seconds` says)."""
    g = genome.copy()
    rows = np.arange(len(g))
    size = problem.file_size_bytes(g)
    while size > budget_bytes:
        can = g > 0
        lower = np.where(can, g - 1, 0)
        saved = problem.size_bytes[rows, g] - problem.size_bytes[rows, lower]
        cost = (problem.damage[rows, lower] - problem.damage[rows, g]) / np.where(can, saved, 1)
        cost[~can] = np.inf
        i = int(np.argmin(cost))
        if not can[i]:
            raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest assignment")
        size -= int(saved[i])
        g[i] -= 1
    timed = time_limit_s is not None and problem.decode_s is not None
    if timed:
        g, size = _speed_up(problem, g, size, budget_bytes, time_limit_s)
    slack_s = time_limit_s - problem.decode_seconds(g) if timed else np.inf
    last = problem.menu_lengths - 1
    while True:
        can = g < last
        upper = np.where(can, g + 1, g)
        extra = problem.size_bytes[rows, upper] - problem.size_bytes[rows, g]
        can &= extra <= budget_bytes - size
        if timed:
            extra_s = problem.decode_s[rows, upper] - problem.decode_s[rows, g]
            can &= extra_s <= max(slack_s, 0.0)
        if not can.any():
            return g
        gain = (problem.damage[rows, g] - problem.damage[rows, upper]) / np.where(extra > 0, extra, 1)
        gain[~can] = -np.inf
        i = int(np.argmax(gain))
        if gain[i] <= 0:
            return g
        size += int(extra[i])
        if timed:
            slack_s -= float(extra_s[i])
        g[i] += 1


def _speed_up(problem: AllocationProblem, g: np.ndarray, size: int, budget_bytes: int, time_limit_s: float
              ) -> tuple[np.ndarray, int]:
    """Swap tensors to faster types (any entry of their menu), most decode time saved per damage added first,
    each swap within the byte budget, until the predicted time is within the limit or no swap saves time."""
    rows = np.arange(len(g))[:, None]
    valid = np.isfinite(problem.size_bytes)
    while problem.decode_seconds(g) > time_limit_s:
        cur = g[:, None]
        saved_s = problem.decode_s[rows, cur] - problem.decode_s          # > 0: faster
        extra_b = problem.size_bytes - problem.size_bytes[rows, cur]
        added = problem.damage - problem.damage[rows, cur]
        ok = valid & (saved_s > 0) & (extra_b <= budget_bytes - size)
        if not ok.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(ok, saved_s / np.maximum(added, 1e-12), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        size += int(extra_b[i, j])
        g[i] = j
    return g, size


def greedy_allocation(problem: AllocationProblem, budget_bytes: int, time_limit_s: float | None = None
                      ) -> np.ndarray:
    """The classical allocator: from the smallest types, upgrade by damage removed per byte until full."""
    return repair(problem, problem.smallest(), budget_bytes, time_limit_s)


def lagrangian_allocation(problem: AllocationProblem, budget_bytes: int, iters: int = 60,
                          time_limit_s: float | None = None) -> np.ndarray:
    """Knapsack by Lagrange multiplier (exllamav2-style): each tensor minimises damage + lam * bytes; lam is
    bisected to the budget, then the result is repaired to fill or fit it exactly."""
    lo, hi = 0.0, 1.0
    pick = lambda lam: np.argmin(problem.damage + lam * problem.size_bytes, axis=1)
    while problem.file_size_bytes(pick(hi)) > budget_bytes and hi < 1e30:
        hi *= 10
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.file_size_bytes(pick(mid)) > budget_bytes else (lo, mid)
    return repair(problem, pick(hi), budget_bytes, time_limit_s)


@dataclass
class GAResult:
    genome: np.ndarray
    measured_kld: float | None
    predicted_damage: float
    history: list[dict] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # genome bytes -> measured KLD


def seeds_to_measure(problem: AllocationProblem, seeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The seeds worth an end-to-end measurement up front: those no larger seed is predicted to beat. Under a
    byte budget size is free, so a smaller, worse seed (the Q2_K preset beside Q4_K_M) is not the answer unless
    the proxy is wrong; it stays in the population and is measured if it ever ranks among the best."""
    points = [(problem.file_size_bytes(g), problem.predicted_damage(g)) for g in seeds]
    return [g for g, (s, d) in zip(seeds, points)
            if not any(s2 >= s and d2 < d or s2 > s and d2 <= d for s2, d2 in points)]


class MixedPrecisionGA:
    """Genetic search for a per-tensor type assignment under an exact byte budget.

    Fitness is multi-fidelity (in the spirit of EvoPress): every individual has the proxy (sum of single-tensor
    damages); each generation the best few not yet measured get the end-to-end KLD of the fake-quantized
    model (`measure_fn`), and from then on rank by it, the proxy being rescaled to the measured values. The
    answer is the individual with the lowest measured KLD, never the proxy's favourite alone.

    With `time_limit_s` (and a problem with decode costs) every individual is also repaired toward the predicted
    decode-time limit; one still over it ranks behind every individual within it and is never the answer.
    """

    def __init__(self, problem: AllocationProblem, budget_bytes: int, pop_size: int = 20, generations: int = 12,
                 measure_fn=None, measures_per_generation: int = 2, seed: int = 0, seed_genomes=(),
                 elite: int = 2, tournament_size: int = 3, mutation_rate: float | None = None,
                 time_limit_s: float | None = None):
        low, high = problem.feasible_range()
        if not low <= budget_bytes:
            raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest assignment ({low:,} bytes); "
                             f"feasible range {low:,} .. {high:,} bytes")
        self.problem, self.budget_bytes = problem, int(budget_bytes)
        self.pop_size, self.generations = pop_size, generations
        self.measure_fn, self.measures_per_generation = measure_fn, measures_per_generation
        self.rng = np.random.default_rng(seed)
        self.seed_genomes = [np.asarray(g, dtype=np.int64) for g in seed_genomes]
        self.elite, self.tournament_size = elite, tournament_size
        self.mutation_rate = mutation_rate or 2.0 / len(problem.menus)
        self.measured: dict[bytes, float] = {}
        self.time_limit_s = time_limit_s if problem.decode_s is not None else None

    def _repair(self, genome: np.ndarray) -> np.ndarray:
        return repair(self.problem, genome, self.budget_bytes, self.time_limit_s)

    def too_slow(self, genome: np.ndarray) -> bool:
        """Predicted decode time over the limit (never, without one)."""
        return self.time_limit_s is not None and self.problem.decode_seconds(genome) > self.time_limit_s * (1 + 1e-9)

    # -- operators -------------------------------------------------------------------------------------
    def initialize_population(self) -> list[np.ndarray]:
        """Presets that fit, the greedy and Lagrangian solutions, then random individuals, all repaired."""
        p = self.problem
        population = [self._repair(g) for g in self.seed_genomes]
        population += [greedy_allocation(p, self.budget_bytes, self.time_limit_s),
                       lagrangian_allocation(p, self.budget_bytes, time_limit_s=self.time_limit_s)]
        while len(population) < self.pop_size:
            random_genome = (self.rng.random(len(p.menus)) * p.menu_lengths).astype(np.int64)
            population.append(self._repair(random_genome))
        return self._unique(population)[:self.pop_size] if len(population) > self.pop_size else population

    def crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Uniform crossover, or block-wise (a decoder block's tensors travel together), half the time each."""
        if self.rng.random() < 0.5:
            take_b = self.rng.random(len(a)) < 0.5
        else:
            blocks = np.unique(self.problem.block_ids)
            from_b = set(blocks[self.rng.random(len(blocks)) < 0.5].tolist())
            take_b = np.array([bid in from_b for bid in self.problem.block_ids])
        return np.where(take_b, b, a)

    def mutate(self, genome: np.ndarray) -> np.ndarray:
        """Move a few tensors one step up or down in size."""
        g = genome.copy()
        hit = self.rng.random(len(g)) < self.mutation_rate
        if not hit.any():
            hit[self.rng.integers(len(g))] = True
        step = np.where(self.rng.random(len(g)) < 0.5, -1, 1)
        g[hit] = np.clip(g[hit] + step[hit], 0, self.problem.menu_lengths[hit] - 1)
        return g

    # -- fitness ---------------------------------------------------------------------------------------
    def _proxy(self, population) -> np.ndarray:
        return np.array([self.problem.predicted_damage(g) for g in population])

    def _fitness(self, population) -> np.ndarray:
        """Measured KLD where known; elsewhere the proxy scaled by the median measured/proxy ratio; an
        individual over the decode-time limit behind all others (by how far over)."""
        proxy = self._proxy(population)
        ratios = [kld / max(self.problem.predicted_damage(np.frombuffer(k, dtype=np.int64)), 1e-12)
                  for k, kld in self.measured.items()]
        scale = float(np.median(ratios)) if ratios else 1.0
        fitness = np.array([self.measured.get(g.tobytes(), p * scale) for g, p in zip(population, proxy)])
        for i, g in enumerate(population):
            if self.too_slow(g):
                fitness[i] = 1e6 * (1 + self.problem.decode_seconds(g) / self.time_limit_s)
        return fitness

    def _measure_best(self, population) -> None:
        """Measure the end-to-end KLD of the best individuals (by current fitness) not measured yet."""
        if self.measure_fn is None:
            return
        order = np.argsort(self._fitness(population), kind="stable")
        todo = [population[i] for i in order if population[i].tobytes() not in self.measured]
        for g in todo[:self.measures_per_generation]:
            self.measured[g.tobytes()] = float(self.measure_fn(self.problem.types_of(g)))

    def _tournament(self, population, fitness) -> np.ndarray:
        picks = self.rng.choice(len(population), size=self.tournament_size, replace=False)
        return population[picks[np.argmin(fitness[picks])]]

    @staticmethod
    def _unique(population):
        seen, out = set(), []
        for g in population:
            if g.tobytes() not in seen:
                seen.add(g.tobytes())
                out.append(g)
        return out

    def optimize(self, progress=None) -> GAResult:
        """Run the search; `progress` is an optional callable(generation, stats) for a progress bar."""
        population = self.initialize_population()
        # The seeds (presets, greedy, Lagrangian) are measured first, so the answer is never worse than them,
        # except those a larger seed is predicted to beat: measuring those would quantize whole tensors to
        # types (Q2_K for the Q2_K preset) that the search may never use, the costliest part of a 7B run.
        if self.measure_fn is not None:
            for g in seeds_to_measure(self.problem, population[:len(self.seed_genomes) + 2]):
                if g.tobytes() not in self.measured:
                    self.measured[g.tobytes()] = float(self.measure_fn(self.problem.types_of(g)))
        history = []
        for generation in range(self.generations):
            self._measure_best(population)
            fitness = self._fitness(population)
            order = np.argsort(fitness, kind="stable")
            stats = {"generation": generation, "best_fitness": float(fitness[order[0]]),
                     "mean_fitness": float(fitness.mean()),
                     "best_proxy": float(self._proxy(population).min()),
                     "best_measured_kld": min(self.measured.values()) if self.measured else None,
                     "n_measured": len(self.measured)}
            history.append(stats)
            if progress:
                progress(generation, stats)
            children = [population[i] for i in order[:self.elite]]
            while len(children) < self.pop_size:
                a, b = self._tournament(population, fitness), self._tournament(population, fitness)
                child = self._repair(self.mutate(self.crossover(a, b)))
                children.append(child)
            population = children
        self._measure_best(population)
        fast_enough = {k: v for k, v in self.measured.items()
                       if not self.too_slow(np.frombuffer(k, dtype=np.int64))}
        if fast_enough:
            key = min(fast_enough, key=fast_enough.get)
            best = np.frombuffer(key, dtype=np.int64).copy()
            kld = self.measured[key]
        else:
            ok = [g for g in population if not self.too_slow(g)] or population
            best = min(ok, key=self.problem.predicted_damage)
            kld = None
        return GAResult(best, kld, self.problem.predicted_damage(best), history, dict(self.measured))


"""Bit allocation: one GGUF type per tensor under an exact file-size budget (numpy only).

`AllocationProblem` is the table every allocator works on: each tensor's menu of types with its exact bytes in
the file and its predicted damage (and, with a speed cost table, its predicted seconds per speed mode). `repair` fits
any assignment to the budget; `greedy_allocation` and `lagrangian_allocation` are the classical knapsack
answers; `MixedPrecisionGA` searches from them and from llama.cpp's presets with the end-to-end KLD of the
fake-quantized model as its final judge (multi-fidelity, in the spirit of EvoPress).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import quant_utils


def pareto_menu(types, size_bytes, damage, seconds=None) -> list[tuple[str, float, float, tuple]]:
    """(type, bytes, damage, seconds per speed mode) sorted by size, keeping only the types no other type beats:
    a type no smaller, no better and (with speed modes) no faster than another is never worth choosing (e.g.
    Q4_0 beside IQ4_NL, unless Q4_0 runs faster)."""
    seconds = seconds if seconds is not None else [()] * len(types)
    entries = sorted(zip(types, map(float, size_bytes), map(float, damage), map(tuple, seconds)),
                     key=lambda e: (e[1], e[2], e[3]))

    def beaten(e, by):
        return by is not e and by[1] <= e[1] and by[2] <= e[2] and all(a <= b for a, b in zip(by[3], e[3])) \
            and (by[1], by[2], by[3]) != (e[1], e[2], e[3])

    kept = []
    for e in entries:
        if not any(beaten(e, other) for other in entries) and (e[1], e[2], e[3]) not in [k[1:] for k in kept]:
            kept.append(e)
    return kept


@dataclass
class AllocationProblem:
    """One type per tensor under a byte budget: the table every allocator works on.

    `menus[i]` lists tensor i's candidate types in ascending size; `size_bytes[i, j]` is the bytes the tensor
    takes in the file as menu entry j (alignment padding included), `damage[i, j]` its predicted damage
    (single-tensor KLD); entries past a menu's end are inf. `fixed_bytes` is the rest of the file (header,
    metadata, unquantized tensors), so `fixed_bytes + sum(size)` is the exact file size. With a speed cost
    table, `seconds[k, i, j]` is the predicted time the entry adds in speed mode `modes[k]` (prompt processing,
    decode: speed_costs.py) and `base_seconds[k]` the rest, so `base_seconds + sum(seconds)` is the predicted
    time of each mode.
    """
    tensor_names: list[str]
    menus: list[list[str]]
    size_bytes: np.ndarray
    damage: np.ndarray
    fixed_bytes: int
    block_ids: np.ndarray  # decoder block of each tensor; -1 for embedding and output
    modes: tuple[str, ...] = ()
    seconds: np.ndarray | None = None          # [n_modes, n_tensors, width]
    base_seconds: np.ndarray | None = None     # [n_modes]

    @classmethod
    def build(cls, tensor_names, menus, size_bytes, damage, fixed_bytes, block_ids,
              seconds: dict[str, Sequence[dict[str, float]]] | None = None,
              base_seconds: dict[str, float] | None = None):
        """From per-tensor lists (menu, bytes, damage) and, optionally, {mode: per-tensor {type: seconds}}
        with {mode: base seconds}; each menu is cut to its Pareto front (pareto_menu)."""
        modes = tuple(seconds or ())
        times = [[tuple(seconds[m][i][t] for m in modes) for t in menu] for i, menu in enumerate(menus)]
        menus = [pareto_menu(m, s, d, ts) for m, s, d, ts in zip(menus, size_bytes, damage, times)]
        n, width = len(tensor_names), max(len(m) for m in menus)
        sizes = np.full((n, width), np.inf)
        dmg = np.full((n, width), np.inf)
        secs = np.full((len(modes), n, width), np.inf) if modes else None
        for i, menu in enumerate(menus):
            sizes[i, :len(menu)] = [e[1] for e in menu]
            dmg[i, :len(menu)] = [e[2] for e in menu]
            for k in range(len(modes)):
                secs[k, i, :len(menu)] = [e[3][k] for e in menu]
        base = np.array([base_seconds[m] for m in modes]) if modes else None
        return cls(list(tensor_names), [[e[0] for e in m] for m in menus], sizes, dmg, int(fixed_bytes),
                   np.asarray(block_ids), modes, secs, base)

    def predicted_seconds(self, genome: np.ndarray) -> np.ndarray | None:
        """Predicted seconds of each speed mode (None without a speed cost table)."""
        if self.seconds is None:
            return None
        return self.base_seconds + self.seconds[:, np.arange(len(genome)), genome].sum(axis=1)

    @property
    def menu_lengths(self) -> np.ndarray:
        return np.array([len(m) for m in self.menus])

    def file_size_bytes(self, genome: np.ndarray) -> int:
        return self.fixed_bytes + int(self.size_bytes[np.arange(len(genome)), genome].sum())

    def predicted_damage(self, genome: np.ndarray) -> float:
        return float(self.damage[np.arange(len(genome)), genome].sum())

    def smallest(self) -> np.ndarray:
        """Every tensor at its smallest entry (the first of its menu)."""
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


def _excess(times: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """How far predicted times are over their limits, summed over modes as fractions of each limit (0: within
    every limit); `times` [n_modes, ...] broadcasts."""
    lim = limits.reshape((-1,) + (1,) * (times.ndim - 1))
    return np.maximum(times / lim - 1.0, 0.0).sum(axis=0)


def repair(problem: AllocationProblem, genome: np.ndarray, budget_bytes: int,
           time_limits: np.ndarray | None = None) -> np.ndarray:
    """Fit a genome to the budget and, with `time_limits` (seconds per speed mode), to the predicted speed.

    Three steps, each a sequence of single-tensor moves to any entry of the tensor's menu: (1) while over the
    budget, the move that adds the least damage per byte saved; (2) while over a time limit, the move that cuts
    the most excess time (summed over modes, relative to each limit) per damage added, within the budget;
    (3) while bytes are left, the move that removes the most damage per byte spent and keeps every mode within
    its limit (a mode still over it may not get slower). The result is always within budget (checked to be
    feasible up front); within the time limits when some sequence of moves gets there (`predicted_seconds`)."""
    p = problem
    g = genome.copy()
    rows = np.arange(len(g))[:, None]
    valid = np.isfinite(p.size_bytes)
    size = p.file_size_bytes(g)
    while size > budget_bytes:
        saved = p.size_bytes[rows, g[:, None]] - p.size_bytes
        added = p.damage - p.damage[rows, g[:, None]]
        with np.errstate(invalid="ignore", divide="ignore"):
            cost = np.where(valid & (saved > 0), added / np.where(saved > 0, saved, 1), np.inf)
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        if not np.isfinite(cost[i, j]):
            raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest assignment")
        size -= int(saved[i, j])
        g[i] = j
    timed = time_limits is not None and p.seconds is not None
    if timed:
        g, size = _speed_up(p, g, size, budget_bytes, np.asarray(time_limits, dtype=np.float64))
        slack = np.maximum(np.asarray(time_limits) - p.predicted_seconds(g), 0.0)
    while True:
        extra = p.size_bytes - p.size_bytes[rows, g[:, None]]
        removed = p.damage[rows, g[:, None]] - p.damage
        ok = valid & (removed > 0) & (extra <= budget_bytes - size)
        if timed:
            extra_s = p.seconds - p.seconds[:, rows, g[:, None]]
            ok &= (extra_s <= slack[:, None, None]).all(axis=0)
        if not ok.any():
            return g
        with np.errstate(invalid="ignore", divide="ignore"):
            gain = np.where(ok, removed / np.maximum(extra, 1.0), -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        size += int(extra[i, j])
        if timed:
            slack = slack - extra_s[:, i, j]
        g[i] = j


def _speed_up(problem: AllocationProblem, g: np.ndarray, size: int, budget_bytes: int, limits: np.ndarray
              ) -> tuple[np.ndarray, int]:
    """Move tensors to faster entries of their menus, the most excess time cut per damage added first, each
    move within the byte budget, until every mode is within its limit or no move cuts the excess."""
    p = problem
    rows = np.arange(len(g))[:, None]
    valid = np.isfinite(p.size_bytes)
    times = p.predicted_seconds(g)
    while _excess(times, limits) > 0:
        new_times = times[:, None, None] + p.seconds - p.seconds[:, rows, g[:, None]]
        cut = _excess(times, limits) - _excess(new_times, limits)
        extra_b = p.size_bytes - p.size_bytes[rows, g[:, None]]
        added = p.damage - p.damage[rows, g[:, None]]
        ok = valid & (cut > 1e-12) & (extra_b <= budget_bytes - size)
        if not ok.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(ok, cut / np.maximum(added, 1e-12), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        size += int(extra_b[i, j])
        times = new_times[:, i, j]
        g[i] = j
    return g, size


def greedy_allocation(problem: AllocationProblem, budget_bytes: int, time_limits: np.ndarray | None = None
                      ) -> np.ndarray:
    """The classical allocator: from the smallest types, upgrade by damage removed per byte until full."""
    return repair(problem, problem.smallest(), budget_bytes, time_limits)


def lagrangian_allocation(problem: AllocationProblem, budget_bytes: int, iters: int = 60,
                          time_limits: np.ndarray | None = None) -> np.ndarray:
    """Knapsack by Lagrange multiplier (exllamav2-style): each tensor minimises damage + lam * bytes; lam is
    bisected to the budget, then the result is repaired to fill or fit it exactly."""
    lo, hi = 0.0, 1.0
    pick = lambda lam: np.argmin(problem.damage + lam * problem.size_bytes, axis=1)
    while problem.file_size_bytes(pick(hi)) > budget_bytes and hi < 1e30:
        hi *= 10
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.file_size_bytes(pick(mid)) > budget_bytes else (lo, mid)
    return repair(problem, pick(hi), budget_bytes, time_limits)


@dataclass
class GAResult:
    genome: np.ndarray
    measured_kld: float | None
    predicted_damage: float
    history: list[dict] = field(default_factory=list)


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

    With `time_limits` (seconds per speed mode, for a problem with speed costs) every individual is also repaired
    toward them; one still over a limit ranks behind every individual within them and is never the answer.
    """

    def __init__(self, problem: AllocationProblem, budget_bytes: int, pop_size: int = 20, generations: int = 12,
                 measure_fn=None, measures_per_generation: int = 2, seed: int = 0, seed_genomes=(),
                 elite: int = 2, tournament_size: int = 3, mutation_rate: float | None = None,
                 time_limits: np.ndarray | None = None):
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
        self.time_limits = None if time_limits is None or problem.seconds is None else np.asarray(time_limits)

    def _repair(self, genome: np.ndarray) -> np.ndarray:
        return repair(self.problem, genome, self.budget_bytes, self.time_limits)

    def too_slow(self, genome: np.ndarray) -> bool:
        """Some mode's predicted time over its limit (never, without limits)."""
        return self.time_limits is not None and bool(
            (self.problem.predicted_seconds(genome) > self.time_limits * (1 + 1e-9)).any())

    # -- operators -------------------------------------------------------------------------------------
    def initialize_population(self) -> list[np.ndarray]:
        """Presets that fit, the greedy and Lagrangian solutions, then random individuals, all repaired."""
        p = self.problem
        population = [self._repair(g) for g in self.seed_genomes]
        population += [greedy_allocation(p, self.budget_bytes, self.time_limits),
                       lagrangian_allocation(p, self.budget_bytes, time_limits=self.time_limits)]
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
        individual over a time limit behind all others (by how far over)."""
        proxy = self._proxy(population)
        ratios = [kld / max(self.problem.predicted_damage(np.frombuffer(k, dtype=np.int64)), 1e-12)
                  for k, kld in self.measured.items()]
        scale = float(np.median(ratios)) if ratios else 1.0
        fitness = np.array([self.measured.get(g.tobytes(), p * scale) for g, p in zip(population, proxy)])
        for i, g in enumerate(population):
            if self.too_slow(g):
                fitness[i] = 1e6 * (1 + float((self.problem.predicted_seconds(g) / self.time_limits).max()))
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
        return GAResult(best, kld, self.problem.predicted_damage(best), history)


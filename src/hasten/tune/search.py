"""Searching a plan for one model at an exact NFE budget: evolutionary search, then local refinement.

The search space is USF's unified multistep framework on UniPC's predictor and corrector: the ``n - 1``
free noise levels (the first is the model's sigma_max, the last step lands on 0, so NFE = n) and, per step,
the predictor order (1-3), whether the corrector is applied, and its variant (bh1/bh2); plus one global
choice, data or noise prediction. Stock solvers are points of this space (DPM-Solver++(2M) is UniPC-bh2
order 2 without corrector; UniPC is order 2 with it), so the search starts from the stock configurations
on every stock grid and can only improve on the best of them (it keeps the best it has seen).

1. **Evolutionary search** (AutoDiffusion): a (mu + lambda) population; children by uniform crossover of
   two elites and mutation (Gaussian moves of log-sigma, random flips of the decisions).
2. **Local refinement** (coordinate descent): each log-sigma moved by +-delta, each step's decisions tried in
   turn, accepted when the objective drops; delta halves when a sweep finds nothing. At very low NFE this
   is often the strongest single move.

**Per-step architecture** (optional, ``shares`` and ``cost_budget`` given): each step also carries the set of
skippable blocks it leaves out (:mod:`hasten.accel.skip`), and a candidate's cost is its NFE-equivalent, the
calls weighted by the FLOP share they keep (:meth:`Candidate.cost`), which must stay within the budget. As in
AutoDiffusion the search is progressive: the first ``steps_first`` share of the evolutionary phase moves only
the levels and solver decisions (the starts' skip patterns ride along), then the skip sets evolve too; every
child is repaired to the budget by skipping more blocks at random steps, and refinement also moves a skipped
block to a neighbouring step or swaps it for a neighbouring block. Unlike AutoDiffusion's code, the skip sets
belong to step *positions* of the sorted grid (the levels are kept sorted, so a set never silently moves to
another step when levels cross) and levels are kept distinct (no duplicate time steps shorten a plan).

The objective is any function of a :class:`Plan` (lower is better). :func:`tune` uses the proxy
"RMSE to a high-accuracy solve from the same noise, on a small search batch" (no feature network needed);
evaluations are memoised by the normalised candidate, so a resumed search replays its cache instantly
and continues where it stopped (the search is deterministic given its seed).

Reference: Li et al., AutoDiffusion, ICCV 2023 (evolutionary search of time steps, and progressively of
per-step layer skipping under a budget); Liu et al., USF / S^3, ICLR 2024 (per-step solver decisions); Zhao
et al., UniPC, NeurIPS 2023 (the predictor and corrector).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .plan import Plan

__all__ = ["Candidate", "SearchResult", "budget_pattern", "candidate_from_plan", "search"]

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
PREDICTIONS = ("data", "noise")  # UniPC's two; "v3" (DPM-Solver-v3's EMS parameterisation) when enabled
_MIN_GAP = 1e-3  # smallest log-sigma gap between neighbouring levels


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A point of the search space. ``log_sigmas``: the ``n - 1`` free levels, descending."""

    log_sigmas: tuple[float, ...]
    orders: tuple[int, ...]
    correctors: tuple[bool, ...]
    variants: tuple[str, ...]
    prediction: str = "data"
    skip: tuple[tuple[int, ...], ...] = ()  # per step: skipped block indices; () = no skips (a plain plan)

    @property
    def num_steps(self) -> int:
        return len(self.orders)

    def normalised(self, log_max: float, log_min: float) -> Candidate:
        """Canonical form: levels clipped, sorted and spaced; decisions that cannot act set to a fixed value.

        Step 0 has no history (order 1, nothing to correct); the last step lands on sigma = 0, where every
        predictor returns the denoised estimate (order 1).
        """
        n = self.num_steps
        levels = sorted((min(max(v, log_min), log_max - _MIN_GAP) for v in self.log_sigmas), reverse=True)
        for i in range(len(levels)):  # keep strictly below sigma_max and the previous level
            upper = (log_max if i == 0 else levels[i - 1]) - _MIN_GAP
            levels[i] = round(min(levels[i], upper), 6)
        orders = tuple(1 if i in (0, n - 1) else min(o, i + 1) for i, o in enumerate(self.orders))
        correctors = tuple(bool(c) and i > 0 for i, c in enumerate(self.correctors))
        variants = ("bh2",) * n if self.prediction == "v3" else self.variants  # v3 has no variant
        skip = tuple(tuple(sorted(set(b))) for b in self.skip)
        return dataclasses.replace(
            self, log_sigmas=tuple(levels), orders=orders, correctors=correctors, variants=variants,
            skip=skip if any(skip) else (),
        )  # fmt: skip

    def key(self) -> str:
        data = dataclasses.asdict(self)
        if not self.skip:  # a candidate without skips keeps the key it had before skips existed (saved searches)
            del data["skip"]
        return json.dumps(data, sort_keys=True)

    def cost(self, shares: Sequence[float]) -> float:
        """NFE-equivalent: one call per step, less the FLOP shares of the blocks the step skips."""
        if not self.skip:
            return float(self.num_steps)
        return float(sum(1.0 - sum(shares[b] for b in blocks) for blocks in self.skip))

    def to_plan(self, sigma_max: float, shares: Sequence[float] | None = None, **metadata: Any) -> Plan:
        """The plan this candidate stands for; ``shares`` (the blocks' FLOP shares) set a skipping plan's cost."""
        if self.skip:
            metadata = {**metadata, "skip": self.skip, "cost": None if shares is None else self.cost(shares)}
        sigmas = (sigma_max, *(math.exp(v) for v in self.log_sigmas), 0.0)
        if self.prediction == "v3":  # the model's statistics are resolved by generate() (ems="auto")
            steps = tuple({"order": o, "corrector": c} for o, c in zip(self.orders, self.correctors))
            options = {"ems": "auto", "lower_order_final": False}
            return Plan(sigmas, "dpm_solver_v3", options, steps, nfe=self.num_steps, **metadata)
        steps = tuple(
            {"order": o, "corrector": c, "variant": v} for o, c, v in zip(self.orders, self.correctors, self.variants)
        )
        options = {"prediction": self.prediction, "lower_order_final": False}
        return Plan(sigmas, "unipc", options, steps, nfe=self.num_steps, **metadata)


def candidate_from_plan(plan: Plan) -> Candidate | None:
    """The search-space point of a stock plan (UniPC or DPM-Solver++ multistep ending at 0), if it has one."""
    n = plan.num_steps
    if plan.sigmas[-1] != 0.0:
        return None
    opts = dict(plan.options)
    if plan.solver == "unipc" and plan.steps is None:
        order, corrector = opts.get("order", 2), opts.get("corrector", True)
        variant, prediction = opts.get("variant", "bh2"), opts.get("prediction", "data")
    elif plan.solver == "dpm_solver_v3" and plan.steps is None and opts.get("ems", "auto") == "auto":
        order, corrector, variant, prediction = opts.get("order", 2), opts.get("corrector", True), "bh2", "v3"
    elif plan.solver in ("dpmpp_2m", "dpmpp_3m") and opts.get("solver_type", "midpoint") == "midpoint":
        # DPM-Solver++(2M) is UniP-2 bh2 without corrector (Zhao et al., Sec. 3.3).
        order, corrector, variant, prediction = 2 if plan.solver == "dpmpp_2m" else 3, False, "bh2", "data"
        if plan.solver == "dpmpp_3m":
            return None  # its third-order rule is not UniP-3's
    else:
        return None
    logs = tuple(math.log(s) for s in plan.sigmas[1:-1])
    return Candidate(logs, (order,) * n, (corrector,) * n, (variant,) * n, prediction)


@dataclasses.dataclass
class SearchResult:
    best: Candidate
    best_score: float
    evaluations: int  # distinct candidates evaluated (including replayed ones)
    seconds: float  # evaluation time spent, including that of a resumed run's earlier part
    history: list[float]  # best score after each evaluation
    start_best: float  # best score among the starting (stock) candidates


class _Budget(Exception):
    """Raised inside the search when the time or evaluation budget is spent."""


def search(
    objective: Callable[[Candidate], tuple[float, float]],
    starts: Sequence[Candidate],
    *,
    log_sigma_max: float,
    log_sigma_min: float,
    seconds: float,
    max_evaluations: int | None = None,
    seed: int = 0,
    population: int = 12,
    elite: int = 4,
    evolution_share: float = 0.6,
    predictions: tuple[str, ...] = PREDICTIONS,
    islands: int = 1,
    cache: dict[str, dict[str, float]] | None = None,
    on_evaluation: Callable[[Candidate, float, float, int, float], None] | None = None,
    prefetch: Callable[[list[Candidate]], None] | None = None,
    shares: Sequence[float] | None = None,
    cost_budget: float | None = None,
    steps_first: float = 0.5,
) -> SearchResult:
    """Minimise ``objective`` (returns ``(score, seconds_spent)``) from ``starts`` within the budget.

    ``predictions`` are the values the global prediction gene may take (add ``"v3"`` when the model's
    DPM-Solver-v3 statistics are available). ``islands`` splits the evolutionary phase into that many
    populations, seeded round-robin from the ranked starts and run one after the other. ``cache`` maps
    :meth:`Candidate.key` to ``{"score", "seconds"}``; it is read (replayed without calling
    ``objective``) and extended, so passing a saved cache resumes a search. ``seconds`` bounds the
    evaluation time (replayed evaluations count their recorded time); ``evolution_share`` of it goes to the
    evolutionary phase, the rest to local refinement. ``on_evaluation(candidate, score, best, count, spent)`` is
    called after every new evaluation (e.g. to save the cache).

    ``prefetch(candidates)`` (optional) is told each group of candidates the search is about to score one after
    the other (the starts, a generation's children, a refinement sweep's neighbours), all fixed before the first
    is scored: it may score them at once and put them in ``cache`` (in parallel, under ``torchrun``), and the
    search then replays them in order as it would have scored them, so its path does not depend on it.

    ``shares`` (each skippable block's FLOP share of a call) and ``cost_budget`` (largest NFE-equivalent) turn on
    the per-step architecture search (see the module docstring); ``steps_first`` is the share of the evolutionary
    phase that moves only the steps. A candidate over the budget scores ``inf`` without being run.
    """
    if not starts:
        raise ValueError("search needs at least one starting candidate")
    if (shares is None) != (cost_budget is None):
        raise ValueError("the architecture search needs both shares and cost_budget (or neither)")
    arch = None if shares is None else _Architecture(tuple(shares), float(cost_budget))
    cache = {} if cache is None else cache
    rng = np.random.default_rng(seed)
    n = starts[0].num_steps
    spent = 0.0
    count = 0
    best: tuple[float, Candidate] | None = None
    history: list[float] = []

    counted: set[str] = set()
    best_by_prediction: dict[str, tuple[float, Candidate]] = {}

    def evaluate(candidate: Candidate) -> float:
        nonlocal spent, count, best
        candidate = candidate.normalised(log_sigma_max, log_sigma_min)
        key = candidate.key()
        if key in counted:
            return cache[key]["score"]
        if max_evaluations is not None and count >= max_evaluations:  # a cap on candidates, replayed or new
            raise _Budget
        new = key not in cache
        if new:
            if spent >= seconds:
                raise _Budget
            if arch is not None and candidate.cost(arch.shares) > arch.budget + 1e-9:
                score, took = math.inf, 0.0  # over the budget: never run
            else:
                score, took = objective(candidate)
            cache[key] = {"score": float(score) if math.isfinite(score) else math.inf, "seconds": float(took)}
        counted.add(key)
        count += 1
        spent += cache[key]["seconds"]  # a replayed evaluation counts the time it took when it ran
        score = cache[key]["score"]
        if best is None or score < best[0]:
            best = (score, candidate)
        if candidate.prediction not in best_by_prediction or score < best_by_prediction[candidate.prediction][0]:
            best_by_prediction[candidate.prediction] = (score, candidate)
        history.append(best[0])
        if new and on_evaluation is not None:
            on_evaluation(candidate, score, best[0], count, spent)
        return score

    def ahead(group: list[Candidate]) -> None:
        if prefetch is not None and spent < seconds:
            prefetch([c.normalised(log_sigma_max, log_sigma_min) for c in group])

    start_scores = []
    try:
        pool = []
        ahead(list(starts))
        for c in starts:
            pool.append((evaluate(c), c.normalised(log_sigma_max, log_sigma_min)))
            start_scores.append(pool[-1][0])
        pool.sort(key=lambda sc: sc[0])
        # 1. Evolutionary phase, on `islands` populations that split the starts round-robin by rank (one
        # population settles on the basin of its best few starts; several keep other basins alive).
        island_pools = [pool[i::islands] for i in range(islands)]
        island_best = []
        for index, island in enumerate(island_pools):
            share = evolution_share * (index + 1) / islands
            begin = evolution_share * index / islands
            while island and spent < share * seconds and (max_evaluations is None or count < share * max_evaluations):
                elites = [c for _, c in island[:elite]]
                # progressive (AutoDiffusion): the skip sets evolve only after the island's first steps_first share
                # of the budget (time, or evaluations when they are capped: whichever is used up faster)
                used = max(spent / seconds, 0.0 if max_evaluations is None else count / max_evaluations)
                evolve_skips = arch is not None and used >= begin + steps_first * (share - begin)
                children = []
                while len(children) < population - elite:
                    a = elites[rng.integers(len(elites))]
                    child = _crossover(a, elites[rng.integers(len(elites))], rng) if rng.random() < 0.5 else a
                    child = _mutate(child, rng, log_sigma_max, log_sigma_min, predictions)
                    if arch is not None:
                        child = arch.repair(arch.mutate(child, rng) if evolve_skips else child, rng)
                    children.append(child)
                ahead(children)
                scored = [(evaluate(c), c.normalised(log_sigma_max, log_sigma_min)) for c in children]
                merged = {c.key(): (s, c) for s, c in island + scored}
                island = sorted(merged.values(), key=lambda sc: sc[0])[:population]
            if island:
                island_best.append(island[0])
        # 2. Local refinement: of the best candidate, then (time permitting) of the best of each island and
        # of each other parameterisation, since an evolutionary population tends to settle on one early.
        assert best is not None
        seeds, seen_seeds = [], set()
        others = sorted([*island_best, *best_by_prediction.values()], key=lambda v: v[0])
        for seed_score, seed_candidate in [best, *others]:
            if seed_candidate.key() not in seen_seeds:
                seen_seeds.add(seed_candidate.key())
                seeds.append((seed_score, seed_candidate))
        for current_score, current in seeds:
            delta = (log_sigma_max - log_sigma_min) / (4 * n)
            while delta > 1e-3:
                improved = False
                trials = list(_neighbours(current, delta))
                if arch is not None:
                    trials += list(arch.neighbours(current))
                ahead(trials)
                for trial in trials:
                    s = evaluate(trial)
                    if s < current_score:
                        current_score, current, improved = s, trial.normalised(log_sigma_max, log_sigma_min), True
                if not improved:
                    delta /= 2
    except _Budget:
        pass
    assert best is not None
    return SearchResult(best[1], best[0], count, spent, history, min(start_scores) if start_scores else math.inf)


def _crossover(a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
    """Uniform crossover, gene by gene (levels re-sorted by normalisation; skip sets swapped by step position)."""

    def mix(x: tuple, y: tuple) -> tuple:
        return tuple(xi if rng.random() < 0.5 else yi for xi, yi in zip(x, y))

    child = Candidate(
        mix(a.log_sigmas, b.log_sigmas), mix(a.orders, b.orders), mix(a.correctors, b.correctors),
        mix(a.variants, b.variants), a.prediction if rng.random() < 0.5 else b.prediction,
    )  # fmt: skip
    if a.skip or b.skip:  # (steps-only searches draw nothing here: their random path is unchanged)
        n = a.num_steps
        child = dataclasses.replace(child, skip=mix(a.skip or ((),) * n, b.skip or ((),) * n))
    return child


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """The per-step architecture genes: block FLOP shares, the cost budget, and the moves on skip sets."""

    shares: tuple[float, ...]
    budget: float

    @property
    def num_blocks(self) -> int:
        return len(self.shares)

    def _sets(self, c: Candidate) -> list[set[int]]:
        return [set(b) for b in c.skip] if c.skip else [set() for _ in range(c.num_steps)]

    def mutate(self, c: Candidate, rng: np.random.Generator) -> Candidate:
        """Each step's set changed with probability 1/n: a random block added or a skipped one run again."""
        sets = self._sets(c)
        for blocks in sets:
            if rng.random() < 1.0 / len(sets):
                if blocks and (len(blocks) >= self.num_blocks - 1 or rng.random() < 0.5):
                    blocks.discard(sorted(blocks)[rng.integers(len(blocks))])
                else:
                    blocks.add(int(rng.choice(sorted(set(range(self.num_blocks)) - blocks))))
        return dataclasses.replace(c, skip=tuple(tuple(sorted(b)) for b in sets))

    def repair(self, c: Candidate, rng: np.random.Generator) -> Candidate:
        """Skip random further blocks (at most all but one per step) until the cost is within the budget."""
        sets = self._sets(c)

        def cost() -> float:
            return sum(1.0 - sum(self.shares[b] for b in blocks) for blocks in sets)

        while cost() > self.budget + 1e-9:
            open_steps = [i for i, blocks in enumerate(sets) if len(blocks) < self.num_blocks - 1]
            if not open_steps:
                break  # infeasible: scored inf by the search
            blocks = sets[open_steps[rng.integers(len(open_steps))]]
            blocks.add(int(rng.choice(sorted(set(range(self.num_blocks)) - blocks))))
        return dataclasses.replace(c, skip=tuple(tuple(sorted(b)) for b in sets))

    def neighbours(self, c: Candidate):
        """Cost-neutral moves (equal shares): a skipped block moved to the next or previous step, or swapped for
        the block beside it at the same step."""
        sets = self._sets(c)
        for i, blocks in enumerate(sets):
            for b in sorted(blocks):
                for j in (i - 1, i + 1):
                    if 0 <= j < len(sets) and b not in sets[j] and len(sets[j]) < self.num_blocks - 1:
                        moved = [set(x) for x in sets]
                        moved[i].discard(b)
                        moved[j].add(b)
                        yield dataclasses.replace(c, skip=tuple(tuple(sorted(x)) for x in moved))
                for other in (b - 1, b + 1):
                    if 0 <= other < self.num_blocks and other not in blocks:
                        swapped = [set(x) for x in sets]
                        swapped[i].discard(b)
                        swapped[i].add(other)
                        yield dataclasses.replace(c, skip=tuple(tuple(sorted(x)) for x in swapped))


def budget_pattern(num_steps: int, shares: Sequence[float], budget: float, where: str) -> tuple[tuple[int, ...], ...]:
    """A deterministic starting skip pattern within ``budget``: middle blocks first, at the ``"early"`` (high-noise)
    steps first, the ``"late"`` ones first, or ``"spread"`` over the steps round-robin from the middle step."""
    num_blocks = len(shares)
    middle = (num_blocks - 1) / 2
    block_order = sorted(range(num_blocks), key=lambda b: (abs(b - middle), b))
    steps = list(range(num_steps))
    if where == "late":
        steps.reverse()
    elif where == "spread":
        steps.sort(key=lambda s: (abs(s - (num_steps - 1) / 2), s))
    elif where != "early":
        raise ValueError(f"where must be 'early', 'late' or 'spread', got {where!r}")
    sets: list[list[int]] = [[] for _ in range(num_steps)]
    cost = float(num_steps)
    moves = [(s, b) for b in block_order[: num_blocks - 1] for s in steps] if where == "spread" else [
        (s, b) for s in steps for b in block_order[: num_blocks - 1]
    ]  # fmt: skip
    for s, b in moves:
        if cost <= budget + 1e-9:
            break
        sets[s].append(b)
        cost -= shares[b]
    if cost > budget + 1e-9:
        raise ValueError(
            f"no skip pattern of {num_steps} steps reaches a cost of {budget:g} NFE-equivalents (at most all but one "
            f"block skipped per step: {cost:.2f}); allow a larger cost or fewer steps"
        )
    return tuple(tuple(sorted(b)) for b in sets)


def _mutate(
    c: Candidate, rng: np.random.Generator, log_max: float, log_min: float, predictions: tuple[str, ...]
) -> Candidate:
    """Gaussian moves of some levels; each decision flipped with probability 1/n; rarely the prediction."""
    n = c.num_steps
    scale = (log_max - log_min) / (2 * n)
    logs = tuple(v + rng.normal(0, scale) if rng.random() < 0.5 else v for v in c.log_sigmas)
    p = 1.0 / n
    orders = tuple(int(rng.choice(ORDERS)) if rng.random() < p else o for o in c.orders)
    correctors = tuple((not x) if rng.random() < p else x for x in c.correctors)
    variants = tuple(str(rng.choice(VARIANTS)) if rng.random() < p else v for v in c.variants)
    prediction = str(rng.choice(predictions)) if rng.random() < 0.05 else c.prediction
    return dataclasses.replace(  # (the skip sets, if any, are kept: they have their own moves)
        c, log_sigmas=logs, orders=orders, correctors=correctors, variants=variants, prediction=prediction
    )


def _neighbours(c: Candidate, delta: float):
    """Coordinate moves: each level +-delta, then each step's order, corrector and variant changed."""
    for i in range(len(c.log_sigmas)):
        for sign in (-1.0, 1.0):
            logs = list(c.log_sigmas)
            logs[i] += sign * delta
            yield dataclasses.replace(c, log_sigmas=tuple(logs))
    for i in range(c.num_steps):
        for o in ORDERS:
            if o != c.orders[i]:
                yield dataclasses.replace(c, orders=(*c.orders[:i], o, *c.orders[i + 1 :]))
        yield dataclasses.replace(c, correctors=(*c.correctors[:i], not c.correctors[i], *c.correctors[i + 1 :]))
        if c.prediction == "v3":
            continue
        other = "bh1" if c.variants[i] == "bh2" else "bh2"
        yield dataclasses.replace(c, variants=(*c.variants[:i], other, *c.variants[i + 1 :]))

"""``hasten optimize``: the fastest recipe whose quality loss stays within a budget, found by measurement.

The search composes what hasten can do to a model's sampling, stage by stage, each stage building on what the
earlier ones found (every candidate is a :class:`~hasten.recipe.Recipe`):

1. **stock**: every hasten solver spec on every stock grid, and every diffusers scheduler, at growing step
   counts; a family stops at its first passing step count, and once anything passes, no family is tried at a
   higher NFE. The fastest passing stock recipe is the baseline every speed-up is paired against.
2. **peers on stock**: diffusers' cache hook / the DeepCache package and torchao's configs on that baseline
   (what a user gets from the peers without hasten).
   **students**: distilled students of the model (``students``, and the bundled ``<model>-fast`` and
   ``<model>-pruned`` when they were made from these weights), each its own network at its own sampler (a pruned
   model also at the baseline's sampler), scored like a stock recipe against the model's converged sampler;
   never the baseline. The later stages may put caches and quantisation on a
   passing student (plans are tuned for the model's own network only).
3. **plans**: saved plans for the model's weights (``--plan``), then, with a share of the budget, plans tuned
   by ``hasten tune``'s search at NFE budgets below the fastest passing one (resumable, kept in the work folder).
4. **caches**: each caching technique that hooks the network, calibrated for the ``top_k`` fastest passing
   samplers (plans included): each ladder of growing reuse is climbed until its first failure.
5. **quantisation**: W8A8 / W4A8 weights (``hasten quantize``, calibrated once per model and cached) under
   the ``top_k`` fastest passing recipes, cached ones included.
6. **timing**: the fastest passing candidates (by their scoring runs) are timed against the baseline, paired
   (alternating runs on the same noise, in this process); the Pareto front of (seconds per image, quality loss)
   is kept.
7. **confirmation**: the fastest timed recipe is scored again on a third noise seed; the next one is tried if
   it fails there. Nothing written when nothing passes.

Quality loss is the relative FD change from the model's converged sampler (the 100-step third-order reference
solve) on the same held-out noise and feature network, ``fd / fd_reference - 1``, bounded either way (an FD
below the reference's is a departure from the model too); for models without a feature network, the RMSE to the
reference images bounded by ``max_rmse``. Every evaluation is cached by
(recipe digest, scoring protocol) under ``$HASTEN_CACHE/optimize`` and written after each candidate, so a killed
run loses at most the evaluation in flight and a later run (or another budget) reuses all of them.

Reference: the issue's composition design; the stages reuse hasten's solvers, ``tune``, cache calibration
ladders and quantisation. AutoDiffusion (Li et al., ICCV 2023) and DeepCache (Ma et al., CVPR 2024) each
search or set one technique alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import statistics
from collections.abc import Callable
from typing import Any

from . import distributed
from ._io import write_text_atomic
from .config import Config
from .recipe import Recipe, save_recipe

__all__ = ["OptimizeConfig", "OptimizeError", "OptimizeResult", "Optimizer", "optimize"]

OPTIMIZE_VERSION = 1
BUNDLED_STUDENTS = ("fast", "pruned")  # bundled <model>-<suffix> folders tried as students of <model>
SCORE_SEED = 0  # held-out noise every candidate is scored on (hasten bench's seed; calibration uses 1000)
CONFIRM_SEED = 3000  # the third noise: the chosen recipe is confirmed here
STEP_LADDER = (2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50)
DEFAULT_SOLVERS = (
    "euler", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc:variant=bh1", "unipc:order=3", "plms:warmup=lower_order",
)  # fmt: skip
DEFAULT_SCHEDULES = ("auto", "karras", "logsnr", "time_uniform", "time_quadratic", "trailing")
QUANT_MODES = {"w8a8": (8, 8), "w4a8": (4, 8)}
STAGES = ("stock", "peers", "students", "plans", "tune", "caches", "quant", "timing", "confirm")


class OptimizeError(ValueError):
    """A search that cannot start as asked (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class OptimizeConfig(Config):
    """What ``hasten optimize`` searches and how it scores.

    Args:
        max_quality_loss: Largest relative FD change from the converged sampler's FD, either way (0.05 = 5%).
        max_rmse: Instead (models without a feature network) or as well: largest RMSE to the reference images.
        minutes: Wall-clock budget of the whole search, the reference solves included.
        guidance: Classifier-free guidance scale (None: the model's default).
        n: Images per evaluation (score and confirmation seeds each).
        reference_steps: Steps of the third-order reference solve (the converged sampler).
        solvers, schedules: The stock hasten solver specs and grids scanned.
        peers: Also scan diffusers' schedulers, and try the peer caches and torchao on the stock baseline.
        plans: Plan files or folders of plans (those for the model's weights are used).
        tune_share: Fraction of the budget for tuning plans below the fastest passing NFE (0: none).
        caches: Calibrate caches on the fastest passing samplers.
        exit_heads: Exit heads of the model's network (``hasten accelerate train-exits``): early exit joins the
            caches stage's techniques on the model's own samplers (the heads are for its weights only).
        quant: Quantisation modes tried (``"w8a8"``, ``"w4a8"``).
        students: Distilled students of the model (folders from ``hasten distill`` or bundled names), each a
            candidate at its own sampler; one distilled from other weights, or at another guidance scale, is refused.
        bundled_students: Also the bundled ``<model>-fast`` (a few-step student) and ``<model>-pruned`` (a pruned
            network, ``hasten prune``) when they were made from the model's weights.
        top_k: How many of the fastest passing recipes get caches and quantisation on top.
        timed: How many passing candidates are timed against the baseline.
        n_time: Images per timed run; ``timing_repeats`` paired runs each.
    """

    max_quality_loss: float = 0.05
    max_rmse: float | None = None
    minutes: float = 30.0
    guidance: float | None = None
    n: int = 200
    reference_steps: int = 100
    solvers: tuple[str, ...] = DEFAULT_SOLVERS
    schedules: tuple[str, ...] = DEFAULT_SCHEDULES
    peers: bool = True
    plans: tuple[str, ...] = ()
    tune_share: float = 0.25
    caches: bool = True
    exit_heads: str | None = None
    quant: tuple[str, ...] = ("w8a8", "w4a8")
    students: tuple[str, ...] = ()
    bundled_students: bool = True
    top_k: int = 3
    timed: int = 8
    n_time: int = 100
    timing_repeats: int = 3

    def __post_init__(self) -> None:
        def finite(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (open_low and value == low) or value > high:
                bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
                raise OptimizeError(f"{name} must be a finite number {bound}, got {value!r}")

        finite("max_quality_loss", self.max_quality_loss, 0.0, 10.0)
        if self.max_rmse is not None:
            finite("max_rmse", self.max_rmse, 0.0, open_low=True)
        finite("minutes", self.minutes, 0.0, 24 * 60.0, open_low=True)
        if self.guidance is not None:
            finite("guidance", self.guidance, 0.0, 1e4)
        finite("tune_share", self.tune_share, 0.0, 0.9)
        for name in ("n", "reference_steps", "top_k", "timed", "n_time", "timing_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptimizeError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n < 10:
            raise OptimizeError(f"n must be >= 10 images (FD needs samples), got {self.n}")
        unknown = sorted(set(self.quant) - set(QUANT_MODES))
        if unknown:
            raise OptimizeError(f"quant modes {unknown} are unknown; known: {', '.join(QUANT_MODES)}")
        from .solvers import get_solver, parse_solver

        for spec in self.solvers:
            try:
                name, options = parse_solver(spec)
                get_solver(name, **options)
            except (KeyError, TypeError, ValueError) as err:
                raise OptimizeError(f"solver spec {spec!r}: {err.args[0] if err.args else err}") from None
        from .recipe import RecipeError, student_recipe

        for student in self.students:
            try:
                student_recipe(student)  # not a student (or no such folder) fails now; its teacher in the search
            except RecipeError as err:
                raise OptimizeError(f"--student {student}: {err}") from None

    def protocol(self, fingerprint: str, guidance: float) -> dict[str, Any]:
        """What makes two evaluations of one recipe comparable: cached evaluations are keyed by it."""
        from .metrics.reference import REFERENCE_SOLVER

        return {"version": OPTIMIZE_VERSION, "fingerprint": fingerprint, "guidance": guidance, "n": self.n,
                "seed": SCORE_SEED, "reference": {**REFERENCE_SOLVER, "steps": self.reference_steps},
                "reference_state": "float64"}  # fmt: skip


@dataclasses.dataclass
class OptimizeResult:
    """What the search found: the chosen recipe (None when nothing met the budget) and everything measured."""

    recipe: Recipe | None
    chosen: dict[str, Any] | None
    baseline: dict[str, Any] | None
    best_stock: dict[str, Any] | None
    front: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    path: list[dict[str, Any]]
    budget: dict[str, Any]
    reference: dict[str, Any]
    closest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["recipe"] = None if self.recipe is None else self.recipe.to_dict()
        return data


class Optimizer:
    """One search on one loaded model; :func:`optimize` is the entry point. ``measure`` and ``time_pair``
    are the two places the world is touched (sampling + metrics, and the clock): tests replace them."""

    def __init__(
        self,
        model: Any,
        config: OptimizeConfig,
        work: pathlib.Path,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        from .metrics.features import FEATURE_NETS

        self.model = model
        self.config = config
        self.work = work
        self.on_event = on_event or (lambda kind, data: None)
        self.guidance = model.default_guidance if config.guidance is None else float(config.guidance)
        self.has_fd = model.info.data in FEATURE_NETS
        if not self.has_fd and config.max_rmse is None:
            raise OptimizeError(
                f"hasten has no feature network for {model.info.data!r} data, so no FD budget: give max_rmse (the "
                "largest RMSE to the reference images, pixels in [0, 1])"
            )
        self.started = distributed.clock()
        self.deadline = self.started + 60.0 * config.minutes
        self.spent: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.spent["reference"] = 0.0
        self.counts: dict[str, int] = dict.fromkeys(STAGES, 0)
        self.evaluations: dict[str, dict[str, Any]] = {}  # by recipe digest, this run's candidates
        self.eval_seconds: list[float] = []
        self.notes: list[str] = []
        protocol = config.protocol(model.fingerprint, self.guidance)
        key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
        from .metrics.quality import cache_dir

        self.cache_path = cache_dir() / "optimize" / f"{model.fingerprint[:16]}-{key}.json"
        self.cache: dict[str, dict[str, Any]] = {}
        if self.cache_path.exists():
            try:
                self.cache = json.loads(self.cache_path.read_text())["evaluations"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.notes.append(f"ignored a corrupt evaluation cache {self.cache_path}")
        self.references: dict[int, Any] = {}
        self.reference_fd: dict[int, float | None] = {}

    # -- the world ---------------------------------------------------------------------------------------

    def reference(self, seed: int) -> Any:
        if seed not in self.references:
            from .metrics.reference import reference_samples

            t0 = distributed.clock()
            images = reference_samples(self.model, self.config.n, seed=seed, guidance=self.guidance,
                                       steps=self.config.reference_steps)  # fmt: skip
            self.references[seed] = images
            self.reference_fd[seed] = self._fd(images)
            self.spent["reference"] += distributed.clock() - t0
        return self.references[seed]

    def _fd(self, images: Any) -> float | None:
        if not self.has_fd:
            return None
        from .metrics.quality import evaluate_images

        return float(evaluate_images(images, data=self.model.info.data)["fd"])

    def measure(self, recipe: Recipe, seed: int) -> dict[str, Any]:
        """Sample ``recipe`` on ``seed``'s noise and score it against the reference of that noise."""
        from .bench.runner import nfe_equivalent, sample_recipe
        from .metrics.reference import rmse

        reference = self.reference(seed)
        gen = sample_recipe(self.model, recipe, self.config.n, seed=seed)
        fd = self._fd(gen.images01)
        return {"fd": fd, "rmse_ref": rmse(gen.images01, reference), "nfe": gen.nfe, "seconds": gen.seconds,
                "nfe_equivalent": nfe_equivalent(gen, recipe)}  # fmt: skip

    def time_pair(self, base: Recipe, candidate: Recipe) -> tuple[list[float], list[float]]:
        """Seconds of alternating runs of ``base`` and ``candidate`` on the same noise (one warm-up each)."""
        from .bench.runner import sample_recipe

        n = self.config.n_time
        sample_recipe(self.model, base, min(n, 10), seed=SCORE_SEED)
        sample_recipe(self.model, candidate, min(n, 10), seed=SCORE_SEED)
        t_base, t_cand = [], []
        for _ in range(self.config.timing_repeats):
            t_base.append(sample_recipe(self.model, base, n, seed=SCORE_SEED).seconds)
            t_cand.append(sample_recipe(self.model, candidate, n, seed=SCORE_SEED).seconds)
        return t_base, t_cand

    # -- bookkeeping -------------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - distributed.clock()

    def typical_evaluation(self) -> float:
        return statistics.median(self.eval_seconds) if self.eval_seconds else 0.0

    def affordable(self, reserve: float = 0.0) -> bool:
        """Whether one more evaluation fits in the budget, keeping ``reserve`` seconds for what must follow."""
        return self.remaining() - reserve > self.typical_evaluation()

    def loss(self, scores: dict[str, Any], seed: int = SCORE_SEED) -> float | None:
        ref_fd = self.reference_fd.get(seed)
        return None if scores.get("fd") is None or not ref_fd else scores["fd"] / ref_fd - 1.0

    def passes(self, row: dict[str, Any]) -> bool:
        """Within the budget: FD within ``max_quality_loss`` of the reference's *either way* (at these sample
        sizes some solver errors score an FD below the converged sampler's, e.g. UniPC-bh1 at 4 NFE on the DiT
        at -5.6%: a departure from the model's distribution, not a gain), and the RMSE bound if given."""
        ok = True
        if self.has_fd:
            ok = row["quality_loss"] is not None and abs(row["quality_loss"]) <= self.config.max_quality_loss
        if self.config.max_rmse is not None:
            ok = ok and row["rmse_ref"] <= self.config.max_rmse
        return ok

    def evaluate(self, recipe: Recipe, stage: str) -> dict[str, Any]:
        """Score ``recipe`` on the held-out noise (cached by its digest); the row says whether it passes."""
        digest = recipe.digest()
        if digest in self.evaluations:
            return self.evaluations[digest]
        self.reference(SCORE_SEED)
        cached = self.cache.get(digest)
        t0 = distributed.clock()
        if cached is not None:
            scores = cached
        else:
            scores = self.measure(recipe, SCORE_SEED)
            self.cache[digest] = scores
            write_text_atomic(self.cache_path, json.dumps({"protocol": self.config.protocol(
                self.model.fingerprint, self.guidance), "evaluations": self.cache}) + "\n")  # fmt: skip
            self.eval_seconds.append(distributed.clock() - t0)
        row = {"digest": digest, "stage": stage, "label": recipe.describe(), "kind": recipe.kind,
               "recipe": recipe, **scores, "quality_loss": self.loss(scores), "cached": cached is not None}  # fmt: skip
        row["passed"] = self.passes(row)
        self.spent[stage] += distributed.clock() - t0
        self.counts[stage] += 1
        self.evaluations[digest] = row
        self.on_event("evaluation", row)
        return row

    def passing(self, *, kinds: tuple[str, ...] | None = None, stages: tuple[str, ...] | None = None) -> list[dict]:
        rows = [r for r in self.evaluations.values() if r["passed"]]
        if kinds is not None:
            rows = [r for r in rows if r["kind"] in kinds]
        if stages is not None:
            rows = [r for r in rows if r["stage"] in stages]
        return sorted(rows, key=lambda r: (r["nfe_equivalent"], r["seconds"], r["quality_loss"] or 0.0))

    def recipe(self, **fields: Any) -> Recipe:
        from .recipe import _model_ref

        return Recipe(model=_model_ref(self.model), fingerprint=self.model.fingerprint, guidance=self.guidance,
                      seed=SCORE_SEED, **fields)  # fmt: skip

    # -- stages ------------------------------------------------------------------------------------------

    def stock_families(self) -> list[dict[str, Any]]:
        from .bench.matrix import DISCRETE_SPACINGS
        from .bench.peers import peers_for
        from .solvers import parse_solver

        flow = self.model.info.objective == "flow"
        families = []
        for spec in self.config.solvers:
            name, options = parse_solver(spec)
            for schedule in self.config.schedules:
                if flow and schedule in DISCRETE_SPACINGS:
                    continue  # diffusers' timestep spacings exist for DDPM-type schedules only
                families.append({"solver": name, "options": options, "schedule": schedule, "library": "hasten"})
        if self.config.peers and self.model.folder is not None:
            for peer in peers_for(self.model.info.objective):
                families.append({"solver": peer, "options": {}, "schedule": "auto", "library": "diffusers"})
        return families

    def stage_stock(self) -> dict[str, Any] | None:
        """The fastest passing stock recipe (the baseline), found in two passes that assume quality does not fall
        with more steps: the lead families (each hasten solver on its default grid) climb the step ladder until
        one passes; every other family is then tried just below the best NFE so far, and goes lower only while
        it passes. Stock samplers of one network cost the same per call, so NFE orders their speed."""
        families = self.stock_families()
        lead = [f for f in families if f["library"] == "hasten" and f["schedule"] == "auto"] or families[:1]
        rest = [f for f in families if f not in lead]
        per_step: dict[int, float] = {}  # network calls per step, learned from each family's first run
        best = math.inf

        def below(i: int) -> int | None:  # the largest ladder step count whose NFE would beat ``best``
            steps = [s for s in STEP_LADDER if s * per_step.get(i, 1.0) < best]
            return max(steps) if steps else None

        def run(i: int, steps: int) -> dict[str, Any] | None:
            nonlocal best
            if not self.affordable(reserve=self.final_reserve()):
                self.notes.append(f"stock scan stopped before {families[i]['solver']} at {steps} steps: budget")
                return None
            row = self.evaluate(self.recipe(steps=steps, **families[i]), "stock")
            per_step[i] = row["nfe"] / steps
            if row["passed"] and row["nfe"] < best:
                best = row["nfe"]
            return row

        active = [families.index(f) for f in lead]
        for steps in STEP_LADDER:
            for i in list(active):
                if steps * per_step.get(i, 1.0) >= best:
                    active.remove(i)  # cannot beat what already passes
                    continue
                row = run(i, steps)
                if row is None:
                    return self.stock_best()
                if row["passed"]:
                    active.remove(i)
            if not active:
                break
        for i in (families.index(f) for f in rest):
            steps = below(i)
            while steps is not None:
                row = run(i, steps)
                if row is None:
                    return self.stock_best()
                if not row["passed"]:
                    break  # fails just below the best: fewer steps only lose more
                steps = below(i)
        return self.stock_best()

    def student_recipes(self) -> list[Recipe]:
        """The students to try: those named (refused when distilled from other weights or at another guidance
        scale than this search's), then the bundled ``<model>-fast`` when it is a student of these weights."""
        from .models.zoo import bundled_models
        from .recipe import RecipeError, student_recipe

        recipes = []
        for name in self.config.students:
            try:
                recipe = student_recipe(name, teacher_fingerprint=self.model.fingerprint, teacher=self.model.info.name,
                                        seed=SCORE_SEED)  # fmt: skip
            except RecipeError as err:
                raise OptimizeError(f"--student {name}: {err}") from None
            learned = recipe.student["teacher_guidance"]
            if learned != self.guidance:
                raise OptimizeError(
                    f"--student {name} learned the teacher's samples at guidance {learned:g}; this search is at "
                    f"guidance {self.guidance:g} (--guidance)"
                )
            recipes.append(recipe)
        for suffix in BUNDLED_STUDENTS:
            bundled = f"{self.model.info.name}-{suffix}"
            if not self.config.bundled_students or bundled not in bundled_models():
                continue
            try:
                recipe = student_recipe(bundled, teacher_fingerprint=self.model.fingerprint, seed=SCORE_SEED)
            except RecipeError as err:
                self.notes.append(f"skipped the bundled {bundled}: {err}")
                continue
            if recipe.student["teacher_guidance"] != self.guidance:
                self.notes.append(f"skipped the bundled {bundled}: distilled at guidance "
                                  f"{recipe.student['teacher_guidance']:g}, not {self.guidance:g}")  # fmt: skip
            elif recipe not in recipes:
                recipes.append(recipe)
        return recipes

    def stage_students(self, baseline: dict[str, Any] | None = None) -> None:
        """Each student at its own sampler, scored like a stock recipe against this model's converged sampler; a
        pruned model (a full sampler's network, not a few-step one) also at the baseline's sampler."""
        for recipe in self.student_recipes():
            candidates = [recipe]
            base = None if baseline is None else baseline["recipe"]
            if recipe.student["method"] == "prune" and base is not None and base.library == "hasten":
                at_baseline = recipe.replace(solver=base.solver, options=base.options, schedule=base.schedule,
                                             steps=base.steps)  # fmt: skip
                if at_baseline != recipe:
                    candidates.append(at_baseline)
            for candidate in candidates:
                if not self.affordable(reserve=self.final_reserve()):
                    self.notes.append(f"student {candidate.describe()} skipped: budget")
                    continue
                self.evaluate(candidate, "students")

    def model_for(self, recipe: Recipe) -> Any:
        """The full-precision network ``recipe`` samples: this model, or the student it names."""
        from .bench.runner import recipe_model

        return recipe_model(self.model, recipe)

    def stock_best(self) -> dict[str, Any] | None:
        rows = self.passing(stages=("stock",))
        return rows[0] if rows else None

    def stage_peers(self, baseline: dict[str, Any]) -> None:
        """What the peers add to the stock baseline: diffusers' cache hook / DeepCache package, torchao."""
        if not self.config.peers or baseline["recipe"].library != "hasten":
            return
        from .bench.cache_peers import cache_peers_for
        from .bench.quant_peers import quant_peers_available

        base: Recipe = baseline["recipe"]
        for peer in cache_peers_for(self.model.network)[0]:
            if self.affordable(reserve=self.final_reserve()):
                self.evaluate(base.replace(cache_peer=peer), "peers")
        for peer in quant_peers_available():
            if self.affordable(reserve=self.final_reserve()):
                self.evaluate(base.replace(quant_peer=peer), "peers")

    def plan_files(self) -> list[pathlib.Path]:
        files: list[pathlib.Path] = []
        for entry in self.config.plans:
            path = pathlib.Path(entry)
            files += sorted(path.glob("*.json")) if path.is_dir() else [path]
        return files

    def stage_plans(self) -> None:
        from .tune.plan import PlanError, load_plan

        for path in self.plan_files():
            if path.name.endswith(".recipe.json") or path.name.endswith(".search.json"):
                continue
            try:
                plan = load_plan(path)
            except PlanError:
                if path.parent in {pathlib.Path(p) for p in self.config.plans}:
                    continue  # a folder may hold other JSON files
                raise
            if plan.fingerprint and plan.fingerprint != self.model.fingerprint:
                continue  # a folder of plans for several models: these are for others
            if plan.guidance != self.guidance:
                self.notes.append(f"skipped {path.name}: tuned for guidance {plan.guidance:g}")
                continue
            if not self.statistics_ready(plan) and self.remaining() < 0.5 * 60.0 * self.config.minutes:
                self.notes.append(f"skipped {path.name}: its solver's model statistics are not cached yet (estimating "
                                  "them takes minutes) and less than half the budget is left")  # fmt: skip
                continue
            if self.affordable(reserve=self.final_reserve()):
                self.evaluate(self.recipe(plan=plan, provenance={"plan_file": str(path)}), "plans")

    def statistics_ready(self, plan: Any) -> bool:
        """Whether the plan's solver runs without a one-time estimate first (DPM-Solver-v3's ``ems="auto"``)."""
        if plan.solver != "dpm_solver_v3" or plan.options.get("ems", "auto") != "auto":
            return True
        from .tune.ems import ems_path_for_model

        return ems_path_for_model(self.model, self.guidance, compute=False).exists()

    def stage_tune(self) -> None:
        """Plans searched at NFE budgets below the fastest passing one, while the tuning share lasts."""
        if self.config.tune_share <= 0:
            return
        from .tune import TuneConfig, TuneError
        from .tune import tune as run_tune

        share_end = distributed.clock() + self.config.tune_share * 60.0 * self.config.minutes
        folder = self.work / "plans"
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            best = self.passing(kinds=("stock", "plan"))
            if not best:
                return
            nfe = int(best[0]["nfe"]) - 1
            left = min(share_end - distributed.clock(), self.remaining() - self.final_reserve())
            if nfe < 2 or left < 3 * max(self.typical_evaluation(), 1.0):
                return
            out = folder / f"nfe{nfe}.json"
            t0 = distributed.clock()
            config = TuneConfig(nfe=nfe, minutes=max(left / 60.0 * 0.6, 0.1), guidance=self.guidance, use_v3=False,
                                n_heldout=min(self.config.n, 100), reference_steps=self.config.reference_steps,
                                fd_candidates=2 if self.has_fd else 0)  # fmt: skip
            try:
                plan = run_tune(self.model, config, out, resume=True, progress=False)
            except TuneError as err:
                self.notes.append(f"tuning at NFE {nfe} stopped: {err}")
                return
            self.spent["tune"] += distributed.clock() - t0
            self.counts["tune"] += 1
            row = self.evaluate(self.recipe(plan=plan, provenance={"plan_file": str(out)}), "plans")
            if not row["passed"]:
                return

    def bases(self) -> list[Recipe]:
        """The ``top_k`` fastest passing hasten samplers (no cache, no quantisation, no peer), students included."""
        rows = [r for r in self.passing(kinds=("stock", "plan", "student")) if r["recipe"].library == "hasten"]
        return [r["recipe"] for r in rows[: self.config.top_k]]

    def stage_caches(self) -> None:
        if not self.config.caches:
            return
        from .accel.calibrate import calibration_setting, ladders, techniques_for

        for base in self.bases():
            model = self.model_for(base)  # a student's cache is calibrated on the student's network
            setting = calibration_setting(model, base)
            heads = self.config.exit_heads if model is self.model else None  # heads fit one network's weights
            for technique in techniques_for(model.network, exit_heads=heads):
                for ladder in ladders(technique, model.network, exit_heads=heads):
                    for config in ladder:
                        if not self.affordable(reserve=self.final_reserve()):
                            self.notes.append("cache ladders stopped: budget")
                            return
                        if not self.evaluate(base.replace(cache=config, cache_setting=setting), "caches")["passed"]:
                            break  # more reuse along this ladder only loses more

    def quantized_folder(self, mode: str, model: Any = None) -> pathlib.Path:
        """Quantised weights of ``model`` (default: this one; a student's) for ``mode``, made once per network
        (cached beside the evaluations). A student is calibrated on its own sampler's trajectories."""
        model = self.model if model is None else model
        folder = self.cache_path.parent / "quant" / f"{model.info.name}-{model.fingerprint[:12]}-{mode}"
        if distributed.sharding():  # rank 0 makes the folder alone; the others wait, then read it
            if not distributed.main_has(folder / "hasten.json") and distributed.is_main():
                with distributed.local():
                    self._quantize(model, mode, folder)
            distributed.barrier()
        elif not (folder / "hasten.json").exists():
            self._quantize(model, mode, folder)
        return folder

    def _quantize(self, model: Any, mode: str, folder: pathlib.Path) -> None:
        from .quant import QuantConfig, quantize_to_folder
        from .recipe import _model_ref

        weights, activations = QUANT_MODES[mode]
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        own = model.default_sampler  # a student's: calibrate where it samples
        sampler = {"solver": own["solver"], "steps": int(own["steps"])} if own else {"steps": 10}
        quantize_to_folder(_model_ref(model), QuantConfig(weights=weights, activations=activations), tmp,
                           n=64, guidance=self.guidance, **sampler)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def stage_quant(self) -> None:
        if not self.config.quant or self.model.folder is None:
            return
        from .models.zoo import folder_fingerprint

        # the fastest passing samplers, and each one's fastest passing cache
        tops = self.bases()
        cached = {}
        for row in self.passing(kinds=("cache",), stages=("caches",)):
            key = row["recipe"].replace(cache=None, cache_setting={}).digest()
            cached.setdefault(key, row["recipe"])
        under = tops + [cached[b.digest()] for b in tops if b.digest() in cached]
        for mode in self.config.quant:
            if not self.affordable(reserve=self.final_reserve() + 4 * self.typical_evaluation()):
                self.notes.append(f"quantisation {mode} skipped: budget")
                return
            for recipe in under:
                if self.affordable(reserve=self.final_reserve()):
                    t0 = distributed.clock()
                    folder = self.quantized_folder(mode, self.model_for(recipe))
                    self.spent["quant"] += distributed.clock() - t0
                    fingerprint = folder_fingerprint(folder)
                    self.evaluate(recipe.replace(quant=str(folder), quant_fingerprint=fingerprint), "quant")

    def final_reserve(self) -> float:
        """Seconds kept for timing and confirmation: their estimate from the evaluations so far, at most a third
        of the budget (timing then covers fewer candidates)."""
        per_run = self.typical_evaluation() * self.config.n_time / self.config.n
        timing = self.config.timed * (2 * self.config.timing_repeats + 2) * per_run
        return min(timing + 2 * self.typical_evaluation(), 20.0 * self.config.minutes)

    def check_budget(self) -> dict[str, float]:
        """Refuse a budget too short for the reference solves and one evaluation, from a timed probe of the
        network here (a few seconds); returns the estimate."""
        from .generate import generate
        from .metrics.reference import reference_path

        probe_n, probe_steps = min(self.config.n, 16), 2
        generate(self.model, 2, steps=1, guidance=self.guidance)  # warm-up
        seconds = generate(self.model, probe_n, steps=probe_steps, guidance=self.guidance).seconds
        per_call = seconds / (probe_n * probe_steps)  # seconds per image per network call
        references = sum(
            self.config.n * self.config.reference_steps * per_call
            for seed in (SCORE_SEED, CONFIRM_SEED)
            if not reference_path(self.model, self.config.n, seed=seed, guidance=self.guidance,
                                  steps=self.config.reference_steps)[0].exists()
        )  # fmt: skip
        evaluation = self.config.n * 5 * per_call
        estimate = {"references": references, "evaluation": evaluation, "per_image_call": per_call}
        if references + 2 * evaluation > 60.0 * self.config.minutes:
            raise OptimizeError(
                f"a budget of {self.config.minutes:g} minutes is too short here: the reference solves "
                f"({self.config.reference_steps} steps, {self.config.n} images, two seeds) and a first evaluation "
                f"take about {(references + 2 * evaluation) / 60:.1f} minutes on this machine; give more --minutes "
                "or fewer images (--n)"
            )
        return estimate

    def stage_timing(self, baseline: Recipe) -> list[dict[str, Any]]:
        """Paired timing of the fastest passing candidates against ``baseline``; returns them, timed."""
        candidates = sorted(self.passing(), key=lambda r: r["seconds"])
        chosen: list[dict[str, Any]] = [self.evaluations[baseline.digest()]]  # its own speed-up: the timing noise
        for row in candidates:  # the fastest of each stage first, then the rest by their scoring runs
            if row["stage"] not in {c["stage"] for c in chosen}:
                chosen.append(row)
        chosen += [r for r in candidates if r not in chosen]
        timed = []
        for row in chosen[: self.config.timed]:
            if timed and self.remaining() < 2 * self.typical_evaluation():
                self.notes.append("timing stopped: budget")
                break
            t0 = distributed.clock()
            t_base, t_cand = self.time_pair(baseline, row["recipe"])
            base, cand = statistics.median(t_base), statistics.median(t_cand)
            row.update({"seconds_per_image": cand / self.config.n_time, "speedup": base / cand,
                        "seconds_timed": t_cand, "baseline_seconds_timed": t_base})  # fmt: skip
            self.spent["timing"] += distributed.clock() - t0
            self.counts["timing"] += 1
            self.on_event("timed", row)
            timed.append(row)
        return timed

    def confirm(self, row: dict[str, Any]) -> bool:
        t0 = distributed.clock()
        self.reference(CONFIRM_SEED)
        scores = self.measure(row["recipe"], CONFIRM_SEED)
        check = {**scores, "quality_loss": self.loss(scores, CONFIRM_SEED)}
        row["confirmation"] = {"seed": CONFIRM_SEED, **check, "reference_fd": self.reference_fd[CONFIRM_SEED],
                               "passed": self.passes(check)}  # fmt: skip
        self.spent["confirm"] += distributed.clock() - t0
        self.counts["confirm"] += 1
        self.on_event("confirmation", row)
        return row["confirmation"]["passed"]

    # -- the whole search --------------------------------------------------------------------------------

    def run(self) -> OptimizeResult:
        self.reference(SCORE_SEED)
        baseline = self.stage_stock()
        if baseline is not None:
            self.stage_peers(baseline)
        self.stage_students(baseline)
        self.stage_plans()
        self.stage_tune()
        self.stage_caches()
        self.stage_quant()
        rows = list(self.evaluations.values())
        passing = self.passing()
        if not passing:
            return self._result(None, [], baseline, rows)
        timing_base = baseline["recipe"] if baseline is not None else passing[0]["recipe"]
        timed = self.stage_timing(timing_base)
        chosen = None
        for row in sorted(timed, key=lambda r: -r["speedup"]):
            if self.confirm(row):
                chosen = row
                break
            if self.remaining() < self.typical_evaluation():
                break
        return self._result(chosen, timed, baseline, rows)

    def _result(self, chosen, timed: list[dict[str, Any]], baseline, rows: list[dict[str, Any]]) -> OptimizeResult:
        from .bench.report import pareto_front

        for row in rows:  # the budget is two-sided: the front is on the distance from the reference's FD
            row["quality_distance"] = abs(row["quality_loss"]) if row["quality_loss"] is not None else row["rmse_ref"]
        front = pareto_front(timed, "seconds_per_image", "quality_distance" if self.has_fd else "rmse_ref")
        stock_rows = [r for r in timed if r["stage"] in ("stock", "peers")]
        best_stock = max(stock_rows, key=lambda r: r["speedup"]) if stock_rows else None
        path = self._path(timed)
        total = distributed.clock() - self.started
        budget = {"minutes": self.config.minutes, "seconds_used": total,
                  "seconds_by_stage": {k: v for k, v in self.spent.items() if v},
                  "evaluations_by_stage": {k: v for k, v in self.counts.items() if v},
                  "cached_evaluations": sum(1 for r in rows if r["cached"]), "notes": self.notes}  # fmt: skip
        from .metrics.reference import REFERENCE_SOLVER

        reference = {**REFERENCE_SOLVER, "steps": self.config.reference_steps, "fd": self.reference_fd,
                     "n": self.config.n, "seeds": {"score": SCORE_SEED, "confirm": CONFIRM_SEED}}  # fmt: skip
        closest = None
        if chosen is None and rows:

            def distance(r: dict[str, Any]) -> float:
                loss = r["quality_loss"] if self.has_fd else None
                return abs(loss) if loss is not None else (r["rmse_ref"] if not self.has_fd else math.inf)

            closest = _public(min(rows, key=distance))
        recipe = None
        if chosen is not None:
            provenance = {"made_by": "hasten optimize", "scores": _public(chosen), "budget": budget,
                          "baseline": None if baseline is None else baseline["label"]}  # fmt: skip
            recipe = chosen["recipe"].replace(provenance={**chosen["recipe"].provenance, **provenance})
        return OptimizeResult(
            recipe=recipe, chosen=None if chosen is None else _public(chosen),
            baseline=None if baseline is None else _public(baseline),
            best_stock=None if best_stock is None else _public(best_stock), front=[_public(r) for r in front],
            evaluations=[_public(r, recipe="speedup" in r) for r in rows], path=path, budget=budget,
            reference=reference, closest=closest,
        )  # fmt: skip

    def _path(self, timed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The fastest timed passing recipe as each technique is added: what each contributed."""
        stages = ("stock", "peers", "students", "plans", "caches", "quant")
        names = ("stock sampler", "+ peers' cache / torchao", "+ distilled students", "+ tuned plans", "+ caches",
                 "+ quantisation")  # fmt: skip
        steps = [(name, stages[: i + 1]) for i, name in enumerate(names)]
        path, last = [], None
        for name, stages in steps:
            rows = [r for r in timed if r["stage"] in stages and r.get("confirmation", {}).get("passed", True)]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["speedup"])
            if last is None or best["digest"] != last:
                path.append({"step": name, **_public(best)})
                last = best["digest"]
        return path


def _public(row: dict[str, Any], *, recipe: bool = True) -> dict[str, Any]:
    """A row as plain data: the recipe as its JSON (``recipe=False``: its digest and label only, for the many
    untimed evaluations, which the evaluation cache keeps in full)."""
    return {k: (v.to_dict() if isinstance(v, Recipe) else v) for k, v in row.items() if recipe or k != "recipe"}


def check_output(out: pathlib.Path, *, resume: bool, force: bool) -> pathlib.Path:
    """Refuse an existing output (unless resuming or forcing) or one that cannot be written; the work folder."""
    work = out.with_name(out.name.removesuffix(".json") + ".optimize")
    if out.is_dir():
        raise OptimizeError(f"--out {out} is a folder; give the recipe file to write (e.g. {out / 'recipe.json'})")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise OptimizeError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OptimizeError(f"--out {out}: the folder {parent} is not writable")
    if (out.exists() or work.exists()) and not (resume or force):
        raise OptimizeError(
            f"{out} (or its work folder {work.name}) exists; pass --resume to continue that search (its evaluations "
            "are reused), --force to search again and replace it, or another --out"
        )
    return work


def optimize(
    model: Any,
    config: OptimizeConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    force: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> OptimizeResult:
    """Find the fastest recipe for ``model`` within ``config``'s quality budget and write it to ``out``.

    Writes ``out`` (the recipe, only when one met the budget and was confirmed), and in the work folder
    ``OUT.optimize/``: ``optimize.json`` (every evaluation, the timed front, the path, the budget) and
    ``report.html``. Returns the :class:`OptimizeResult` either way.
    """
    out = pathlib.Path(out)
    work = check_output(out, resume=resume, force=force)
    optimizer = Optimizer(model, config, work, on_event=on_event)
    optimizer.check_budget()  # before anything is written
    if force and out.exists() and distributed.is_main():
        out.unlink()
    work.mkdir(parents=True, exist_ok=True)
    result = optimizer.run()
    write_text_atomic(work / "optimize.json", json.dumps({"config": config.to_dict(), **result.to_dict()},
                                                         indent=2, default=str) + "\n")  # fmt: skip
    from .optimize_report import render_optimize

    render_optimize(result, work / "report.html", model_name=model.info.name, config=config)
    if result.recipe is not None:
        result.recipe = _with_own_folders(result.recipe, out)
        save_recipe(result.recipe, out)
    return result


def _with_own_folders(recipe: Recipe, out: pathlib.Path) -> Recipe:
    """The recipe with its quantised weights copied beside ``out`` (``OUT.w8a8/``) when they lie in the search's
    cache: a written recipe and the folders it names move together, and a cache clean-up cannot break it."""
    if recipe.quant is None:
        return recipe
    source = pathlib.Path(recipe.quant)
    from .metrics.quality import cache_dir

    if cache_dir().resolve() not in source.resolve().parents:
        return recipe
    target = out.with_name(out.name.removesuffix(".json") + "." + source.name.rsplit("-", 1)[-1])
    if distributed.is_main():  # under torchrun rank 0 copies; every rank names the copy
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    distributed.barrier()
    return recipe.replace(quant=str(target))

"""``hasten tune``: a plan for one model at an exact NFE, searched on one noise seed and scored on another.

Proxy objective: RMSE (pixels in [0, 1]) of the plan's samples to a high-accuracy solve from the same noise
(:func:`hasten.metrics.reference.reference_samples`, cached on disk), on ``n_search`` images drawn with
``search_seed``. The held-out score, the only one reported as the plan's quality, uses ``heldout_seed``
(by default the seed ``hasten bench`` uses, so the bench's reference solve is shared) together with FD for
MNIST models, for the plan and for the best stock configuration the search started from.

The search state (every evaluation, memoised) is written atomically beside the plan after each
evaluation: rerun with ``resume=True`` and it replays those instantly and continues, losing at most the
evaluation that was running.

With ``skip_cost`` the search is joint (AutoDiffusion): ``nfe`` steps whose per-step block skips
(:mod:`hasten.accel.skip`) bring the plan's NFE-equivalent cost (FLOP-weighted, shares measured once on the
network) within ``skip_cost``; the stock starts carry deterministic skip patterns within that budget.

With ``student`` (a pruned or distilled student of the model) and ``student_cost``, the plan is a model assembly
(:mod:`hasten.accel.assembly`): after the search, the steps the student runs are chosen greedily on the search
images (each round adds the step whose swap raises the proxy error least) until the plan's NFE-equivalent cost
(the student's calls weighted by their FLOP share) is within ``student_cost``; the fit stage, if any, then fits
the weights and levels through the assembled sampler, so the steps adapt to the student's errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import warnings
from typing import Any

import numpy as np
import torch

from .. import distributed
from .._io import write_text_atomic
from ..config import Config
from ..generate import generate, guided_denoiser
from ..metrics.features import FEATURE_NETS
from ..metrics.reference import REFERENCE_SOLVER, reference_samples, rmse
from ..models.zoo import LoadedModel
from ..progress import BudgetProgress
from ..schedules.grids import get_sigmas
from ..schedules.noise import FlowMatching, VPDiscrete
from .fit import FIT_VERSION, LR_SCHEDULES, FitConfig, fit_weights
from .plan import Plan, PlanError, plan_from_stock, save_plan
from .search import PREDICTIONS, Candidate, budget_pattern, candidate_from_plan, search

__all__ = ["STOCK_GRIDS", "STOCK_SOLVERS", "STOCK_V3", "TuneConfig", "TuneError", "stock_plans", "tune"]

# "trailing" (diffusers' 999, 799, ... then 0, for discrete schedules) spends no model call at sigma_min: at
# 5 NFE on mnist-unet it is the best stock grid by far (DPM-Solver-v3 0.086 against 0.160 on time_quadratic).
STOCK_GRIDS = ("auto", "karras", "logsnr", "time_uniform", "time_quadratic", "trailing")
DISCRETE_ONLY_GRIDS = ("trailing", "leading", "linspace")
# Stock multistep solvers that are points of the search space (see search.candidate_from_plan).
STOCK_SOLVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dpmpp_2m", {}),
    ("unipc", {"order": 2, "variant": "bh2"}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh2"}),
    ("unipc", {"order": 3, "variant": "bh1"}),
)


STOCK_V3: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dpm_solver_v3", {"ems": "auto", "order": 2}),
    ("dpm_solver_v3", {"ems": "auto", "order": 3}),
)


class TuneError(ValueError):
    """Settings a search cannot run with (the message says what is allowed)."""


@dataclasses.dataclass(frozen=True)
class TuneConfig(Config):
    """What ``hasten tune`` searches and how it scores.

    Args:
        nfe: Exact denoiser calls per sample (= steps; the last step lands on sigma = 0). At least 2.
        minutes: Evaluation-time budget of the search (a resumed search counts its earlier part).
        guidance: Classifier-free guidance scale the plan is tuned for.
        n_search: Images per proxy evaluation.
        search_seed: Noise seed of the search batch (must differ from ``heldout_seed``).
        heldout_seed: Noise seed of the held-out scores (``hasten bench`` uses 0).
        validation_seed: Noise seed of the final check of the searched plan against the best stock start
            (``n_search`` images); the stock start is returned if the plan does not win there.
        n_heldout: Images for the held-out scores.
        reference_steps: Steps of the third-order reference solve the RMSE is measured against.
        seed: Seed of the search's own random choices.
        max_evaluations: Optional cap on evaluations (tests, reproducible short runs).
        fd_candidates: Full-objective stage (MNIST models): how many of the best proxy candidates get an FD
            evaluation (half by proxy rank, half by a learned FD predictor); 0 skips the stage.
        n_fd: Images per FD evaluation (search seed).
        use_v3: Include DPM-Solver-v3 (its statistics are estimated once per model and cached) both as
            stock starts and as a parameterisation the search may choose.
        fit_iterations: Fit stage (0 skips it): Adam iterations fitting ``learned_multistep`` weights (on the
            denoised estimates and on the state) and the interior levels, from DPM-Solver++(2M) or DDIM on the chosen
            plan's or the best stock start's grid, to the reference solve of ``n_fit`` images of the search seed;
            the best weights on the validation seed are kept, and they replace the plan only if they beat it
            there (:mod:`hasten.tune.fit`).
        fit_lr: Adam's learning rate for the fit (its first; see ``fit_lr_schedule``).
        fit_lr_schedule: ``"cosine"`` (decays to 5% of ``fit_lr`` at the last iteration) or ``"constant"``.
        n_fit: Training images of the fit.
        fit_every: Iterations between validations (and checkpoints) of the fit.
        skip_cost: Per-step architecture search (None: off): the plan takes ``nfe`` steps and skips blocks per step
            so that its NFE-equivalent cost (calls weighted by the FLOP share they keep) is at most this, which
            must be below ``nfe``. Not combined with the fit stage.
        student: Per-step model assembly (None: off): a student of the model (bundled name or model folder; pruned
            or distilled from the model's weights) that runs some of the ``nfe`` steps; needs ``student_cost``.
        student_cost: The assembled plan's largest NFE-equivalent cost (the student's calls count their FLOP share
            of a model call), below ``nfe``; decides how many steps the student runs.
    """

    nfe: int = 5
    minutes: float = 10.0
    guidance: float = 1.0
    n_search: int = 64
    search_seed: int = 1000
    heldout_seed: int = 0
    validation_seed: int = 2000
    n_heldout: int = 100
    reference_steps: int = 100
    seed: int = 0
    max_evaluations: int | None = None
    fd_candidates: int = 6
    n_fd: int = 200
    use_v3: bool = True
    fit_iterations: int = 0
    fit_lr: float = 0.01
    fit_lr_schedule: str = "cosine"
    n_fit: int = 128
    fit_every: int = 25
    skip_cost: float | None = None
    student: str | None = None
    student_cost: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.nfe, int) or self.nfe < 2:
            raise TuneError(f"nfe must be an integer >= 2 (plans end with a step onto sigma = 0), got {self.nfe!r}")
        if not 0 < self.minutes < math.inf:
            raise TuneError(f"minutes must be a finite number > 0, got {self.minutes}")
        if not 0 <= self.guidance < math.inf:
            raise TuneError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.fd_candidates < 0 or self.n_fd < 10 or self.reference_steps < 1:
            raise TuneError(
                f"fd_candidates must be >= 0 (0: proxy only), n_fd >= 10 and reference_steps >= 1; got "
                f"{self.fd_candidates}, {self.n_fd} and {self.reference_steps}"
            )
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise TuneError(f"max_evaluations must be >= 1 (or None), got {self.max_evaluations}")
        if self.n_search < 2 or self.n_heldout < 10:
            raise TuneError(f"n_search must be >= 2 and n_heldout >= 10, got {self.n_search} and {self.n_heldout}")
        if self.fit_iterations < 0 or self.fit_every < 1 or not self.fit_lr > 0 or self.n_fit < 2:
            raise TuneError(
                f"fit_iterations must be >= 0, fit_every >= 1, fit_lr > 0 and n_fit >= 2; got {self.fit_iterations}, "
                f"{self.fit_every}, {self.fit_lr} and {self.n_fit}"
            )
        if self.fit_lr_schedule not in LR_SCHEDULES:
            raise TuneError(f"fit_lr_schedule must be one of {LR_SCHEDULES}, got {self.fit_lr_schedule!r}")
        if self.skip_cost is not None:
            if not (isinstance(self.skip_cost, int | float) and 0 < self.skip_cost < self.nfe):
                raise TuneError(
                    f"skip_cost must be a number in (0, nfe={self.nfe}) (NFE-equivalents; at nfe or above nothing "
                    f"needs skipping), got {self.skip_cost!r}"
                )
            if self.fit_iterations > 0:
                raise TuneError(
                    "skip_cost (per-step block skips) cannot be combined with the fit stage (fit_iterations)"
                )
        if (self.student is None) != (self.student_cost is None):
            raise TuneError("student and student_cost go together: name the student and the plan's largest "
                            "NFE-equivalent cost (--student, --student-cost)")  # fmt: skip
        if self.student is not None:
            if not isinstance(self.student, str) or not self.student:
                raise TuneError(f"student must name a model (bundled name or folder), got {self.student!r}")
            cost = self.student_cost
            if isinstance(cost, bool) or not (isinstance(cost, int | float) and 0 < cost < self.nfe):
                raise TuneError(f"student_cost must be a number in (0, nfe={self.nfe}) (NFE-equivalents; at nfe or "
                                f"above the student need run no step), got {cost!r}")  # fmt: skip
            if self.skip_cost is not None:
                raise TuneError("a plan takes per-step block skips (skip_cost) or a per-step student (student), "
                                "not both")  # fmt: skip
        seeds = (self.search_seed, self.validation_seed, self.heldout_seed)
        if len(set(seeds)) != 3:
            raise TuneError(f"search_seed, validation_seed and heldout_seed must all differ, got {seeds}")


def stock_plans(model: LoadedModel, nfe: int, *, use_v3: bool = False) -> list[tuple[str, Plan]]:
    """The stock configurations at ``nfe`` that the search starts from, labelled ``solver[options] (grid)``."""
    schedule = model.schedule
    out: dict[tuple, tuple[str, Plan]] = {}
    solvers = STOCK_SOLVERS + (STOCK_V3 if use_v3 else ())
    for grid in STOCK_GRIDS:
        if grid in ("time_uniform", "time_quadratic") and isinstance(schedule, FlowMatching):
            continue  # the flow 'auto' grid is uniform in time already
        if grid in DISCRETE_ONLY_GRIDS and not isinstance(schedule, VPDiscrete):
            continue  # timestep spacings need a discrete (DDPM-type) schedule
        sigmas = tuple(get_sigmas(grid, nfe, schedule).tolist())
        for name, options in solvers:
            plan = plan_from_stock(sigmas, name, **options)
            key = (sigmas, name, tuple(sorted(options.items())))
            opts = ",".join(f"{k}={v}" for k, v in options.items())
            out.setdefault(key, (f"{name}{f'[{opts}]' if opts else ''} ({grid})", plan))
    return list(out.values())


def _differences(saved: dict[str, Any], identity: dict[str, Any]) -> str:
    """``"n_search 4 -> 5, model 'a' -> 'b'"``: what differs between a saved search and this one."""
    old_config, new_config = saved.get("config") or {}, identity["config"]
    changed = [f"{k} {old_config.get(k)!r} -> {new_config.get(k)!r}" for k in sorted({*old_config, *new_config})
               if old_config.get(k) != new_config.get(k)]  # fmt: skip
    changed += [f"{k} {saved.get(k)!r} -> {identity[k]!r}" for k in ("model", "fingerprint")
                if saved.get(k) != identity[k]]  # fmt: skip
    return ", ".join(changed)


def _state_path(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(out.name + ".search.json")


def tune(
    model: LoadedModel,
    config: TuneConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
) -> Plan:
    """Search a plan for ``model`` and write it to ``out`` (JSON); returns it. See the module docstring."""
    out = pathlib.Path(out)
    state_path = _state_path(out)
    # What a resumed search must share with the saved one: everything but the budget (more time may be given)
    # and the fit stage's settings (checked against the fit's own checkpoint below; a fit may be added later).
    fit_keys = ("fit_iterations", "fit_lr", "fit_lr_schedule", "n_fit", "fit_every")
    settings = {k: v for k, v in config.to_dict().items() if k not in ("minutes", "max_evaluations", *fit_keys)}
    for optional in ("skip_cost", "student", "student_cost"):  # searches saved before these resume unchanged
        if settings[optional] is None:
            settings.pop(optional)
    fit_settings = {k: getattr(config, k) for k in fit_keys if k != "fit_iterations"}
    identity = {"config": settings, "model": model.info.name, "fingerprint": model.fingerprint}
    cache: dict[str, dict[str, float]] = {}  # proxy evaluations by candidate key
    fd_cache: dict[str, float] = {}  # FD of the full-objective stage by candidate key
    fit_state: dict[str, Any] | None = None  # the fit stage's checkpoint
    assembly_state: dict[str, Any] = {}  # the student-step stage's evaluations
    if state_path.exists() or out.exists():
        if not resume:
            raise TuneError(
                f"{out} (or its search state) exists; pass --resume to continue that search, or use another --out"
            )
        if state_path.exists():
            saved = json.loads(state_path.read_text())
            if {k: saved.get(k) for k in identity} != identity:
                raise TuneError(
                    f"{state_path} belongs to a search with other settings or another model "
                    f"({_differences(saved, identity)}); resume with those, or use another --out"
                )
            cache, fd_cache = saved["cache"], saved.get("fd", {})
            fd_cache.update(cache.pop("_fd", {}))  # where states of earlier versions kept their FDs
            fit_state = saved.get("fit")
            assembly_state = saved.get("assembly") or {}
            if fit_state is not None and fit_state.get("version") != FIT_VERSION:
                warnings.warn(
                    f"{state_path} holds a fit made by an earlier hasten (another loss and solver family); the "
                    "search is resumed and the fit starts again", stacklevel=2,
                )  # fmt: skip
                fit_state = None
            if fit_state is not None and fit_state.get("settings") != fit_settings:
                raise TuneError(
                    f"{state_path} holds a fit with other settings ({fit_state.get('settings')}); resume it with "
                    "those, or use another --out"
                )
    if config.guidance != 1.0 and model.unconditional() is None:
        raise TuneError(f"guidance {config.guidance:g} needs a model with an unconditional branch; {model.info.name!r} "
                        "has none")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.info.name, "fingerprint": model.fingerprint, "guidance": config.guidance}
    sigma_max = float(model.schedule.sigma_max)
    log_max = math.log(sigma_max)
    log_min = math.log(float(model.schedule.sigma_min))

    shares, blocks = None, None
    if config.skip_cost is not None:
        from ..accel.skip import block_flop_shares, skippable_blocks

        blocks = [path for path, _ in skippable_blocks(model.network)]
        with torch.no_grad():  # one network call (a one-step solve), counted once
            shares = block_flop_shares(model.network, lambda: generate(model, 1, steps=1, seed=0, guidance=1.0))
        budget_pattern(config.nfe, shares, config.skip_cost, "early")  # refuses a budget no pattern reaches

    student, student_share, student_swaps = None, None, 0
    if config.student is not None:  # refused now, not after the search: a stranger, or a cost it cannot reach
        from ..accel.assembly import call_share, load_student

        student = load_student(model, config.student)
        student_share = call_share(model, student)
        student_swaps = math.ceil((config.nfe - config.student_cost) / max(1e-12, 1.0 - student_share) - 1e-9)
        if student_share >= 1.0 or student_swaps > config.nfe:
            reach = config.nfe * student_share
            raise TuneError(
                f"student {config.student!r} costs {student_share:.3f} of a model call (FLOPs): even at every step "
                f"the plan costs {reach:.2f} NFE-equivalents, above student_cost {config.student_cost:g}"
            )

    reference = reference_samples(
        model, config.n_search, seed=config.search_seed, guidance=config.guidance, steps=config.reference_steps
    )

    def run(plan: Plan, n: int, seed: int):
        with torch.no_grad():
            return generate(model, n, plan=plan, seed=seed, guidance=config.guidance)

    def objective(candidate: Candidate) -> tuple[float, float]:
        start = distributed.clock()
        try:
            images = run(candidate.to_plan(sigma_max, shares, **meta), config.n_search, config.search_seed).images01
            score = rmse(images, reference)
        except (FloatingPointError, PlanError):
            score = math.inf
        return score, distributed.clock() - start

    predictions = PREDICTIONS
    if config.use_v3:
        from .ems import ems_path_for_model

        ems_path_for_model(model, config.guidance)  # estimated (minutes) once per model and guidance, then cached
        predictions = (*PREDICTIONS, "v3")
    stock = stock_plans(model, config.nfe, use_v3=config.use_v3)
    # Grids reach sigma_max through different float paths (up to 3e-9 apart): compare with a tolerance.
    starts = [
        (label, c)
        for label, p in stock
        if (c := candidate_from_plan(p)) is not None and math.isclose(p.sigmas[0], sigma_max, rel_tol=1e-6)
    ]
    if shares is not None:  # each stock start with skip patterns that fit the budget
        starts = [
            (f"{label} skipping {where}", dataclasses.replace(c, skip=budget_pattern(c.num_steps, shares,
                                                                                     config.skip_cost, where)))
            for label, c in starts
            for where in ("early", "late", "spread")
        ]  # fmt: skip
    if not starts:
        raise TuneError(f"no stock configuration at nfe={config.nfe} fits the search space for {model.info.name!r}")
    budget = config.minutes * 60.0
    if not cache:  # one evaluation first, to refuse a budget that cannot even score the stock starts
        score, took = distributed.broadcast_json(objective(starts[0][1]))  # rank 0's time: every rank decides alike
        if took * len(starts) > budget:
            raise TuneError(
                f"--minutes {config.minutes:g} is too short: one evaluation takes {took:.1f} s and the search first "
                f"scores {len(starts)} stock configurations; allow at least {took * len(starts) * 1.5 / 60:.1f} minutes"
            )
        cache[starts[0][1].normalised(log_max, log_min).key()] = {"score": score, "seconds": took}

    bar = BudgetProgress(progress, "tuning", budget)

    def save_state() -> None:  # after every evaluation: a kill loses at most the one running
        write_text_atomic(state_path, json.dumps({**identity, "cache": cache, "fd": fd_cache, "fit": fit_state,
                                                  "assembly": assembly_state}))  # fmt: skip

    def on_evaluation(candidate: Candidate, score: float, best: float, count: int, spent: float) -> None:
        save_state()
        bar.update(spent, f"{count} evaluations  best RMSE {best:.5f}")

    def prefetch(candidates: list[Candidate]) -> None:
        """Under torchrun: score a group of candidates at once, one per process (hasten.distributed.map_tasks);
        the search replays them from the cache in its own order, so its path is the one-process path."""
        if not distributed.sharding():
            return
        todo = list({c.key(): c for c in candidates if c.key() not in cache}.values())
        for candidate, (score, took) in zip(todo, distributed.map_tasks(objective, todo), strict=True):
            cache[candidate.key()] = {"score": float(score) if math.isfinite(score) else math.inf, "seconds": took}
        if todo:
            save_state()

    try:
        result = search(
            objective, [c for _, c in starts], log_sigma_max=log_max, log_sigma_min=log_min, seconds=budget,
            max_evaluations=config.max_evaluations, seed=config.seed, cache=cache, on_evaluation=on_evaluation,
            predictions=predictions, islands=3, prefetch=prefetch, shares=shares, cost_budget=config.skip_cost,
        )  # fmt: skip
    finally:
        bar.close()
    save_state()

    chosen, full_stage = result.best, None
    if config.fd_candidates > 0 and model.info.data in FEATURE_NETS:
        chosen, full_stage = _full_objective_stage(
            model, config, cache, fd_cache, run, sigma_max, meta, save_state, shares
        )

    start_keys = {c.normalised(log_max, log_min).key(): (label, c) for label, c in starts}
    # (an evaluation cap may stop the search before every stock start was scored)
    best_stock_key = min((k for k in start_keys if k in cache), key=lambda k: cache[k]["score"])
    best_stock_label, best_stock = start_keys[best_stock_key]

    # Validation on a third noise seed: near-equal candidates swap places between image sets, so a plan
    # that only won on the search images is replaced by the best stock start (itself a point of the space).
    val_ref = reference_samples(
        model, config.n_search, seed=config.validation_seed, guidance=config.guidance, steps=config.reference_steps
    )

    def validation_rmse(candidate: Candidate) -> float:
        return rmse(
            run(candidate.to_plan(sigma_max, shares, **meta), config.n_search, config.validation_seed).images01, val_ref
        )

    validation = {
        "seed": config.validation_seed, "n": config.n_search,
        "rmse_ref_searched": validation_rmse(chosen), "rmse_ref_best_stock": validation_rmse(best_stock),
    }  # fmt: skip
    validation["kept"] = "searched" if validation["rmse_ref_searched"] < validation["rmse_ref_best_stock"] else "stock"
    if validation["kept"] == "stock":
        chosen = best_stock
    plan = chosen.to_plan(sigma_max, shares, **meta)
    chosen_key = chosen.normalised(log_max, log_min).key()

    assembly_record, step_denoisers = None, None
    if student is not None:
        if assembly_state.get("plan") != plan.digest():  # the stage's evaluations belong to the plan it ran on
            assembly_state = {"plan": plan.digest(), "scores": {}}
        assembly, assembly_record = _assembly_stage(
            plan, student, config.student, student_share, student_swaps, assembly_state["scores"],
            lambda p: rmse(run(p, config.n_search, config.search_seed).images01, reference), save_state, progress,
        )  # fmt: skip
        assembly_record["cost_budget"] = config.student_cost
        plan = dataclasses.replace(plan, assembly=assembly, cost=None)
        student_denoiser = guided_denoiser(student, config.guidance)
        step_denoisers = [student_denoiser if k in assembly.steps else None for k in range(plan.num_steps)]

    fit_record = None
    if config.fit_iterations > 0:

        def fitted_plan(sigmas, coefficients, x_weights) -> Plan:
            options = {"coefficients": coefficients, "x_weights": x_weights}
            return Plan(sigmas, "learned_multistep", options, nfe=config.nfe, assembly=plan.assembly, **meta)

        def validate(sigmas, coefficients, x_weights) -> float:
            candidate = fitted_plan(sigmas, coefficients, x_weights)
            return rmse(run(candidate, config.n_search, config.validation_seed).images01, val_ref)

        def checkpoint(state: dict[str, Any]) -> None:
            nonlocal fit_state
            fit_state = {**state, "settings": fit_settings}
            save_state()

        # The fit may also start from the best stock start's grid: on the UNet at NFE 5 the plain trailing grid
        # fitted to 0.0412 held-out where the searched plan's grid reached 0.0467 (benchmarks/fit_start_grid_study.py).
        stock_grid = best_stock.to_plan(sigma_max, shares, **meta).sigmas
        alternatives = [stock_grid] if len(stock_grid) == len(plan.sigmas) else []
        fit = fit_weights(
            model, plan.sigmas,
            FitConfig(iterations=config.fit_iterations, lr=config.fit_lr, lr_schedule=config.fit_lr_schedule,
                      n_train=config.n_fit, train_seed=config.search_seed, every=config.fit_every,
                      reference_steps=config.reference_steps, guidance=config.guidance, seed=config.seed),
            validate, alternatives=alternatives, state=fit_state, on_checkpoint=checkpoint, progress=progress,
            step_denoisers=step_denoisers,
        )  # fmt: skip
        plan_validation = validation["rmse_ref_searched" if validation["kept"] == "searched" else "rmse_ref_best_stock"]
        if plan.assembly is not None:  # the fit competes with the assembled plan, not with the steps-only one
            plan_validation = rmse(run(plan, config.n_search, config.validation_seed).images01, val_ref)
        fit_record = {
            "method": "learned_multistep weights (c_ij and a_i) and interior levels fitted by Adam through the "
            "sampler to the reference solve's images, from DPM-Solver++(2M) or DDIM on the plan's or the best stock "
            "start's grid; best validated weights",
            "iterations": config.fit_iterations, "lr": config.fit_lr, "lr_schedule": config.fit_lr_schedule,
            "n_train": config.n_fit,
            "train_seed": config.search_seed, "start": fit.start, "start_validation_rmse": fit.start_validation_rmse,
            "validation_rmse": fit.validation_rmse, "best_iteration": fit.best_iteration,
            "plan_validation_rmse": plan_validation, "history": fit.history,
        }  # fmt: skip
        fit_record["kept"] = "fitted" if fit.validation_rmse < plan_validation else "plan"
        if fit_record["kept"] == "fitted":
            plan = fitted_plan(fit.sigmas, fit.coefficients, fit.x_weights)

    # Held-out scores: the plan and the best stock start by search score, on other noise.
    held_ref = reference_samples(
        model, config.n_heldout, seed=config.heldout_seed, guidance=config.guidance, steps=config.reference_steps
    )
    held_fd = _fd(held_ref, model) if model.info.data in FEATURE_NETS else None  # the floor, computed once
    if plan.assembly is not None:  # what the student's steps cost: the same plan with the model at every step
        assembly_record["heldout_without_student"] = _heldout(
            run(dataclasses.replace(plan, assembly=None, cost=None), config.n_heldout, config.heldout_seed),
            held_ref, model, held_fd, config,
        )  # fmt: skip
    scores = {
        "objective": "rmse_ref" if full_stage is None else "rmse_ref, then FD among the best",
        "search": {"rmse_ref": cache[chosen_key]["score"], "n": config.n_search, "seed": config.search_seed},
        "validation": validation,
        "heldout": _heldout(run(plan, config.n_heldout, config.heldout_seed), held_ref, model, held_fd, config),
        "baseline": {
            "label": best_stock_label,
            "search_rmse_ref": cache[best_stock_key]["score"],
            "heldout": _heldout(
                run(best_stock.to_plan(sigma_max, shares, **meta), config.n_heldout, config.heldout_seed),
                held_ref,
                model,
                held_fd,
                config,
            ),
        },
    }
    plan = dataclasses.replace(
        plan,
        scores=scores,
        search={
            "method": "evolutionary search + coordinate refinement over per-step UniPC / DPM-Solver-v3 decisions "
            "(USF space)"
            + ("" if shares is None else " and per-step block skips within a FLOP-weighted cost")
            + ("" if assembly_record is None else ", then the student's steps (greedy, search seed)")
            + (", then fitted weights" if fit_record and fit_record["kept"] == "fitted" else ""),
            "config": config.to_dict(),
            "evaluations": result.evaluations,
            "evaluation_seconds": result.seconds,
            "reference": {**REFERENCE_SOLVER, "steps": config.reference_steps},
            "stock_starts": len(starts),
            "best_proxy_rmse_ref": result.best_score,
            "full_objective": full_stage,
            "fit": fit_record,
            "assembly": assembly_record,
            "architecture": None
            if shares is None
            else {
                "cost_budget": config.skip_cost,
                "blocks": blocks,
                "flop_shares": list(shares),
                "rule": "progressive: steps first, then per-step skip sets; children repaired to the budget",
            },
        },
    )
    save_plan(plan, out)
    return plan


def _assembly_stage(plan, student, reference, share, swaps, scores, proxy, save_state, progress):
    """Choose the ``swaps`` steps of ``plan`` the student runs: greedy forward selection by the proxy error.

    Each round tries every step not yet chosen and keeps the one whose swap gives the lowest ``proxy`` (RMSE to
    the reference on the search images). ``scores`` memoises evaluations by the chosen set (resume). Returns the
    :class:`~hasten.tune.plan.Assembly` and a record of the rounds.
    Reference: the greedy per-step choice of the model-assembly probe (benchmarks/prune/assembly_plan_probe.py);
    AutoDiffusion searches the same space evolutionarily, which at these sizes costs more evaluations.
    """
    from .plan import Assembly

    def assembled(steps: list[int]) -> Plan:
        return dataclasses.replace(plan, assembly=Assembly(reference, student.fingerprint, tuple(steps), share),
                                   cost=None)  # fmt: skip

    def score(steps: list[int]) -> float:
        key = ",".join(map(str, sorted(steps)))
        if key not in scores:
            scores[key] = proxy(assembled(steps)) if steps else proxy(plan)
            save_state()
        return scores[key]

    total = sum(plan.num_steps - r for r in range(swaps)) + 1
    bar = BudgetProgress(progress, "choosing the student's steps", total)
    chosen: list[int] = []
    rounds = [{"steps": [], "rmse_ref": score([])}]
    try:
        for _ in range(swaps):
            options = {k: score([*chosen, k]) for k in range(plan.num_steps) if k not in chosen}
            best = min(options, key=options.get)
            chosen.append(best)
            tried = {str(k): v for k, v in options.items()}  # (JSON keys: the plan file reads back equal)
            rounds.append({"steps": sorted(chosen), "rmse_ref": options[best], "tried": tried})
            bar.update(len(scores), f"student at steps {sorted(chosen)}  RMSE {options[best]:.5f}")
    finally:
        bar.close()
    assembly = Assembly(reference, student.fingerprint, tuple(chosen), share)
    record = {"student": reference, "fingerprint": student.fingerprint, "call_share": share,
              "rule": "greedy forward selection by the proxy (search seed), one step a round",
              "rounds": rounds}  # fmt: skip
    return assembly, record


def _candidate_from_key(key: str) -> Candidate:
    data = json.loads(key)
    if "skip" in data:
        data["skip"] = [tuple(b) for b in data["skip"]]
    return Candidate(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _features(candidate: Candidate, proxy: float) -> list[float]:
    """What the FD predictor sees: the proxy score and a summary of the decisions and levels."""
    n = candidate.num_steps
    return [
        math.log(proxy), sum(candidate.orders) / n, sum(candidate.correctors) / n,
        sum(v == "bh1" for v in candidate.variants) / n, float(candidate.prediction == "noise"),
        sum(len(b) for b in candidate.skip) / n, *candidate.log_sigmas,
    ]  # fmt: skip


def _ridge_predict(train_x: list[list[float]], train_y: list[float], test_x: list[list[float]]) -> list[float]:
    """Ridge regression on standardised features (S^3's performance predictor, at this scale)."""
    x, y = np.asarray(train_x), np.asarray(train_y)
    keep = x.std(0) > 1e-6  # a feature constant on the training points carries no information
    x, test = x[:, keep], np.asarray(test_x)[:, keep]
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    coef = np.linalg.solve(z.T @ z + np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return list((test - mu) / sd @ coef + y.mean())


def _full_objective_stage(model, config, cache, fd_cache, run, sigma_max, meta, save_state, shares=None):
    """FD (search seed) for the best proxy candidates: half by proxy rank, half picked by a learned predictor.

    Returns the chosen candidate and a record (see the rule below).
    Reference: Liu et al., S^3 (ICLR 2024): a cheap proxy pre-screens, a predictor of the expensive metric
    ranks, the expensive metric decides.
    """
    ranked = sorted(((v["score"], k) for k, v in cache.items() if math.isfinite(v["score"])))
    pool, seen_scores = [], set()
    for score, k in ranked:  # candidates with identical samples (a decision that cannot act) count once
        if score not in seen_scores and len(pool) < 3 * config.fd_candidates:
            seen_scores.add(score)
            pool.append((score, _candidate_from_key(k), k))
    reference = reference_samples(
        model, config.n_fd, seed=config.search_seed, guidance=config.guidance, steps=config.reference_steps
    )
    fd_reference = _fd(reference, model)

    def fd_of(item) -> float:
        _, candidate, key = item
        if key not in fd_cache:
            gen = run(candidate.to_plan(sigma_max, shares, **meta), config.n_fd, config.search_seed)
            fd_cache[key] = _fd(gen.images01, model)
            save_state()
        return fd_cache[key]

    first = (config.fd_candidates + 1) // 2
    evaluated = [(item, fd_of(item), None) for item in pool[:first]]
    rest = pool[first:]
    if rest and len(evaluated) >= 2:
        predicted = _ridge_predict(
            [_features(c, p) for (p, c, _), _, _ in evaluated], [fd for _, fd, _ in evaluated],
            [_features(c, p) for p, c, _ in rest],
        )  # fmt: skip
        order = sorted(range(len(rest)), key=lambda i: predicted[i])[: config.fd_candidates - first]
        evaluated += [(rest[i], fd_of(rest[i]), float(predicted[i])) for i in order]
    # FD of a few hundred images is noisy: it overrides the proxy's choice only when it separates two
    # candidates by more than twice the spread of the FDs measured here (near-identical plans differ by noise).
    best_proxy = pool[0][0]
    spread = float(np.std([fd for _, fd, _ in evaluated]))
    chosen = evaluated[0]
    for entry in evaluated[1:]:
        if entry[0][0] <= 1.1 * best_proxy and entry[1] < chosen[1] - 2 * spread:
            chosen = entry
    record = {
        "rule": "the best proxy candidate, unless a candidate within 10% of its proxy score has an FD (search "
        "seed) lower by more than twice the spread of the evaluated FDs",
        "fd_spread": spread,
        "n_fd": config.n_fd,
        "fd_reference": fd_reference,
        "evaluated": [{"rmse_ref": p, "fd": fd, "predicted_fd": pred} for (p, _, _), fd, pred in evaluated],
        "chosen_fd": chosen[1],
    }
    return chosen[0][1], record


def _fd(images01: torch.Tensor, model: LoadedModel) -> float:
    """FD in the feature space of the model's data set, against its held-out split."""
    from ..metrics.quality import evaluate_images

    return evaluate_images(images01, data=model.info.data)["fd"]


def _heldout(gen, reference: torch.Tensor, model: LoadedModel, fd_reference: float | None, config) -> dict[str, Any]:
    scores: dict[str, Any] = {"rmse_ref": rmse(gen.images01, reference), "n": config.n_heldout,
                              "seed": config.heldout_seed}  # fmt: skip
    if fd_reference is not None:
        scores["fd"], scores["fd_reference"] = _fd(gen.images01, model), fd_reference
    return scores

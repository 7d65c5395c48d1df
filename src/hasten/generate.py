"""Sampling a bundled or saved model end to end: labels, guidance, initial noise, timing.

This is the library behind ``hasten sample``; ``bench`` reuses it so both measure the same thing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .accel import AccelStats, accelerate_, accelerator_of
from .accel.assembly import assemble, installed_assembly, load_student
from .accel.skip import installed_skip, skip_blocks, skip_by_block
from .models.guidance import CFGDenoiser, ThresholdedDenoiser
from .models.zoo import LoadedModel
from .rewards import REWARD_SOLVER, get_reward, reward_solver
from .schedules.grids import get_sigmas
from .schedules.noise import NoiseSchedule
from .seeds import NOISE_CONVENTION, check_convention, initial_noise, step_seeds
from .solvers import DEFAULT_SOLVER, OPTION_RESOLVERS, SOLVERS, Solver, sample

__all__ = [
    "Generation",
    "collect",
    "default_labels",
    "generate",
    "guided_denoiser",
    "options_for_model",
    "options_for_schedule",
    "resolve_sampler",
]


@dataclasses.dataclass
class Generation:
    images01: Tensor  # [N, C, H, W] in [0, 1]
    labels: Tensor | None
    nfe: int
    seconds: float
    sigmas: list[float]
    accel_stats: dict[str, Any] | None = None  # what an installed cache did (hasten.accel.AccelStats)
    samples: Tensor | None = None  # the samples in model space (latents for a latent pipeline)
    rows: range | None = None  # the sample indices held (a process's own under torchrun with gather=False)
    rewards: Tensor | None = None  # the reward of each image, when sampled with one (hasten.rewards)


def guided_denoiser(model: LoadedModel, guidance: float):
    """The model's denoiser, wrapped in classifier-free guidance unless ``guidance == 1``, then in the model's
    own processing of the x0 estimate (a pipeline scheduler's ``clip_sample``/``thresholding``) if it has one."""
    denoiser = _guided(model, guidance)
    return denoiser if model.x0_processing is None else ThresholdedDenoiser(denoiser, model.x0_processing)


def _guided(model: LoadedModel, guidance: float):
    if guidance == 1.0:
        return model.denoiser
    uncond = model.unconditional()
    if uncond is None:
        raise ValueError(
            f"guidance {guidance:g} needs a model with an unconditional branch (class labels with a null class, or a "
            f"prompt pipeline with a negative prompt); {model.info.name!r} has none: use guidance 1"
        )
    return CFGDenoiser(model.denoiser, guidance, uncond)


def default_labels(model: LoadedModel, n: int, label: int | None = None) -> Tensor | None:
    """The labels to sample: ``label`` for all, or spread evenly over the classes (0, 1, ..., 9, 0, ...)."""
    k = model.info.num_classes
    if not k:
        if label is not None:
            raise ValueError(f"model {model.info.name!r} is unconditional; --label is not allowed")
        return None
    if label is None:
        return torch.arange(n) % k
    if not 0 <= label < k:
        raise ValueError(f"label must be in 0..{k - 1} for {model.info.name!r}, got {label}")
    return torch.full((n,), label, dtype=torch.long)


def options_for_schedule(solver: str | Solver, schedule: NoiseSchedule, options: Mapping[str, Any]) -> dict[str, Any]:
    """Solver options with the defaults the solver takes from the model's schedule
    (:meth:`hasten.Solver.options_for_schedule`: ``space="flow"`` for Heun and PLMS on flow matching).

    Only for solvers named by string; explicit options and an already-configured solver are left alone.
    """
    if isinstance(solver, str):
        return SOLVERS.get(solver).cls.options_for_schedule(options, schedule)
    return dict(options)


def options_for_model(
    solver: str | Solver, options: Mapping[str, Any], model: LoadedModel, guidance: float
) -> dict[str, Any]:
    """Everything a solver option can take from the model: the schedule's defaults (see
    :func:`options_for_schedule`), then the option resolver registered for the solver's name in
    :data:`hasten.solvers.OPTION_RESOLVERS`, if any (DPM-Solver-v3's ``ems="auto"``: the path of the model's
    statistics at this guidance scale, estimated once, then cached; registered by :mod:`hasten.tune.ems`)."""
    options = options_for_schedule(solver, model.schedule, options)
    if isinstance(solver, str) and solver in OPTION_RESOLVERS:
        options = OPTION_RESOLVERS.get(solver)(options, model, guidance)
    return options


def learned_guidance(model: LoadedModel) -> float:
    """The classifier-free guidance scale a distilled student learned from its teacher (1: none)."""
    return float(getattr(model.info, "learned_guidance", 1.0))


def resolve_sampler(
    model: LoadedModel,
    solver: str | None,
    steps: int | None,
    schedule: str | None,
    options: Mapping[str, Any],
    guidance: float | None,
    *,
    use_own: bool = True,
) -> tuple[str, int, str, dict[str, Any], float | None]:
    """The sampler to run when a caller names ``solver``/``steps``/``schedule``/``options`` or not: the model's
    own (:attr:`LoadedModel.default_sampler`, a student's) when none is named, else the library's defaults for
    what is missing. Returns ``(solver, steps, schedule, options, guidance)``; the one place this is decided
    (``generate``, ``hasten sample``, recipes)."""
    own = model.default_sampler if use_own else {}
    if own and solver is None and steps is None and schedule is None and not options:
        guidance = own.get("guidance") if guidance is None else guidance
        return own["solver"], int(own["steps"]), own.get("schedule", "auto"), dict(own.get("options", {})), guidance
    return (
        DEFAULT_SOLVER if solver is None else solver, 10 if steps is None else steps,
        "auto" if schedule is None else schedule, dict(options), guidance,
    )  # fmt: skip


def collect(
    model: LoadedModel, outputs: list[Tensor], batches: list[range], n: int, nfe: int, gather: bool
) -> tuple[Tensor, Tensor, int, range]:
    """A sampling run's end: this process's batch outputs -> ``(samples, images, nfe, rows held)``.

    One process: all ``n``. Under torchrun: the whole set gathered in index order (``gather``), or this process's
    rows (an idle process holds none, of the right shape); the NFE is the largest any process counted."""
    samples = torch.cat(outputs) if outputs else None
    images = None if samples is None else model.to_images(samples)
    if not distributed.sharding():
        return samples, images, nfe, range(0, n)
    nfe = int(distributed.all_max(nfe))
    if gather:
        return distributed.gather_rows(samples), distributed.gather_rows(images), nfe, range(0, n)
    held = range(batches[0].start, batches[-1].stop) if batches else range(0)
    # an idle process learns the shapes from the others (empty gathers: every process joins them)
    shapes = [distributed.gather_rows(None if t is None else t[:0]) for t in (samples, images)]
    if samples is None:
        samples, images = shapes
    return samples, images, nfe, held


def _with_oms(kwargs: dict[str, Any], oms: Any) -> dict[str, Any]:
    """A recipe's generate() arguments with the caller's One More Step module, unless the recipe has its own."""
    if oms is None:
        return kwargs
    if kwargs.get("oms") is not None:
        raise TypeError("the recipe supplies its One More Step module; do not also pass oms")
    return kwargs | {"oms": oms}


def generate(
    model: LoadedModel,
    n: int,
    *,
    solver: str | None = None,
    steps: int | None = None,
    schedule: str | None = None,
    seed: int | None = None,
    guidance: float | None = None,
    label: int | None = None,
    batch_size: int = 256,
    callback: Any = None,
    sigmas: Tensor | None = None,
    plan: Any = None,
    force_plan: bool = False,
    accel: Any = None,
    recipe: Any = None,
    state_dtype: torch.dtype = torch.float32,
    noise: str = NOISE_CONVENTION,
    gather: bool = True,
    oms: Any = None,
    reward: Any = None,
    particles: int = 1,
    alpha: float = 0.0,
    **solver_options: Any,
) -> Generation:
    """Sample ``n`` images; ``seconds`` is the sampling time alone (no loading), NFE counted per batch.

    ``sigmas`` (a descending VE grid) overrides ``steps`` and ``schedule``, e.g. to reuse another library's
    timesteps through :func:`hasten.schedules.from_timesteps`. ``plan`` (a :class:`hasten.tune.Plan`) replaces
    the grid and the solver and sets the guidance scale it was tuned for unless ``guidance`` is given; a plan
    made for other weights is refused unless ``force_plan``. A plan with a per-step architecture runs it for this
    call only: its block skips (:mod:`hasten.accel.skip`), or its student (:mod:`hasten.accel.assembly`, loaded
    beside the model and checked to be the one the plan was tuned with and to descend from the model's weights)
    at its steps. ``accel`` (a :class:`hasten.accel.AccelConfig`)
    installs that cache on the network for this call only; its stats land in ``accel_stats`` (as they do for
    a cache installed beforehand with :func:`hasten.accelerate_`).

    With no ``solver``, ``steps``, ``schedule`` or solver option, a model that declares its own sampler (a
    distilled student: :attr:`LoadedModel.default_sampler`) samples with it; otherwise the library's defaults
    (``dpmpp_2m``, 10 steps, the ``auto`` grid) fill what is not given.

    ``recipe`` (a :class:`hasten.Recipe`) supplies all of that (sampler or plan, grid, guidance, cache) and the
    seed; it is checked against ``model`` first (see :meth:`hasten.Recipe.check_model`). ``seed`` overrides the
    recipe's; any other sampler argument given with a recipe is refused. Without a recipe, ``seed`` defaults to 0.

    ``state_dtype`` is the dtype of the sampler's state and arithmetic (``torch.float64`` for a reference solve:
    the network still runs in its own dtype, the denoiser's output and every update are accumulated in float64).

    ``noise`` is the noise convention (:mod:`hasten.seeds`): by default every sample's initial and step noise
    come from its own index, so the images do not depend on ``batch_size`` or on the number of processes. Under
    ``torchrun`` (:mod:`hasten.distributed`) each process samples its block of the batches and every process
    returns the whole set, in index order; ``seconds`` is then the slowest process's sampling time. With
    ``gather=False`` each process keeps its own rows (``rows`` says which; ``labels`` are theirs): what a
    measurement that gathers only per-sample results uses (:func:`hasten.evaluate_model`), so images never travel.

    ``oms`` (a :class:`hasten.oms.OneMoreStep`, from :func:`hasten.oms.load_oms`) starts every batch from the
    module's prediction at SNR 0 and stands it in for the model's prediction at the grid's first level (that call
    is still counted in ``nfe``, but the network does not run); it composes with a recipe, a plan and a cache.

    ``reward`` (a registered name such as ``"class:3"``, ``"ink"``, ``"symmetry"``, or any callable ``images01 ->
    [N]``, :mod:`hasten.rewards`) steers sampling without gradients (SVDD, :mod:`hasten.solvers.svdd`): every
    stochastic step draws ``particles`` candidates from the solver's ancestral step (``ddpm`` unless a solver is
    named) and keeps the best by the reward of its x0 estimate (``alpha = 0``) or one drawn with weights
    ``softmax(reward / alpha)``. ``nfe`` counts every candidate's network call; ``rewards`` holds each image's reward.
    ``particles=1`` is plain sampling, bit for bit.
    """
    if getattr(model, "mask_id", None) is not None:  # a hasten.discrete.MaskedDiffusionModel: tokens, not noise
        raise TypeError(
            f"{model.info.name} is a masked (discrete) diffusion model: sample it with hasten.discrete.generate_masked"
        )
    if recipe is not None:
        given = {
            name: value
            for name, value, default in (
                ("solver", solver, None),
                ("steps", steps, None),
                ("schedule", schedule, None),
                ("guidance", guidance, None),
                ("sigmas", sigmas, None),
                ("plan", plan, None),
                ("accel", accel, None),
                ("force_plan", force_plan, False),
            )
            if value is not default and value != default
        }
        given.update(solver_options)
        if given:
            raise TypeError(f"a recipe supplies the sampler; do not also pass {', '.join(sorted(given))}")
        recipe.check_model(model)
        return generate(
            model, n, seed=recipe.seed if seed is None else seed, label=label, batch_size=batch_size,
            callback=callback, state_dtype=state_dtype, noise=recipe.noise, gather=gather,
            reward=reward, particles=particles, alpha=alpha, **_with_oms(recipe.generate_kwargs(), oms),
        )  # fmt: skip
    seed = 0 if seed is None else seed
    if reward is None and particles != 1:
        raise ValueError(f"particles={particles!r} chooses among candidates by a reward; pass reward= as well")
    if reward is not None:
        if plan is not None or accel is not None:
            # a plan fixes every step's solver; a cache assumes one network call per step on one trajectory
            raise ValueError(f"reward guidance cannot run with {'a plan' if plan is not None else 'a cache (accel)'}")
        reward = get_reward(reward)
        solver = REWARD_SOLVER if solver is None else solver
    if plan is None and sigmas is None:
        solver, steps, schedule, solver_options, guidance = resolve_sampler(
            model, solver, steps, schedule, solver_options, guidance
        )
    else:
        solver = DEFAULT_SOLVER if solver is None else solver
        steps, schedule = 10 if steps is None else steps, "auto" if schedule is None else schedule
    if accel is not None:
        with accelerate_(model, accel):
            return generate(
                model, n, solver=solver, steps=steps, schedule=schedule, seed=seed, guidance=guidance, label=label,
                batch_size=batch_size, callback=callback, sigmas=sigmas, plan=plan, force_plan=force_plan,
                state_dtype=state_dtype, noise=noise, gather=gather, oms=oms, **solver_options,
            )  # fmt: skip
    skip = None if plan is None else plan.skip
    if skip is not None:
        plan.check_network(model.network)  # a block index the network lacks is refused by name
    if skip is not None and installed_skip(model.network) != skip_by_block(model.network, skip):
        # a plan's per-step architecture: skip hooks for this call only (the plan object holds only indices)
        if accelerator_of(model) is not None:
            raise ValueError("a plan with per-step block skips cannot run under a cache (both decide which blocks "
                             "run); sample the plan without --accel, or a plan without skips")  # fmt: skip
        with skip_blocks(model.network, skip):
            return generate(
                model, n, solver=solver, steps=steps, schedule=schedule, seed=seed, guidance=guidance, label=label,
                batch_size=batch_size, callback=callback, sigmas=sigmas, plan=plan, force_plan=force_plan,
                state_dtype=state_dtype, noise=noise, gather=gather, oms=oms, **solver_options,
            )  # fmt: skip
    assembly = None if plan is None else plan.assembly
    if assembly is not None and installed_assembly(model.network) != (assembly.fingerprint, frozenset(assembly.steps)):
        # a plan's per-step student: loaded and hooked in for this call only (the plan holds its name and steps)
        if accelerator_of(model) is not None:
            raise ValueError("a plan with a per-step student cannot run under a cache (the cache would reuse one "
                             "network's features in the other's calls); sample the plan without --accel")  # fmt: skip
        plan.check_model(model.info.name, model.fingerprint, force=force_plan)
        # (the student must descend from the weights the plan was tuned for: the model's, unless the plan is forced)
        student = load_student(model, assembly.student, assembly.fingerprint, ancestor=plan.fingerprint)
        with assemble(model, student, assembly.steps):
            return generate(
                model, n, solver=solver, steps=steps, schedule=schedule, seed=seed, guidance=guidance, label=label,
                batch_size=batch_size, callback=callback, sigmas=sigmas, plan=plan, force_plan=force_plan,
                state_dtype=state_dtype, noise=noise, gather=gather, oms=oms, **solver_options,
            )  # fmt: skip
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if plan is not None:
        if sigmas is not None or solver_options:
            raise TypeError("a plan supplies the grid and the solver; do not pass sigmas or solver options with it")
        plan.check_model(model.info.name, model.fingerprint, force=force_plan)
        sigmas = torch.tensor(plan.sigmas, dtype=torch.float64)
        guidance = plan.guidance if guidance is None else guidance
        solver = plan.build_solver(**options_for_model(plan.solver, plan.options, model, guidance))
    guidance = model.default_guidance if guidance is None else guidance
    learned = learned_guidance(model)
    if learned != 1.0 and guidance != 1.0:
        raise ValueError(
            f"{model.info.name} already learned guidance {learned:g} (a guidance-distilled student); guidance "
            f"{guidance:g} on top would apply it twice: sample it at guidance 1"
        )
    labels = default_labels(model, n, label)
    denoiser = guided_denoiser(model, guidance)
    if sigmas is None:
        sigmas = get_sigmas(schedule, steps, model.schedule)
    solver_options = options_for_model(solver, solver_options, model, guidance)
    if reward is not None:  # SVDD around the named ancestral step
        solver, solver_options = reward_solver(model, reward, particles, alpha, solver, solver_options), {}
    device = model.device
    check_convention(noise)
    sharded = distributed.sharding()
    if sharded and noise != NOISE_CONVENTION:
        raise ValueError(
            f"noise convention {noise!r} draws the whole set as one stream and cannot be sharded over processes; "
            f"run it in one process, or use {NOISE_CONVENTION!r}"
        )
    # this process's batches: all of them, or its block of the global batches under torchrun (hasten.distributed)
    batches = distributed.shard_batches(n, batch_size)
    mine = [i for rows in batches for i in rows]
    initial = initial_noise(seed, mine, model.info.image_shape, convention=noise, total=n)
    scale = model.schedule.initial_noise_scale(float(sigmas[0]))
    if oms is not None:
        oms.check_model(model, float(sigmas[0]))
    outputs, nfe, offset = [], 0, 0
    installed = accelerator_of(model)
    stats_before = None if installed is None else installed.stats
    distributed.barrier()  # a sharded run is timed from a common start: its time is its slowest process's
    start = time.perf_counter()
    for rows in batches:
        x = initial[offset : offset + len(rows)]
        offset += len(rows)
        batch_labels = None if labels is None else labels[rows.start : rows.stop]
        cond = {key: v.to(device) for key, v in model.conditioning(batch_labels, rows).items()}
        if noise == NOISE_CONVENTION:  # every sample's step noise from its own index
            randomness: dict[str, Any] = {"noise_seeds": step_seeds(seed, rows)}
        else:
            randomness = {"generator": torch.Generator(device=device).manual_seed(seed + 1 + rows.start)}
        run_denoiser, x_start = denoiser, x.to(state_dtype) * scale
        if oms is not None:  # One More Step: the start and the first-level prediction from SNR 0
            x_start, run_denoiser = oms.begin(denoiser, x.to(state_dtype), batch_labels, float(sigmas[0]), guidance)
        result = sample(
            run_denoiser,
            x_start.to(device),
            sigmas,
            solver,
            cond=cond,
            return_info=True,
            callback=callback,
            **randomness,
            **solver_options,
        )
        outputs.append(result.x)
        nfe = max(nfe, result.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start  # sampling alone: decoding and gathering come after
    samples, images, nfe, held = collect(model, outputs, batches, n, nfe, gather)
    if labels is not None:
        labels = labels[held.start : held.stop]
    if sharded:  # the slowest process's, the same on every rank (a decision taken on it is then the same)
        seconds = distributed.all_max(seconds)
    stats = None if installed is None else installed.stats.since(stats_before)
    if sharded:
        stats = AccelStats.combine(distributed.gather_json(None if stats is None else dataclasses.asdict(stats)))
    rewards = None
    if reward is not None:
        with torch.no_grad():
            rewards = reward(images).detach().cpu()
    return Generation(
        images.cpu(), labels, nfe, seconds, sigmas.tolist(), None if stats is None else stats.as_dict(), samples.cpu(),
        held, rewards,
    )  # fmt: skip

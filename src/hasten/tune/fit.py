"""Fitting a plan's solver weights and interior noise levels to a reference solve (``hasten tune``'s fit stage).

The solver family is :class:`hasten.solvers.learned.LearnedMultistep`, DPM-Solver++'s multistep update in VE
form with free weights, ``x_{i+1} = a_i x_i + (1 - r_i) sum_j c_ij D_j`` (``r_i = sigma_{i+1} / sigma_i``).
Starting from DPM-Solver++(2M) or DDIM on a grid (the searched plan's or an alternative, e.g. the best stock
start's: whichever pair validates best, since 2M's extrapolation can be far off on an uneven grid;
``a_i = r_i``), Adam fits every ``c_ij``, the
offsets ``a_i - r_i`` and the interior log-sigmas (first and last level fixed) by backpropagating through the
sampler and the network to the final samples of a high-accuracy solve from the same noise, on training noise.
Adam moves the offsets in units of ``s_i = sqrt(1 + sigma_{i+1}^2) / sqrt(1 + sigma_i^2)`` (on the starting
grid), the ratio of the state's scales after and before the step: a unit then changes ``x_{i+1}`` by about its
own size at every step, where a raw offset of 0.01 at the first step of a flow model (``sigma_max`` near
10^4) would add a hundred units of noise.

The loss is the metric's own: squared error of the images in [0, 1] (``model.to_images``, clamped), not of
raw model outputs. A model may overshoot the data range where it does not matter (the bundled UNet puts a
third of its pixels below -1, some at -16, where the image is black either way); a model-space loss spends
the fit on those pixels.

A validation seed scores the weights every ``every`` iterations with the real sampler (``generate`` on the
plan); the best validated weights are the result (early stopping: on the 128 training images alone the
weights overfit).

The fit's state (iteration, weights, Adam's moments, best-so-far, history) is a JSON-able dict handed to
``on_checkpoint`` at every validation, so a killed fit resumes losing at most ``every`` iterations.

Reference: Shaul et al., "Bespoke Solvers for Generative Flow Models", ICLR 2024; Tong et al., "Learning to
Discretize Denoising Diffusion ODEs" (LD3), 2024 (fitting a sampler's coefficients / time steps to a
teacher solve); Lu et al., "DPM-Solver++", 2022 (the update family).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..generate import default_labels, guided_denoiser
from ..metrics.reference import reference_samples
from ..models.zoo import LoadedModel
from ..progress import BudgetProgress
from ..seeds import initial_noise

__all__ = ["FIT_VERSION", "FitConfig", "FitResult", "dpmpp_2m_weights", "fit_weights", "multistep_samples"]

# Checkpoints of another version (another loss or family) cannot be continued. 2: image-space loss, free a_i.
FIT_VERSION = 2
LR_SCHEDULES = ("cosine", "constant")
LR_FLOOR = 0.05  # the cosine schedule's last step size, as a fraction of the first


def dpmpp_2m_weights(sigmas: Tensor) -> list[list[float]]:
    """DPM-Solver++(2M)'s weights over ``D_0 .. D_i`` on a grid of noise levels (the last step onto 0 and the
    first step are first order, as in ``dpmpp_2m``)."""
    lam = -torch.log(sigmas.double())  # VE log-SNR up to a constant: only differences matter
    rows = []
    for i in range(len(sigmas)):
        row = [0.0] * (i + 1)
        row[i] = 1.0
        if 0 < i < len(sigmas) - 1:
            q = float((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i]))
            row[i], row[i - 1] = 1 + 1 / (2 * q), -1 / (2 * q)
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Settings of one fit (see :class:`hasten.tune.TuneConfig` for the user-facing names)."""

    iterations: int
    lr: float = 0.01
    lr_schedule: str = "cosine"  # or "constant"; cosine decays to LR_FLOOR * lr at the last iteration
    n_train: int = 128
    batch_size: int = 32
    train_seed: int = 1000
    every: int = 25
    reference_steps: int = 100
    guidance: float = 1.0
    seed: int = 0
    min_gap: float = 0.05  # smallest log-sigma step kept between consecutive levels

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


@dataclasses.dataclass(frozen=True)
class FitResult:
    sigmas: tuple[float, ...]  # descending, ending with 0
    coefficients: tuple[tuple[float, ...], ...]
    x_weights: tuple[float, ...]  # a_i, one per step
    validation_rmse: float  # of the returned weights
    start_validation_rmse: float  # of the starting weights on the start grid
    start: str  # which: "dpmpp_2m" or "ddim", with ", grid k" when it was alternative k (1-based)
    best_iteration: int
    history: list[dict[str, float]]


def fit_weights(
    model: LoadedModel,
    sigmas: tuple[float, ...],
    config: FitConfig,
    validate: Callable[[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]], float],
    *,
    alternatives: Sequence[tuple[float, ...]] = (),
    state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    step_denoisers: Sequence[Callable[..., Tensor] | None] | None = None,
) -> FitResult:
    """Fit weights and interior levels for the grid ``sigmas`` (descending, ending with 0); see the module
    docstring. ``alternatives``: other grids of as many steps the fit may start from instead (the start is
    the best of 2M and DDIM on every grid, by validation). ``validate(sigmas, coefficients, x_weights)`` returns
    the validation RMSE of a candidate; ``state`` is a checkpoint from an earlier call with the same arguments.
    ``step_denoisers`` (one per step, None for the model's own) are the denoisers of a per-step student's steps
    (a plan's assembly, :mod:`hasten.accel.assembly`): the weights are fitted through the network that runs."""
    grids = [tuple(float(v) for v in sigmas)]
    grids += [g for g in (tuple(float(v) for v in alt) for alt in alternatives) if g not in grids]
    for grid in grids:
        levels = torch.tensor(grid, dtype=torch.float64)
        if len(levels) < 3 or float(levels[-1]) != 0.0 or not bool(torch.all(levels[:-2] > levels[1:-1])):
            raise ValueError(f"need a descending grid of at least 2 steps ending with 0, got {list(grid)}")
        if len(grid) != len(grids[0]):
            raise ValueError(f"alternative grids need {len(grids[0]) - 1} steps like sigmas, got {list(grid)}")

    if state is None:  # start from whichever of 2M and DDIM scores better, on whichever grid
        start_scores: dict[str, tuple[float, tuple, list[list[float]]]] = {}
        for k, grid in enumerate(grids):
            ratios = tuple(b / a for a, b in itertools.pairwise(grid))
            two_m = dpmpp_2m_weights(torch.tensor(grid[:-1], dtype=torch.float64))
            for name, rows in (("dpmpp_2m", two_m), ("ddim", _ddim_weights(len(grid) - 1))):
                label = name if k == 0 else f"{name}, grid {k}"
                score = validate(grid, tuple(tuple(r) for r in rows), ratios)
                start_scores[label] = (score, grid, rows)
        start_name = min(start_scores, key=lambda label: start_scores[label][0])
        start_val, start_grid, start_rows = start_scores[start_name]
    else:
        start_grid = tuple(state.get("start_sigmas", grids[0]))  # checkpoints before alternatives: sigmas
        start_rows = _ddim_weights(len(start_grid) - 1)  # placeholders: the checkpoint's weights replace them

    levels = torch.tensor(start_grid, dtype=torch.float64)
    log_first = torch.log(levels[:1])  # levels in float64: the first one must stay sigma_max exactly
    log_floor = math.log(float(model.schedule.sigma_min))
    interior = torch.log(levels[1:-1]).clone().requires_grad_(True)
    weights = [torch.tensor(row, dtype=torch.float32, requires_grad=True) for row in start_rows]
    scale = levels.pow(2).add(1).sqrt()
    x_offset_unit = (scale[1:] / scale[:-1]).float()  # s_i (see the module docstring)
    x_offsets = torch.zeros(len(weights), requires_grad=True)  # (a_i - r_i) / s_i: the fit starts from a_i = r_i
    optimiser = torch.optim.Adam([interior, *weights, x_offsets], lr=config.lr)

    def current() -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]:
        grid = (float(levels[0]), *(float(s) for s in interior.detach().exp()), 0.0)
        offsets = (x_offsets.detach() * x_offset_unit).tolist()
        x_weights = tuple(b / a + e for a, b, e in zip(grid, grid[1:], offsets, strict=False))
        return grid, tuple(tuple(float(v) for v in w.detach()) for w in weights), x_weights

    def record(iteration: int, score: float, candidate) -> dict[str, Any]:
        sigmas_, coefficients, x_weights = candidate
        return {"iteration": iteration, "validation_rmse": score, "sigmas": list(sigmas_),
                "coefficients": [list(r) for r in coefficients], "x_weights": list(x_weights)}  # fmt: skip

    if state is None:
        state = {"version": FIT_VERSION, "iteration": 0, "history": [{"iteration": 0, "validation_rmse": start_val}],
                 "start": start_name, "start_sigmas": list(start_grid),
                 "start_scores": {label: v[0] for label, v in start_scores.items()},
                 "start_validation_rmse": start_val, "best": record(0, start_val, current())}  # fmt: skip
    else:  # resume: weights, levels and Adam's moments as they were at the checkpoint
        if state.get("version") != FIT_VERSION:
            raise ValueError(f"this checkpoint is from fit version {state.get('version', 1)}; this is {FIT_VERSION}")
        with torch.no_grad():
            interior.copy_(torch.tensor(state["interior"]))
            for w, row in zip(weights, state["coefficients"], strict=True):
                w.copy_(torch.tensor(row))
            x_offsets.copy_(torch.tensor(state["x_offsets"]))
        optimiser.load_state_dict(_adam_from_json(state["adam"]))

    denoiser = guided_denoiser(model, config.guidance)
    if step_denoisers is not None:
        if len(step_denoisers) != len(start_grid) - 1:
            raise ValueError(f"step_denoisers needs one per step ({len(start_grid) - 1}), got {len(step_denoisers)}")
        denoiser = [denoiser if d is None else d for d in step_denoisers]
    network_params = [p for p in model.network.parameters() if p.requires_grad]
    noise = initial_noise(config.train_seed, range(config.n_train), model.info.image_shape)  # generate()'s noise
    labels = default_labels(model, config.n_train, None)
    target = reference_samples(  # images in [0, 1] from the same noise (cached on disk)
        model, config.n_train, seed=config.train_seed, guidance=config.guidance, steps=config.reference_steps
    )

    def sample(rows: list[int]) -> Tensor:
        cond = model.conditioning(None if labels is None else labels[rows], rows)
        log_sigmas = torch.cat([log_first, interior])
        return multistep_samples(denoiser, model, log_sigmas, weights, noise[rows], cond, x_offsets * x_offset_unit)

    bar = BudgetProgress(progress, "fitting weights", config.iterations)
    try:
        for p in network_params:  # gradients flow through the network, not into it
            p.requires_grad_(False)
        for it in range(state["iteration"] + 1, config.iterations + 1):
            batch_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + it)  # the same batches on resume
            rows = torch.randperm(config.n_train, generator=batch_gen)[: config.batch_size].tolist()
            loss = (model.to_images(sample(rows)) - target[rows]).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, it)
            optimiser.step()
            with torch.no_grad():  # keep the levels strictly descending and above the schedule's floor
                for k in range(len(interior)):
                    above = log_first[0] if k == 0 else interior[k - 1]
                    interior[k] = torch.clamp(torch.minimum(interior[k], above - config.min_gap), min=log_floor)
            if it % config.every == 0 or it == config.iterations:
                candidate = current()
                score = validate(*candidate)
                state["history"].append({"iteration": it, "train_loss": float(loss.detach()), "validation_rmse": score})
                if score < state["best"]["validation_rmse"]:
                    state["best"] = record(it, score, candidate)
                state.update(iteration=it, interior=interior.detach().tolist(),
                             coefficients=[w.detach().tolist() for w in weights], x_offsets=x_offsets.detach().tolist(),
                             adam=_adam_to_json(optimiser.state_dict()))  # fmt: skip
                if on_checkpoint is not None:
                    on_checkpoint(state)
                best_score = state["best"]["validation_rmse"]
                bar.update(it, f"iteration {it}  validation RMSE {score:.5f}  best {best_score:.5f}")
    finally:
        for p in network_params:
            p.requires_grad_(True)
        bar.close()
    best = state["best"]
    return FitResult(
        tuple(best["sigmas"]), tuple(tuple(r) for r in best["coefficients"]), tuple(best["x_weights"]),
        best["validation_rmse"], state["start_validation_rmse"], state["start"], best["iteration"], state["history"],
    )  # fmt: skip


def multistep_samples(
    denoiser: Any | Sequence[Any],
    model: LoadedModel,
    log_sigmas: Tensor,
    weights: list[Tensor],
    noise: Tensor,
    cond: dict,
    x_offsets: Tensor | None = None,
) -> Tensor:
    """The ``learned_multistep`` sampler written with autograd-friendly ops: levels ``exp(log_sigmas)`` then 0,
    one weight row per step, ``a_i = r_i + x_offsets[i]`` (``r_i`` when None), from unit ``noise`` scaled as
    ``generate`` scales it (float32 state, float64 levels). Equal to ``generate`` on the corresponding plan up to
    float rounding. ``denoiser`` may be a sequence, one per step (a plan's per-step student)."""
    denoisers = list(denoiser) if isinstance(denoiser, Sequence) else [denoiser] * len(weights)
    level = torch.cat([log_sigmas.exp(), torch.zeros(1, dtype=log_sigmas.dtype)])
    x = noise * float(model.schedule.initial_noise_scale(float(level[0].detach())))
    denoised: list[Tensor] = []
    for i in range(len(weights)):
        denoised.append(denoisers[i](x, level[i].double().expand(len(x)), **cond).float())
        r = (level[i + 1] / level[i]).float()
        a = r if x_offsets is None else r + x_offsets[i]
        x = a * x + (1 - r) * sum(weights[i][j] * denoised[j] for j in range(i + 1))
    return x


def learning_rate(config: FitConfig, iteration: int) -> float:
    """Adam's step size at ``iteration`` (1-based). Cosine: from ``lr`` down to ``LR_FLOOR * lr`` at
    ``config.iterations``, so the last validations see the bottom of the valley rather than Adam's
    oscillation around it (at a constant 0.01 the UNet's validation error swung by 3% between checkpoints).
    A fit extended to more iterations follows the longer curve from where it is (a warm restart)."""
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(iteration / config.iterations, 1.0)
    return config.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ddim_weights(steps: int) -> list[list[float]]:
    """``c_ii = 1``: each step uses its own denoised estimate only (no extrapolation from older ones)."""
    return [[0.0] * i + [1.0] for i in range(steps)]


def _adam_to_json(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {str(k): {name: v.tolist() for name, v in s.items()} for k, s in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def _adam_from_json(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {int(k): {name: torch.tensor(v) for name, v in s.items()} for k, s in data["state"].items()},
        "param_groups": data["param_groups"],
    }

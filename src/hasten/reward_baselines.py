"""The baselines reward-guided sampling (SVDD, :func:`hasten.generate` with ``reward=``) is judged against.

* :func:`best_of_n`: ``draws`` plain samples per index, the one with the highest reward kept. Costs ``draws`` times
  the plain sampler's network calls (``nfe`` sums them).
* :func:`gradient_guided`: classifier (gradient) guidance by the reward of the x0 estimate
  (:class:`hasten.models.RewardGradientDenoiser`); needs a differentiable reward. ``nfe`` counts forward calls;
  each also backpropagates through the network, counted as two more evaluations
  (``RewardGradientDenoiser.evaluations_per_call``).

Compare them at equal network evaluations per sample (``benchmarks/reward/measure.py``).

Reference: Li et al., SVDD, 2024, Sec. 6 (best-of-N and classifier guidance as baselines); Dhariwal & Nichol,
"Diffusion Models Beat GANs", 2021 (classifier guidance).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .generate import Generation, generate
from .models.guidance import RewardGradientDenoiser
from .models.zoo import LoadedModel
from .rewards import Reward, get_reward, model_value
from .seeds import row_seed

__all__ = ["best_of_n", "draw_seed", "gradient_guided"]


def draw_seed(seed: int, draw: int) -> int:
    """The seed of best-of-N's draw ``draw``: the run's own seed for draw 0 (so one draw is plain sampling)."""
    return seed if draw == 0 else row_seed(seed, draw, "best-of-n")


def _refuse_reward(kwargs: dict[str, Any], what: str) -> None:
    clash = sorted({"reward", "particles", "alpha"} & set(kwargs))
    if clash:
        raise TypeError(f"{what} chooses by its own reward; do not pass {', '.join(clash)}")


def best_of_n(
    model: LoadedModel,
    n: int,
    reward: str | Callable[[Tensor], Tensor] | Reward,
    draws: int,
    *,
    seed: int = 0,
    **generate_kwargs: Any,
) -> Generation:
    """Sample every index ``draws`` times (seeds :func:`draw_seed`) and keep the draw with the highest reward.

    Sample ``j`` of every draw has the same label, so the choice is among ``draws`` samples of one condition.
    ``nfe`` is the network calls per sample summed over the draws; ``seconds`` includes scoring.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    _refuse_reward(generate_kwargs, "best_of_n")
    reward = get_reward(reward)
    best: Generation | None = None
    best_scores = None
    nfe, seconds = 0, 0.0
    for draw in range(draws):
        run = generate(model, n, seed=draw_seed(seed, draw), **generate_kwargs)
        start = time.perf_counter()
        with torch.no_grad():
            scores = reward(run.images01).detach().cpu()
        nfe, seconds = nfe + run.nfe, seconds + run.seconds + time.perf_counter() - start
        if best is None:
            best, best_scores = run, scores
            continue
        take = scores > best_scores  # ties keep the earlier draw
        rows = take.view(-1, *([1] * (run.images01.ndim - 1)))
        best.images01 = torch.where(rows, run.images01, best.images01)
        best.samples = torch.where(rows.to(run.samples.device), run.samples, best.samples)
        best_scores = torch.where(take, scores, best_scores)
    best.nfe, best.seconds, best.rewards = nfe, seconds, best_scores
    return best


def gradient_guided(
    model: LoadedModel,
    n: int,
    reward: str | Callable[[Tensor], Tensor] | Reward,
    scale: float,
    **generate_kwargs: Any,
) -> Generation:
    """Sample with classifier guidance by ``reward`` of the x0 estimate at weight ``scale`` (any solver).

    ``nfe`` counts forward calls; the equal-cost comparison counts each as
    ``RewardGradientDenoiser.evaluations_per_call`` (3) network evaluations. ``rewards`` holds each image's reward.
    """
    _refuse_reward(generate_kwargs, "gradient_guided")
    reward = get_reward(reward)
    guided = copy.copy(model)  # the same network and record, its denoiser wrapped for this run only
    guided.denoiser = RewardGradientDenoiser(model.denoiser, model_value(model, reward), scale)
    run = generate(guided, n, **generate_kwargs)
    with torch.no_grad():
        run.rewards = reward(run.images01).detach().cpu()
    return run

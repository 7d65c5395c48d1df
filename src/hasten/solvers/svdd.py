"""SVDD: derivative-free reward guidance by soft value-based decoding (the posterior-mean value, SVDD-PM).

At every stochastic step the sampler draws ``K`` candidate next states from the pre-trained transition (the
ancestral DDPM / DDIM-eta step: one network call gives the shared mean, each candidate adds its own noise), values
each candidate by the reward of its x0 estimate ``v_k = r(D(x_k, sigma'))`` (one network call per candidate) and
keeps one per sample: the best (``alpha = 0``, what both official repositories do) or one drawn with weights
``softmax(v / alpha)`` (``alpha > 0``, the paper's soft-optimal policy; ``alpha = inf`` is a uniform draw, so the
output law is the plain sampler's). The reward needs no gradient.

Cost: the kept candidate's x0 estimate is exactly the network call the next step starts from (same input, same
level), so it is reused: a run of ``S`` steps whose last step lands on 0 makes ``1 + K (S - 1)`` network calls,
every one counted by the loop (NFE). ``K = 1`` evaluates nothing extra and is the plain sampler bit for bit.

Randomness: candidate ``k`` uses the noise source's extra draw ``k`` of the move (``noise(sigma, sigma', draw=k)``,
:mod:`hasten.solvers.brownian`), candidate 0 the move's own noise, and the soft choice a Gumbel-max over draw
``K`` (turned uniform through the normal CDF); all per row reproducible under :mod:`hasten.seeds`.

Reference: Li et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft Value-Based
Decoding", 2024, Alg. 1 (SVDD-PM: the value ``r(x0_hat(x_{t-1}))``); the official code (masa-ue/SVDD,
masa-ue/SVDD-image) selects by argmax; Gumbel-max: Gumbel, 1954 / Maddison et al., "A* Sampling", 2014.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import Model, NoiseFn, Solver, StepInfo, ddim_step
from .euler import EulerAncestral, ancestral_levels

__all__ = ["SVDDState", "SoftValueDecoding", "check_values"]


def check_values(values: Any, rows: int, source: str) -> Tensor:
    """``values`` if it is a finite ``[rows]`` tensor, else a ValueError naming ``source`` (a reward, a value)."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{source} must return a tensor of shape [{rows}], got {type(values).__name__}")
    if tuple(values.shape) != (rows,):
        raise ValueError(
            f"{source} returned shape {tuple(values.shape)} for {rows} images; it must return one number per image, "
            f"shape [{rows}]"
        )
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{source} returned NaN or infinity for {bad} of {rows} images; a reward must be finite")
    return values


@dataclasses.dataclass(frozen=True)
class SVDDState:
    """What a step hands the next: the state it returned and the model's x0 estimate there (reused, not recomputed)."""

    x: Tensor
    denoised: Tensor


@dataclasses.dataclass(frozen=True)
class SoftValueDecoding(Solver):
    """Soft value-based decoding (SVDD-PM) around an ancestral step: ``K`` candidates per step, one kept by value.

    Args:
        transition: The pre-trained stochastic transition the candidates are drawn from: an ancestral step
            (``ddpm`` / ``euler_ancestral``, or ``ddim`` with ``eta > 0``).
        particles: Candidates per step, ``K >= 1``; 1 is the plain transition.
        alpha: Temperature of the choice: 0 keeps the best candidate, ``alpha > 0`` draws one with weights
            ``softmax(v / alpha)``, ``inf`` uniformly.
        value: ``value(x0_hat) -> [B]`` on the model-space x0 estimates of a batch of candidates (higher is better);
            :func:`hasten.rewards.model_value` builds one from a reward on images. Not plain data, so an SVDD solver
            is built per run (:func:`hasten.generate` does), not written into recipes.

    Reference: Li et al., SVDD, 2024, Alg. 1 (SVDD-PM).
    """

    name = "svdd"  # not a registered preset: it needs a value function
    transition: EulerAncestral = dataclasses.field(default_factory=EulerAncestral)
    particles: int = 1
    alpha: float = 0.0
    value: Callable[[Tensor], Tensor] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.transition, EulerAncestral):
            raise TypeError(
                f"SVDD draws candidates from an ancestral step (ddpm, euler_ancestral, ddim with eta > 0); got "
                f"{type(self.transition).__name__}"
            )
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"particles must be an integer >= 1, got {self.particles!r}")
        if not (isinstance(self.alpha, int | float) and self.alpha >= 0):  # NaN fails this too
            raise ValueError(f"alpha must be a number >= 0 (0: keep the best candidate), got {self.alpha!r}")
        if self.particles > 1:
            if not self.transition.stochastic:
                raise ValueError(
                    f"particles={self.particles} needs a stochastic transition to draw candidates from; "
                    f"{self.transition.name!r} with eta={self.transition.eta:g} is deterministic: use eta > 0 "
                    "(ddpm has eta = 1)"
                )
            if self.value is None:
                raise ValueError(f"particles={self.particles} needs a value function to choose among the candidates")

    def to_dict(self) -> dict[str, Any]:
        raise TypeError("an SVDD solver holds a value function, which is not plain data; record the reward instead")

    @property
    def stochastic(self) -> bool:
        return self.transition.stochastic

    @property
    def brownian_noise(self) -> bool:
        return self.transition.brownian_noise

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        if self.particles == 1:
            return self.transition.step(model, x, info, None, noise)
        # the previous step valued the state it returned at this level: that call is this step's network call
        # (unless a callback replaced x in between)
        reuse = isinstance(state, SVDDState) and state.x is x
        denoised = state.denoised if reuse else model(x, info.sigma)
        sigma_down, sigma_up = ancestral_levels(info.sigma, info.sigma_next, self.transition.eta)
        mean = ddim_step(x, denoised, info.sigma, sigma_down)
        if sigma_up == 0:  # a deterministic move (onto sigma = 0): nothing to choose
            return mean, None
        spread = self.transition.s_noise * sigma_up
        gumbel = None if self.alpha == 0 else self._gumbel(noise, info, x.shape[0])
        best_x = best_d = best_key = None
        for k in range(self.particles):  # streamed: memory of one candidate batch, not K
            candidate = mean + noise(info.sigma, info.sigma_next, draw=k) * spread
            estimate = model(candidate, info.sigma_next)
            v = check_values(self.value(estimate), x.shape[0], f"the value function {self.value!r}").to(torch.float64)
            key = v if gumbel is None else (gumbel[:, k] if math.isinf(self.alpha) else v / self.alpha + gumbel[:, k])
            if best_key is None:
                best_x, best_d, best_key = candidate, estimate, key
                continue
            take = key > best_key  # strict: ties keep the earlier candidate (candidate 0 is the plain move)
            where = take.view(-1, *([1] * (x.ndim - 1)))
            best_x = torch.where(where, candidate, best_x)
            best_d = torch.where(where, estimate, best_d)
            best_key = torch.where(take, key, best_key)
        return best_x, SVDDState(best_x, best_d)

    def _gumbel(self, noise: NoiseFn, info: StepInfo, rows: int) -> Tensor:
        """``[rows, K]`` standard Gumbel variables from the move's extra draws ``K, K + 1, ...`` (per row seeded)."""
        columns, draw = [], self.particles
        while sum(c.shape[1] for c in columns) < self.particles:
            columns.append(noise(info.sigma, info.sigma_next, draw=draw).reshape(rows, -1).to(torch.float64))
            draw += 1
        z = torch.cat(columns, dim=1)[:, : self.particles]
        uniform = (0.5 * torch.erfc(-z / math.sqrt(2.0))).clamp(1e-300, 1.0 - 1e-16)
        return -torch.log(-torch.log(uniform))

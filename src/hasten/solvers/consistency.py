"""Multistep consistency sampling: jump to data, re-noise to the next level, repeat."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from ._base import Model, NoiseFn, Solver, StepInfo, register_solver


@register_solver("consistency")
@dataclasses.dataclass(frozen=True)
class ConsistencySampler(Solver):
    """Consistency sampling: ``x0 = f(x, sigma_i)``, then ``x_next = x0 + sqrt(sigma_next^2 - sigma_min^2) z``.

    For a consistency model ``f`` (a denoiser whose output is the end of its probability-flow trajectory at
    the boundary level ``sigma_min``, e.g. a ``hasten distill --method consistency`` student). Each step costs
    one call; a step onto 0 (or onto a level at or below ``sigma_min``) returns ``x0`` with no noise, so ``n``
    steps on a grid ending at 0 are ``n`` calls and one step is the one-shot sample. With an exact ``f`` every
    step keeps the marginal ``p_sigma`` exactly, whatever the grid; the grid only trades how much of the
    student's error each re-noising forgets. No convergence order: more steps do not approach an ODE solution.

    Args:
        sigma_min: The boundary level the model was trained with (its ``consistency`` record; a student's own
            recipe sets it). ``x0`` counts as a sample at ``sigma_min``, so the noise added brings it to
            ``sigma_next`` exactly. 0: a plain denoiser used as a one-jump sampler.
        brownian: Draw the noise from one Brownian path fixed by the generator (the library's default for
            stochastic solvers); ``False`` draws fresh noise per step, as the reference code does. Either way
            each step's noise is standard normal and independent of the others.

    Reference: Song et al., "Consistency Models", ICML 2023, Algorithm 1 (multistep consistency sampling);
    openai/consistency_models ``karras_diffusion.stochastic_iterative_sampler``.
    """

    order = 1  # no convergence order (see above); stochastic, so the order tests leave it out
    sigma_min: float = 0.0
    brownian: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sigma_min, bool) or not 0 <= self.sigma_min < math.inf:
            raise ValueError(f"sigma_min must be a finite number >= 0, got {self.sigma_min!r}")

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def brownian_noise(self) -> bool:
        return self.brownian

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        denoised = model(x, info.sigma)
        if info.sigma_next <= self.sigma_min:
            return denoised, None
        scale = math.sqrt(info.sigma_next**2 - self.sigma_min**2)
        return denoised + noise(info.sigma, info.sigma_next) * scale, None

"""CTM's gamma-sampling: anytime-to-anytime jumps of a two-time network, with a share of fresh noise.

Reference: Kim et al., "Consistency Trajectory Model: Learning Probability Flow ODE Trajectory of Diffusion",
ICLR 2024, Alg. 2 (gamma-sampling) and Eq. 7 (the jump ``G``); sony/ctm ``cm/sample_util.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from ._base import Model, NoiseFn, Solver, StepInfo, ddim_step, register_solver


@register_solver("ctm_gamma")
@dataclasses.dataclass(frozen=True)
class GammaSampling(Solver):
    """One jump of a two-time network per step, then fresh noise: CTM's gamma-sampling.

    A two-time network's denoiser takes the level it jumps to as the conditioning input ``target_sigma`` and
    returns ``g(x, sigma, s)``; the jump is ``G(x, sigma, s) = (s / sigma) x + (1 - s / sigma) g`` (a DDIM step
    with ``g``, so ``G(x, sigma, sigma) = x`` exactly). For the step ``sigma -> sigma'``:
    ``s = sqrt(1 - gamma^2) sigma'``, ``x <- G(x, sigma, s)``, ``x <- x + sqrt(sigma'^2 - s^2) z``. hasten's
    grids end at 0, which is the paper's ``sigma_min`` here. ``gamma = 0`` follows the ODE with long jumps
    (deterministic); ``gamma = 1`` jumps to 0 and re-noises to ``sigma'``: multistep consistency sampling.
    One network call per step.

    Args:
        gamma: Share of noise renewed per step, in [0, 1].
        brownian: Draw the noise from one Brownian path fixed by the generator (as ``euler_ancestral``);
            ``False`` draws fresh noise per step (the paper's sampler).
    """

    order = 1
    gamma: float = 0.0
    brownian: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")

    @property
    def stochastic(self) -> bool:
        return self.gamma > 0

    @property
    def brownian_noise(self) -> bool:
        return self.brownian

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        sigma, sigma_next = info.sigma, info.sigma_next
        target = math.sqrt(1.0 - self.gamma**2) * sigma_next
        x = ddim_step(x, model(x, sigma, target_sigma=target), sigma, target)
        renew = math.sqrt(max(sigma_next**2 - target**2, 0.0))
        if renew > 0:
            x = x + noise(sigma, sigma_next) * renew
        return x, None

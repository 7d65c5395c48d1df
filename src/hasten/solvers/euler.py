"""Euler (= deterministic DDIM), ancestral Euler (= DDIM with eta, DDPM posterior) and Heun."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from torch import Tensor

from ..config import check_choice
from ._base import SPACES, Model, NoiseFn, Solver, StepInfo, ddim_step, register_solver, space_coordinates


@register_solver("euler")
@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    """Euler on the VE probability-flow ODE ``dx/dsigma = (x - D) / sigma``, identical to DDIM (eta = 0).

    Reference: Song et al., DDIM, ICLR 2021, Eq. 12 with sigma_t = 0; Karras et al., EDM, Sec. 3.
    """

    order = 1

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        denoised = model(x, info.sigma)
        return ddim_step(x, denoised, info.sigma, info.sigma_next), None


def ancestral_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the move to ``sigma_next`` into a deterministic part to ``sigma_down`` plus fresh noise ``sigma_up``.

    ``sigma_up = eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)``, ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``.
    In VP terms this is exactly DDIM's ``c1`` / ``c2`` split, so eta = 1 gives the DDPM posterior.

    Reference: Song et al., DDIM, Eq. 16; k-diffusion ``get_ancestral_step``.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@register_solver("ddpm", alias_of="euler_ancestral")
@register_solver("euler_ancestral", eta=1.0)
@register_solver("ddim", eta=0.0)
@dataclasses.dataclass(frozen=True)
class EulerAncestral(Solver):
    """DDIM with stochasticity ``eta``: a deterministic DDIM step to ``sigma_down``, then fresh noise ``sigma_up``.

    ``eta = 0`` is deterministic DDIM (= ``euler``); ``eta = 1`` is ancestral sampling from the DDPM
    posterior ``q(x_{t-1} | x_t, x0_hat)`` with the "fixed small" variance (diffusers' ``DDPMScheduler``).

    Args:
        eta: Noise fraction in [0, 1] (above 1 is allowed as in the references, capped at sigma_next).
        s_noise: Scale of the added noise (EDM's S_noise); 1 is exact.
        brownian: Draw the noise from one Brownian path fixed by the generator (default: the same seed
            follows one path at any step count, and with eta = 1 each step adds the SDE's exact noise);
            ``False`` draws fresh noise per step, as diffusers' and k-diffusion's samplers do.

    Reference: Song et al., DDIM, ICLR 2021, Eq. 12 and 16; Ho et al., DDPM, Eq. 6-7.
    """

    order = 1
    eta: float = 1.0
    s_noise: float = 1.0
    brownian: bool = True

    def __post_init__(self) -> None:
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @property
    def brownian_noise(self) -> bool:
        return self.brownian

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        denoised = model(x, info.sigma)
        sigma_down, sigma_up = ancestral_levels(info.sigma, info.sigma_next, self.eta)
        x = ddim_step(x, denoised, info.sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise(info.sigma, info.sigma_next) * (self.s_noise * sigma_up)
        return x, None


@register_solver("heun")
@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """Heun's second-order method on ``dy/du = (y - D) / u``; 2 NFE per step, 1 on a step to 0.

    Args:
        space: ``"ve"`` integrates in ``(x, sigma)`` (EDM, diffusers' ``HeunDiscreteScheduler``);
            ``"flow"`` in rectified-flow coordinates (diffusers' ``FlowMatchHeunDiscreteScheduler``), the
            right choice for flow-matching models, whose first VE level is ~1e4 (see
            :func:`~hasten.solvers.space_coordinates`). :func:`hasten.generate` picks ``"flow"`` for them.

    Reference: Karras et al., EDM, NeurIPS 2022, Algorithm 1 (deterministic, S_churn = 0).
    """

    order = 2
    space: Literal["ve", "flow"] = "ve"

    def __post_init__(self) -> None:
        check_choice("space", self.space, SPACES)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        sigma, sigma_next = info.sigma, info.sigma_next
        # The Euler step is DDIM in every space.
        denoised = model(x, sigma)
        x_euler = ddim_step(x, denoised, sigma, sigma_next)
        if sigma_next == 0:
            return x_euler, None
        # 2nd-order correction y' = y + h (d + d') / 2 with y = a x, d = (y - D) / u, d' = (a' x_euler - D') / u',
        # h = u' - u, divided by a' and expanded in x, x_euler, D and D' so the update is one fused pass.
        denoised_next = model(x_euler, sigma_next)
        u, a = space_coordinates(sigma, self.space)
        u_next, a_next = space_coordinates(sigma_next, self.space)
        h = u_next - u
        c_x = (a / a_next) * (1.0 + 0.5 * h / u)
        c_e = 0.5 * h / u_next
        return x.mul(c_x).add_(x_euler, alpha=c_e).add_(denoised, alpha=-0.5 * h / (u * a_next)).add_(
            denoised_next, alpha=-0.5 * h / (u_next * a_next)
        ), None

"""PNDM's pseudo linear multistep method (PLMS) with its three warm-up options.

PNDM's "transfer" ``phi(x, eps, t -> t')`` is a DDIM step driven by a combined noise estimate; in VE form
it is ``x' = x + (sigma' - sigma) eps``. After warm-up, the noise estimates of the last four steps are
combined with the fourth-order Adams-Bashforth weights (55, -59, 37, -9) / 24. The weights assume equal
steps, so PLMS is high order on grids uniform in its integration time ``u`` and lower elsewhere: ``u = sigma``
in the default ``space="ve"``, the flow time ``t`` in ``space="flow"`` (where ``eps`` becomes the velocity and
a flow model's default grid is uniform; see :func:`~hasten.solvers.space_coordinates`).

Warm-up (``warmup``):
* ``"prk"``: F-PNDM, three pseudo Runge-Kutta (RK4) steps of 4 NFE each; midpoints at the arithmetic
  mean of the two sigmas. NFE = steps + 9.
* ``"heun"``: what diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (Stable Diffusion's PLMS) does: the
  first step is a pseudo improved-Euler step (2 NFE), then AB2, AB3, AB4. NFE = steps + 1.
* ``"lower_order"``: Adams-Bashforth of order 1, 2, 3, then 4 (iPNDM-style), 1 NFE per step.

Reference: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds", ICLR 2022,
Eq. 9-13 (F-PNDM, S-PNDM); Zhang & Chen, DEIS, ICLR 2023, App. (iPNDM warm-up).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from ..config import check_choice
from ._base import SPACES, Model, NoiseFn, Solver, StepInfo, register_solver, sigma_of, space_coordinates

# Adams-Bashforth weights, newest first.
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclasses.dataclass(frozen=True)
class PLMSState:
    """Noise estimates stored for the multistep combination, newest first."""

    eps: tuple[Tensor, ...] = ()


@register_solver("plms")
@dataclasses.dataclass(frozen=True)
class PLMS(Solver):
    """Pseudo linear multistep (PNDM) on noise estimates, fourth-order Adams-Bashforth after warm-up.

    Args:
        warmup: ``"prk"`` (F-PNDM), ``"heun"`` (diffusers' skip_prk_steps PLMS) or ``"lower_order"``.
        space: ``"ve"`` or ``"flow"`` (the integration space; :func:`hasten.generate` picks ``"flow"`` for
            flow-matching models).

    Reference: Liu et al., PNDM, ICLR 2022, Alg. 2 (F-PNDM) and Eq. 12 (PLMS).
    """

    order = 4
    warmup: Literal["prk", "heun", "lower_order"] = "prk"
    space: Literal["ve", "flow"] = "ve"

    def __post_init__(self) -> None:
        check_choice("warmup", self.warmup, ("prk", "heun", "lower_order"))
        check_choice("space", self.space, SPACES)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        state = state or PLMSState()
        sigma, sigma_next = info.sigma, info.sigma_next
        u, a = space_coordinates(sigma, self.space)
        u_next, a_next = space_coordinates(sigma_next, self.space)

        def eps_at(x_: Tensor, s: float) -> Tensor:
            # dy/du = (y - D) / u = a (x - D / a) / u; in VE this is (x - D) / sigma.
            u_s, a_s = space_coordinates(s, self.space)
            return torch.sub(x_, model(x_, s), alpha=1.0 / a_s).mul_(a_s / u_s)

        def transfer(e: Tensor, s_to: float) -> Tensor:
            # y(s_to) = a x + (u_to - u) e, returned as x = y / a_to.
            u_to, a_to = space_coordinates(s_to, self.space)
            return torch.add(x, e, alpha=(u_to - u) / a).mul_(a / a_to)

        e_1 = eps_at(x, sigma)
        history = (e_1, *state.eps)[:4]
        n_prev = len(state.eps)
        if self.warmup == "prk" and n_prev < 3 and sigma_next > 0:
            # Pseudo RK4: three more evaluations, only e_1 is kept.
            mid = sigma_of(0.5 * (u + u_next), self.space)
            e_2 = eps_at(transfer(e_1, mid), mid)
            e_3 = eps_at(transfer(e_2, mid), mid)
            e_4 = eps_at(transfer(e_3, sigma_next), sigma_next)
            eps = (e_1 + 2 * e_2 + 2 * e_3 + e_4) / 6
        elif self.warmup == "heun" and n_prev == 0 and sigma_next > 0:
            # Pseudo improved Euler: one more evaluation at the predicted point, only e_1 is kept.
            e_2 = eps_at(transfer(e_1, sigma_next), sigma_next)
            eps = (e_1 + e_2) / 2
        else:
            # x + (sigma' - sigma) sum_j w_j e_j, fused into one pass per history entry.
            dt = (u_next - u) / a
            weights = _AB[min(len(history), 4)]
            x_next = torch.add(x, history[0], alpha=dt * weights[0])
            for w, e in zip(weights[1:], history[1:]):
                x_next.add_(e, alpha=dt * w)
            return x_next.mul_(a / a_next), PLMSState(history[:3])
        return transfer(eps, sigma_next), PLMSState(history[:3])

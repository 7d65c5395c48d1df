"""Multistep DPM-Solver / DPM-Solver++ (2M, 3M) and the SDE variant DPM-Solver++(2M) SDE.

All formulas are in VE form (``alpha = 1``, ``sigma`` the VE level, ``lambda = -log sigma``); the
exponential integrators are invariant to the VP <-> VE rescaling, so they equal the papers' VP formulas.
History (denoised outputs and their sigmas, newest first) is explicit state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from torch import Tensor

from ..config import check_choice
from ._base import Model, NoiseFn, Solver, StepInfo, ddim_step, lambda_of, register_solver
from .singlestep import singlestep_update


@dataclasses.dataclass(frozen=True)
class MultistepState:
    """Previous model outputs and their noise levels, newest first.

    ``outputs`` are data predictions (``prediction="data"``) or noise predictions (``"noise"``).
    """

    outputs: tuple[Tensor, ...] = ()
    sigmas: tuple[float, ...] = ()


def multistep_order(
    order: int, history: int, info: StepInfo, lower_order_final: bool, lower_order_final_below: int
) -> int:
    """The order used at this step: warm-up from 1, lower order near the end, first order onto sigma = 0.

    The final rule follows diffusers (``lower_order_final`` applies when there are fewer than 15 steps;
    the official DPM-Solver code uses 10: set ``lower_order_final_below=10``). A step onto sigma = 0 is
    always first order: ``lambda = inf`` there, and the first-order step lands exactly on ``x0_hat``.
    """
    k = min(order, history + 1)
    if lower_order_final and info.num_steps < lower_order_final_below:
        k = min(k, info.remaining)
    if info.sigma_next == 0:
        k = 1
    return k


@register_solver("dpmpp_2m", order=2)
@register_solver("dpmpp_3m", order=3)
@register_solver("dpm_solver_2m", order=2, prediction="noise")
@register_solver("dpm_solver_3m", order=3, prediction="noise")
@register_solver("dpmpp_2m_sde", order=2, eta=1.0)
@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(Solver):
    """Multistep DPM-Solver(++) of order 1-3; with ``eta > 0`` the DPM-Solver++(2M) SDE.

    Args:
        order: 1, 2 or 3 (order 3 uses the 'taylor' form for both solver types, as the references do).
        prediction: ``"data"`` (DPM-Solver++) or ``"noise"`` (DPM-Solver).
        solver_type: ``"midpoint"`` (the papers' 'dpmsolver' form, diffusers' default) or ``"heun"``
            ('taylor'), for the second-order term.
        lower_order_final: Drop to lower orders in the last steps of short runs (stabilises < 15 steps).
        lower_order_final_below: The rule applies when the run has fewer steps than this (diffusers 15,
            official code 10).
        third_order_term: ``"taylor"`` (default) weights the second difference ``D2 ~ h^2 m''/2`` as the
            Taylor expansion requires: third order (from noise with the singlestep start below).
            ``"reference"`` reproduces the DPM-Solver code, diffusers and k-diffusion, which apply the
            coefficient derived for ``h^2 m''`` to ``D2`` and so carry half the second-derivative term:
            their 3M is second order. Measured at equal NFE (docs/guide/solvers.md): the Taylor 3M has
            0.75x / 0.43x the error of diffusers' at 6 / 11 NFE on the bundled mnist-unet, about the same
            on mnist-dit, and more than it below ~30 NFE on two analytic mixtures.
        warmup: How the first step, which has no history, is taken. ``"lower_order"`` (the references:
            first order, then second) leaves an ``O(h^2)`` error that caps the Taylor 3M at global order
            2 from noise. ``"singlestep"`` takes the first step with the second-order singlestep
            DPM-Solver(++)-2 (one extra model call at the lambda midpoint, counted in NFE), whose
            ``O(h^3)`` error keeps order 3. ``"auto"`` (default): ``"singlestep"`` for the Taylor 3M (the
            one method whose order the start limits), ``"lower_order"`` otherwise.
        eta: SDE noise (data prediction, order <= 2): 0 is the ODE solver, 1 the DPM-Solver++ SDE.
        brownian: SDE noise from one Brownian path fixed by the generator (default, as k-diffusion's
            Brownian tree: the same seed follows one path at any step count; with eta = 1 each step adds
            the SDE's exact noise); ``False`` draws fresh noise per step, as diffusers does.

    Reference: Lu et al., "DPM-Solver++", 2022, Alg. 2 (2M) and App. B (3M); Lu et al., "DPM-Solver",
    NeurIPS 2022, Sec. 3.3; SDE: Lu et al. 2022 Sec. 5 / diffusers ``sde-dpmsolver++`` and k-diffusion
    ``sample_dpmpp_2m_sde`` (eta).
    """

    order: int = 2
    prediction: Literal["data", "noise"] = "data"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    lower_order_final_below: int = 15
    eta: float = 0.0
    third_order_term: Literal["taylor", "reference"] = "taylor"
    warmup: Literal["auto", "lower_order", "singlestep"] = "auto"
    brownian: bool = True

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("warmup", self.warmup, ("auto", "lower_order", "singlestep"))
        if self.warmup == "singlestep" and self.eta > 0:
            raise ValueError(
                "warmup='singlestep' is for the ODE solver; the SDE variant (eta > 0) warms up lower_order"
            )
        check_choice("prediction", self.prediction, ("data", "noise"))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("third_order_term", self.third_order_term, ("taylor", "reference"))
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and (self.prediction != "data" or self.order > 2):
            raise ValueError("the SDE variant (eta > 0) needs prediction='data' and order <= 2")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @property
    def brownian_noise(self) -> bool:
        return self.brownian

    @property
    def singlestep_warmup(self) -> bool:
        """Whether the first step is a second-order singlestep step (``warmup`` resolved)."""
        if self.warmup == "auto":
            return self.order == 3 and self.third_order_term == "taylor" and self.eta == 0
        return self.warmup == "singlestep"

    @property
    def convergence_order(self) -> int:
        """Global order from noise: the reference 3M, or the Taylor 3M after a first-order start, is 2."""
        if self.order == 3 and (self.third_order_term == "reference" or not self.singlestep_warmup):
            return 2
        return self.order

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        state = state or MultistepState()
        sigma, sigma_next = info.sigma, info.sigma_next
        denoised = model(x, sigma)
        output = denoised if self.prediction == "data" else (x - denoised) / sigma
        keep = self.order - 1
        if not state.outputs and self.singlestep_warmup and sigma_next > 0:
            # Order this step may have with a full history (lower_order_final may cap it at 1).
            if multistep_order(self.order, self.order, info, self.lower_order_final, self.lower_order_final_below) > 1:
                return self._singlestep_start(model, x, denoised, output, sigma, sigma_next, keep)
        k = multistep_order(self.order, len(state.outputs), info, self.lower_order_final, self.lower_order_final_below)
        ms, sigmas = (output, *state.outputs), (sigma, *state.sigmas)
        if self.eta > 0:
            x_next = self._sde_update(x, ms, sigmas, sigma_next, k, noise)
        elif self.prediction == "data":
            x_next = self._data_update(x, ms, sigmas, sigma_next, k)
        else:
            x_next = self._noise_update(x, ms, sigmas, sigma_next, k)
        return x_next, MultistepState(ms[:keep], sigmas[:keep])

    def _singlestep_start(self, model, x, denoised, output, sigma, sigma_next, keep):
        """DPM-Solver(++)-2 with ``r = 1/2``: first order to the lambda midpoint, then the second-order step."""
        sigma_mid = math.sqrt(sigma * sigma_next)  # lambda midpoint
        x_mid = ddim_step(x, denoised, sigma, sigma_mid)  # the first-order step, in either prediction
        denoised_mid = model(x_mid, sigma_mid)
        output_mid = denoised_mid if self.prediction == "data" else (x_mid - denoised_mid) / sigma_mid
        pairs = [(sigma, output), (sigma_mid, output_mid)]
        x_next = singlestep_update(x, sigma, sigma_next, pairs, self.prediction, "midpoint")
        # Only the first output is kept: the second step is then a 2M step, whose O(h^3) error keeps order 3.
        return x_next, MultistepState((output,)[:keep], (sigma,)[:keep])

    # -- the update rules ---------------------------------------------------------------------------
    # Each rule is x' = c_x x + sum_j c_j m_j (+ noise); the divided differences D1 ~ h m' and D2 are
    # linear in the history, so they are folded into the c_j and the update is one fused pass.
    def _difference_weights(self, sigmas, h, k):
        """Weights of the history in ``D1`` and ``D2`` (lists over m_0..m_{k-1})."""
        if k == 1:
            return [0.0], [0.0]
        lam0 = lambda_of(sigmas[0])
        r0 = (lam0 - lambda_of(sigmas[1])) / h
        if k == 2:  # D1 = (m0 - m1) / r0
            return [1.0 / r0, -1.0 / r0], [0.0, 0.0]
        r1 = (lambda_of(sigmas[1]) - lambda_of(sigmas[2])) / h
        # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1; D1 = D1_0 + a (D1_0 - D1_1); D2 = b (D1_0 - D1_1)
        a = r0 / (r0 + r1)
        # D2 ~ h^2 m'' / 2; the Taylor weight is twice the reference code's (see third_order_term).
        b = (2.0 if self.third_order_term == "taylor" else 1.0) / (r0 + r1)
        d1 = [(1 + a) / r0, -(1 + a) / r0 - a / r1, a / r1]
        d2 = [b / r0, -b / r0 - b / r1, b / r1]
        return d1, d2

    @staticmethod
    def _combine(x: Tensor, c_x: float, ms, coefficients) -> Tensor:
        out = x.mul(c_x)
        for m, c in zip(ms, coefficients):
            if c != 0.0:
                out.add_(m, alpha=c)
        return out

    def _data_update(self, x, ms, sigmas, sigma_next, k):
        """DPM-Solver++: ``x' = (s'/s) x - expm1(-h) m0 + g1 D1 - g2 D2``."""
        if sigma_next == 0:  # lambda = inf: the first-order step lands on x0_hat
            return ms[0].clone()
        h = lambda_of(sigma_next) - lambda_of(sigmas[0])
        phi_1 = math.expm1(-h)
        if k == 2 and self.solver_type == "midpoint":
            g1, g2 = -0.5 * phi_1, 0.0
        else:
            g1, g2 = phi_1 / h + 1.0, -((phi_1 + h) / h**2 - 0.5)
        d1, d2 = self._difference_weights(sigmas, h, k)
        cs = [g1 * w1 + g2 * w2 for w1, w2 in zip(d1, d2)]
        cs[0] -= phi_1
        return self._combine(x, sigma_next / sigmas[0], ms[:k], cs)

    def _noise_update(self, x, eps, sigmas, sigma_next, k):
        """DPM-Solver: ``x' = x - s' expm1(h) eps0 - s' (g1 D1 + g2 D2)``."""
        if sigma_next == 0:  # the limit of the first-order step: land on x0_hat
            return x - sigmas[0] * eps[0]
        h = lambda_of(sigma_next) - lambda_of(sigmas[0])
        phi_1 = math.expm1(h)
        if k == 2 and self.solver_type == "midpoint":
            g1, g2 = 0.5 * phi_1, 0.0
        else:
            g1, g2 = phi_1 / h - 1.0, (phi_1 - h) / h**2 - 0.5
        d1, d2 = self._difference_weights(sigmas, h, k)
        cs = [-sigma_next * (g1 * w1 + g2 * w2) for w1, w2 in zip(d1, d2)]
        cs[0] -= sigma_next * phi_1
        return self._combine(x, 1.0, eps[:k], cs)

    def _sde_update(self, x, ms, sigmas, sigma_next, k, noise):
        """DPM-Solver++ SDE: the data update with ``h_eta = (1 + eta) h`` and matching fresh noise."""
        if sigma_next == 0:
            return ms[0].clone()
        h = lambda_of(sigma_next) - lambda_of(sigmas[0])
        h_eta = (1.0 + self.eta) * h
        coeff = -math.expm1(-h_eta)  # 1 - exp(-(1 + eta) h)
        g1 = 0.5 * coeff if self.solver_type == "midpoint" else math.expm1(-h_eta) / h_eta + 1.0
        d1, _ = self._difference_weights(sigmas, h, k)
        cs = [g1 * w for w in d1]
        cs[0] += coeff
        x_next = self._combine(x, (sigma_next / sigmas[0]) * math.exp(-self.eta * h), ms[:k], cs)
        return x_next.add_(noise(sigmas[0], sigma_next), alpha=sigma_next * math.sqrt(-math.expm1(-2.0 * self.eta * h)))

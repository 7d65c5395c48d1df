"""Singlestep DPM-Solver / DPM-Solver++ (orders 1-3) and the stochastic DPM++ SDE.

Two ways to place a singlestep solver's intermediate evaluations:

* ``intermediate="lambda"`` (the papers): each step of the grid is one full step of order k, with its
  k - 1 intermediate points at fractions ``r1`` (``r2``) of the step in lambda. NFE = k per step.
* ``intermediate="grid"`` (diffusers' ``DPMSolverSinglestepScheduler``): every grid point is one
  evaluation; groups of consecutive points form one singlestep step whose order follows diffusers'
  ``get_order_list`` (e.g. 1, 2, 3, 1, 2, 3, ... for order 3). NFE = number of steps.

Formulas are in VE form (``alpha = 1``, ``lambda = -log sigma``).

Reference: Lu et al., "DPM-Solver", NeurIPS 2022, Alg. 1-2 (DPM-Solver-2/3); Lu et al.,
"DPM-Solver++", 2022, Alg. 1 (2S) and App. B (3S); k-diffusion ``sample_dpmpp_sde`` (DPM++ SDE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from torch import Tensor

from ..config import check_choice
from ._base import Model, NoiseFn, Solver, StepInfo, ddim_step, lambda_of, register_solver
from .euler import ancestral_levels

Prediction = Literal["data", "noise"]
SolverType = Literal["midpoint", "heun"]


def singlestep_update(
    x_a: Tensor,
    sigma_a: float,
    sigma_t: float,
    outputs: list[tuple[float, Tensor]],
    prediction: Prediction,
    solver_type: SolverType,
) -> Tensor:
    """One singlestep update of order ``len(outputs)`` from the anchor ``(x_a, sigma_a)`` to ``sigma_t``.

    ``outputs`` are ``(sigma_k, m_k)`` pairs: the anchor's own output first, then the intermediate
    evaluations (data predictions, or noise predictions for ``prediction="noise"``). ``solver_type``
    ``"midpoint"`` is the papers' 'dpmsolver' form, ``"heun"`` the 'taylor' form.
    """
    m_a = outputs[0][1]
    if sigma_t == 0:  # lambda = inf: only the first-order limit exists, which lands on x0_hat
        return m_a if prediction == "data" else x_a - sigma_a * m_a
    lam_a = lambda_of(sigma_a)
    h = lambda_of(sigma_t) - lam_a
    rs = [(lambda_of(s) - lam_a) / h for s, _ in outputs[1:]]
    # Data form: x = (s_t/s_a) x_a - phi_1 m_a + g1 D1 - g2 D2 with phi_1 = expm1(-h);
    # noise form: x = x_a - s_t phi_1 eps_a - s_t (g1 D1 + g2 D2) with phi_1 = expm1(h).
    if prediction == "data":
        phi_1 = math.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        c_x, c_a, sign = sigma_t / sigma_a, -phi_1, 1.0
    else:
        phi_1 = math.expm1(h)
        phi_2 = phi_1 / h - 1.0
        c_x, c_a, sign = 1.0, -sigma_t * phi_1, -sigma_t
    phi_3 = phi_2 / h - 0.5
    # Weights of the intermediate outputs m_1.. in the D1/D2 terms (each D is linear in m_k - m_a).
    if len(outputs) == 1:
        weights: list[float] = []
    elif len(outputs) == 2:  # D1 = (m_1 - m_a) / r1
        g1 = (-0.5 * phi_1 if prediction == "data" else 0.5 * phi_1) if solver_type == "midpoint" else phi_2
        weights = [(g1 if prediction == "data" else sign * g1) / rs[0]]
    elif solver_type == "midpoint":  # + phi_2 D1_1, D1_1 = (m_2 - m_a) / r2
        weights = [0.0, sign * phi_2 / rs[1]]
    else:  # taylor: D1 = (r2 D1_0 - r1 D1_1)/(r2 - r1), D2 = 2 (D1_1 - D1_0)/(r2 - r1)
        r1, r2 = rs
        w_d1_0 = phi_2 * r2 / (r2 - r1) + phi_3 * 2.0 / (r2 - r1) * (1.0 if prediction == "data" else -1.0)
        w_d1_1 = -phi_2 * r1 / (r2 - r1) - phi_3 * 2.0 / (r2 - r1) * (1.0 if prediction == "data" else -1.0)
        weights = [sign * w_d1_0 / r1, sign * w_d1_1 / r2]
    out = x_a.mul(c_x)
    for (_, m), w in zip(outputs[1:], weights):
        if w != 0.0:
            out.add_(m, alpha=w)
        c_a -= w
    return out.add_(m_a, alpha=c_a)


@dataclasses.dataclass(frozen=True)
class SinglestepState:
    """Grid mode only: the group's anchor point and the outputs evaluated since it."""

    x: Tensor | None = None
    sigma: float = 0.0
    outputs: tuple[tuple[float, Tensor], ...] = ()


def diffusers_order_list(steps: int, order: int, lower_order_final: bool, final_is_zero: bool) -> list[int]:
    """The per-step orders of diffusers' ``DPMSolverSinglestepScheduler.get_order_list``."""
    if order == 1:
        orders = [1] * steps
    elif order == 2:
        if lower_order_final:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1, 2] * (steps // 2) + [1] * (steps % 2)
    else:
        if lower_order_final:
            if steps % 3 == 0:
                orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
            elif steps % 3 == 1:
                orders = [1, 2, 3] * (steps // 3) + [1]
            else:
                orders = [1, 2, 3] * (steps // 3) + [1, 2]
        else:
            orders = [1, 2, 3] * (steps // 3) + [1, 2][: steps % 3]
    if final_is_zero:
        orders[-1] = 1
    return orders[:steps]


@register_solver("dpm_solver_1", order=1, prediction="noise")
@register_solver("dpm_solver_2", order=2, prediction="noise")
@register_solver("dpm_solver_3", order=3, prediction="noise")
@register_solver("dpmpp_2s", order=2)
@register_solver("dpmpp_3s", order=3)
@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestep(Solver):
    """Singlestep DPM-Solver (noise prediction) / DPM-Solver++ (data prediction), order 1-3.

    Args:
        order: 1, 2 or 3.
        prediction: ``"noise"`` (DPM-Solver) or ``"data"`` (DPM-Solver++).
        solver_type: ``"midpoint"`` ('dpmsolver' form) or ``"heun"`` ('taylor' form) of the last stage.
        r1, r2: Intermediate points as fractions of the step in lambda (``intermediate="lambda"``);
            default 1/2 for order 2 and 1/3, 2/3 for order 3, as in the paper.
        intermediate: ``"lambda"`` (paper: k evaluations inside each step) or ``"grid"`` (diffusers:
            each grid point is one evaluation, grouped by diffusers' order list).
        lower_order_final: Grid mode: end with lower-order groups, as diffusers does.

    Reference: Lu et al., DPM-Solver, NeurIPS 2022, Alg. 1 (DPM-Solver-2), Alg. 2 (DPM-Solver-3);
    Lu et al., DPM-Solver++, 2022, Alg. 1 (DPM-Solver++(2S)).
    """

    order: int = 2
    prediction: Prediction = "data"
    solver_type: SolverType = "midpoint"
    r1: float | None = None
    r2: float | None = None
    intermediate: Literal["lambda", "grid"] = "lambda"
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("prediction", self.prediction, ("data", "noise"))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("intermediate", self.intermediate, ("lambda", "grid"))
        r1, r2 = self.fractions()
        if not (0 < r1 < 1) or (self.order == 3 and not r1 < r2 < 1):
            raise ValueError(f"need 0 < r1 (< r2) < 1, got r1={self.r1}, r2={self.r2}")

    def fractions(self) -> tuple[float, float]:
        if self.order == 3:
            return (1 / 3 if self.r1 is None else self.r1), (2 / 3 if self.r2 is None else self.r2)
        return (0.5 if self.r1 is None else self.r1), 1.0

    def _output(self, x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
        return denoised if self.prediction == "data" else (x - denoised) / sigma

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        if self.intermediate == "grid":
            return self._grid_step(model, x, info, state)
        sigma, sigma_next = info.sigma, info.sigma_next
        m_s = self._output(x, model(x, sigma), sigma)
        outputs = [(sigma, m_s)]
        if sigma_next > 0 and self.order > 1:
            h = lambda_of(sigma_next) - lambda_of(sigma)
            r1, r2 = self.fractions()
            # First intermediate point: a first-order step to lambda_s + r1 h.
            s1 = sigma * math.exp(-r1 * h)
            u1 = singlestep_update(x, sigma, s1, outputs, self.prediction, self.solver_type)
            outputs.append((s1, self._output(u1, model(u1, s1), s1)))
            if self.order == 3:
                # Second intermediate point: a second-order ('taylor') step to lambda_s + r2 h.
                s2 = sigma * math.exp(-r2 * h)
                u2 = singlestep_update(x, sigma, s2, outputs, self.prediction, "heun")
                outputs.append((s2, self._output(u2, model(u2, s2), s2)))
        return singlestep_update(x, sigma, sigma_next, outputs, self.prediction, self.solver_type), None

    def _grid_step(self, model: Model, x: Tensor, info: StepInfo, state: Any) -> tuple[Tensor, Any]:
        state = state or SinglestepState()
        orders = diffusers_order_list(info.num_steps, self.order, self.lower_order_final, info.sigmas[-1] == 0)
        k = min(orders[info.index], len(state.outputs) + 1)
        m = self._output(x, model(x, info.sigma), info.sigma)
        if k == 1:
            state = SinglestepState(x, info.sigma, ((info.sigma, m),))
        else:
            state = SinglestepState(state.x, state.sigma, (*state.outputs[: k - 1], (info.sigma, m)))
        x_next = singlestep_update(
            state.x, state.sigma, info.sigma_next, list(state.outputs), self.prediction, self.solver_type
        )
        return x_next, state


@register_solver("dpmpp_sde")
@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(Solver):
    """DPM-Solver++ SDE: a stochastic singlestep second-order solver (2 NFE per step).

    An ancestral first-order step to the lambda-midpoint gives a second data prediction; the full step
    then uses their mix ``(1 - 1/(2r)) D_s + 1/(2r) D_mid`` and adds noise. As in k-diffusion both noises
    are increments of one Brownian path (``sigma -> sigma_mid`` and ``sigma -> sigma_next``, so they are
    correlated); hasten's path is its own (:mod:`~hasten.solvers.brownian`), so samples are not bitwise
    k-diffusion's.

    Args:
        eta: Ancestral noise fraction (0: deterministic DPM-Solver++(2S) with r).
        s_noise: Scale of the added noise.
        r: Intermediate point as a fraction of the step in lambda.
        brownian: Both noises from one Brownian path fixed by the generator (default); ``False`` draws
            them independently (same marginals, different coupling).

    Reference: k-diffusion ``sample_dpmpp_sde`` (Crowson, 2022), after Lu et al., DPM-Solver++, Alg. 1.
    """

    order = 1  # strong order of the SDE solver; deterministic (eta = 0) it is second order
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    brownian: bool = True

    def __post_init__(self) -> None:
        if self.eta < 0 or not 0 < self.r < 1:
            raise ValueError(f"need eta >= 0 and 0 < r < 1, got eta={self.eta}, r={self.r}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @property
    def brownian_noise(self) -> bool:
        return self.brownian

    @property
    def convergence_order(self) -> int:
        return 1 if self.eta > 0 else 2

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        sigma, sigma_next = info.sigma, info.sigma_next
        denoised = model(x, sigma)
        if sigma_next == 0:
            return denoised, None
        # Stage 1: ancestral step to the lambda-midpoint s.
        h = lambda_of(sigma_next) - lambda_of(sigma)
        sigma_s = sigma * math.exp(-self.r * h)
        down, up = ancestral_levels(sigma, sigma_s, self.eta)
        x_2 = ddim_step(x, denoised, sigma, down)
        if up > 0:
            x_2 = x_2 + noise(sigma, sigma_s) * (self.s_noise * up)
        denoised_2 = model(x_2, sigma_s)
        # Stage 2: full ancestral step with the mixed data prediction.
        fac = 1.0 / (2.0 * self.r)
        down, up = ancestral_levels(sigma, sigma_next, self.eta)
        x = ddim_step(x, (1.0 - fac) * denoised + fac * denoised_2, sigma, down)
        if up > 0:
            x = x + noise(sigma, sigma_next) * (self.s_noise * up)
        return x, None

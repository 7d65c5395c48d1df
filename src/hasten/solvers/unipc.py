"""UniPC: the unified predictor (UniP-p) with the optional corrector (UniC), variants bh1 and bh2.

The corrector reuses the model evaluation at the predicted point, which the next step needs anyway,
so it raises the order by one at no extra NFE. The final step is never corrected (that would cost an
evaluation). In VE form (``alpha = 1``, ``lambda = -log sigma``).

Reference: Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", NeurIPS 2023, Alg. 2-3 and Eq. 8-12 (B(h) = h for bh1, e^h - 1 for bh2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
from torch import Tensor

from ..config import check_choice
from ._base import Model, NoiseFn, Solver, StepInfo, lambda_of, register_solver
from .multistep import multistep_order


@dataclasses.dataclass(frozen=True)
class UniPCState:
    """History for UniPC, newest first: outputs, their sigmas, the pre-predictor sample, its order."""

    outputs: tuple[Tensor, ...] = ()
    sigmas: tuple[float, ...] = ()
    x_prev: Tensor | None = None
    prev_order: int = 0


def _coefficients(rks: list[float], hh: float, variant: str) -> tuple[float, list[list[float]], list[float]]:
    """``B(h)``, the matrix ``R[i][k] = r_k^i`` and the vector ``b_i = hh phi_{i+1}(hh) i! / B(h)``."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    r = [[rk**i for rk in rks] for i in range(p)]
    b = []
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    for i in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b_h, r, b


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a tiny (at most 3x3) linear system in double precision, without tensor overhead."""
    return [float(v) for v in np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))]


@register_solver("unipc")
@dataclasses.dataclass(frozen=True)
class UniPC(Solver):
    """UniPC-p: a p-th order multistep predictor, plus a corrector that makes it order p + 1.

    Args:
        order: Predictor order p in {1, 2, 3}.
        variant: ``"bh2"`` (default, as in diffusers; bh2 without corrector equals DPM-Solver++(2M)) or
            ``"bh1"`` (the official code's default; diffusers recommends it below 10 steps, unconditional).
            hasten defaults to bh2 because it measured better at 5-20 steps on both the analytic mixture
            (docs/guide/solvers.md) and the bundled flow model (README bench).
        corrector: Apply UniC after every step except the last.
        prediction: ``"data"`` (UniPC with x0 prediction, default) or ``"noise"``.
        lower_order_final: Use lower orders in the final steps of short runs.
        lower_order_final_below: The rule applies when the run has fewer steps than this. Default 15,
            DPM-Solver's rule in diffusers. diffusers' UniPC applies it at any length
            (``lower_order_final_below=2**31`` reproduces that), which ends every run with an uncorrected
            first-order step and so caps UniPC at global order 2 (order 3 from noise, 40-160 steps: slope
            2.4 against 4.2, tests/test_order.py); below 15 steps the two rules are the same.

    Reference: Zhao et al., UniPC, NeurIPS 2023, Alg. 2 (UniP) and Alg. 3 (UniC); order-2 predictor
    uses rho = 1/2 as in the official code.
    """

    order: int = 2
    variant: Literal["bh1", "bh2"] = "bh2"
    corrector: bool = True
    prediction: Literal["data", "noise"] = "data"
    lower_order_final: bool = True
    lower_order_final_below: int = 15

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("variant", self.variant, ("bh1", "bh2"))
        check_choice("prediction", self.prediction, ("data", "noise"))

    @property
    def convergence_order(self) -> int:
        return self.order + (1 if self.corrector else 0)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        state = state or UniPCState()
        sigma = info.sigma
        denoised = model(x, sigma)
        output = denoised if self.prediction == "data" else (x - denoised) / sigma
        # UniC: correct the previous step's result with the output just evaluated there.
        if self.corrector and state.x_prev is not None:
            x = self._update(state.x_prev, state.sigmas, state.outputs, sigma, state.prev_order, output)
        k = multistep_order(self.order, len(state.outputs), info, self.lower_order_final, self.lower_order_final_below)
        outputs, sigmas = (output, *state.outputs), (sigma, *state.sigmas)
        # UniP: predict the next point.
        x_next = self._update(x, sigmas, outputs, info.sigma_next, k, None)
        # Three outputs (the most any order uses), so that a per-step plan can raise the order at any step.
        return x_next, UniPCState(outputs[:3], sigmas[:3], x, k)

    def _update(
        self,
        x: Tensor,
        sigmas: tuple[float, ...],
        ms: tuple[Tensor, ...],
        sigma_t: float,
        k: int,
        m_t: Tensor | None,
    ) -> Tensor:
        """UniP (``m_t is None``) or UniC (``m_t`` = output at ``sigma_t``) of order ``k`` from ``sigmas[0]``."""
        sigma_0, m0 = sigmas[0], ms[0]
        if sigma_t == 0:  # lambda = inf: land on the first-order limit
            return m0.clone() if self.prediction == "data" else x - sigma_0 * m0
        lam_0 = lambda_of(sigma_0)
        h = lambda_of(sigma_t) - lam_0
        rks = [(lambda_of(sigmas[i]) - lam_0) / h for i in range(1, k)]
        hh = -h if self.prediction == "data" else h
        b_h, r, b = _coefficients([*rks, 1.0], hh, self.variant)
        h_phi_1 = math.expm1(hh)
        # x_t = c_x x - c_0 m0 + scale * (sum_k rho_k D1_k [+ rho_k (m_t - m0)]), folded into coefficients.
        if self.prediction == "data":
            c_x, c_0, scale = sigma_t / sigma_0, -h_phi_1, -b_h  # alpha_t = 1 in VE form
        else:
            c_x, c_0, scale = 1.0, -sigma_t * h_phi_1, -sigma_t * b_h
        if m_t is None:  # UniP: the k - 1 past differences
            rhos = [] if k == 1 else [0.5] if k == 2 else _solve([row[:-1] for row in r[:-1]], b[:-1])
            terms = list(zip(rhos, range(1, k)))
        else:  # UniC: the new point enters as the k-th difference
            rhos = [0.5] if k == 1 else _solve(r, b)
            terms = list(zip(rhos[:-1], range(1, k)))
        out = x.mul(c_x)
        coeff_m0 = c_0
        for rho, i in terms:  # D1_i = (m_i - m0) / r_i
            w = scale * rho / rks[i - 1]
            out.add_(ms[i], alpha=w)
            coeff_m0 -= w
        if m_t is not None:
            w = scale * rhos[-1]
            out.add_(m_t, alpha=w)
            coeff_m0 -= w
        return out.add_(m0, alpha=coeff_m0)

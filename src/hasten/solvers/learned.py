"""A multistep update with given weights: the solver a fitted plan carries.

``x_{i+1} = a_i x_i + (1 - r_i) sum_{j <= i} c_ij D_j`` with ``r_i = sigma_{i+1} / sigma_i`` (VE form), ``D_j``
the denoised estimates so far and ``a_i = r_i`` unless state weights are given. With ``a_i = r_i`` this family
holds the data-prediction multistep solvers: DDIM is ``c_ii = 1``; DPM-Solver++(2M) is ``c_ii = 1 + 1/(2 q_i)``,
``c_i,i-1 = -1/(2 q_i)`` with ``q_i`` the ratio of consecutive log-SNR steps. A free ``a_i`` matters most at the
last step, where ``r = 0`` drops the state entirely: a few percent of ``x`` carries detail that the blurry
denoised estimates at the last level lack. Free weights, fitted to a reference solve for one model and one
grid, are what ``hasten tune --fit-iterations`` produces (:mod:`hasten.tune.fit`).

Reference: Lu et al., "DPM-Solver++", 2022, Alg. 2 (the update family); Shaul et al., "Bespoke Solvers for
Generative Flow Models", ICLR 2024, and Tong et al., "Learning to Discretize Denoising Diffusion ODEs", 2024
(fitting a sampler's coefficients / time steps to a teacher).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from ._base import Model, NoiseFn, Solver, StepInfo, register_solver

__all__ = ["LearnedMultistep"]


@register_solver("learned_multistep")
@dataclasses.dataclass(frozen=True)
class LearnedMultistep(Solver):
    """Multistep data-prediction update with explicit weights (see the module docstring).

    Args:
        coefficients: One row per step; row ``i`` holds ``i + 1`` weights over ``D_0 .. D_i`` (oldest first).
            Empty: ``c_ii = 1`` at every step, i.e. DDIM on any grid. Otherwise the grid must have exactly
            ``len(coefficients)`` steps (weights are fitted for one grid).
        x_weights: ``a_i``, the weight on the state ``x_i`` at each step (one per row of ``coefficients``).
            Empty: ``a_i = r_i``, the exact weight of the data-prediction update.
    """

    coefficients: tuple[tuple[float, ...], ...] = ()
    x_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        rows = tuple(tuple(float(c) for c in row) for row in self.coefficients)
        for i, row in enumerate(rows):
            if len(row) != i + 1:
                raise ValueError(f"coefficients row {i} must hold {i + 1} weights (D_0..D_{i}), got {len(row)}")
            if not all(math.isfinite(c) for c in row):
                raise ValueError(f"coefficients row {i} has a non-finite weight: {row}")
        object.__setattr__(self, "coefficients", rows)
        x_weights = tuple(float(a) for a in self.x_weights)
        if x_weights and len(x_weights) != len(rows):
            raise ValueError(f"x_weights must hold one weight per coefficients row ({len(rows)}), got {len(x_weights)}")
        if not all(math.isfinite(a) for a in x_weights):
            raise ValueError(f"x_weights has a non-finite weight: {x_weights}")
        object.__setattr__(self, "x_weights", x_weights)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        if self.coefficients and len(self.coefficients) != info.num_steps:
            raise ValueError(
                f"these weights were fitted for {len(self.coefficients)} steps; the grid has {info.num_steps}"
            )
        r = info.sigma_next / info.sigma
        if not self.coefficients:  # DDIM: no history to keep
            return model(x, info.sigma).lerp(x, r), None
        history = (*(state or ()), model(x, info.sigma))
        row = self.coefficients[info.index]
        combined = history[-1] * row[-1]
        for weight, denoised in zip(row[:-1], history[:-1], strict=True):
            if weight != 0.0:
                combined = combined.add(denoised, alpha=weight)
        if not self.x_weights:
            return combined.lerp(x, r), history  # r x + (1 - r) combined
        return combined.mul(1.0 - r).add(x, alpha=self.x_weights[info.index]), history

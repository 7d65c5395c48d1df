"""A solver whose options change from step to step: the executable half of a tuned :class:`~hasten.tune.Plan`.

Each step delegates to its own configured solver. They must share one state format, which in practice
means one solver family with per-step options (UniPC with its order, corrector and variant chosen per
step, as in USF's unified framework, or any single solver repeated).

Reference: Liu et al., "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic
Models" (USF / S^3), ICLR 2024, Sec. 3 (per-step solver decisions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ._base import Model, NoiseFn, Solver, StepInfo


@dataclasses.dataclass(frozen=True)
class PerStepSolver(Solver):
    """``solvers[i]`` takes step ``i``; the grid must have exactly ``len(solvers)`` steps.

    Args:
        solvers: One configured solver per step, all of the same class (their states must be compatible).
    """

    name = "per_step"
    solvers: tuple[Solver, ...] = ()

    def __post_init__(self) -> None:
        if not self.solvers:
            raise ValueError("solvers must hold one solver per step, got none")
        kinds = {type(s) for s in self.solvers}
        if len(kinds) != 1:
            raise TypeError(
                f"all steps must use one solver class (shared state), got {sorted(k.__name__ for k in kinds)}"
            )

    @property
    def convergence_order(self) -> int:
        return min(s.convergence_order for s in self.solvers)

    @property
    def stochastic(self) -> bool:
        return any(s.stochastic for s in self.solvers)

    @property
    def brownian_noise(self) -> bool:
        return any(s.brownian_noise for s in self.solvers if s.stochastic)

    def min_steps(self) -> int:
        return len(self.solvers)

    def step(self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn) -> tuple[Tensor, Any]:
        if info.num_steps != len(self.solvers):
            raise ValueError(f"this per-step solver has {len(self.solvers)} steps, the grid has {info.num_steps}")
        return self.solvers[info.index].step(model, x, info, state, noise)

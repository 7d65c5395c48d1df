"""Progressive distillation: one student step reproduces two teacher DDIM steps; halve the steps round by round.

Reference: Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022, Alg. 2
and Sec. 4 (parameterisation and weighting); google-research ``diffusion_distillation/dpm.py`` (the target
built in x-space, the last interval's target the teacher's midpoint prediction).

In hasten's VE form (``x = x0 + sigma n``) with the DDIM step ``x_s = D + (sigma_s / sigma_t)(x_t - D)``: from
``x_t`` the teacher takes two DDIM steps, ``sigma_t -> sigma_mid -> sigma_next`` (``sigma_mid`` halfway in the
schedule's time), landing on ``x''``; the student's single step lands there exactly when its prediction is
``x~ = (x'' - r x_t) / (1 - r)``, ``r = sigma_next / sigma_t`` (``x~ = x''`` when ``sigma_next = 0``). The loss
is the squared error to ``x~`` weighted by the truncated SNR ``max(1, 1 / sigma_t^2)`` (paper's default;
``snr_plus_one`` is the v-loss weight ``1 + 1 / sigma_t^2``).

A noise-predicting student cannot make a one-step jump from pure noise (``x0 = x - sigma eps`` amplifies the
error by ``sigma``): the paper's argument for predicting ``v`` or ``x``. ``parameterisation="auto"`` gives a
VP teacher's student a v-head (the same network, its output read as ``v``) and keeps a flow teacher's velocity
head, which is already well-posed at pure noise (``x0 = x_t - t v``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import torch
from torch import Tensor

from ..config import Config, check_choice
from ..solvers._base import ddim_step
from ._base import DistillConfig, DistillMethod, check_schedule, register_method
from .guidance import weighted_x0_loss

__all__ = ["Progressive", "ProgressiveOptions", "progressive_target"]


@dataclasses.dataclass(frozen=True)
class ProgressiveOptions(Config):
    """Options of ``--method progressive``.

    Args:
        start_steps: DDIM steps of the original teacher in the first round (``nfe * 2**k``, k >= 1): the first
            student takes ``start_steps / 2`` steps, each round halves that until ``nfe``.
        schedule: The grid family every round's student samples on (``auto``: the model's default grid).
        steps_per_round: Updates per round; 0 splits the time budget evenly over the rounds.
        weighting: ``snr_trunc`` (max(1, SNR), the paper's) or ``snr_plus_one`` (1 + SNR).
        parameterisation: What the student predicts: ``auto`` (v for a VP teacher, the velocity for a flow
            teacher), ``v``, ``x0``, ``eps`` (VP teachers) or ``flow`` (flow teachers).
        teacher_substeps: In the first round only, split each of the original teacher's two DDIM steps into this
            many (equal in time): the first student then learns a ``2 * teacher_substeps``-step DDIM map per step,
            a cheaper start than more rounds when training time is short (1 = the paper).
    """

    start_steps: int = 32
    schedule: str = "auto"
    steps_per_round: int = 0
    weighting: str = "snr_trunc"
    parameterisation: str = "auto"
    teacher_substeps: int = 1


def progressive_target(x_t: Tensor, x_next: Tensor, sigma_t: Tensor, sigma_next: Tensor) -> Tensor:
    """The x0 prediction whose DDIM step from ``x_t`` (level ``sigma_t``) lands exactly on ``x_next``.

    ``x~ = (x_next - r x_t) / (1 - r)`` with ``r = sigma_next / sigma_t``; ``x_next`` itself when ``sigma_next`` is 0.
    """
    view = (-1, *([1] * (x_t.ndim - 1)))
    r = (sigma_next / sigma_t).to(x_t.dtype).view(view)
    return (x_next - r * x_t) / (1 - r)


@register_method("progressive")
class Progressive(DistillMethod):
    """Progressive distillation (Salimans & Ho): see the module docstring."""

    Options = ProgressiveOptions

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: ProgressiveOptions) -> None:
        ratio = options.start_steps // config.nfe
        if options.start_steps % config.nfe or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"progressive distillation halves the steps each round: start_steps ({options.start_steps}) must be "
                f"nfe ({config.nfe}) times a power of two >= 2, e.g. {config.nfe * 16}"
            )
        check_schedule(options.schedule)
        check_choice("weighting", options.weighting, ("snr_trunc", "snr_plus_one"))
        flow = teacher.info.objective == "flow"
        allowed = ("auto", "flow", "x0") if flow else ("auto", "v", "x0", "eps")
        check_choice(f"parameterisation (for a {teacher.info.objective} teacher)", options.parameterisation, allowed)
        if options.teacher_substeps < 1:
            raise ValueError(f"teacher_substeps must be >= 1, got {options.teacher_substeps}")
        if options.steps_per_round < 0:
            raise ValueError(f"steps_per_round must be >= 0, got {options.steps_per_round}")

    @property
    def rounds(self) -> int:
        return (self.options.start_steps // self.config.nfe).bit_length() - 1

    def build(self):
        modules, optimizers = super().build()
        self.round_teacher = self.copy_network(self.teacher.network, trainable=False)
        self.state.setdefault("round", 0)
        self.state.setdefault("round_start", 0)  # update index where the current round began
        self.state.setdefault("round_seconds", 0.0)  # time spent in the current round (time-split budgets)
        return {**modules, "round_teacher": self.round_teacher}, optimizers

    def sampler(self) -> dict[str, Any]:
        return {"solver": "euler", "options": {}, "schedule": self.options.schedule, "steps": self.config.nfe,
                "guidance": 1.0}  # fmt: skip

    def _advance_round(self, index: int) -> None:
        """Move to the next round when this one has had its share: its EMA student becomes the teacher."""
        if self.state["round"] >= self.rounds - 1:
            return
        per = self.options.steps_per_round
        done = index - self.state["round_start"] >= per if per else (
            self.state["round_seconds"] >= self.config.minutes * 60.0 / self.rounds
        )  # fmt: skip
        if done:
            self.round_teacher.load_state_dict(self.ema.state_dict())
            self.state.update(round=self.state["round"] + 1, round_start=index, round_seconds=0.0)

    def _round_fraction(self, index: int) -> float:
        per = self.options.steps_per_round
        if per:
            return (index - self.state["round_start"]) / per
        return self.state["round_seconds"] / (self.config.minutes * 60.0 / self.rounds)

    def teacher_x0(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """Round 0: the original teacher (with the run's guidance); later rounds: the previous round's student."""
        if self.state["round"] == 0:
            return self.teacher_denoise(x, sigma, labels)
        with torch.no_grad():
            return self.student_denoiser(self.round_teacher)(x, sigma, **self.cond(labels)).float()

    def teacher_ddim(self, x: Tensor, sigma: Tensor, sigma_to: Tensor, labels: Tensor | None, substeps: int) -> Tensor:
        """``substeps`` teacher DDIM steps from ``sigma`` to ``sigma_to``, equal in the schedule's time."""
        levels = [sigma, *(self.time_between(sigma, sigma_to, k / substeps) for k in range(1, substeps)), sigma_to]
        for a, b in itertools.pairwise(levels):
            x = ddim_step(x, self.teacher_x0(x, a, labels), a, b)
        return x

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        start = time.perf_counter()
        self._advance_round(index)
        student_steps = self.config.nfe * 2 ** (self.rounds - 1 - self.state["round"])
        grid = self.sigmas(student_steps, self.options.schedule).to(self.device)
        b = x0.shape[0]
        i = torch.randint(0, student_steps, (b,), generator=self.gen, device=self.device)
        sigma_t, sigma_next = grid[i], grid[i + 1]
        sigma_mid = self.time_between(sigma_t, sigma_next, 0.5)
        x_t = x0 + sigma_t.float().view(-1, 1, 1, 1) * self.randn_like(x0)
        with torch.no_grad():
            substeps = self.options.teacher_substeps if self.state["round"] == 0 else 1
            x_mid = self.teacher_ddim(x_t, sigma_t, sigma_mid, labels, substeps)
            x_next = self.teacher_ddim(x_mid, sigma_mid, sigma_next, labels, substeps)
            target = progressive_target(x_t, x_next, sigma_t, sigma_next)
        pred = self.student_denoiser(self.student)(x_t, sigma_t, **self.cond(labels))
        loss = weighted_x0_loss(pred, target, sigma_t.float(), self.options.weighting)
        # the learning rate decays linearly to a tenth within each round (the paper anneals to 0 per round)
        lr = self.scheduled_lr(index, self._round_fraction(index))
        value = self.update(loss, index, lr=lr)
        self.state["round_seconds"] += time.perf_counter() - start
        return value

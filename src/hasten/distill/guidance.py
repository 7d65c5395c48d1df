"""Guidance distillation: one network call per step where classifier-free guidance needs two.

Reference: Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023, Sec. 3 stage 1 (a student
initialised from the teacher regresses the guided x-prediction at noised data, times uniform in [0, 1], a weight
``omega(lambda_t)`` of the log-SNR, here Salimans & Ho's truncated SNR, ICLR 2022 Sec. 4); SpeedUpNet (Chai et
al., ECCV 2024) has the same goal. Meng writes the guided prediction as ``(1 + w) x(c) - w x(empty)``; in
hasten's convention (scale ``s``, 1 = no guidance) that is ``x(empty) + s (x(c) - x(empty))`` with ``s = 1 + w``.

Design: the student is a *fixed-scale* student. It keeps the teacher's architecture and is trained on the one
scale of the run (``--guidance``), so it is an ordinary model folder: it loads, samples, quantises, caches and
is a ``--teacher`` for every other method with no extra module. Meng's stage 1 conditions the student on ``w``
(an embedding added to the time embedding) so one student serves a range of scales; that needs a module the
folder format does not carry, and a user of a few-step student picks one scale anyway. Labels dropped to the
null class (``--cfg-dropout``) keep learning the teacher's unconditional prediction, so the student still has
an unconditional branch (its guidance then scales the already guided difference).

The student's sampler is ``dpmpp_2m`` (hasten's default solver, one call per step, second order) at ``--nfe``
steps on the ``auto`` grid with guidance 1: ``nfe`` network calls, half the ``2 nfe`` of the teacher's guided
sampler at the same steps.

Training inputs (``inputs``): ``data`` noises training images, ``x = x0 + sigma n`` with the schedule's time
uniform over its whole range (the paper's); ``trajectory`` takes the states the teacher's guided sampler
(the student's solver) visits on a grid of ``trajectory_steps`` steps from fresh noise, the inputs the student
meets when it samples (``2 trajectory_steps`` more teacher calls per update). The loss is the squared
x0 error weighted by ``max(1, 1 / sigma^2)`` (``snr_trunc``, Salimans & Ho's) for x0-, v- and flow-predicting
teachers, and by ``1 / sigma^2`` for noise-predicting ones (their own eps loss; see ``weighting``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..config import Config, check_choice
from ._base import DistillConfig, DistillMethod, check_schedule, register_method

__all__ = ["ONE_CALL_SOLVERS", "GuidanceDistillation", "GuidanceOptions", "level_weight", "weighted_x0_loss"]

# Deterministic solvers that make exactly one network call per step at every step count (so the student's NFE
# is its step count); the third-order multistep solvers are not among them: their start-up costs an extra call.
ONE_CALL_SOLVERS = ("dpmpp_2m", "unipc", "dpm_solver_2m", "euler", "ddim")
WEIGHTINGS = ("auto", "snr_trunc", "snr_plus_one", "snr", "uniform", "min_snr")
# Min-SNR-gamma's gamma (Hang et al., ICCV 2023: 5 in the paper's experiments).
MIN_SNR_GAMMA = 5.0


@dataclasses.dataclass(frozen=True)
class GuidanceOptions(Config):
    """Options of ``--method guidance``.

    Args:
        solver: The student's default solver, one network call per step (see :data:`ONE_CALL_SOLVERS`).
        schedule: The grid family the student samples on (``auto``: the model's default grid).
        inputs: ``data`` (noised training images, times uniform over the schedule) or ``trajectory`` (states
            of the teacher's guided sampler).
        trajectory_steps: Steps of the teacher's guided trajectories (``inputs="trajectory"``); 0: ``nfe``,
            the student's own grid.
        weighting: The x0-error weight: ``snr_trunc`` (max(1, SNR), Salimans & Ho's), ``snr_plus_one`` (1 + SNR, the
            v-loss), ``snr`` (SNR, the eps-loss), ``uniform``, or ``auto``: ``snr`` for a noise-predicting
            teacher (the x0 error of an eps head is sigma times its own error, up to ~157 on the 1000-step VP
            schedule, so a weight of 1 there would let the noisiest levels swamp the rest), else ``snr_trunc``.
    """

    solver: str = "dpmpp_2m"
    schedule: str = "auto"
    inputs: str = "data"
    trajectory_steps: int = 0
    weighting: str = "auto"


def level_weight(sigma: Tensor, weighting: str) -> Tensor:
    """The per-row weight of an x0 error at VE levels ``sigma`` [B] (``SNR = 1 / sigma^2``); ``weighting`` is one of
    :data:`WEIGHTINGS` other than ``auto``. ``snr`` is the noise loss of a noise-predicting network; ``min_snr``
    caps it at :data:`MIN_SNR_GAMMA` so the nearly clean levels do not dominate; ``snr_trunc`` (at least 1) puts
    most of a time-uniform batch's weight on the noisiest levels, where a noise-predicting network's x0 is least
    precise."""
    snr = sigma.pow(-2)
    if weighting == "snr_trunc":
        return snr.clamp_min(1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    if weighting == "snr":
        return snr
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":  # Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy"
        return snr.clamp_max(MIN_SNR_GAMMA)
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS[1:])}; got {weighting!r}")


def weighted_x0_loss(pred: Tensor, target: Tensor, sigma: Tensor, weighting: str) -> Tensor:
    """Mean over the batch of ``weight(sigma) * mean((pred - target)^2)`` per row, ``SNR = 1 / sigma^2`` (VE);
    ``weighting`` is one of :data:`WEIGHTINGS` other than ``auto``."""
    weight = level_weight(sigma.to(pred.dtype), weighting)
    return (weight * (pred - target).pow(2).flatten(1).mean(1)).mean()


@register_method("guidance")
class GuidanceDistillation(DistillMethod):
    """Guidance distillation (Meng et al. stage 1, fixed scale): see the module docstring."""

    Options = GuidanceOptions

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: GuidanceOptions) -> None:
        info = teacher.info
        if info.null_class is None:
            raise ValueError(
                f"guidance distillation needs a teacher with classifier-free guidance (class labels and a null "
                f"class); {info.name} is unconditional"
            )
        if config.guidance == 1.0:
            raise ValueError(
                "guidance distillation bakes --guidance into the student, and guidance 1 means no guidance: nothing "
                "to distil; give the scale the student should sample at, e.g. --guidance 3"
            )
        if info.distillation.get("method") == "guidance":
            baked = info.distillation.get("config", {}).get("guidance")
            raise ValueError(
                f"teacher {info.name} is already guidance-distilled (scale {baked}); distil its own teacher at the "
                "scale you want instead of compounding scales"
            )
        check_choice("solver (one network call per step)", options.solver, ONE_CALL_SOLVERS)
        check_schedule(options.schedule)
        check_choice("inputs", options.inputs, ("data", "trajectory"))
        check_choice("weighting", options.weighting, WEIGHTINGS)
        if options.trajectory_steps < 0 or options.trajectory_steps == 1:
            raise ValueError(f"trajectory_steps must be 0 (nfe) or >= 2, got {options.trajectory_steps}")
        if options.trajectory_steps and options.inputs != "trajectory":
            raise ValueError(f"trajectory_steps={options.trajectory_steps} needs inputs='trajectory'")
        if options.inputs == "trajectory" and not options.trajectory_steps and config.nfe < 2:
            raise ValueError("inputs='trajectory' at nfe 1 visits pure noise only; set trajectory_steps >= 2")

    @property
    def weighting(self) -> str:
        """The weighting in use (``auto`` resolved for this teacher)."""
        if self.options.weighting != "auto":
            return self.options.weighting
        return "snr" if self.student_objective() == "eps" else "snr_trunc"

    def sampler(self) -> dict[str, Any]:
        return {"solver": self.options.solver, "options": {}, "schedule": self.options.schedule,
                "steps": self.config.nfe, "guidance": 1.0}  # fmt: skip

    # -- training inputs -------------------------------------------------------------------------------------
    def guided_teacher(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """The guided teacher as a VE denoiser ``D(x, sigma, class_labels=...)`` (two network calls)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return self.teacher_denoise(x, sigma, cond.get("class_labels"))

    @torch.no_grad()
    def trajectory_points(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One state per row of the teacher's guided sampler (the student's solver) from fresh noise, at a
        uniformly drawn level of its grid above 0: ``(x, sigma)``."""
        from ..solvers import sample

        steps = self.options.trajectory_steps or self.config.nfe
        grid = self.sigmas(steps, self.options.schedule).to(self.device)
        n = labels.shape[0]
        scale = self.teacher.schedule.initial_noise_scale(float(grid[0]))
        x = torch.randn((n, *self.teacher.info.image_shape), generator=self.gen, device=self.device) * scale
        pick = torch.randint(0, steps, (n,), generator=self.gen, device=self.device)
        states = [x]

        def keep(i: int, sigma_next: float, state: Tensor) -> None:
            if i + 1 < steps:
                states.append(state.clone())

        if int(pick.max()):  # the whole grid: a shortened one would change multistep solvers' final orders
            sample(self.guided_teacher, x, grid, self.options.solver, cond={"class_labels": labels}, callback=keep)
        chosen = torch.stack(states)[pick, torch.arange(n, device=self.device)]
        return chosen.float(), grid[pick].float()

    # -- the update ------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """The weighted x0 error of the student to the guided teacher at inputs ``x`` (levels ``sigma`` [B])."""
        target = self.teacher_denoise(x, sigma, labels)
        pred = self.student_denoiser(self.student)(x, sigma, **self.cond(labels))
        return weighted_x0_loss(pred, target, sigma, self.weighting)

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        if labels is None:
            raise ValueError("guidance distillation needs class labels with every batch; the teacher's data has none")
        if self.options.inputs == "trajectory":
            x, sigma = self.trajectory_points(labels)
        else:
            sigma = self.training_sigmas(x0.shape[0])
            x = x0 + sigma.view(-1, *([1] * (x0.ndim - 1))) * self.randn_like(x0)
        return self.update(self.loss(x, sigma, labels), index)

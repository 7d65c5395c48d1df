"""Consistency distillation: a student that maps every point of a teacher's ODE trajectory to its start.

Reference: Song et al., "Consistency Models", ICML 2023, Algorithm 2 (consistency distillation) and Sec. 3
(boundary parameterisation); openai/consistency_models ``karras_diffusion.consistency_losses`` (Heun teacher
step between neighbouring levels, EMA target network, l2 loss); Song & Dhariwal, "Improved Techniques for
Training Consistency Models", ICLR 2024, Sec. 3.3 (pseudo-Huber distance).

In hasten's VE form: the training grid is ``levels`` noise levels ``sigma_0 > ... > sigma_{N-1} = sigma_min``
(a stock discretisation with ``final="sigma_min"``, by default uniform in the schedule's time). Per row,
``n ~ U{0..N-2}``, ``x_n = x0 + sigma_n z`` from real data; the teacher takes one ODE step (Heun, in flow
coordinates for flow teachers, or DDIM) to ``x^_{n+1}`` at ``sigma_{n+1}``; the loss is
``d(f_theta(x_n, sigma_n), sg f_theta-(x^_{n+1}, sigma_{n+1}))`` with the target network ``theta-`` an EMA of the
student at rate ``target_decay`` (a module of its own, apart from the exported EMA) and ``d`` the mean squared
error or the pseudo-Huber distance. At ``n = N-2`` the target is ``x^_{N-1}`` itself: the boundary condition
``f(x, sigma_min) = x`` holds exactly for any weights, because the student's denoiser is wrapped by
:func:`hasten.models.adapters.consistency_boundary` (the student keeps its teacher's objective; the folder's
``hasten.json`` records ``consistency: {"sigma_min": ...}`` and :func:`hasten.load` applies it). LPIPS, the
paper's best distance, is not offered: it needs a pretrained VGG, and training against the metric's own feature
network would game the FD it is judged by.

The student samples with the ``consistency`` solver (multistep consistency sampling) on its ``schedule`` grid
with ``nfe`` steps: the ``auto`` grid starts at the model's top level and spaces the rest uniformly in time
(for 2 steps the middle level is ``t_max / 2``, near the middle index CM's ternary search found on its Karras
grid, ``sigma`` ~1.4 with ``sigma_data`` 0.5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ..config import Config, check_choice
from ..schedules.grids import DISCRETISATIONS, get_sigmas
from ..schedules.noise import FlowMatching
from ..solvers._base import ddim_step
from ._base import DistillConfig, DistillMethod, check_schedule, register_method

__all__ = ["Consistency", "ConsistencyOptions", "consistency_distance", "training_grid"]

TEACHER_SOLVERS = ("heun", "ddim")
DISTANCES = ("l2", "pseudo_huber")


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions(Config):
    """Options of ``--method consistency``.

    Args:
        levels: Noise levels N of the training grid (N - 1 teacher intervals); CM used 18 (CIFAR-10) and 40
            (ImageNet-64). Fewer levels: longer teacher steps, larger discretisation error in the target.
        grid: The training grid's discretisation (a stock grid that can end at ``sigma_min``: ``time_uniform``,
            ``time_quadratic``, ``karras``, ``logsnr``, and ``linspace``/``leading``/``trailing`` for discrete
            schedules). Its lowest level is the boundary ``sigma_min``. ``karras`` spends half a flow model's
            levels above t = 0.99, so the default is uniform in the schedule's time.
        teacher_solver: The teacher's step between neighbouring levels: ``heun`` (2 calls, CM's) or ``ddim``.
        target_decay: EMA rate mu of the target network theta- (CM: 0.95 for CD; 0 makes it the student).
        loss: ``l2`` (mean squared error per value) or ``pseudo_huber`` (``sqrt(|a - b|^2 + c^2) - c`` over the
            whole image, ``c = huber_scale * sqrt(values)``; iCT's).
        huber_scale: The pseudo-Huber ``c`` per square root of the number of values (iCT: 0.00054).
        schedule: The grid family the student samples on (``auto``: the model's default grid).
        parameterisation: What the student network predicts under the boundary wrapper: ``auto`` (v for a VP
            teacher, the velocity for a flow teacher), ``v``, ``x0``, ``eps`` (VP teachers) or ``flow`` (flow
            teachers). A noise-predicting student cannot make the one-step jump from pure noise (``x0 = x -
            sigma eps`` multiplies its error by sigma ~157 on the bundled UNet's schedule), so ``auto`` reads a VP
            teacher's network as a v-head, as progressive distillation does.
    """

    levels: int = 40
    grid: str = "time_uniform"
    teacher_solver: str = "heun"
    target_decay: float = 0.95
    loss: str = "l2"
    huber_scale: float = 0.00054
    schedule: str = "auto"
    parameterisation: str = "auto"


def training_grid(options: ConsistencyOptions, schedule) -> Tensor:
    """The ``levels`` descending VE training levels, from the schedule's top down to ``sigma_min`` (float64)."""
    try:
        grid = get_sigmas(options.grid, options.levels - 1, schedule, final="sigma_min")
    except (TypeError, ValueError) as err:
        raise ValueError(f"grid {options.grid!r} cannot end at sigma_min for this teacher ({err})") from None
    return grid


def consistency_distance(a: Tensor, b: Tensor, loss: str, huber_scale: float) -> Tensor:
    """Per-row distance ``d(a, b)``: mean squared error, or pseudo-Huber over all values of the row."""
    diff = (a - b).flatten(1)
    if loss == "l2":
        return diff.pow(2).mean(1)
    c = huber_scale * math.sqrt(diff.shape[1])
    return (diff.pow(2).sum(1) + c * c).sqrt() - c


def _coordinates(sigma: Tensor, flow: bool) -> tuple[Tensor, Tensor]:
    """Time ``u`` and state scale ``a`` of the teacher's integration space (per row; see ``space_coordinates``)."""
    if not flow:
        return sigma, torch.ones_like(sigma)
    a = 1.0 / (1.0 + sigma)
    return sigma * a, a


@register_method("consistency")
class Consistency(DistillMethod):
    """Consistency distillation (Song et al.): see the module docstring."""

    Options = ConsistencyOptions

    def __init__(self, teacher, config: DistillConfig, options: ConsistencyOptions, device: torch.device) -> None:
        super().__init__(teacher, config, options, device)
        self.grid = training_grid(options, teacher.schedule).to(device)
        self.sigma_min = float(self.grid[-1])

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: ConsistencyOptions) -> None:
        if options.levels < 2:
            raise ValueError(f"levels must be >= 2 (one teacher step at least), got {options.levels}")
        if options.grid not in DISCRETISATIONS:
            raise ValueError(f"grid {options.grid!r} is not a grid; known: {', '.join(DISCRETISATIONS.names())}")
        check_schedule(options.schedule)
        check_choice("teacher_solver", options.teacher_solver, TEACHER_SOLVERS)
        check_choice("loss", options.loss, DISTANCES)
        flow = teacher.info.objective == "flow"
        allowed = ("auto", "flow", "x0") if flow else ("auto", "v", "x0", "eps")
        check_choice(f"parameterisation (for a {teacher.info.objective} teacher)", options.parameterisation, allowed)
        if not 0 <= options.target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {options.target_decay}")
        if not 0 < options.huber_scale < math.inf:
            raise ValueError(f"huber_scale must be a finite number > 0, got {options.huber_scale}")
        grid = training_grid(options, teacher.schedule)
        sampled = get_sigmas(options.schedule, config.nfe, teacher.schedule)[:-1]
        top, bottom = float(grid[0]), float(grid[-1])
        outside = [float(s) for s in sampled if not bottom <= float(s) <= top * (1 + 1e-6)]
        if outside:
            raise ValueError(
                f"the student's {options.schedule!r} grid at {config.nfe} steps calls it at {outside[0]:.6g}, outside "
                f"the levels it is trained on ([{bottom:.6g}, {top:.6g}] from grid {options.grid!r}); choose another "
                "schedule"
            )

    @property
    def student_info(self):
        return dataclasses.replace(super().student_info, consistency={"sigma_min": self.sigma_min})

    def sampler(self) -> dict[str, Any]:
        return {"solver": "consistency", "options": {"sigma_min": self.sigma_min}, "schedule": self.options.schedule,
                "steps": self.config.nfe, "guidance": 1.0}  # fmt: skip

    def build(self):
        modules, optimizers = super().build()
        self.target = self.copy_network(self.student, trainable=False)  # theta-, not the exported EMA
        self.student_f = self.student_denoiser(self.student)
        self.target_f = self.student_denoiser(self.target)
        return {**modules, "target": self.target}, optimizers

    def teacher_step(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, labels: Tensor | None) -> Tensor:
        """One teacher ODE step per row from ``sigma`` to ``sigma_next`` (> 0): DDIM, or Heun in the teacher's
        integration space (flow coordinates for a flow teacher, as ``heun`` samples it)."""
        view = (-1, *([1] * (x.ndim - 1)))
        denoised = self.teacher_denoise(x, sigma, labels).to(x.dtype)
        x_euler = ddim_step(x, denoised, sigma, sigma_next)
        if self.options.teacher_solver == "ddim":
            return x_euler
        denoised_next = self.teacher_denoise(x_euler, sigma_next, labels).to(x.dtype)
        flow = isinstance(self.teacher.schedule, FlowMatching)
        u, a = (c.to(x.dtype).view(view) for c in _coordinates(sigma, flow))
        u_next, a_next = (c.to(x.dtype).view(view) for c in _coordinates(sigma_next, flow))
        slope = (a * x - denoised) / u
        slope_next = (a_next * x_euler - denoised_next) / u_next
        return (a * x + 0.5 * (u_next - u) * (slope + slope_next)) / a_next

    def loss(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """The consistency distillation loss of one batch (random levels and noise from ``self.gen``)."""
        b = x0.shape[0]
        n = torch.randint(0, self.options.levels - 1, (b,), generator=self.gen, device=self.device)
        sigma, sigma_next = self.grid[n], self.grid[n + 1]
        x = x0 + sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * self.randn_like(x0)
        cond = self.cond(labels)
        with torch.no_grad():
            x_next = self.teacher_step(x, sigma, sigma_next, labels)
            target = self.target_f(x_next, sigma_next, **cond).float()
        pred = self.student_f(x, sigma, **cond)
        return consistency_distance(pred, target, self.options.loss, self.options.huber_scale).mean()

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        value = self.update(self.loss(x0, labels), index)
        with torch.no_grad():  # theta- <- mu theta- + (1 - mu) theta, after the student's update (CM's order)
            torch._foreach_lerp_(list(self.target.parameters()), list(self.student.parameters()),
                                 1.0 - self.options.target_decay)  # fmt: skip
        return value

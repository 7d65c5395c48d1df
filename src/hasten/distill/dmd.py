"""Distribution matching distillation (DMD2): a few-step generator whose samples' distribution matches the teacher's.

Reference: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2), NeurIPS
2024, Sec. 4 (two time-scale updates, no regression loss, backward simulation); Yin et al., "One-step Diffusion
with Distribution Matching Distillation" (DMD), CVPR 2024, Eq. 7-8 and Alg. 1; tianweiy/DMD2
``main/edm/edm_guidance.py`` (the gradient normaliser, the fake-score weighting).

Three networks, all starting as copies of the teacher: the generator ``G`` (the student), the frozen teacher as
the *real* score, and a *fake* score network trained online to denoise ``G``'s samples. For a generator sample
``x`` (an x0 estimate), noise it to a random level, ``x_t = x + sigma n``, and ask both denoisers:

    g = (D_fake(x_t) - D_real(x_t)) / mean_{C,H,W} |x - D_real(x_t)|        (per sample, no gradient)
    L_DM = 1/2 mean (x - sg(x - g))^2       so  dL_DM/dx = g / numel(x)

Descending ``L_DM`` moves each sample toward where the teacher's data would denoise it and away from where the
generator's own distribution would: the gradient of the KL between the two noised distributions, in x0 space
(DMD Eq. 7). The real score carries the run's guidance scale (``teacher_denoise``); the fake score is never
guided. The fake network learns every update with the denoising loss ``(1/sigma^2 + 1/sigma_data^2) |D_fake(x_t)
- sg(x)|^2`` on fresh generator samples (EDM's weighting, ``sigma_data = 0.5``); the generator moves only every
``generator_every``-th update, so the fake score keeps up with it (DMD2's two time-scale rule, which replaces
DMD's regression set).

A student with ``nfe > 1`` is trained by backward simulation (DMD2 Sec. 4.5): pick a step ``k`` of its ``nfe``,
run the current generator without gradient from pure noise through its first ``k`` steps, and train it at step
``k`` on what it produced. Between steps this method takes the deterministic DDIM (= VE Euler) step
``x' = D + (sigma'/sigma)(x - D)`` rather than DMD2's re-noising ``x' = D + sigma' z``: the student is trained for
exactly the sampler it ships with, the stock ``euler`` solver on its grid, so it composes with recipes and plans
without a solver of its own, and sampling it stays deterministic given the initial noise.

DMD2's GAN term (a classifier head on the fake network, real images against generator samples) is not
implemented: it needs the training images and a discriminator, and DMD2 reports it as the last polish (ImageNet-64
FID 2.61 -> 1.28) bought with about as much training again as the distribution matching itself, beyond a CPU
budget. This method therefore draws no training images (``needs_data = False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..config import Config, check_choice
from ..solvers._base import ddim_step
from ._base import DistillConfig, DistillMethod, check_schedule, register_method

__all__ = ["DMD", "DMDOptions", "distribution_matching_gradient", "distribution_matching_loss", "fake_score_loss"]

SIGMA_DATA = 0.5  # EDM's data scale in the fake-score weighting 1/sigma^2 + 1/sigma_data^2 (images in [-1, 1])


@dataclasses.dataclass(frozen=True)
class DMDOptions(Config):
    """Options of ``--method dmd``.

    Args:
        generator_every: The generator is updated on updates ``0, r, 2r, ...`` (``r`` this value); the fake score
            on every update (DMD2's two time-scale rule; its ImageNet default 5). 1 = updated together.
        fake_lr_scale: The fake-score network's learning rate as a multiple of the run's ``lr``.
        dm_time_min, dm_time_max: The distribution-matching noise levels are drawn uniformly in the schedule's
            time between these fractions of its range (DMD2: indices 20..980 of 1000), so neither the
            near-clean end (no signal about the distribution) nor pure noise (no signal about the sample) is used.
        schedule: The grid family of the student's ``nfe`` levels (``auto``: the model's default grid).
        parameterisation: What the generator predicts: ``auto`` (a flow teacher's velocity, ``v`` for a
            noise-predicting teacher, which cannot make a one-step jump from pure noise; otherwise the teacher's),
            ``v``, ``x0``, ``eps`` or ``flow`` (flow teachers).
    """

    generator_every: int = 5
    fake_lr_scale: float = 1.0
    dm_time_min: float = 0.02
    dm_time_max: float = 0.98
    schedule: str = "auto"
    parameterisation: str = "auto"


def _rows(values: Tensor, like: Tensor) -> Tensor:
    """Per-row values [B] shaped to broadcast over ``like``'s rows, in its dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def distribution_matching_gradient(x: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """DMD's per-sample normalised gradient ``g = (fake - real) / mean_{C,H,W}|x - real|`` (no gradient flows).

    ``x`` are generator samples, ``real`` / ``fake`` the two denoisers' x0 estimates of their noised copies.
    NaN or infinite entries (a degenerate batch) become 0, as in DMD2.
    """
    x, real, fake = x.detach(), real.detach(), fake.detach()
    scale = _rows((x - real).abs().flatten(1).mean(1).clamp_min(1e-12), x)
    return torch.nan_to_num((fake - real) / scale, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x: Tensor, gradient: Tensor) -> Tensor:
    """``1/2 mean (x - sg(x - g))^2``: its gradient with respect to ``x`` is ``g / numel(x)``."""
    target = (x - gradient).detach()
    return 0.5 * (x - target).pow(2).mean()


def fake_score_loss(denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The fake network's denoising loss: ``(1/sigma^2 + 1/sigma_data^2) |D_fake(x_t) - x|^2``, batch mean."""
    weight = sigma.to(denoised.dtype).pow(-2) + SIGMA_DATA**-2
    return (weight * (denoised - x.detach()).pow(2).flatten(1).mean(1)).mean()


@register_method("dmd")
class DMD(DistillMethod):
    """Distribution matching distillation as DMD2 does it: see the module docstring."""

    Options = DMDOptions
    needs_data = False  # generator samples and the two scores only (the GAN term would need images)

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: DMDOptions) -> None:
        if options.generator_every < 1:
            raise ValueError(f"generator_every must be >= 1, got {options.generator_every}")
        if not options.fake_lr_scale > 0:
            raise ValueError(f"fake_lr_scale must be > 0, got {options.fake_lr_scale}")
        if not 0 <= options.dm_time_min < options.dm_time_max <= 1:
            raise ValueError(
                f"need 0 <= dm_time_min < dm_time_max <= 1, got dm_time_min={options.dm_time_min}, "
                f"dm_time_max={options.dm_time_max}"
            )
        check_schedule(options.schedule)
        flow = teacher.info.objective == "flow"
        allowed = ("auto", "flow", "x0") if flow else ("auto", "v", "x0", "eps")
        check_choice(f"parameterisation (for a {teacher.info.objective} teacher)", options.parameterisation, allowed)

    def sampler(self) -> dict[str, Any]:
        return {"solver": "euler", "options": {}, "schedule": self.options.schedule, "steps": self.config.nfe,
                "guidance": 1.0}  # fmt: skip

    def build(self):
        modules, optimizers = super().build()  # student = generator (+ its EMA, exported) and its optimizer
        self.fake = self.copy_network(self.teacher.network, trainable=True)
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=self.config.lr, weight_decay=0.0)
        self.fake_denoiser = self.make_fake_denoiser()
        self.state.setdefault("generator_updates", 0)
        self.state.setdefault("dm_loss", None)  # the last generator update's L_DM (reported between updates)
        self.state.setdefault("fake_loss", None)
        return {**modules, "fake": self.fake}, {**optimizers, "fake_opt": self.fake_opt}

    def make_fake_denoiser(self):
        from ..models.zoo import make_denoiser

        return make_denoiser(self.fake, self.teacher.info)  # the teacher's objective: it starts as its copy

    # -- the pieces of one update ------------------------------------------------------------------------------
    def grid(self) -> Tensor:
        return self.sigmas(self.config.nfe, self.options.schedule).to(self.device)

    def is_generator_update(self, index: int) -> bool:
        return index % self.options.generator_every == 0

    def generator_input(self, k: int, labels: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
        """Backward simulation: the input of the generator's step ``k`` and its level [n], reached from pure noise
        by ``k`` of its own DDIM steps without gradient (``k = 0``: the noise itself)."""
        grid = self.grid()
        x = self.initial_noise(n)
        denoise = self.student_denoiser(self.student)
        with torch.no_grad():
            for i in range(k):
                sigma, sigma_next = grid[i].expand(n), grid[i + 1].expand(n)
                x = ddim_step(x, denoise(x, sigma, **self.cond(labels)).float(), sigma, sigma_next)
        return x, grid[k].expand(n)

    def random_levels(self, n: int, low: float, high: float) -> Tensor:
        """VE levels [n] uniform in the schedule's time between fractions ``low`` and ``high`` of its range."""
        schedule = self.teacher.schedule
        u = low + (high - low) * torch.rand(n, generator=self.gen, device=self.device, dtype=torch.float64)
        return schedule.ve_sigma(schedule.t_min + (schedule.t_max - schedule.t_min) * u).to(self.device)

    def dm_gradient(self, x: Tensor, x_t: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """``g`` for samples ``x`` noised to ``x_t`` at levels ``sigma``: guided teacher against the fake score."""
        real = self.teacher_denoise(x_t, sigma, labels)
        with torch.no_grad():
            fake = self.fake_denoiser(x_t, sigma, **self.cond(labels)).float()
        return distribution_matching_gradient(x, real, fake)

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        b = self.batch_rows  # this process's rows of the batch (all of it in one)
        labels = self.random_labels(b)
        k = int(torch.randint(0, self.config.nfe, (1,), generator=self.gen, device=self.device))
        x_in, sigma_in = self.generator_input(k, labels, b)
        train_generator = self.is_generator_update(index)
        with torch.set_grad_enabled(train_generator):
            x = self.student_denoiser(self.student)(x_in, sigma_in, **self.cond(labels)).float()
        if train_generator:
            sigma = self.random_levels(b, self.options.dm_time_min, self.options.dm_time_max)
            x_t = x.detach() + _rows(sigma, x) * self.randn_like(x)
            loss = distribution_matching_loss(x, self.dm_gradient(x, x_t, sigma, labels))
            updates = self.state["generator_updates"]
            lr = self.config.lr * min(1.0, (updates + 1) / 100)  # warm-up counted in generator updates
            self.state["dm_loss"] = self.update(loss, updates, lr=lr)
            self.state["generator_updates"] = updates + 1
        # the fake score learns the generator's current distribution every update (on these samples, detached)
        sigma = self.random_levels(b, 0.0, 1.0)
        x = x.detach()
        x_t = x + _rows(sigma, x) * self.randn_like(x)
        denoised = self.fake_denoiser(x_t, sigma, **self.cond(labels)).float()
        lr = self.config.lr * self.options.fake_lr_scale * min(1.0, (index + 1) / 100)
        self.state["fake_loss"] = self.update(
            fake_score_loss(denoised, x, sigma), index, opt=self.fake_opt, network=self.fake, lr=lr
        )
        return self.state["dm_loss"]

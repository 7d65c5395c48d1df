"""Classifier-free guidance and dynamic thresholding, as denoiser wrappers.

Both act on the data prediction, so every solver gets them for free. Guidance in ``x0`` equals guidance
in ``eps`` at a fixed noise level, because ``x0 = x - sigma * eps`` is affine in ``eps`` with the same ``x``.

Reference: Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, Eq. 6; Saharia et al., Imagen,
2022, Sec. 2.3 (dynamic thresholding); Lu et al., DPM-Solver++, 2022, Sec. 4 (thresholding for
data-prediction solvers); Chung et al., "Diffusion Posterior Sampling", ICLR 2023, and Bansal et al.,
"Universal Guidance", 2023 (the gradient of a reward of the x0 estimate).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._context import guidance_branch
from ..config import Config
from .adapters import Denoiser, as_sigma

__all__ = ["CFGDenoiser", "DynamicThreshold", "RewardGradientDenoiser", "ThresholdedDenoiser"]


@dataclasses.dataclass(frozen=True)
class DynamicThreshold(Config):
    """Dynamic thresholding of ``x0_hat``: ``s = clamp(quantile(|x0|, percentile), min_scale, max_scale)``,
    then ``x0 <- clamp(x0, -s, s) / s`` per sample.

    The references differ in the clamp: the DPM-Solver code uses ``s = max(q, max_val)``, i.e.
    ``min_scale=max_val, max_scale=inf``; diffusers uses ``s = clamp(q, 1, sample_max_value)``, i.e.
    ``min_scale=1, max_scale=sample_max_value``. The default is Imagen's (``min_scale=1``, no cap).
    Only meaningful for bounded pixel data in [-1, 1], not for latents.

    Reference: Saharia et al., Imagen, 2022, Sec. 2.3; Lu et al., DPM-Solver++, Sec. 4.
    """

    percentile: float = 0.995
    min_scale: float = 1.0
    max_scale: float = math.inf

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0, 1], got {self.percentile}")
        if not 0.0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")

    def __call__(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1).abs()
        q = torch.quantile(flat.float(), self.percentile, dim=1).to(x0.dtype)
        s = q.clamp(min=self.min_scale, max=self.max_scale).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s


class ThresholdedDenoiser(Denoiser):
    """Apply a :class:`DynamicThreshold` (or any ``x0 -> x0`` map, e.g. a scheduler's clipping) to any
    denoiser's output."""

    def __init__(self, denoiser: Callable[..., Tensor], threshold: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.denoiser, self.threshold = denoiser, threshold
        self.sigma_min = getattr(denoiser, "sigma_min", 0.0)
        self.sigma_max = getattr(denoiser, "sigma_max", math.inf)

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        return self.threshold(self.denoiser(x, sigma, **cond))


class CFGDenoiser(Denoiser):
    """Classifier-free guidance: ``D = D_uncond + scale * (D_cond - D_uncond)``, both branches in one call.

    The conditional inputs arrive as keyword arguments of each call (``class_labels=...``); ``uncond``
    gives the matching unconditional inputs (a null class, an empty-prompt embedding), each with a
    batch dimension of 1 or B. At ``scale == 1`` only the conditional branch runs.

    Args:
        denoiser: A conditional denoiser ``D(x, sigma, **cond)``.
        scale: Guidance scale ``w``; 1 is no guidance, 0 is unconditional.
        uncond: Unconditional inputs, one entry per conditioning keyword.
        threshold: Optional dynamic thresholding of the guided ``x0_hat``.

    Reference: Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, Eq. 6.
    """

    # Inputs that say where a call goes, not what it is conditioned on: both branches get the same value
    # (``target_sigma``, the level a two-time network jumps to, set per call by ``ctm_gamma``).
    SHARED_INPUTS = ("target_sigma",)

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        uncond: Mapping[str, Tensor],
        *,
        threshold: DynamicThreshold | None = None,
    ) -> None:
        super().__init__()
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        if not uncond:
            raise ValueError("uncond must name at least one unconditional input, e.g. {'class_labels': null_class}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.threshold = threshold
        self.sigma_min = getattr(denoiser, "sigma_min", 0.0)
        self.sigma_max = getattr(denoiser, "sigma_max", math.inf)

    def both_branches(self, cond: Mapping[str, Any], batch: int) -> dict[str, Any]:
        """The inputs of one batched call of both branches: each conditional input with its unconditional one
        appended (rows ``batch..2 batch``); also what a loop outside hasten (the diffusers peers) feeds."""
        if set(cond) - set(self.SHARED_INPUTS) != set(self.uncond):
            raise ValueError(
                f"conditioning keys {sorted(cond)} do not match the unconditional inputs {sorted(self.uncond)}"
            )
        merged = {}
        for key, c in cond.items():
            c = torch.as_tensor(c)
            u = torch.as_tensor(self.uncond.get(key, c), device=c.device)
            if c.ndim == 0:
                c = c.expand(batch)
            if u.ndim == 0:
                u = u.expand(batch)
            u = u.to(c.dtype).expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u.to(c.dtype)
            if c.shape[0] != batch or u.shape != c.shape:
                raise ValueError(
                    f"{key!r}: cond shape {tuple(c.shape)} / uncond shape {tuple(u.shape)} for batch {batch}"
                )
            merged[key] = torch.cat([c, u])
        return merged

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        sigma = as_sigma(sigma, x)
        if self.scale == 1.0:
            with guidance_branch("cond"):
                denoised = self.denoiser(x, sigma, **cond)
        else:
            with guidance_branch("cond+uncond"):  # both branches in one batch: caches keep them apart by row
                inputs = self.both_branches(cond, x.shape[0])
                both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **inputs)
            d_cond, d_uncond = both.chunk(2)
            denoised = d_uncond + self.scale * (d_cond - d_uncond)
        return self.threshold(denoised) if self.threshold is not None else denoised


class RewardGradientDenoiser(Denoiser):
    """Classifier (gradient) guidance by a reward of the x0 estimate: ``D' = D + sigma^2 * scale * grad_x r(D(x))``.

    ``sigma^2 grad_x log p`` is how a score term enters the data prediction (``D = x + sigma^2 grad log p_sigma``),
    and ``r(D(x, sigma))`` stands in for ``log p(y | x)`` (the posterior-mean approximation of DPS / universal
    guidance), so ``scale`` is the weight of the reward. Every call backpropagates through the network: about two
    forward passes more (on the bundled UNet on a CPU, forward + backward took 2.8x a forward), which a fair
    comparison counts (:attr:`evaluations_per_call`).

    Args:
        denoiser: Any denoiser ``D(x, sigma, **cond)``.
        value: ``value(x0_hat) -> [B]``, differentiable (:func:`hasten.rewards.model_value` of a reward).
        scale: Guidance weight (0: the plain denoiser, with the gradient still computed).

    Reference: Chung et al., DPS, ICLR 2023, Alg. 1 (gradient through the x0 estimate); Bansal et al., "Universal
    Guidance for Diffusion Models", 2023, Eq. 6 (forward guidance).
    """

    evaluations_per_call = 3  # a forward pass plus a backward pass counted as two

    def __init__(self, denoiser: Callable[..., Tensor], value: Callable[[Tensor], Tensor], scale: float) -> None:
        super().__init__()
        if not math.isfinite(scale):
            raise ValueError(f"reward guidance scale must be finite, got {scale}")
        self.denoiser, self.value, self.scale = denoiser, value, float(scale)
        if hasattr(denoiser, "schedule"):  # a model's denoiser carries its schedule (LoadedModel.schedule reads it)
            self.schedule = denoiser.schedule
        self.sigma_min = getattr(denoiser, "sigma_min", 0.0)
        self.sigma_max = getattr(denoiser, "sigma_max", math.inf)

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        sigma = as_sigma(sigma, x)
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True)
            denoised = self.denoiser(inputs, sigma, **cond)
            (gradient,) = torch.autograd.grad(self.value(denoised).sum(), inputs)
        weight = (sigma**2 * self.scale).to(denoised.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (denoised + weight * gradient.to(denoised.dtype)).detach()

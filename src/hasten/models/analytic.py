"""Analytic fixtures: exact denoisers and exact probability-flow solutions.

In VE form the marginal of ``x = x0 + s n`` does not depend on the schedule, so one exact denoiser
``D(x, s) = E[x0 | x]`` serves every schedule; :func:`as_network` re-expresses it as the eps / v / x0 /
flow network a given schedule would have learned, to exercise the adapters and peers end to end.

* :class:`GaussianMixture` - ``sum_k pi_k N(mu_k, diag(s_k^2))`` in ``R^d``; ``stds = 0`` gives the ideal
  denoiser of a finite point set (:func:`point_set`). Exact flow for a single component.
* :class:`ProductMixture` - every coordinate an independent 1-D mixture: non-Gaussian, multi-modal, any
  tensor shape, with the exact PF-ODE solution by the quantile map. The default order-test problem.

Reference: hasten research notes, card F (Tweedie's formula; quantile map of 1-D monotone flows);
Karras et al., EDM, Eq. 4 (PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..schedules.noise import NoiseSchedule
from .adapters import Denoiser, as_sigma

__all__ = ["GaussianMixture", "ProductMixture", "as_network", "point_set"]


def _vector(values: Sequence[float] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if not torch.all(torch.isfinite(t)):
        raise ValueError(f"{name} must be finite")
    return t


def _weights(weights: Sequence[float] | Tensor | None, k: int) -> Tensor:
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else _vector(weights, "weights")
    if w.shape != (k,) or torch.any(w <= 0):
        raise ValueError(f"weights must be {k} positive numbers, got {w.tolist()}")
    return w / w.sum()


class GaussianMixture(Denoiser):
    """``p0 = sum_k pi_k N(mu_k, diag(s_k^2))`` on vectors of length ``d`` (inputs ``[B, d]`` or ``[B, ...]``).

    Args:
        means: ``[K, d]`` component means.
        stds: ``[K]`` isotropic or ``[K, d]`` diagonal standard deviations (0 allowed: point masses).
        weights: ``[K]`` mixture weights (normalised), uniform by default.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor,
        stds: Sequence[float] | Sequence[Sequence[float]] | Tensor,
        weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        mu = _vector(means, "means")
        if mu.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(mu.shape)}")
        s = _vector(stds, "stds")
        s = s[:, None].expand_as(mu) if s.ndim == 1 else s
        if s.shape != mu.shape or torch.any(s < 0):
            raise ValueError(f"stds must be [K] or [K, d] = {tuple(mu.shape)} and non-negative")
        self.means, self.stds = mu, s.clone()
        self.weights = _weights(weights, mu.shape[0])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        sig = as_sigma(sigma, x)[:, None, None]  # [B, 1, 1]
        flat = x.reshape(x.shape[0], -1).to(torch.float64)  # [B, d]
        if flat.shape[1] != self.dim:
            raise ValueError(f"this mixture lives in R^{self.dim}; got inputs with {flat.shape[1]} values")
        mu, var = self.means.to(x.device), self.stds.to(x.device) ** 2  # [K, d]
        c = var + sig**2  # [B, K, d]  marginal variances
        diff = flat[:, None, :] - mu  # [B, K, d]
        log_w = torch.log(self.weights.to(x.device)) - 0.5 * (torch.log(c) + diff**2 / c).sum(-1)
        w = torch.softmax(log_w, dim=1)  # posterior component weights [B, K]
        m = mu + var / c * diff  # per-component posterior means
        return (w[..., None] * m).sum(1).reshape(x.shape).to(x.dtype)

    def sample(self, n: int, *, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of the noisy marginal ``p_sigma`` (``sigma=0``: the data), float64 ``[n, d]``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = torch.sqrt(self.stds[k] ** 2 + sigma**2)
        return self.means[k] + std * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)

    def exact_flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Exact PF-ODE map from level ``sigma_from`` to ``sigma_to`` (single component only)."""
        if self.means.shape[0] != 1:
            raise ValueError("exact_flow has a closed form for a single Gaussian; use ProductMixture for mixtures")
        mu, var = self.means[0], self.stds[0] ** 2
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        ratio = torch.sqrt((var + sigma_to**2) / (var + sigma_from**2))
        return (mu + (flat - mu) * ratio).reshape(x.shape).to(x.dtype)


def point_set(
    points: Sequence[Sequence[float]] | Tensor, weights: Sequence[float] | Tensor | None = None
) -> GaussianMixture:
    """The exact (memorising) denoiser of a finite set of points ``[K, d]``."""
    pts = _vector(points, "points")
    if pts.ndim != 2:
        raise ValueError(f"points must be [K, d], got shape {tuple(pts.shape)}")
    return GaussianMixture(pts, torch.zeros(pts.shape[0], dtype=torch.float64), weights)


class ProductMixture(Denoiser):
    """Every coordinate an independent copy of the 1-D mixture ``sum_k pi_k N(mu_k, s_k^2)``.

    Works on tensors of any shape (each element is a coordinate). Non-Gaussian and multi-modal, with an
    exact PF-ODE solution: 1-D probability flows are monotone and preserve quantiles, so
    ``x_to = F_to^{-1}(F_from(x_from))`` per coordinate (card F.4.2).
    """

    def __init__(
        self,
        means: Sequence[float] | Tensor = (-1.0, 0.5, 1.5),
        stds: Sequence[float] | Tensor = (0.3, 0.2, 0.4),
        weights: Sequence[float] | Tensor | None = (0.3, 0.45, 0.25),
    ) -> None:
        super().__init__()
        self.means = _vector(means, "means").flatten()
        self.stds = _vector(stds, "stds").flatten()
        if self.stds.shape != self.means.shape or torch.any(self.stds <= 0):
            raise ValueError("stds must match means and be positive")
        self.weights = _weights(weights, self.means.numel())

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        sig = as_sigma(sigma, x).reshape(-1, *([1] * x.ndim))  # [B, 1, ..., 1]
        xe = x.to(torch.float64).unsqueeze(-1)  # [..., 1] against components [K]
        var = self.stds.to(x.device) ** 2
        c = var + sig**2
        diff = xe - self.means.to(x.device)
        w = torch.softmax(torch.log(self.weights.to(x.device)) - 0.5 * (torch.log(c) + diff**2 / c), dim=-1)
        return (w * (self.means.to(x.device) + var / c * diff)).sum(-1).to(x.dtype)

    def sample(self, shape: Sequence[int], *, sigma: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of ``p_sigma`` with the given shape, float64."""
        n = math.prod(shape)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = torch.sqrt(self.stds[k] ** 2 + sigma**2)
        out = self.means[k] + std * torch.randn(n, dtype=torch.float64, generator=generator)
        return out.reshape(tuple(shape))

    def _cdf_sf(self, y: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        std = torch.sqrt(self.stds**2 + sigma**2)
        z = (y.unsqueeze(-1) - self.means) / std
        return (self.weights * torch.special.ndtr(z)).sum(-1), (self.weights * torch.special.ndtr(-z)).sum(-1)

    def exact_flow(self, x: Tensor, sigma_from: float, sigma_to: float, *, iterations: int = 200) -> Tensor:
        """Exact PF-ODE solution from ``sigma_from`` to ``sigma_to`` by the quantile map (float64 bisection)."""
        xd = x.to(torch.float64).cpu()
        cdf, sf = self._cdf_sf(xd, sigma_from)
        use_sf = sf < cdf  # compare in the tail with the better-conditioned side
        target = torch.where(use_sf, sf, cdf)
        width = 40.0 * float(torch.sqrt(self.stds.max() ** 2 + max(sigma_from, sigma_to) ** 2))
        lo = torch.full_like(xd, float(self.means.min()) - width)
        hi = torch.full_like(xd, float(self.means.max()) + width)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            c, s = self._cdf_sf(mid, sigma_to)
            # G(y) increasing in y: F_to(y) - F or S - S_to(y).
            g = torch.where(use_sf, target - s, c - target)
            above = g > 0
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
            if torch.all(hi - lo <= 1e-15 * (1 + hi.abs())):
                break
        return (0.5 * (lo + hi)).to(device=x.device, dtype=x.dtype)


Prediction = Literal["eps", "v", "x0", "flow"]


class _AnalyticNetwork(nn.Module):
    """An exact denoiser re-expressed as the network a schedule would have learned."""

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, prediction: Prediction, time_scale: float):
        super().__init__()
        self.denoiser, self.schedule, self.prediction, self.time_scale = (
            denoiser,
            schedule,
            prediction,
            time_scale,
        )

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device) / self.time_scale
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        s = self.schedule.ve_sigma(t)  # [B]
        alpha = self.schedule.alpha_from_ve_sigma(s).reshape(-1, *([1] * (x_t.ndim - 1)))
        s_b = s.reshape_as(alpha)
        x = x_t.to(torch.float64) / alpha  # VE form
        x0 = self.denoiser(x, s, **cond).to(torch.float64)
        eps = (x - x0) / s_b
        if self.prediction == "eps":
            out = eps
        elif self.prediction == "x0":
            out = x0
        elif self.prediction == "v":
            out = alpha * eps - alpha * s_b * x0
        else:  # flow velocity, SD3 orientation: v = eps - x0
            out = eps - x0
        return out.to(x_t.dtype)


def as_network(
    denoiser: Denoiser, schedule: NoiseSchedule, prediction: Prediction = "eps", *, time_scale: float = 1.0
) -> nn.Module:
    """Wrap an exact denoiser as a network ``net(x_t, t)`` predicting eps / v / x0 / flow velocity.

    ``t`` is the schedule's time label (times ``time_scale``), ``x_t = alpha(t) x0 + sigma(t) eps``; conditioning
    keywords (``class_labels=``) are passed on to the denoiser (a class-conditional fixture may use them).
    Used to test adapters and to drive other libraries' schedulers on a model with a known answer.
    """
    if prediction not in ("eps", "v", "x0", "flow"):
        raise ValueError(f"prediction must be 'eps', 'v', 'x0' or 'flow', got {prediction!r}")
    return _AnalyticNetwork(denoiser, schedule, prediction, float(time_scale))

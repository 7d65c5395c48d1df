"""Adapters that turn a trained network into a hasten denoiser ``D(x, sigma, **cond) -> x0_hat``.

The contract (k-diffusion / EDM): ``x`` is in VE form ``x = x0 + sigma * n`` and ``sigma`` has shape
``[B]`` (a Python float is broadcast). An adapter converts ``sigma`` into the network's own time label,
scales the input by ``alpha``, calls the network and turns its output (noise, velocity, data or
flow velocity) into the data prediction. Solvers never see any of this.

A two-time network (a CTM student, :mod:`hasten.distill.ctm`) also takes the level it jumps to: the
conditioning input ``target_sigma`` (VE, like ``sigma``; clamped at the schedule's ``sigma_min``) reaches the
network as ``target_time``, converted to its time label as ``sigma`` is.

Reference: Karras et al., EDM, Sec. 5 and Table 1 (preconditioning as a wrapper around the network);
Lu et al., DPM-Solver, App. (``model_wrapper``: noise / x_start / v / score outputs, discrete time labels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..schedules.noise import FlowMatching, NoiseSchedule

__all__ = [
    "Denoiser",
    "EpsDenoiser",
    "FlowDenoiser",
    "NetworkDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "as_sigma",
    "consistency_boundary",
]

TimeLabel = Literal["t", "round", "sigma"]


class Denoiser(nn.Module):
    """Base of hasten's denoisers: ``forward(x, sigma, **cond)`` returns the data prediction ``x0_hat``.

    Any callable with that signature works with :func:`hasten.sample`; subclassing is optional.
    """

    sigma_min: float = 0.0
    sigma_max: float = float("inf")


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Broadcast ``sigma`` (float, 0-d or ``[B]``) to a float64 ``[B]`` tensor on ``x``'s device."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.ndim == 0:
        return s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a tensor of shape [B]=[{x.shape[0]}], got {tuple(s.shape)}")
    return s.to(torch.float64)


def _unwrap(out: Any) -> Tensor:
    """Accept a plain tensor, a diffusers output object (``.sample``) or a tuple (first element)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the network returned {type(out).__name__}; expected a Tensor, a .sample output or a tuple")


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def consistency_boundary(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_min: float) -> Tensor:
    """A consistency model's output from its network's data prediction: ``f = D + (sigma_min / sigma) (x - D)``.

    That is the DDIM step from ``sigma`` down to the boundary level ``sigma_min`` with the network's own ``D``,
    and ``f(x, sigma) = x`` for ``sigma <= sigma_min`` (exactly, not to rounding), the boundary condition a
    consistency function must meet. It is CM's parameterisation ``f = c_skip x + c_out F`` with the same factor
    ``(sigma - sigma_min) / sigma`` on an EDM-preconditioned denoiser (``c_out / c_out_EDM``) and ``sigma_min /
    sigma`` in place of CM's ``c_skip`` correction: both reach every function with ``f(x, sigma_min) = x``, this
    one needs no ``sigma_data``, gives the plain denoiser back at ``sigma_min = 0``, and makes a student that
    starts as a copy of its teacher the teacher's one-step DDIM map to ``sigma_min`` (first order in the jump),
    so the network keeps its own objective. Mixing ``c_skip x + (1 - c_skip) D`` instead would scale the
    network's part by ``(sigma - sigma_min)^2`` near the boundary, forcing ``D`` far from a denoiser there.

    Reference: Song et al., "Consistency Models", ICML 2023, Sec. 3 and App. C (``c_skip``, ``c_out``).
    """
    above = sigma > sigma_min
    ratio = sigma_min / torch.where(above, sigma, torch.ones_like(sigma))  # rows at or below: replaced by x
    return torch.where(_bcast(above, x), torch.lerp(denoised, x, _bcast(ratio, x).to(x.dtype)), x)


class NetworkDenoiser(Denoiser, ABC):
    """Common machinery: time label, input scaling, dtype handling; subclasses convert the output.

    Args:
        model: The network, called as ``model(x_t, t, **cond)``.
        schedule: The noise schedule the network was trained with.
        time_label: How the network's time input is formed from sigma: ``"t"`` the schedule's time
            (a fractional index for :class:`VPDiscrete`), ``"round"`` that time rounded to the nearest
            integer (networks that only saw integer timesteps), ``"sigma"`` the VE sigma itself.
        time_scale: Multiplies the time label (e.g. 1000 for SD3-style flow models fed ``t * 1000``).

    ``consistency_sigma_min`` (set by :func:`hasten.models.zoo.make_denoiser` from a student's ``consistency``
    record): when not None the output is the consistency function :func:`consistency_boundary` of the data
    prediction, exactly ``x`` at that level.
    """

    consistency_sigma_min: float | None = None

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        *,
        time_label: TimeLabel = "t",
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if time_label not in ("t", "round", "sigma"):
            raise ValueError(f"time_label must be 't', 'round' or 'sigma', got {time_label!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a hasten NoiseSchedule, got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.time_label = time_label
        self.time_scale = float(time_scale)
        self.sigma_min, self.sigma_max = schedule.sigma_min, schedule.sigma_max

    def model_time(self, sigma: Tensor) -> Tensor:
        """The network's time label for VE noise level ``sigma`` ([B], float64)."""
        if self.time_label == "sigma":
            label = sigma
        else:
            label = self.schedule.t_from_ve_sigma(sigma)
            if self.time_label == "round":
                label = label.round()
        return label * self.time_scale

    def _network_dtype(self, fallback: torch.dtype) -> torch.dtype:
        param = next(iter(self.model.parameters()), None) if isinstance(self.model, nn.Module) else None
        return param.dtype if param is not None and param.is_floating_point() else fallback

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        sigma = as_sigma(sigma, x)
        alpha = self.schedule.alpha_from_ve_sigma(sigma)
        work = torch.promote_types(x.dtype, torch.float32)
        x_t = x.to(work) * _bcast(alpha, x).to(work)
        net_dtype = self._network_dtype(work)
        if "target_sigma" in cond:  # a two-time network (a CTM student): the level it jumps to, as a time label
            target = as_sigma(cond.pop("target_sigma"), x).clamp_min(self.schedule.sigma_min)
            cond["target_time"] = self.model_time(target).to(net_dtype)
        out = _unwrap(self.model(x_t.to(net_dtype), self.model_time(sigma).to(net_dtype), **cond)).to(work)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        x_w = x.to(work)
        denoised = self.to_denoised(out, x_w, x_t, _bcast(alpha, x).to(work), _bcast(sigma, x).to(work))
        if self.consistency_sigma_min is not None:
            return consistency_boundary(x_w, denoised, sigma, self.consistency_sigma_min)
        return denoised

    @abstractmethod
    def to_denoised(self, out: Tensor, x: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Convert the network output to ``x0_hat``. ``x`` is VE, ``x_t = alpha * x`` the network input."""


class EpsDenoiser(NetworkDenoiser):
    """Noise-prediction network: ``x0 = x - sigma * eps`` in VE form.

    Reference: Ho et al., DDPM, Eq. 11; DPM-Solver's ``model_wrapper`` (model_type="noise").
    """

    def to_denoised(self, out, x, x_t, alpha, sigma):
        return x - sigma * out


class VDenoiser(NetworkDenoiser):
    """Velocity-prediction network, ``v = alpha eps - sigma_t x0``: ``x0 = alpha x_t - sigma_t v``.

    Reference: Salimans & Ho, "Progressive Distillation", ICLR 2022, Sec. 4 and App. D.
    """

    def to_denoised(self, out, x, x_t, alpha, sigma):
        return alpha * x_t - (alpha * sigma) * out


class X0Denoiser(NetworkDenoiser):
    """Data-prediction network: the output is ``x0_hat`` already."""

    def to_denoised(self, out, x, x_t, alpha, sigma):
        return out


class FlowDenoiser(NetworkDenoiser):
    """Flow-matching / rectified-flow network predicting a velocity on a :class:`FlowMatching` schedule.

    Args:
        orientation: ``"noise_at_one"`` (SD3, Flux, diffusers' FlowMatch schedulers): ``x_t = (1-t) x0 + t eps``,
            time label ``t``, velocity ``v = eps - x0``, so ``x0 = x_t - t v``. ``"data_at_one"`` (the
            rectified-flow papers' code): label ``tau = 1 - t``, ``v = x0 - eps``, so ``x0 = x_t + t v``.

    Reference: Liu et al., "Rectified Flow", ICLR 2023; Esser et al., SD3, 2024, Sec. 2.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: FlowMatching | None = None,
        *,
        orientation: Literal["noise_at_one", "data_at_one"] = "noise_at_one",
        time_scale: float = 1.0,
    ) -> None:
        schedule = FlowMatching() if schedule is None else schedule
        if not isinstance(schedule, FlowMatching):
            raise TypeError(f"FlowDenoiser needs a FlowMatching schedule, got {type(schedule).__name__}")
        if orientation not in ("noise_at_one", "data_at_one"):
            raise ValueError(f"orientation must be 'noise_at_one' or 'data_at_one', got {orientation!r}")
        super().__init__(model, schedule, time_label="t", time_scale=time_scale)
        self.orientation = orientation

    def model_time(self, sigma: Tensor) -> Tensor:
        t = self.schedule.t_from_ve_sigma(sigma)
        return (t if self.orientation == "noise_at_one" else 1.0 - t) * self.time_scale

    def to_denoised(self, out, x, x_t, alpha, sigma):
        t = alpha * sigma  # marginal noise scale of the flow, equal to its time
        return x_t - t * out if self.orientation == "noise_at_one" else x_t + t * out

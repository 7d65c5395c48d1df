"""Noise schedules: the map between a model's own time label ``t`` and its noise level.

Every schedule describes the forward marginal ``x_t = alpha(t) * x0 + sigma(t) * eps`` and exposes the
half log-SNR ``lambda(t) = log alpha(t) - log sigma(t)`` with its inverse. hasten's samplers work in the
VE form ``x = x0 + s * n`` with ``s = sigma(t) / alpha(t) = exp(-lambda(t))`` (the "VE sigma"); the
schedule converts that ``s`` back to the model's time label and input scaling.

All maths runs in float64. Inputs may be Python floats or tensors; outputs are float64 tensors.

Reference: Lu et al., "DPM-Solver", NeurIPS 2022, Sec. 2 and App. (``NoiseScheduleVP``); Karras et al.,
"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), NeurIPS 2022, Table 1;
Esser et al., "Scaling Rectified Flow Transformers" (SD3), 2024, Sec. 5.3.2 (resolution shift);
Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024, Alg. 1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "VE",
    "FlowMatching",
    "NoiseSchedule",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "betas_for",
    "rescale_zero_terminal_snr",
]

TensorLike = float | Tensor


def _f64(value: TensorLike) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return torch.tensor(value, dtype=torch.float64)


class NoiseSchedule(ABC):
    """A forward process ``x_t = alpha(t) x0 + sigma(t) eps`` over the time interval ``[t_min, t_max]``.

    Subclasses define :meth:`lambda_` and :meth:`t_from_lambda`; ``alpha`` and ``sigma`` follow from the
    family (variance preserving, variance exploding or flow matching).
    """

    t_min: float
    t_max: float

    @abstractmethod
    def lambda_(self, t: TensorLike) -> Tensor:
        """Half log-SNR ``log alpha(t) - log sigma(t)``; decreases with ``t``."""

    @abstractmethod
    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        """Inverse of :meth:`lambda_`."""

    @abstractmethod
    def alpha_from_ve_sigma(self, s: TensorLike) -> Tensor:
        """Signal scale ``alpha`` at VE noise level ``s`` (input scaling of the network)."""

    # -- derived quantities, shared by every family -----------------------------------------------------
    def alpha(self, t: TensorLike) -> Tensor:
        """Signal scale ``alpha(t)``."""
        return self.alpha_from_ve_sigma(self.ve_sigma(t))

    def sigma(self, t: TensorLike) -> Tensor:
        """Noise scale ``sigma(t)`` of the marginal (not the VE sigma)."""
        s = self.ve_sigma(t)
        return self.alpha_from_ve_sigma(s) * s

    def ve_sigma(self, t: TensorLike) -> Tensor:
        """VE noise level ``sigma(t) / alpha(t) = exp(-lambda(t))``, the unit hasten's samplers use."""
        return torch.exp(-self.lambda_(t))

    def t_from_ve_sigma(self, s: TensorLike) -> Tensor:
        """The model time ``t`` whose VE noise level is ``s``."""
        return self.t_from_lambda(-torch.log(_f64(s)))

    @property
    def sigma_min(self) -> float:
        """Smallest VE noise level on ``[t_min, t_max]``."""
        return float(self.ve_sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        """Largest VE noise level on ``[t_min, t_max]``."""
        return float(self.ve_sigma(self.t_max))

    def time_shift(self, u: TensorLike) -> Tensor:
        """Warp applied to uniformly spaced times by the time-based discretisations (identity here)."""
        return _f64(u)

    def initial_noise_scale(self, s: float) -> float:
        """Standard deviation of the starting noise at VE level ``s``, as diffusers initialises it.

        Unit variance in the network's own input space, i.e. ``1 / alpha``; VE schedules use ``s``.
        """
        return float(1.0 / self.alpha_from_ve_sigma(s))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t in [{self.t_min:g}, {self.t_max:g}])"


class _VariancePreserving(NoiseSchedule, ABC):
    """VP family: ``alpha^2 + sigma^2 = 1``, so ``alpha = 1 / sqrt(1 + s^2)``."""

    def alpha_from_ve_sigma(self, s: TensorLike) -> Tensor:
        return torch.rsqrt(1.0 + _f64(s) ** 2)


def betas_for(
    kind: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """The discrete beta tables diffusers uses (names as in its ``beta_schedule`` option).

    Reference: Ho et al., DDPM (linear); Rombach et al., LDM (scaled_linear); Nichol & Dhariwal,
    "Improved DDPM", Eq. 17 (squaredcos_cap_v2, betas capped at 0.999).
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; allowed: 'linear', 'scaled_linear', 'squaredcos_cap_v2'")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Rescale ``alphas_cumprod`` so that the last step has zero SNR, keeping the first step's SNR.

    Reference: Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024,
    Algorithm 1 (also the premise of Hu et al., "One More Step", CVPR 2024). Models need v- or
    x0-prediction at zero SNR: noise prediction cannot recover x0 when ``alpha = 0``.
    """
    sqrt_ab = _f64(alphas_cumprod).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # Shift so the last value is zero, then scale so the first value is unchanged.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (``numpy.interp``) for increasing ``xp``, extrapolating linearly."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class VPDiscrete(_VariancePreserving):
    """A discrete DDPM schedule given by ``alphas_cumprod[i]``, i = 0..N-1, with ``t`` the (float) index.

    Between integer indices the log VE sigma is interpolated linearly, which is how diffusers and
    k-diffusion map a noise level back to a fractional timestep. ``t`` therefore is exactly the label a
    discrete-time network was trained with.

    Args:
        alphas_cumprod: ``[N]`` cumulative products of ``1 - beta``, decreasing.
        terminal_alpha_cumprod: Replaces an exact zero at the end (zero terminal SNR) so that the VE
            noise level stays finite, as diffusers' Euler scheduler does (2**-24).
    """

    def __init__(self, alphas_cumprod: Tensor, *, terminal_alpha_cumprod: float = 2.0**-24) -> None:
        ab = _f64(alphas_cumprod).flatten()
        if ab.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not torch.all(torch.isfinite(ab)) or torch.any(ab < 0) or torch.any(ab > 1):
            raise ValueError("alphas_cumprod must be finite and lie in [0, 1]")
        if torch.any(ab[1:] >= ab[:-1]):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        if ab[-1] == 0:
            ab = ab.clone()
            ab[-1] = terminal_alpha_cumprod
        self.alphas_cumprod = ab
        self.num_train_timesteps = ab.numel()
        self.t_min, self.t_max = 0.0, float(ab.numel() - 1)
        # lambda_i = 0.5 * log(ab / (1 - ab)), decreasing in i; stored increasing for searchsorted.
        self._lambdas = 0.5 * (torch.log(ab) - torch.log1p(-ab))
        self._index = torch.arange(ab.numel(), dtype=torch.float64)
        self._lambdas_increasing, self._index_reversed = self._lambdas.flip(0), self._index.flip(0)
        self._on_device: dict[torch.device, tuple[Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(index, lambdas, lambdas increasing, index reversed) on ``device``: copied once per device, since a
        sampler on a GPU asks with GPU tensors on every model call."""
        tables = (self._index, self._lambdas, self._lambdas_increasing, self._index_reversed)
        if device == self._index.device:
            return tables
        if device not in self._on_device:
            self._on_device[device] = tuple(t.to(device) for t in tables)
        return self._on_device[device]  # type: ignore[return-value]

    @classmethod
    def from_betas(
        cls,
        kind: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        *,
        zero_terminal_snr: bool = False,
    ) -> VPDiscrete:
        """Build from a named beta table (diffusers' ``beta_schedule``), optionally rescaled to zero SNR."""
        betas = betas_for(kind, num_train_timesteps, beta_start, beta_end)
        ab = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            ab = rescale_zero_terminal_snr(ab)
        return cls(ab)

    def lambda_(self, t: TensorLike) -> Tensor:
        t = _f64(t)
        index, lambdas, _, _ = self._tables(t.device)
        return _interp(t.flatten(), index, lambdas).reshape(t.shape)

    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        lam = _f64(lambda_)
        _, _, lambdas_increasing, index_reversed = self._tables(lam.device)
        flipped = _interp(lam.flatten(), lambdas_increasing, index_reversed)
        return flipped.reshape(lam.shape)

    def __repr__(self) -> str:
        return f"VPDiscrete(N={self.num_train_timesteps}, sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"


class VPLinear(_VariancePreserving):
    """Continuous VP schedule with linear ``beta(t)`` (ScoreSDE / DDPM limit).

    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``.

    Reference: Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, Eq. 33;
    DPM-Solver App. (closed-form inverse of lambda).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if beta_max <= beta_min or beta_min < 0:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def lambda_(self, t: TensorLike) -> Tensor:
        log_alpha = self._log_alpha(_f64(t))
        log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        lam = _f64(lambda_)
        d_beta = self.beta_max - self.beta_min
        tmp = 2.0 * d_beta * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_min**2 + tmp) + self.beta_min) / d_beta


class VPCosine(_VariancePreserving):
    """Continuous cosine VP schedule, ``alpha(t) = cos((t + s) / (1 + s) * pi / 2) / cos(s / (1 + s) * pi / 2)``.

    Reference: Nichol & Dhariwal, "Improved DDPM", ICML 2021, Eq. 17; DPM-Solver's ``NoiseScheduleVP``
    ('cosine', ``t_max = 0.9946`` keeps ``lambda`` above about -5.1).
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._log_alpha_0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))

    def lambda_(self, t: TensorLike) -> Tensor:
        t = _f64(t)
        log_alpha = torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0
        log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        lam = _f64(lambda_)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) - self.s


class VE(NoiseSchedule):
    """Variance-exploding / EDM schedule: ``alpha = 1``, ``sigma(t) = t``; the time label is sigma itself.

    Reference: Karras et al., EDM, NeurIPS 2022, Table 1 (sigma in [0.002, 80]).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = sigma_min, sigma_max

    def lambda_(self, t: TensorLike) -> Tensor:
        return -torch.log(_f64(t))

    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        return torch.exp(-_f64(lambda_))

    def alpha_from_ve_sigma(self, s: TensorLike) -> Tensor:
        return torch.ones_like(_f64(s))

    def initial_noise_scale(self, s: float) -> float:
        return float(s)


class FlowMatching(NoiseSchedule):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps`` (t = 1 is noise, SD3's orientation).

    The VE noise level is ``s = t / (1 - t)``. ``t = 1`` itself has infinite VE noise, so the schedule
    stops at ``t_max`` (default ``1 - 1e-4``, ``s ~ 1e4``), where the marginal differs from pure noise by
    1e-4 of the data.

    Args:
        shift: SD3 / Flux resolution shift applied to uniformly spaced times,
            ``t = shift u / (1 + (shift - 1) u)``; 1 means no shift.

    Reference: Lipman et al., "Flow Matching", ICLR 2023; Liu et al., "Rectified Flow", ICLR 2023;
    Esser et al., SD3, 2024, Sec. 5.3.2 (timestep shift).
    """

    def __init__(self, shift: float = 1.0, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.t_min, self.t_max = float(shift), t_min, t_max

    @classmethod
    def for_resolution(
        cls,
        image_seq_len: int,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
    ) -> FlowMatching:
        """Flux's resolution-dependent shift ``exp(mu)``, mu linear in the number of image tokens."""
        slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        mu = base_shift + slope * (image_seq_len - base_seq_len)
        return cls(shift=math.exp(mu))

    def lambda_(self, t: TensorLike) -> Tensor:
        t = _f64(t)
        return torch.log1p(-t) - torch.log(t)

    def t_from_lambda(self, lambda_: TensorLike) -> Tensor:
        return torch.sigmoid(-_f64(lambda_))

    def alpha_from_ve_sigma(self, s: TensorLike) -> Tensor:
        return 1.0 / (1.0 + _f64(s))

    def time_shift(self, u: TensorLike) -> Tensor:
        u = _f64(u)
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def __repr__(self) -> str:
        return f"FlowMatching(shift={self.shift:g}, t in [{self.t_min:g}, {self.t_max:g}])"

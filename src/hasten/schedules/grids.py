"""Discretisations: descending VE ``sigmas`` tensors of length ``n + 1`` for ``n`` solver steps.

A discretisation is data (k-diffusion's convention), so search can optimise the tensor itself. Every
function here takes ``final``: ``"zero"`` (default) spaces ``n`` levels from ``sigma_max`` down to
``sigma_min`` and appends 0, so the last step denoises fully; ``"sigma_min"`` spaces ``n + 1`` levels and
ends at ``sigma_min`` (DPM-Solver's convention; pair it with ``denoise_to_zero``).

Reference: Karras et al., EDM, Eq. 5 (rho grid); Lu et al., DPM-Solver, Sec. 3.3 (``logSNR``,
``time_uniform``, ``time_quadratic``); Lin et al., WACV 2024, Table 2 (``linspace``/``leading``/``trailing``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..registry import Registry
from .noise import FlowMatching, NoiseSchedule, VPDiscrete, _f64

__all__ = [
    "DISCRETISATIONS",
    "discrete_timesteps",
    "from_sigmas",
    "from_timesteps",
    "get_sigmas",
    "karras",
    "logsnr_uniform",
    "time_quadratic",
    "time_uniform",
]

Final = Literal["zero", "sigma_min"]


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _finish(levels: Tensor, final: Final) -> Tensor:
    """Append the final zero when asked; ``levels`` already has the right count for ``final``."""
    if final == "zero":
        return torch.cat([levels, levels.new_zeros(1)])
    if final == "sigma_min":
        return levels
    raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")


def _count(n: int, final: Final) -> int:
    return n if final == "zero" else n + 1


def karras(n: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0, final: Final = "zero") -> Tensor:
    """EDM's grid, uniform in ``sigma ** (1 / rho)``: dense near ``sigma_min``.

    Reference: Karras et al., EDM, NeurIPS 2022, Eq. 5 (rho = 7).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, _count(n, final), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, final)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float, *, final: Final = "zero") -> Tensor:
    """Uniform steps in log-SNR (``lambda = -log sigma``): a geometric sigma grid.

    Reference: Lu et al., DPM-Solver, NeurIPS 2022, Sec. 3.3 ("logSNR" skip type).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    lam = torch.linspace(-torch.log(_f64(sigma_max)).item(), -torch.log(_f64(sigma_min)).item(), _count(n, final))
    return _finish(torch.exp(-lam.to(torch.float64)), final)


def _time_power(
    n: int, schedule: NoiseSchedule, power: float, t_min: float | None, t_max: float | None, final: Final
) -> Tensor:
    _check_n(n)
    t_lo = schedule.t_min if t_min is None else t_min
    t_hi = schedule.t_max if t_max is None else t_max
    if not schedule.t_min <= t_lo < t_hi <= schedule.t_max:
        raise ValueError(
            f"need {schedule.t_min} <= t_min < t_max <= {schedule.t_max} for {schedule!r}, got {t_lo}, {t_hi}"
        )
    u = torch.linspace(t_hi ** (1 / power), t_lo ** (1 / power), _count(n, final), dtype=torch.float64) ** power
    # The schedule's own warp of the time axis (SD3 / Flux shift for flow matching).
    shifted = schedule.time_shift(u)
    return _finish(schedule.ve_sigma(shifted), final)


def time_uniform(
    n: int,
    schedule: NoiseSchedule,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    final: Final = "zero",
) -> Tensor:
    """Uniform steps in the schedule's time ``t`` (after its ``time_shift``, e.g. SD3's shift).

    Reference: Lu et al., DPM-Solver, Sec. 3.3 ("time_uniform"); Esser et al., SD3, Sec. 5.3.2.
    """
    return _time_power(n, schedule, 1.0, t_min, t_max, final)


def time_quadratic(
    n: int,
    schedule: NoiseSchedule,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    final: Final = "zero",
) -> Tensor:
    """Uniform steps in ``sqrt(t)``, i.e. quadratic in ``t``: dense near ``t_min``.

    Reference: Lu et al., DPM-Solver, Sec. 3.3 ("time_quadratic"); Song et al., DDIM, App. D.2 ("quad").
    """
    return _time_power(n, schedule, 2.0, t_min, t_max, final)


def discrete_timesteps(
    n: int,
    num_train_timesteps: int = 1000,
    spacing: Literal["linspace", "leading", "trailing"] = "trailing",
    *,
    steps_offset: int = 0,
) -> Tensor:
    """Integer timesteps (descending) for a discrete model, with diffusers' ``timestep_spacing`` rules.

    ``linspace``: ``round(linspace(0, T - 1, n))``; ``leading``: ``arange(n) * (T // n) + steps_offset``;
    ``trailing``: ``round(arange(T, 0, -T / n)) - 1``, which starts at the last trained timestep.
    (diffusers' multistep DPM-Solver and UniPC schedulers space ``n + 1`` points and drop the last; pass
    their ``scheduler.timesteps`` to :func:`from_timesteps` to reproduce them exactly.)

    Reference: Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2.
    """
    _check_n(n)
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"cannot take {n} steps from {T} training timesteps")
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    elif spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1
        return ts.to(torch.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: 'linspace', 'leading', 'trailing'")
    return ts.flip(0).to(torch.int64)


def from_timesteps(schedule: NoiseSchedule, timesteps: Sequence[float] | Tensor, *, final: Final = "zero") -> Tensor:
    """Sigmas at explicit model times (e.g. a diffusers scheduler's ``timesteps``), plus a final 0 if asked.

    With ``final="sigma_min"`` the grid ends at the last given timestep.
    """
    ts = _f64(timesteps if isinstance(timesteps, Tensor) else torch.as_tensor(timesteps, dtype=torch.float64)).flatten()
    if ts.numel() < 1:
        raise ValueError("timesteps must not be empty")
    if torch.any(ts < schedule.t_min - 1e-9) or torch.any(ts > schedule.t_max + 1e-9):
        raise ValueError(f"timesteps must lie in [{schedule.t_min}, {schedule.t_max}] for {schedule!r}")
    levels = schedule.ve_sigma(ts)
    return from_sigmas(_finish(levels, final))


def from_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    """Validate an explicit list of VE sigmas: 1-D, finite, non-negative, strictly descending, n >= 1."""
    # a list of Python floats is read in float64 (as_tensor's default float32 would round the levels)
    s = _f64(sigmas if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas, dtype=torch.float64))
    if s.ndim > 1:  # e.g. a [B, N] batch of grids: every sample of one call shares one grid
        raise ValueError(f"sigmas must be 1-D (one grid for the whole batch), got shape {tuple(s.shape)}")
    s = s.flatten()
    if s.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 entries (one step), got {s.numel()}")
    if not torch.all(torch.isfinite(s)):
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if torch.any(s < 0):
        raise ValueError(f"sigmas must be non-negative, got {s.tolist()}")
    bad = torch.nonzero(s[1:] >= s[:-1]).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"sigmas must be strictly descending; "
            f"sigmas[{i}]={s[i].item():.6g} <= sigmas[{i + 1}]={s[i + 1].item():.6g}"
        )
    return s


DISCRETISATIONS: Registry[Callable[..., Tensor]] = Registry("discretisation")


@DISCRETISATIONS.register("karras")
def _karras(n: int, schedule: NoiseSchedule, **kw) -> Tensor:
    return karras(n, kw.pop("sigma_min", schedule.sigma_min), kw.pop("sigma_max", schedule.sigma_max), **kw)


@DISCRETISATIONS.register("logsnr")
def _logsnr(n: int, schedule: NoiseSchedule, **kw) -> Tensor:
    return logsnr_uniform(n, kw.pop("sigma_min", schedule.sigma_min), kw.pop("sigma_max", schedule.sigma_max), **kw)


DISCRETISATIONS.add("time_uniform", time_uniform)
DISCRETISATIONS.add("time_quadratic", time_quadratic)


def _discrete(spacing: Literal["linspace", "leading", "trailing"]) -> Callable[..., Tensor]:
    def make(n: int, schedule: NoiseSchedule, *, steps_offset: int = 0, final: Final = "zero") -> Tensor:
        T = getattr(schedule, "num_train_timesteps", None)
        if T is None:
            raise ValueError(f"{spacing!r} spacing needs a discrete schedule (VPDiscrete), got {schedule!r}")
        return from_timesteps(schedule, discrete_timesteps(n, T, spacing, steps_offset=steps_offset), final=final)

    make.__doc__ = f"diffusers' {spacing!r} timestep spacing on a discrete schedule."
    return make


for _spacing in ("linspace", "leading", "trailing"):
    DISCRETISATIONS.add(_spacing, _discrete(_spacing))


@DISCRETISATIONS.register("auto")
def _auto(n: int, schedule: NoiseSchedule, **kw) -> Tensor:
    """One rule where the model's time is discrete or bounded: ``n`` levels uniform in time from the top
    down to ``1/n`` of it, then 0, so the last model call sees a real noise level. For a discrete (DDPM-type)
    schedule that is ``trailing`` (timesteps ``T-1, ..., T/n - 1``; Lin et al. 2024); for flow matching the
    SD3 / Flux grid in (shifted) time from ``t_max`` down to ``t_max / n``. ``karras`` for continuous VP and
    VE schedules.

    Why: a grid that ends at the smallest trained level (``karras``, ``logsnr`` and ``time_uniform`` down to
    ``sigma_min``) spends its last model call on already-clean data. Measured on the bundled noise-predicting
    UNet (RMSE to a 200-step reference, 200 images; DPM-Solver++(2M) at 5 / 10 / 20 steps): karras 0.345 /
    0.068 / 0.019, trailing 0.107 / 0.042 / 0.015 (``benchmarks/diffusers_defaults.py``)."""
    if isinstance(schedule, VPDiscrete):
        if kw:
            raise TypeError(f"the discrete-schedule 'auto' grid takes no options, got {sorted(kw)}")
        return DISCRETISATIONS.get("trailing")(n, schedule)
    if not isinstance(schedule, FlowMatching):
        return _karras(n, schedule, **kw)
    if kw:
        raise TypeError(f"the flow-matching 'auto' grid takes no options, got {sorted(kw)}")
    _check_n(n)
    u = torch.linspace(schedule.t_max, 0.0, n + 1, dtype=torch.float64)[:-1]
    return _finish(schedule.ve_sigma(schedule.time_shift(u)), "zero")


def get_sigmas(name: str, n: int, schedule: NoiseSchedule, **options) -> Tensor:
    """Build the named discretisation with ``n`` steps for ``schedule``.

    Names: ``auto`` (``trailing`` for discrete schedules, uniform in time down to ``t_max / n`` for flow
    matching, ``karras`` otherwise), ``karras``, ``logsnr``,
    ``time_uniform``, ``time_quadratic``, ``linspace``, ``leading``, ``trailing`` (the last three for
    discrete schedules).
    """
    return DISCRETISATIONS.get(name)(n, schedule, **options)

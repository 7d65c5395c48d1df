"""Noise schedules (model time <-> noise level) and discretisations (descending sigma grids)."""

from .grids import (
    DISCRETISATIONS,
    discrete_timesteps,
    from_sigmas,
    from_timesteps,
    get_sigmas,
    karras,
    logsnr_uniform,
    time_quadratic,
    time_uniform,
)
from .noise import (
    VE,
    FlowMatching,
    NoiseSchedule,
    VPCosine,
    VPDiscrete,
    VPLinear,
    betas_for,
    rescale_zero_terminal_snr,
)

__all__ = [
    "DISCRETISATIONS",
    "VE",
    "FlowMatching",
    "NoiseSchedule",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "betas_for",
    "discrete_timesteps",
    "from_sigmas",
    "from_timesteps",
    "get_sigmas",
    "karras",
    "logsnr_uniform",
    "rescale_zero_terminal_snr",
    "time_quadratic",
    "time_uniform",
]

"""Model adapters (network -> denoiser), guidance wrappers and analytic fixtures."""

from .adapters import Denoiser, EpsDenoiser, FlowDenoiser, NetworkDenoiser, VDenoiser, X0Denoiser
from .analytic import GaussianMixture, ProductMixture, as_network, point_set
from .guidance import CFGDenoiser, DynamicThreshold, RewardGradientDenoiser, ThresholdedDenoiser

__all__ = [
    "CFGDenoiser",
    "Denoiser",
    "DynamicThreshold",
    "EpsDenoiser",
    "FlowDenoiser",
    "GaussianMixture",
    "NetworkDenoiser",
    "ProductMixture",
    "RewardGradientDenoiser",
    "ThresholdedDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "as_network",
    "point_set",
]

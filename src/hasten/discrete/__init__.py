"""Discrete (masked) diffusion: the sibling of the continuous path for sequences of tokens (issue 23, in progress).

A masked diffusion model (MDM) corrupts every token independently into a MASK state; at time ``t`` a token is
still itself with probability ``alpha_t`` (:class:`LogLinearMask`: ``alpha_t = 1 - (1 - eps) t``). Its network is
*time-agnostic*: ``model(x, rows) -> logits [B, L, V]`` over the clean value of every position given the partly
masked sequence ``x`` (``[B, L]`` integers, MASK = ``V``; ``rows`` the batch rows ``x`` holds). This package holds
the objective (:func:`mdlm_loss`), the exact categorical draw (:func:`categorical`, float64 Gumbel-max by default),
the samplers (:data:`DISCRETE_SAMPLERS`: the ancestral sampler with call caching, the first-hitting sampler, its
parallel variant), each counting its network calls, and :class:`MaskedUNet` / :func:`train_masked`, which train
one on binarised images (no bundled model, CLI or bench yet), and reward steering: :class:`DiscreteSVDD` (the
``svdd`` sampler) and DRAKES fine-tuning (:func:`fine_tune`). Nothing here touches the continuous contract.
"""

from __future__ import annotations

from .drakes import DrakesConfig, fine_tune
from .energy import AutoregressiveEnergy, EnergyCorrectedSampler, train_autoregressive
from .generate import MaskedDiffusionModel, MaskedGeneration, generate_masked, is_masked_folder, load_masked
from .masking import LogLinearMask, mdlm_loss
from .model import MaskedTrainConfig, MaskedUNet, binarise, train_masked
from .sampling import (
    DISCRETE_SAMPLERS,
    AncestralSampler,
    DiscreteSample,
    FirstHittingSampler,
    JointTable,
    RowGenerators,
    categorical,
    get_discrete_sampler,
    parse_discrete_sampler,
    sample_discrete,
)
from .svdd import DiscreteSVDD

__all__ = [
    "DISCRETE_SAMPLERS",
    "AncestralSampler",
    "AutoregressiveEnergy",
    "DiscreteSVDD",
    "DiscreteSample",
    "DrakesConfig",
    "EnergyCorrectedSampler",
    "FirstHittingSampler",
    "JointTable",
    "LogLinearMask",
    "MaskedDiffusionModel",
    "MaskedGeneration",
    "MaskedTrainConfig",
    "MaskedUNet",
    "RowGenerators",
    "binarise",
    "categorical",
    "fine_tune",
    "generate_masked",
    "get_discrete_sampler",
    "is_masked_folder",
    "load_masked",
    "mdlm_loss",
    "parse_discrete_sampler",
    "sample_discrete",
    "train_autoregressive",
    "train_masked",
]

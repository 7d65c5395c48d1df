"""Discrete (masked) diffusion: the sibling of the continuous path for sequences of tokens (issue 23, in progress).

A masked diffusion model (MDM) corrupts every token independently into a MASK state; at time ``t`` a token is
still itself with probability ``alpha_t`` (:class:`LogLinearMask`: ``alpha_t = 1 - (1 - eps) t``). Its network is
*time-agnostic*: ``model(x) -> logits [B, L, V]`` over the clean value of every position given the partly masked
sequence ``x`` (``[B, L]`` integers, MASK = ``V``). This package holds the objective (:func:`mdlm_loss`), the exact
categorical draw (:func:`categorical`, float64 Gumbel-max by default) and the samplers (:data:`DISCRETE_SAMPLERS`:
the ancestral sampler with call caching, the first-hitting sampler, its parallel variant), each counting its
network calls. Nothing here touches the continuous contract.
"""

from __future__ import annotations

from .masking import LogLinearMask, mdlm_loss
from .sampling import (
    DISCRETE_SAMPLERS,
    AncestralSampler,
    DiscreteSample,
    FirstHittingSampler,
    JointTable,
    categorical,
    get_discrete_sampler,
    sample_discrete,
)

__all__ = [
    "DISCRETE_SAMPLERS",
    "AncestralSampler",
    "DiscreteSample",
    "FirstHittingSampler",
    "JointTable",
    "LogLinearMask",
    "categorical",
    "get_discrete_sampler",
    "mdlm_loss",
    "sample_discrete",
]

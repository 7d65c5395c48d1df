"""Ensembles of diffusion models (`hasten ensemble`): the output average and adaptive feature aggregation (AFA).

An ensemble folder loads with :func:`hasten.load` like any model (its folder format is registered on import),
so ``hasten sample / bench / evaluate --model <folder>`` run it. See :mod:`hasten.ensemble.model` for the two
methods and :mod:`hasten.ensemble.build` for building one; docs/guide/ensembling.md for use and measured numbers.
"""

from .build import EnsembleConfig, EnsembleResult, build_ensemble
from .model import (
    METHODS,
    Aggregator,
    AveragedModel,
    EnsembleModel,
    FeatureEnsemble,
    OutputAverage,
    average,
    check_members,
    default_blocks,
)

__all__ = [
    "METHODS",
    "Aggregator",
    "AveragedModel",
    "EnsembleConfig",
    "EnsembleModel",
    "EnsembleResult",
    "FeatureEnsemble",
    "OutputAverage",
    "average",
    "build_ensemble",
    "check_members",
    "default_blocks",
]

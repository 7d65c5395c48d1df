"""Training-free ODE/SDE solvers: pure steps with explicit state, one shared sampling loop.

``available()`` lists the registered names; ``get_solver(name, **options)`` builds one.
"""

from . import euler, multistep, per_step, plms, singlestep, unipc  # noqa: F401  (register the solvers)
from ._base import (
    SOLVERS,
    Model,
    NonFiniteOutputError,
    SampleOutput,
    Solver,
    StepHook,
    StepInfo,
    available,
    ddim_step,
    get_solver,
    register_solver,
    sample,
    sigma_of,
    space_coordinates,
)
from .euler import Euler, EulerAncestral, Heun
from .multistep import DPMSolverMultistep, MultistepState
from .per_step import PerStepSolver
from .plms import PLMS, PLMSState
from .singlestep import DPMSolverPPSDE, DPMSolverSinglestep, SinglestepState
from .unipc import UniPC, UniPCState

__all__ = [
    "PLMS",
    "SOLVERS",
    "DPMSolverMultistep",
    "DPMSolverPPSDE",
    "DPMSolverSinglestep",
    "Euler",
    "EulerAncestral",
    "Heun",
    "Model",
    "MultistepState",
    "NonFiniteOutputError",
    "PLMSState",
    "PerStepSolver",
    "SampleOutput",
    "SinglestepState",
    "Solver",
    "StepHook",
    "StepInfo",
    "UniPC",
    "UniPCState",
    "available",
    "ddim_step",
    "get_solver",
    "register_solver",
    "sample",
    "sigma_of",
    "space_coordinates",
]

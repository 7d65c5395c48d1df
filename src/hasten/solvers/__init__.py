"""Training-free ODE/SDE solvers: pure steps with explicit state, one shared sampling loop.

``available()`` lists the registered names; ``get_solver(name, **options)`` builds one.
"""

from . import consistency, dpm_solver_v3, euler, gamma, learned, multistep, per_step, plms, singlestep, svdd, unipc  # noqa: F401  (register the solvers)
from ._base import (
    DEFAULT_SOLVER,
    OPTION_RESOLVERS,
    SOLVERS,
    Model,
    NonFiniteOutputError,
    OptionResolver,
    SampleOutput,
    Solver,
    StepHook,
    StepInfo,
    available,
    ddim_step,
    get_solver,
    parse_solver,
    register_solver,
    sample,
    sigma_of,
    space_coordinates,
)
from .consistency import ConsistencySampler
from .dpm_solver_v3 import EMS, DPMSolverV3, V3State, load_ems, save_ems
from .euler import Euler, EulerAncestral, Heun
from .gamma import GammaSampling
from .learned import LearnedMultistep
from .multistep import DPMSolverMultistep, MultistepState
from .per_step import PerStepSolver
from .plms import PLMS, PLMSState
from .singlestep import DPMSolverPPSDE, DPMSolverSinglestep, SinglestepState
from .svdd import SoftValueDecoding, SVDDState
from .unipc import UniPC, UniPCState

__all__ = [
    "DEFAULT_SOLVER",
    "EMS",
    "OPTION_RESOLVERS",
    "PLMS",
    "SOLVERS",
    "ConsistencySampler",
    "DPMSolverMultistep",
    "DPMSolverPPSDE",
    "DPMSolverSinglestep",
    "DPMSolverV3",
    "Euler",
    "EulerAncestral",
    "GammaSampling",
    "Heun",
    "LearnedMultistep",
    "Model",
    "MultistepState",
    "NonFiniteOutputError",
    "OptionResolver",
    "PLMSState",
    "PerStepSolver",
    "SVDDState",
    "SampleOutput",
    "SinglestepState",
    "SoftValueDecoding",
    "Solver",
    "StepHook",
    "StepInfo",
    "UniPC",
    "UniPCState",
    "V3State",
    "available",
    "ddim_step",
    "get_solver",
    "load_ems",
    "parse_solver",
    "register_solver",
    "sample",
    "save_ems",
    "sigma_of",
    "space_coordinates",
]

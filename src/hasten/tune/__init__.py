"""Per-model tuning: plans (serialisable sampling recipes) and the search that finds them.

``hasten.tune.tune(model, TuneConfig(nfe=5), "plan.json")`` searches; ``hasten.tune.load_plan`` reads a plan;
``hasten.generate(model, n, plan=plan)`` / ``hasten.sample(den, x, plan=plan)`` replay it; with
``fit_iterations`` the search's plan gets fitted multistep weights (``hasten.tune.fit``).
"""

from . import ems  # noqa: F401  (registers DPM-Solver-v3's ems="auto" option resolver)
from .fit import FitConfig, FitResult, dpmpp_2m_weights, fit_weights
from .plan import PLAN_SCHEMA_VERSION, Assembly, Plan, PlanError, load_plan, plan_from_stock, save_plan
from .search import Candidate, SearchResult, candidate_from_plan, search
from .tuner import STOCK_GRIDS, STOCK_SOLVERS, TuneConfig, TuneError, stock_plans, tune

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "STOCK_GRIDS",
    "STOCK_SOLVERS",
    "Assembly",
    "Candidate",
    "FitConfig",
    "FitResult",
    "Plan",
    "PlanError",
    "SearchResult",
    "TuneConfig",
    "TuneError",
    "candidate_from_plan",
    "dpmpp_2m_weights",
    "fit_weights",
    "load_plan",
    "plan_from_stock",
    "save_plan",
    "search",
    "stock_plans",
    "tune",
]

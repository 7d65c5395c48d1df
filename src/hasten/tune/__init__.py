"""Per-model tuning: plans (serialisable sampling recipes) and the search that finds them.

``hasten.tune.tune(model, TuneConfig(nfe=5), "plan.json")`` searches; ``hasten.tune.load_plan`` reads a plan;
``hasten.generate(model, n, plan=plan)`` / ``hasten.sample(den, x, plan=plan)`` replay it.
"""

from .plan import PLAN_SCHEMA_VERSION, Plan, PlanError, load_plan, plan_from_stock, save_plan
from .search import Candidate, SearchResult, candidate_from_plan, search
from .tuner import STOCK_GRIDS, STOCK_SOLVERS, TuneConfig, TuneError, stock_plans, tune

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "STOCK_GRIDS",
    "STOCK_SOLVERS",
    "Candidate",
    "Plan",
    "PlanError",
    "SearchResult",
    "TuneConfig",
    "TuneError",
    "candidate_from_plan",
    "load_plan",
    "plan_from_stock",
    "save_plan",
    "search",
    "stock_plans",
    "tune",
]

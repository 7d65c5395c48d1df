"""Convergence order of every deterministic solver against the exact probability-flow solution.

Problem: every coordinate an independent 1-D Gaussian mixture (non-Gaussian, multi-modal), whose exact
PF-ODE map is the quantile map. The start is an exact sample of p_sigma_max; multistep histories are
seeded from the exact solution so that a lower-order warm-up does not cap the observed order
(diffrax-style order tests; research notes card F.5).
"""

import math

import numpy as np
import pytest
import torch

import hasten
from hasten.models import ProductMixture
from hasten.solvers import MultistepState, PLMSState, UniPCState, get_solver, space_coordinates

MIXTURE = ProductMixture()
SIGMA_MAX, SIGMA_MIN = 5.0, 0.1
SHAPE = (64, 4)


def _grid(n: int, spacing: str, extra: int) -> torch.Tensor:
    """n steps from SIGMA_MAX to SIGMA_MIN (uniform in lambda or sigma), with `extra` points before."""
    if spacing == "lambda":
        u = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), n + 1, dtype=torch.float64)
        pre = u[0] - (u[1] - u[0]) * torch.arange(extra, 0, -1, dtype=torch.float64)
        return torch.exp(-torch.cat([pre, u]))
    if spacing == "flow":  # uniform in rectified-flow time u = sigma / (1 + sigma)
        u = torch.linspace(SIGMA_MAX / (1 + SIGMA_MAX), SIGMA_MIN / (1 + SIGMA_MIN), n + 1, dtype=torch.float64)
        pre = u[0] - (u[1] - u[0]) * torch.arange(extra, 0, -1, dtype=torch.float64)
        u = torch.cat([pre, u])
        return u / (1 - u)
    u = torch.linspace(SIGMA_MAX, SIGMA_MIN, n + 1, dtype=torch.float64)
    pre = u[0] - (u[1] - u[0]) * torch.arange(extra, 0, -1, dtype=torch.float64)
    return torch.cat([pre, u])


def _seeded_state(solver, x_max: torch.Tensor, pre: torch.Tensor):
    """Exact history at the `pre` levels (oldest first) in the form each multistep solver keeps."""
    if not len(pre):
        return None
    xs = [MIXTURE.exact_flow(x_max, SIGMA_MAX, float(s)) for s in pre]
    ds = [MIXTURE(x, float(s)) for x, s in zip(xs, pre)]
    eps = [(x - d) / float(s) for x, d, s in zip(xs, ds, pre)]
    sig = tuple(pre.tolist()[::-1])
    if isinstance(solver, hasten.solvers.PLMS):  # dy/du in the solver's space (the velocity for "flow")
        coords = [space_coordinates(float(s), solver.space) for s in pre]
        return PLMSState(tuple((a * x - d) / u for x, d, (u, a) in zip(xs, ds, coords))[::-1])
    outs = tuple((ds if solver.prediction == "data" else eps)[::-1])
    if isinstance(solver, hasten.solvers.UniPC):
        return UniPCState(outs, sig, xs[-1], solver.order)
    return MultistepState(outs, sig)


def final_error(solver, n: int, spacing: str = "lambda") -> float:
    multistep = isinstance(solver, hasten.solvers.DPMSolverMultistep | hasten.solvers.UniPC | hasten.solvers.PLMS)
    extra = 3 if multistep else 0
    full = _grid(n, spacing, extra)
    x_max = MIXTURE.sample(SHAPE, sigma=SIGMA_MAX, generator=torch.Generator().manual_seed(0))
    exact = MIXTURE.exact_flow(x_max, SIGMA_MAX, SIGMA_MIN)
    state = _seeded_state(solver, x_max, full[:extra])
    out = hasten.sample(MIXTURE, x_max, full[extra:], solver, state=state)
    return float(((out - exact) ** 2).mean().sqrt())


def fitted_order(solver, ns, spacing="lambda") -> tuple[float, list[float]]:
    errs = [final_error(solver, n, spacing) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    return float(slope), errs


NO_LOF = {"lower_order_final": False}
CASES = [
    ("euler", {}, "lambda"),
    ("ddim", {}, "lambda"),
    ("heun", {}, "lambda"),
    ("dpm_solver_1", {}, "lambda"),
    ("dpm_solver_2", {}, "lambda"),
    ("dpm_solver_2", {"solver_type": "heun"}, "lambda"),
    ("dpm_solver_3", {}, "lambda"),
    ("dpm_solver_3", {"solver_type": "heun"}, "lambda"),
    ("dpmpp_2s", {}, "lambda"),
    ("dpmpp_3s", {}, "lambda"),
    ("dpmpp_3s", {"solver_type": "heun"}, "lambda"),
    ("dpmpp_sde", {"eta": 0.0}, "lambda"),
    ("dpmpp_2m", NO_LOF, "lambda"),
    ("dpmpp_2m", {**NO_LOF, "solver_type": "heun"}, "lambda"),
    ("dpmpp_3m", NO_LOF, "lambda"),
    ("dpm_solver_2m", NO_LOF, "lambda"),
    ("dpm_solver_3m", NO_LOF, "lambda"),
    ("unipc", {**NO_LOF, "order": 1}, "lambda"),
    ("unipc", {**NO_LOF, "order": 2}, "lambda"),
    ("unipc", {**NO_LOF, "order": 3}, "lambda"),
    ("unipc", {**NO_LOF, "order": 2, "variant": "bh2"}, "lambda"),
    ("unipc", {**NO_LOF, "order": 2, "corrector": False}, "lambda"),
    ("unipc", {**NO_LOF, "order": 3, "corrector": False}, "lambda"),
    ("unipc", {**NO_LOF, "order": 2, "prediction": "noise"}, "lambda"),
    ("plms", {"warmup": "lower_order"}, "sigma"),
    ("heun", {"space": "flow"}, "flow"),
    ("plms", {"warmup": "lower_order", "space": "flow"}, "flow"),
]


@pytest.mark.parametrize(("name", "options", "spacing"), CASES, ids=lambda v: str(v))
def test_convergence_order(name, options, spacing):
    solver = get_solver(name, **options)
    ns = [16, 32, 64, 128] if spacing == "lambda" else [64, 128, 256, 512]
    slope, errs = fitted_order(solver, ns, spacing)
    assert errs[-1] < errs[0]
    assert abs(slope - solver.convergence_order) < 0.3, f"{name} {options}: slope {slope:.2f}, errors {errs}"


def test_reference_third_order_rule_is_second_order():
    """The DPM-Solver / diffusers 3M coefficient halves the D2 term: measurably second order."""
    slope_ref, _ = fitted_order(get_solver("dpmpp_3m", third_order_term="reference", **NO_LOF), [8, 16, 32, 64])
    slope_taylor, _ = fitted_order(get_solver("dpmpp_3m", **NO_LOF), [8, 16, 32, 64])
    assert abs(slope_ref - 2.0) < 0.45
    assert slope_taylor > slope_ref + 0.5


@pytest.mark.parametrize("warmup", ["prk", "heun", "lower_order"])
def test_plms_warmups_unseeded(warmup):
    """Without seeding, the warm-up decides the order: pseudo-RK4 keeps PLMS at 4th order on a uniform grid."""
    solver = get_solver("plms", warmup=warmup)
    errs = []
    ns = [64, 128, 256, 512]
    for n in ns:
        sig = _grid(n, "sigma", 0)
        x_max = MIXTURE.sample(SHAPE, sigma=SIGMA_MAX, generator=torch.Generator().manual_seed(0))
        out = hasten.sample(MIXTURE, x_max, sig, solver)
        errs.append(float(((out - MIXTURE.exact_flow(x_max, SIGMA_MAX, SIGMA_MIN)) ** 2).mean().sqrt()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    expected = {"prk": 4, "heun": 3, "lower_order": 2}[warmup]
    assert slope > expected - 0.35, f"{warmup}: slope {slope:.2f}, errors {errs}"


def test_exponential_integrators_exact_for_single_point():
    """For data concentrated at one point D is constant, so DDIM-type steps are exact at any step size."""
    mu = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    point = hasten.models.point_set(mu[None])
    x = mu + torch.randn(5, 3, dtype=torch.float64) * 10.0
    sigmas = hasten.karras(3, 0.5, 10.0, final="sigma_min")
    exact = mu + (x - mu) * (0.5 / 10.0)  # x(sigma) = mu + (x - mu) sigma / sigma_max
    for name in [
        "euler",
        "dpm_solver_1",
        "dpm_solver_2",
        "dpm_solver_3",
        "dpmpp_2m",
        "dpmpp_3m",
        "unipc",
        "dpmpp_2s",
    ]:
        out = hasten.sample(point, x, sigmas, name)
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-12, msg=name)

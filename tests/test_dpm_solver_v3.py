"""DPM-Solver-v3: the EMS estimator against closed forms, the solver's order, and its accuracy with EMS."""

import math

import numpy as np
import pytest
import torch

import hasten
from hasten.models import GaussianMixture
from hasten.solvers import EMS, V3State, get_solver, load_ems, save_ems
from hasten.tune.ems import estimate_ems
from test_order import MIXTURE, SIGMA_MAX, SIGMA_MIN, _grid

MU = torch.tensor([[0.5, -1.0, 2.0]])
S = 0.3  # one isotropic Gaussian N(MU, S^2 I): l* = sigma^2 / (S^2 + sigma^2) exactly (VE form)


@pytest.fixture(scope="module")
def gaussian_ems(tmp_path_factory):
    gaussian = GaussianMixture(MU, [S])
    x0 = MU + S * torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    ems = estimate_ems(gaussian, x0, 80.0, 0.002, num_lambdas=120)
    return gaussian, ems, save_ems(ems, tmp_path_factory.mktemp("ems") / "gaussian.safetensors")


def test_ems_estimator_matches_the_gaussian_closed_form(gaussian_ems):
    _, ems, path = gaussian_ems
    sigma = torch.exp(-ems.lambdas)[:, None]
    # Hutchinson's estimate of a diagonal Jacobian is exact: l to float rounding.
    torch.testing.assert_close(ems.l, (sigma**2 / (S**2 + sigma**2)).expand(-1, 3), rtol=0, atol=1e-6)
    # f = -sigma^2 mu / (S^2 + sigma^2) does not depend on x: s = 0 and b = df/dlambda (up to the finite
    # differences of l on the grid, largest where l changes fastest).
    assert float(ems.s.abs().max()) < 0.2
    b_exact = 2 * MU * sigma**2 * S**2 / (S**2 + sigma**2) ** 2
    assert float((ems.b - b_exact).abs().max()) < 0.06 * float(b_exact.abs().max())
    again = load_ems(path)
    assert torch.equal(again.l, ems.l) and again.meta["num_lambdas"] == "120"


def test_v3_with_ems_is_near_exact_on_a_gaussian(gaussian_ems):
    """With its statistics v3's first-order step is exact for a Gaussian (g is constant); DPM-Solver++ is not."""
    gaussian, _, path = gaussian_ems
    x = MU + math.sqrt(S**2 + 80.0**2) * torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    sigmas = hasten.get_sigmas("logsnr", 5, hasten.VE(0.002, 80.0))[:-1]  # stop at sigma_min
    exact = MU + (x - MU) * math.sqrt((S**2 + float(sigmas[-1]) ** 2) / (S**2 + 80.0**2))

    def error(solver, **options):
        return float(((hasten.sample(gaussian, x, sigmas, solver, **options) - exact) ** 2).mean().sqrt())

    v3 = error("dpm_solver_v3", ems=str(path), order=1, corrector=False)
    assert v3 < 0.1 * min(error("dpmpp_2m"), error("unipc"), error("dpm_solver_v3", ems="degenerate"))


def _constant_ems(tmp_path, l_value: float, s_value: float, b_value: float) -> str:
    lam = torch.tensor([-math.log(SIGMA_MAX) - 1, -math.log(SIGMA_MIN) + 1], dtype=torch.float64)
    ems = EMS(lam, torch.full((2,), l_value), torch.full((2,), s_value), torch.full((2,), b_value))
    return str(save_ems(ems, tmp_path / f"ems_{l_value}_{s_value}_{b_value}.safetensors"))


@pytest.mark.parametrize("ems_values", [None, (0.7, 0.3, 0.1)], ids=["degenerate", "constant"])
@pytest.mark.parametrize(("order", "corrector"), [(1, False), (2, False), (3, False), (1, True), (2, True)])
def test_dpm_solver_v3_order(tmp_path, ems_values, order, corrector):
    """Order p (p + 1 with the corrector) for any smooth statistics, on the exact mixture solution."""
    ems = "degenerate" if ems_values is None else _constant_ems(tmp_path, *ems_values)
    solver = get_solver("dpm_solver_v3", ems=ems, order=order, corrector=corrector, lower_order_final=False)
    statistics = solver.statistics()
    ns = [16, 32, 64, 128]
    errs = []
    for n in ns:
        extra = 2
        full = _grid(n, "lambda", extra)
        x_max = MIXTURE.sample((64, 4), sigma=SIGMA_MAX, generator=torch.Generator().manual_seed(0))
        exact = MIXTURE.exact_flow(x_max, SIGMA_MAX, SIGMA_MIN)
        # Seed the history with exact f values at the two levels before the grid.
        pre = full[:extra].tolist()
        xs = [MIXTURE.exact_flow(x_max, SIGMA_MAX, s) for s in pre]
        lams = [-math.log(s) for s in pre]
        ls = [statistics.evaluate(torch.tensor([lam], dtype=torch.float64))["l"][0] for lam in lams]
        fs = [(1 - l_i) * x - MIXTURE(x, s) for x, s, l_i in zip(xs, pre, ls)]
        state = V3State(tuple(fs[::-1]), tuple(lams[::-1]), None, 0)
        start = MIXTURE.exact_flow(x_max, SIGMA_MAX, float(full[extra]))
        out = hasten.sample(MIXTURE, start, full[extra:], solver, state=state)
        errs.append(float(((out - exact) ** 2).mean().sqrt()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    expected = order + (1 if corrector else 0)
    assert abs(slope - expected) < 0.35, f"order {order} corrector {corrector}: slope {slope:.2f}, errors {errs}"


def test_v3_errors():
    x = torch.randn(2, 4)
    sigmas = hasten.get_sigmas("karras", 3, hasten.VE(0.1, 5.0))
    with pytest.raises(ValueError, match="ems='auto' needs the model"):
        hasten.sample(MIXTURE, x * 5, sigmas, "dpm_solver_v3")
    with pytest.raises(FileNotFoundError):
        hasten.sample(MIXTURE, x * 5, sigmas, "dpm_solver_v3", ems="/nonexistent/ems.safetensors")
    narrow = EMS(torch.tensor([0.0, 1.0]), torch.ones(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="outside the EMS grid"):
        narrow.evaluate(torch.tensor([-3.0]))
    with pytest.raises(ValueError, match="strictly ascending"):
        EMS(torch.tensor([1.0, 0.0]), torch.ones(2), torch.zeros(2), torch.zeros(2))

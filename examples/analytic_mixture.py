"""Sample an analytic Gaussian mixture with three solvers and print their exact errors.

Every coordinate follows the same 1-D three-component mixture, so the exact probability-flow solution
is known (the quantile map) and each solver's error can be measured exactly, not estimated.

Run: python examples/analytic_mixture.py
"""

import torch

import hasten
from hasten.models import ProductMixture

mixture = ProductMixture(means=(-1.0, 0.5, 1.5), stds=(0.3, 0.2, 0.4), weights=(0.3, 0.45, 0.25))
sigma_max, sigma_min = 20.0, 0.02

# An exact sample of the noisy marginal at sigma_max, and its exact image at sigma_min.
x = mixture.sample((256, 16), sigma=sigma_max, generator=torch.Generator().manual_seed(0))
exact = mixture.exact_flow(x, sigma_max, sigma_min)

print(f"{'solver':>10} {'steps':>5} {'NFE':>4} {'RMSE to exact':>14}")
for solver in ["euler", "heun", "dpmpp_2m", "unipc"]:
    for steps in (5, 10, 20):
        sigmas = hasten.karras(steps, sigma_min, sigma_max, final="sigma_min")
        out = hasten.sample(mixture, x, sigmas, solver, return_info=True)
        rmse = (out.x - exact).pow(2).mean().sqrt().item()
        print(f"{solver:>10} {steps:>5} {out.nfe:>4} {rmse:>14.2e}")

"""Study: does the grid the fit starts from matter? The fit stage (`hasten.tune.fit.fit_weights`, the product
code) run on the UNet's plain trailing 5-step grid instead of the searched plan's grid.

Same protocol as ``hasten tune --fit-iterations 600 --fit-lr 0.01 --fit-lr-schedule constant --n-fit 256``
(training seed 1000, validation seed 2000 with 64 images, held-out seed 0 with 100 images); prints the grid,
then the start, best validation, its iteration, the held-out RMSE and the fitted levels. Result and context:
``benchmarks/results/tune_fit/README.md`` ("Lead: the start grid").

    OMP_NUM_THREADS=2 python benchmarks/fit_start_grid_study.py
"""

import json

import torch

import hasten
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import Plan
from hasten.tune.fit import FitConfig, fit_weights

model = hasten.load("mnist-unet")
sig = tuple(hasten.get_sigmas("trailing", 5, model.schedule).tolist())
print(sig, flush=True)
val_ref = reference_samples(model, 64, seed=2000, steps=100)
held_ref = reference_samples(model, 100, seed=0, steps=100)


def plan_of(s, c, x):
    return Plan(s, "learned_multistep", {"coefficients": c, "x_weights": x}, nfe=5)


def validate(s, c, x):
    with torch.no_grad():
        return rmse(hasten.generate(model, 64, plan=plan_of(s, c, x), seed=2000).images01, val_ref)


r = fit_weights(
    model,
    sig,
    FitConfig(iterations=600, lr=0.01, lr_schedule="constant", n_train=256, train_seed=1000),
    validate,
    progress=False,
)
with torch.no_grad():
    held = rmse(
        hasten.generate(model, 100, plan=plan_of(r.sigmas, r.coefficients, r.x_weights), seed=0).images01, held_ref
    )
print(
    json.dumps(
        {
            "start": r.start,
            "start_val": r.start_validation_rmse,
            "val": r.validation_rmse,
            "it": r.best_iteration,
            "held": held,
            "sigmas": r.sigmas,
        }
    ),
    flush=True,
)

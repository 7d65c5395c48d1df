"""One trailing block (5 or 4) skipped at one step of the shipped NFE-8 plan, on the unmodified mnist-dit and on a
jointly trained early-exit student, RMSE to the unmodified network's 100-step solve (n = 128, seed 1000).

Usage: python benchmarks/early_exit/skip_sensitivity_joint.py STUDENT_FOLDER
"""

import dataclasses
import json
import sys

import torch

import hasten
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import load_plan

torch.set_num_threads(1)
plan = load_plan("plans/mnist-dit-nfe8.json")
teacher = hasten.load("mnist-dit")
student = hasten.load(sys.argv[1])
n, seed = 128, 1000
out = {
    "plan": "plans/mnist-dit-nfe8.json",
    "n": n,
    "seed": seed,
    "reference": "unmodified mnist-dit, 100 steps",
    "rows": [],
}
with torch.no_grad():
    ref = reference_samples(teacher, n, seed=seed, steps=100)
    for name, model in (("unmodified", teacher), ("joint", student)):
        base = rmse(hasten.generate(model, n, plan=plan, seed=seed, force_plan=True).images01, ref)
        out[f"plan_rmse_{name}"] = base
        print(name, "plan", round(base, 4), flush=True)
        for block in (5, 4):
            for step in range(plan.num_steps):
                skip = tuple((block,) if s == step else () for s in range(plan.num_steps))
                g = hasten.generate(model, n, plan=dataclasses.replace(plan, skip=skip), seed=seed, force_plan=True)
                r = rmse(g.images01, ref)
                out["rows"].append({"model": name, "block": block, "step": step, "rmse_ref": r})
                print(name, block, step, round(r, 4), flush=True)
json.dump(out, open("benchmarks/results/early-exit/skip-sensitivity-joint.json", "w"), indent=1)

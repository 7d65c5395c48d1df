"""Per-step model assembly on a plan: the pruned network at some steps, the original at the rest (a probe).

A-SDM's model assembly asks which network (here: the original or its pruned student) runs at which step. This
probe hooks the original network (one hook in hasten's registry) so that the plan's steps in a chosen set call
the student network instead. On calibration noise it measures, for a tuned plan, how much one swapped step
costs in RMSE to the original's 100-step reference solve, grows the swapped set greedily from the cheapest
steps, and then measures the chosen sets and the steps-only plans on held-out noise: RMSE to the reference and
CPU time (one thread, paired runs alternating, median of --repeats). Writes JSON.

Not a library feature yet: the hook lives in this script (see docs/guide/tuning.md).

Usage: python benchmarks/prune/assembly_plan_probe.py OUT.json [--plan plans/mnist-dit-nfe10-fitted.json ...]
(--run PLAN=STEPS, repeatable: time given assemblies beside the --baselines, with no search.)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch

import hasten
from hasten._context import current_run
from hasten.hooks import add_hook, remove_hooks
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import load_plan

CALIBRATION_SEED, HELDOUT_SEED = 1000, 0


def sample(teacher, student, plan, steps: frozenset[int], n: int, seed: int):
    """The plan on ``teacher`` with the steps in ``steps`` run by ``student``'s network."""

    def assembled(forward, *args, **kwargs):
        run = current_run()
        if run is not None and run.step is not None and run.step.index in steps:
            return student.network(*args, **kwargs)
        return forward(*args, **kwargs)

    handle = add_hook(teacher.network, "probe/assembly", assembled)
    try:
        return hasten.generate(teacher, n, plan=plan, seed=seed, batch_size=n)
    finally:
        remove_hooks([handle])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--teacher", default="mnist-dit")
    parser.add_argument("--student", default="mnist-dit-pruned")
    parser.add_argument(
        "--plan", nargs="+", default=["plans/mnist-dit-nfe10-fitted.json", "plans/mnist-dit-nfe8-fitted.json"]
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=[
            "plans/mnist-dit-nfe5-fitted.json",
            "plans/mnist-dit-nfe8-fitted.json",
            "plans/mnist-dit-nfe10-fitted.json",
        ],
    )
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-swaps", type=int, default=6)
    parser.add_argument(
        "--run", action="append", default=[],
        help="PLAN=STEPS (e.g. plans/x.json=0,1,7): time this assembly beside the baselines; skips the greedy search",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, student = hasten.load(args.teacher), hasten.load(args.student)
    with torch.no_grad():
        ref_cal = reference_samples(teacher, args.calib_n, seed=CALIBRATION_SEED, steps=100)
        ref = reference_samples(teacher, args.n, seed=HELDOUT_SEED, steps=100)
    result = {"teacher": args.teacher, "student": args.student,
              "calibration": {"seed": CALIBRATION_SEED, "n": args.calib_n},
              "heldout": {"seed": HELDOUT_SEED, "n": args.n}, "reference": "original network, 100 steps",
              "plans": {}, "heldout_rows": []}  # fmt: skip
    candidates: list[tuple[str, frozenset[int]]] = []
    for spec in args.run:
        path, _, steps = spec.partition("=")
        chosen = frozenset(int(k) for k in steps.split(",") if k)
        if not chosen or not all(0 <= k < load_plan(path).num_steps for k in chosen):
            parser.error(f"--run {spec!r}: give PLAN=STEPS with step indices 0..{load_plan(path).num_steps - 1}")
        candidates.append((path, chosen))
    for path in [] if args.run else args.plan:
        plan = load_plan(path)
        base = rmse(sample(teacher, student, plan, frozenset(), args.calib_n, CALIBRATION_SEED).images01, ref_cal)
        single = {}
        for k in range(plan.num_steps):
            images = sample(teacher, student, plan, frozenset({k}), args.calib_n, CALIBRATION_SEED).images01
            single[k] = rmse(images, ref_cal) - base
            print(f"{path} swap step {k}: {single[k]:+.4f}", flush=True)
        order = sorted(single, key=single.get)
        greedy = []
        for size in range(1, min(args.max_swaps, plan.num_steps) + 1):
            chosen = frozenset(order[:size])
            value = rmse(sample(teacher, student, plan, chosen, args.calib_n, CALIBRATION_SEED).images01, ref_cal)
            greedy.append({"steps": sorted(chosen), "rmse_ref": value})
            candidates.append((path, chosen))
            print(f"{path} swap {sorted(chosen)}: {value:.4f}", flush=True)
        result["plans"][path] = {"rmse_ref": base, "single_swap_change": single, "greedy": greedy}
    runs = [(path, frozenset()) for path in args.baselines] + candidates
    times: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    errors: dict[int, float] = {}
    for _ in range(args.repeats):
        for i, (path, steps) in enumerate(runs):
            plan = load_plan(path)
            start = time.process_time()
            gen = sample(teacher, student, plan, steps, args.n, HELDOUT_SEED)
            times[i].append(time.process_time() - start)
            errors[i] = rmse(gen.images01, ref)
    for i, (path, steps) in enumerate(runs):
        row = {"plan": path, "student_steps": sorted(steps), "nfe": load_plan(path).nfe,
               "cpu_seconds": statistics.median(times[i]), "cpu_seconds_all": times[i],
               "rmse_ref": errors[i]}  # fmt: skip
        result["heldout_rows"].append(row)
        print(json.dumps(row), flush=True)
    result.update(threads=1, machine=platform.processor() or platform.machine(), torch=torch.__version__)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

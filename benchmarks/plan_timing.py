"""Plans at equal time: each plan's error to the converged reference and its CPU and wall time, timed interleaved.

``hasten bench`` times each row's repeats back to back; on a shared 2-core VM the speed drifts by 20-30% over the
minutes a bench takes, which is the size of the differences between neighbouring plans. Here every repeat runs
every plan once, in a rotated order, and a plan's time is the median of its repeats, so the drift falls on all
plans alike. Both clocks are recorded: the process's CPU time (all threads summed; the wall time at one thread)
and the wall time (what a user waits for with several threads). Per-step architecture plans (block skips, a
per-step student) run as ``hasten.generate`` runs them.

Writes JSON: per plan its NFE, cost (NFE-equivalents), RMSE to the reference solve (pixels in [0, 1]; the
original network's 100-step third-order solve from the same noise), CPU and wall seconds (median and all), and
the conditions (threads, images, seed, machine).

Usage: python benchmarks/plan_timing.py OUT.json PLAN.json [PLAN.json ...] [--model mnist-dit] [--n 500]
       [--repeats 5] [--threads 1] [--seed 0]
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
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import load_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--model", default="mnist-dit")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.n < 1 or args.repeats < 1 or args.threads < 1:
        parser.error(f"--n, --repeats and --threads must be >= 1, got {args.n}, {args.repeats}, {args.threads}")
    out = pathlib.Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; choose another output file")
    plans = [load_plan(path) for path in args.plans]  # a missing or corrupt plan fails before any work
    torch.set_num_threads(args.threads)
    model = hasten.load(args.model)
    for plan in plans:
        plan.check_model(model.info.name, model.fingerprint)
    with torch.no_grad():
        reference = reference_samples(model, args.n, seed=args.seed, steps=100)
        hasten.generate(model, 8, plan=plans[0], seed=args.seed)  # warm-up (first-call allocations, kernels)
        times: list[list[float]] = [[] for _ in plans]
        walls: list[list[float]] = [[] for _ in plans]
        errors: list[float] = [0.0] * len(plans)
        for repeat in range(args.repeats):
            order = [(repeat + k) % len(plans) for k in range(len(plans))]  # rotated: no plan always goes first
            for i in order:
                start, wall = time.process_time(), time.perf_counter()
                gen = hasten.generate(model, args.n, plan=plans[i], seed=args.seed, batch_size=args.n)
                times[i].append(time.process_time() - start)
                walls[i].append(time.perf_counter() - wall)
                errors[i] = rmse(gen.images01, reference)  # deterministic: the same every repeat
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    for path, plan, seconds, wall, error in zip(args.plans, plans, times, walls, errors, strict=True):
        row = {"plan": path, "nfe": plan.nfe, "cost": plan.nfe if plan.cost is None else plan.cost,
               "architecture": plan.per_step_architecture,
               "student_steps": None if plan.assembly is None else list(plan.assembly.steps),
               "rmse_ref": error, "cpu_seconds": statistics.median(seconds), "cpu_seconds_all": seconds,
               "wall_seconds": statistics.median(wall), "wall_seconds_all": wall}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("plan", "nfe", "cost", "rmse_ref", "cpu_seconds", "wall_seconds")}),
              flush=True)  # fmt: skip
    result = {
        "model": args.model, "fingerprint": model.fingerprint, "n": args.n, "seed": args.seed,
        "repeats": args.repeats, "threads": args.threads, "timing": "CPU and wall time, interleaved, median",
        "reference": "dpmpp_3m (karras, 100 steps), the bench's reference solve, same noise",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}", "rows": rows,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

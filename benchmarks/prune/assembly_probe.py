"""Would a per-step choice between the full and the pruned network pay (A-SDM's model assembly)? A probe.

RMSE to the *original* network's 100-step reference solve (held-out noise) of the original and of its pruned
student along the same stock sampler at several step counts, and the time of each (one thread, paired, median
of --repeats), so the two curves can be compared at equal time: if the pruned network's curve lies below the
original's, spending a call's saving on more steps beats exact calls, and a plan mixing both networks per step
has room to win. Writes JSON.

Usage: python benchmarks/prune/assembly_probe.py OUT.json [--teacher mnist-dit] [--student mnist-dit-pruned]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--teacher", default="mnist-dit")
    parser.add_argument("--student", default="mnist-dit-pruned")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 6, 7, 8, 10, 12])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, student = hasten.load(args.teacher), hasten.load(args.student)
    reference = reference_samples(teacher, args.n, seed=args.seed, steps=100)
    rows = []
    for steps in args.steps:
        for name, model in (("original", teacher), ("pruned", student)):
            times, images = [], None
            for _ in range(args.repeats):
                start = time.process_time()
                images = hasten.generate(model, args.n, solver=args.solver, steps=steps, seed=args.seed,
                                         guidance=1.0, batch_size=args.n).images01  # fmt: skip
                times.append(time.process_time() - start)
            rows.append({"network": name, "steps": steps, "cpu_seconds": statistics.median(times),
                         "rmse_ref": rmse(images, reference)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out = {"teacher": args.teacher, "student": args.student, "solver": args.solver, "n": args.n, "seed": args.seed,
           "reference": "original network, 100 steps", "threads": 1, "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__, "rows": rows}  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-step architecture plans against steps-only plans at equal cost on mnist-dit (issue 21).

For each plan: its FLOP-weighted cost (NFE-equivalents: calls weighted by the share of the network's FLOPs
they keep), its measured sampling time (one batch of ``--n-time`` images, median of ``--repeats`` runs,
plans interleaved), the RMSE of its samples to the reference solve (held-out seed 0, ``--n`` images, pixels
in [0, 1]) and FD (bundled MNIST features, same images). Writes JSON to ``--out``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plan_skip_study.py --plans plans/mnist-dit-nfe5.json ...
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import torch

import hasten
from hasten.accel.skip import block_flop_shares
from hasten.metrics.quality import evaluate_images
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import load_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mnist-dit")
    parser.add_argument("--plans", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-time", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/plan_skip/study.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = hasten.load(args.model)
    plans = {p: load_plan(p) for p in args.plans}
    with torch.no_grad():
        shares = block_flop_shares(model.network, lambda: hasten.generate(model, 1, steps=1))
        reference = reference_samples(model, args.n, seed=0, steps=100)
        times: dict[str, list[float]] = {p: [] for p in plans}
        for _ in range(args.repeats):  # interleaved, so machine load hits every plan alike
            for path, plan in plans.items():
                times[path].append(hasten.generate(model, args.n_time, plan=plan, seed=0).seconds)
        rows = []
        for path, plan in plans.items():
            gen = hasten.generate(model, args.n, plan=plan, seed=0)
            fd = evaluate_images(gen.images01, data=model.info.data)["fd"]
            rows.append({
                "plan": path, "describe": plan.describe(), "nfe": plan.nfe,
                "cost_flop_equivalent": plan.cost_with(shares), "seconds_batch": statistics.median(times[path]),
                "seconds_all": times[path], "rmse_ref": rmse(gen.images01, reference), "fd": fd,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    base = min(r["seconds_batch"] / r["cost_flop_equivalent"] for r in rows)
    for r in rows:
        r["seconds_per_cost_unit"] = r["seconds_batch"] / r["cost_flop_equivalent"]
    out = {
        "model": args.model, "n": args.n, "seed": 0, "n_time": args.n_time, "repeats": args.repeats,
        "flop_shares": list(shares), "machine": f"{platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread", "rows": rows, "min_seconds_per_cost_unit": base,
    }  # fmt: skip
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

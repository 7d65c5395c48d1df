"""How much one skipped block at one step costs (mnist-dit, mnist-unet), against what a step is worth (issue 21).

For a plan (default: the shipped tuned NFE-8 plan), skip one block (each of ``--blocks``) at one step (each
step) and measure the RMSE to the reference solve (``--n`` images, seed ``--seed``) against the plan's own.
A skipped block saves its FLOP share of one call (1/6 of an NFE on mnist-dit; recorded per block, as
``flop_share``); the steps-only plans' RMSE per NFE is the exchange rate it must beat. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import torch

import hasten
from hasten.accel.skip import block_flop_shares, skippable_blocks
from hasten.metrics.reference import reference_samples, rmse
from hasten.tune import load_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mnist-dit")
    parser.add_argument("--plan", default="plans/mnist-dit-nfe8.json")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 2, 5])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/plan_skip/sensitivity.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = hasten.load(args.model)
    plan = load_plan(args.plan)
    names = [path for path, _ in skippable_blocks(model.network)]
    shares = block_flop_shares(model.network, lambda: hasten.generate(model, 1, steps=1, seed=0, guidance=1.0))
    with torch.no_grad():
        reference = reference_samples(model, args.n, seed=args.seed, steps=100)
        base = rmse(hasten.generate(model, args.n, plan=plan, seed=args.seed).images01, reference)
        rows = []
        for block in args.blocks:
            for step in range(plan.num_steps):
                skip = tuple((block,) if s == step else () for s in range(plan.num_steps))
                gen = hasten.generate(model, args.n, plan=dataclasses.replace(plan, skip=skip), seed=args.seed)
                rows.append({"block": block, "name": names[block], "flop_share": shares[block], "step": step,
                             "sigma": plan.sigmas[step], "rmse_ref": rmse(gen.images01, reference)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.model, "plan": args.plan, "n": args.n, "seed": args.seed, "plan_rmse_ref": base, "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

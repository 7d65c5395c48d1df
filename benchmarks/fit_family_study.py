"""Study for the fit stage of `hasten tune`: which extensions of the ``learned_multistep`` family pay.

From a fitted plan's levels and weights, Adam continues the fit (image-space loss, 128 training images of seed
1000, batches of 32, validation on seed 2000 every 25 iterations, best validated weights scored on seed 0)
with optional extra parameters:

* ``--freex``: a free weight on the state, ``x_{i+1} = (r_i + e_i) x_i + (1 - r_i) sum_j c_ij D_j``;
* ``--pc``: a corrector row per step, ``x_i <- (r + e) x_{i-1} + (1 - r) sum_{j <= i} k_ij D_j`` once ``D_i`` is
  evaluated at the predicted ``x_i`` (UniPC's structure; ``k`` starts equal to ``c``, i.e. no correction);
* ``--shift``: the network sees the level ``sigma_i exp(s_i)`` instead of ``sigma_i``.

``--model-space-loss`` uses the old loss on raw model outputs. ``hasten tune --fit-iterations`` adopted the
image-space loss and ``--freex`` (as ``x_weights``); results: ``benchmarks/results/fit_family/``.

Reference: Shaul et al., "Bespoke Solvers for Generative Flow Models", ICLR 2024 (fitted solver families);
Zhao et al., "UniPC", NeurIPS 2023 (the corrector structure); Li et al., "Alleviating Exposure Bias in
Diffusion Models through Sampling with Shifted Time Steps", ICLR 2024 (the level shift).

    python benchmarks/fit_family_study.py --plan benchmarks/results/tune_fit/mnist-unet-nfe5.plan.json --freex
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import hasten
from hasten._io import write_text_atomic
from hasten.generate import default_labels, guided_denoiser
from hasten.metrics.reference import reference_samples, rmse
from hasten.train import machine_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="a learned_multistep plan to start from")
    parser.add_argument("--freex", action="store_true")
    parser.add_argument("--pc", action="store_true")
    parser.add_argument("--shift", action="store_true")
    parser.add_argument("--model-space-loss", action="store_true")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--out", default="benchmarks/results/fit_family")
    args = parser.parse_args()

    start_plan = hasten.load_plan(args.plan)
    model = hasten.load(start_plan.model)
    for p in model.network.parameters():
        p.requires_grad_(False)
    denoiser = guided_denoiser(model, 1.0)
    sig = torch.tensor(start_plan.sigmas, dtype=torch.float64)
    rows0 = start_plan.options["coefficients"]
    n = len(sig) - 1
    log_first = torch.log(sig[:1])
    interior = torch.log(sig[1:-1]).clone().requires_grad_(True)
    c = [torch.tensor(r, dtype=torch.float32, requires_grad=True) for r in rows0]
    e = torch.zeros(n, requires_grad=True)
    k = [torch.tensor([*rows0[i], 0.0], dtype=torch.float32, requires_grad=True) for i in range(n - 1)]
    s = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    params = [interior, *c] + ([e] if args.freex else []) + (k if args.pc else []) + ([s] if args.shift else [])

    def sampler(noise: torch.Tensor, cond: dict) -> torch.Tensor:
        level = torch.cat([torch.cat([log_first, interior]).exp(), torch.zeros(1, dtype=torch.float64)])
        x = noise * float(model.schedule.initial_noise_scale(float(level[0].detach())))
        x_prev, denoised = x, []
        for i in range(n):
            seen = level[i] * s[i].exp() if args.shift else level[i]
            denoised.append(denoiser(x, seen.expand(len(x)), **cond).float())
            if args.pc and i >= 1:  # correct x_i with D_i, evaluated at the predicted x_i
                r = (level[i] / level[i - 1]).float()
                a = r + e[i - 1] if args.freex else r
                x = a * x_prev + (1 - r) * sum(k[i - 1][j] * denoised[j] for j in range(i + 1))
            r = (level[i + 1] / level[i]).float()
            a = r + e[i] if args.freex else r
            x_prev, x = x, a * x + (1 - r) * sum(c[i][j] * denoised[j] for j in range(i + 1))
        return x

    def noise_set(count: int, seed: int):
        noise = torch.randn((count, *model.info.image_shape), generator=torch.Generator().manual_seed(seed))
        return noise, default_labels(model, count, None)

    def cond_of(labels, rows) -> dict:
        return model.conditioning(None if labels is None else labels[rows], rows)

    def score(count: int, seed: int) -> float:
        noise, labels = noise_set(count, seed)
        with torch.no_grad():
            out = torch.cat([sampler(noise[i : i + 50], cond_of(labels, list(range(i, min(i + 50, count)))))
                             for i in range(0, count, 50)])  # fmt: skip
        return rmse(model.to_images(out), reference_samples(model, count, seed=seed, steps=100))

    train_noise, train_labels = noise_set(128, 1000)
    target = reference_samples(model, 128, seed=1000, steps=100)
    optimiser = torch.optim.Adam(params, lr=args.lr)
    start = {"validation_rmse": score(64, 2000), "heldout_rmse": score(100, 0)}
    best, history, began = (start["validation_rmse"], 0, None), [], time.perf_counter()
    for it in range(1, args.iterations + 1):
        rows = torch.randperm(128, generator=torch.Generator().manual_seed(it))[:32].tolist()
        out = sampler(train_noise[rows], cond_of(train_labels, rows))
        loss = (out - (target[rows] * 2 - 1)) if args.model_space_loss else (model.to_images(out) - target[rows])
        loss = loss.pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # keep the levels descending
            for j in range(len(interior)):
                interior[j] = torch.minimum(interior[j], (log_first[0] if j == 0 else interior[j - 1]) - 0.05)
        if it % 25 == 0:
            val = score(64, 2000)
            if val < best[0]:
                best = (val, it, [t.detach().clone() for t in params])
            history.append({"iteration": it, "train_loss": float(loss), "validation_rmse": val})
            print(f"iteration {it}: validation RMSE {val:.5f} (best {best[0]:.5f} at {best[1]})", flush=True)
    if best[2] is not None:
        with torch.no_grad():
            for t, b in zip(params, best[2], strict=True):
                t.copy_(b)
    variant = "+".join(f for f in ("freex", "pc", "shift") if getattr(args, f)) or "plain"
    variant += "-model-space" if args.model_space_loss else ""
    result = {
        "study": "fit family", "start_plan": args.plan, "variant": variant, "iterations": args.iterations,
        "lr": args.lr, "start": start, "best_iteration": best[1], "validation_rmse": best[0],
        "heldout_rmse": score(100, 0), "seconds": time.perf_counter() - began, "history": history,
        "x_offsets": e.tolist(), "level_shifts": s.tolist(), "machine": machine_description(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    out = pathlib.Path(args.out) / f"{model.info.name}-{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()

"""Feasibility study for issue 5: learned per-step solver coefficients at a fixed NFE.

The solver family is DPM-Solver++'s multistep update in VE form, ``x_{i+1} = r_i x_i + (1 - r_i) sum_j c_ij D_j``
with ``r_i = sigma_{i+1} / sigma_i`` and ``D_j`` the denoised estimates so far: DDIM is ``c_ii = 1``,
DPM-Solver++(2M) is ``c_ii = 1 + 1/(2 q_i)``, ``c_i,i-1 = -1/(2 q_i)`` (``q_i`` the ratio of log-SNR steps).
Here every ``c_ij`` and the interior log-sigmas are free and fitted by gradient descent through the sampler
(autograd through the network) to the final sample of a 100-step reference solve, on training noise (seed
1000, 128 images, batches of 32); scored on held-out noise (seed 0, 100 images) as ``hasten bench`` scores.
This study script (no validation, fixed iteration count) measured whether the family can reach issue 5's
targets; ``hasten tune --fit-iterations N`` is the product version (validated, resumable: hasten.tune.fit).

Reference: the idea of fitting solver coefficients / time steps to a teacher: Shaul et al., "Bespoke Solvers
for Generative Flow Models", ICLR 2024; Tong et al., "Learning to Discretize Denoising Diffusion ODEs" (LD3),
2024; Zheng et al., DPM-Solver-v3, NeurIPS 2023 (data-driven coefficients).

    python benchmarks/learned_coefficients.py --model mnist-dit --nfe 5 --iterations 500
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

import hasten
from hasten._io import write_text_atomic
from hasten.data import from_model_space
from hasten.metrics.reference import reference_samples, rmse
from hasten.train import machine_description
from hasten.tune.fit import dpmpp_2m_weights
from hasten.tune.plan import save_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-dit")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--init", choices=("ddim", "dpmpp_2m"), default="dpmpp_2m")
    parser.add_argument("--grid", default="auto", help="a stock grid name, or a plan file to start from")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="the fit's record (JSON)")
    parser.add_argument(
        "--plan-out",
        type=pathlib.Path,
        default=None,
        help="also write the result as a plan (solver learned_multistep) for `hasten bench --plan`",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = hasten.load(args.model)
    den, schedule, nfe = model.denoiser, model.schedule, args.nfe
    if args.grid.endswith(".json"):
        start = torch.tensor(hasten.load_plan(args.grid).sigmas[:-1], dtype=torch.float64)
    else:
        start = hasten.get_sigmas(args.grid, nfe, schedule)[:-1]
    if len(start) != nfe:
        raise SystemExit(f"grid has {len(start)} model calls, not {nfe}")
    log_first = torch.log(start[:1]).float()
    interior = torch.log(start[1:]).float().clone().requires_grad_(True)
    init = dpmpp_2m_weights(start) if args.init == "dpmpp_2m" else None
    rows = init if init else [torch.eye(i + 1)[i].tolist() for i in range(nfe)]
    coefficients = [torch.tensor(row, dtype=torch.float32, requires_grad=True) for row in rows]

    def sample(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigmas = torch.cat([log_first, interior]).exp()
        levels = torch.cat([sigmas, torch.zeros(1)])
        x = noise * float(schedule.initial_noise_scale(float(sigmas[0])))
        denoised = []
        for i in range(nfe):
            denoised.append(den(x, levels[i].expand(len(x)).double(), class_labels=labels).float())
            r = levels[i + 1] / levels[i]
            x = r * x + (1 - r) * sum(coefficients[i][j] * denoised[j] for j in range(i + 1))
        return x

    def noise_of(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((n, *model.info.image_shape), generator=gen), torch.arange(n) % model.info.num_classes

    x_train, y_train = noise_of(128, 1000)
    target = reference_samples(model, 128, seed=1000, steps=100) * 2 - 1  # model space
    x_held, y_held = noise_of(100, 0)
    reference_held = reference_samples(model, 100, seed=0, steps=100)

    def held_out() -> float:
        with torch.no_grad():
            return rmse(from_model_space(sample(x_held, y_held)), reference_held)

    optimiser = torch.optim.Adam([interior, *coefficients], lr=args.lr)
    history = [{"iteration": 0, "heldout_rmse": held_out()}]
    print(f"start ({args.init} on {args.grid}): held-out RMSE {history[0]['heldout_rmse']:.4f}", flush=True)
    started = time.perf_counter()
    for it in range(1, args.iterations + 1):
        batch = torch.randperm(128)[:32]
        loss = (sample(x_train[batch], y_train[batch]) - target[batch]).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # keep the levels strictly descending
            for k in range(len(interior)):
                above = log_first[0] if k == 0 else interior[k - 1]
                interior[k] = torch.minimum(interior[k], above - 0.05)
        if it % 50 == 0 or it == args.iterations:
            history.append({"iteration": it, "train_loss": float(loss), "heldout_rmse": held_out(),
                            "seconds": time.perf_counter() - started})  # fmt: skip
            print(f"{it}: held-out RMSE {history[-1]['heldout_rmse']:.4f} ({history[-1]['seconds']:.0f} s)", flush=True)
    result = {
        "model": args.model, "nfe": nfe, "init": args.init, "grid": args.grid, "lr": args.lr,
        "sigmas": [round(float(s), 6) for s in torch.cat([log_first, interior]).exp()] + [0.0],
        "coefficients": [[round(float(v), 6) for v in c] for c in coefficients], "history": history,
        "machine": machine_description(torch.device("cpu")), "torch": torch.__version__,
    }  # fmt: skip
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    if args.plan_out is not None:
        plan = hasten.Plan(
            (*(float(s) for s in torch.cat([log_first, interior]).detach().double().exp()), 0.0),
            "learned_multistep", {"coefficients": [[float(v) for v in c] for c in coefficients]}, nfe=nfe,
            model=model.info.name, fingerprint=model.fingerprint,
            scores={"heldout": {"rmse_ref": history[-1]["heldout_rmse"], "n": 100, "seed": 0}},
            search={"method": "learned coefficients (benchmarks/learned_coefficients.py)", "init": args.init,
                    "grid": args.grid, "iterations": args.iterations, "lr": args.lr, "train_seed": 1000},
        )  # fmt: skip
        save_plan(plan, args.plan_out)
    print(json.dumps({k: result[k] for k in ("sigmas", "coefficients")}))
    assert math.isfinite(history[-1]["heldout_rmse"])


if __name__ == "__main__":
    main()

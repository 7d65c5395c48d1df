"""Reward-guided sampling against its baselines at equal network evaluations per sample.

Rows (one model, one reward, ``ddpm`` at ``--steps`` steps, noise seed ``--seed`` held out from tuning):

* ``plain``: the ancestral sampler, ``S`` evaluations per sample.
* ``svdd-K``: SVDD-PM with K candidates per step (``hasten.generate(..., reward=, particles=K)``):
  ``1 + K (S - 1)`` evaluations (the kept candidate's x0 estimate is the next step's network call).
* ``best-of-N``: N plain draws per sample (seeds ``hasten.reward_baselines.draw_seed``), the best kept; ``N S``
  evaluations, N the smallest with ``N S >= 1 + K (S - 1)`` (the baseline gets at least SVDD's budget). Draw 0 is
  the plain row's run, and best-of-4 is the first 4 draws of best-of-8: the draws (seeds) and tie rule of
  ``hasten.reward_baselines.best_of_n``, without sampling the shared draws twice.
* ``gradient-K``: classifier guidance by the reward of the x0 estimate (``gradient_guided``), each call counted
  as 3 evaluations (forward + backward), at ``ceil((1 + K (S - 1)) / 3)`` steps; its scale is the best mean
  reward on ``--tune-n`` samples of another seed (``--tune-seed``) among ``--scales``. Only for a reward with a
  gradient (``ink`` has none).

Each row: the reward's mean, 10th percentile and median; FD, precision/recall and the classifier's label
accuracy against the held-out digits (``hasten.evaluate_images``: the bundled classifier, which the ``symmetry``
and ``ink`` rewards do not use, so it is an independent judge of what the steering did to the digits);
evaluations per sample; sampling seconds. Written to ``benchmarks/results/reward/<model>-<reward>.json`` after
every row (a rerun skips the rows already there).

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 15 python benchmarks/reward/measure.py --model mnist-unet --n 500
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import torch

import hasten
from hasten.metrics.quality import evaluate_images
from hasten.reward_baselines import draw_seed, gradient_guided
from hasten.rewards import get_reward

OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "reward"


def summary(rewards: torch.Tensor) -> dict:
    r = rewards.double()
    return {"reward_mean": float(r.mean()), "reward_p10": float(r.quantile(0.1)), "reward_median": float(r.median())}


def quality(images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    q = evaluate_images(images, labels)
    keys = ("fd", "fd_real_vs_real", "precision", "recall", "label_accuracy", "confidence")
    return {k: q[k] for k in keys if k in q}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-unet")
    parser.add_argument("--reward", default="symmetry")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--particles", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--soft-alpha", type=float, default=None, help="also SVDD at the largest K with this alpha")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--tune-seed", type=int, default=7)
    parser.add_argument("--tune-n", type=int, default=100)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--no-gradient", action="store_true", help="skip classifier guidance (a reward without one)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--part", choices=("all", "sampling", "gradient"), default="all",
        help="run only the plain/SVDD/best-of-N rows or only the gradient rows, into <model>-<reward>-<part>.json "
        "(two processes side by side)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)

    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.part == "all" else f"-{args.part}"
    path = OUT / f"{args.model}-{args.reward.replace(':', '')}{suffix}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    # what the rows depend on (the gradient baseline's tuning settings are kept with its tuning record)
    settings = {"model": args.model, "reward": args.reward, "n": args.n, "steps": args.steps, "solver": "ddpm",
                "seed": args.seed}  # fmt: skip
    if record.get("settings") != settings:
        record = {"settings": settings, "rows": {}}
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}  # fmt: skip
    rows = record["rows"]

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)

    model = hasten.load(args.model)
    reward = get_reward(args.reward)
    common = {"solver": "ddpm", "batch_size": args.batch_size}
    steps = args.steps

    def row(name: str, compute) -> None:
        if name in rows:
            print(f"{name}: kept from {path.name}")
            return
        start = time.perf_counter()
        rows[name] = compute()
        rows[name]["wall_seconds"] = time.perf_counter() - start
        save()
        r = rows[name]
        print(f"{name}: reward mean {r['reward_mean']:.4f} p10 {r['reward_p10']:.4f} FD {r['fd']:.2f} "
              f"acc {r.get('label_accuracy', float('nan')):.3f} evals {r['evaluations_per_sample']} "
              f"{r['seconds']:.0f} s", flush=True)  # fmt: skip

    # best-of-N draws: draw 0 is the plain run; kept in memory for the best-of-N rows
    budget = {k: 1 + k * (steps - 1) for k in args.particles}
    draws: list[hasten.Generation] = []

    def draw(i: int) -> hasten.Generation:
        while len(draws) <= i:
            j = len(draws)
            draws.append(hasten.generate(model, args.n, steps=steps, seed=draw_seed(args.seed, j), reward=reward,
                                         **common))  # fmt: skip
        return draws[i]

    def plain() -> dict:
        g = draw(0)
        return {**summary(g.rewards), **quality(g.images01, g.labels), "evaluations_per_sample": g.nfe,
                "nfe": g.nfe, "seconds": g.seconds}  # fmt: skip

    sampling, gradients = args.part in ("all", "sampling"), args.part in ("all", "gradient") and not args.no_gradient
    if sampling:
        row("plain", plain)

    for k in args.particles if sampling else ():

        def svdd(k=k, alpha=0.0) -> dict:
            g = hasten.generate(model, args.n, steps=steps, seed=args.seed, reward=reward, particles=k, alpha=alpha,
                                **common)  # fmt: skip
            return {**summary(g.rewards), **quality(g.images01, g.labels), "evaluations_per_sample": g.nfe,
                    "nfe": g.nfe, "seconds": g.seconds, "particles": k, "alpha": alpha}  # fmt: skip

        row(f"svdd-{k}", svdd)

    if args.soft_alpha is not None and sampling:
        k = max(args.particles)
        row(f"svdd-{k}-alpha{args.soft_alpha:g}", lambda: svdd(k, args.soft_alpha))

    for k in args.particles if sampling else ():
        n_draws = math.ceil(budget[k] / steps)

        def best(n_draws=n_draws) -> dict:
            runs = [draw(i) for i in range(n_draws)]
            scores = torch.stack([r.rewards for r in runs])  # [draws, n]
            # the first maximum: ties keep the earlier draw, as best_of_n does
            pick = torch.stack([(scores[:, j] == scores[:, j].max()).nonzero()[0, 0] for j in range(args.n)])
            images = torch.stack([runs[int(pick[j])].images01[j] for j in range(args.n)])
            chosen = scores[pick, torch.arange(args.n)]
            return {**summary(chosen), **quality(images, runs[0].labels),
                    "evaluations_per_sample": sum(r.nfe for r in runs), "nfe": sum(r.nfe for r in runs),
                    "seconds": sum(r.seconds for r in runs), "draws": n_draws}  # fmt: skip

        row(f"best-of-{n_draws}", best)

    if gradients:
        tuning = record.setdefault("gradient_tuning", {})
        for k in args.particles:
            g_steps = math.ceil(budget[k] / 3)
            key = f"steps{g_steps}"
            tune_settings = {"seed": args.tune_seed, "n": args.tune_n, "scales": args.scales}
            if tuning.get(key, {}).get("settings") != tune_settings:
                scores = {}
                for scale in args.scales:
                    g = gradient_guided(model, args.tune_n, reward, scale, steps=g_steps, seed=args.tune_seed, **common)
                    scores[str(scale)] = float(g.rewards.mean())
                    print(f"tuning gradient guidance at {g_steps} steps: scale {scale:g} -> mean reward "
                          f"{scores[str(scale)]:.4f}", flush=True)  # fmt: skip
                chosen = float(max(scores, key=scores.get))
                tuning[key] = {"settings": tune_settings, "mean_reward": scores, "chosen": chosen}
                save()
            scale = tuning[key]["chosen"]

            def gradient(g_steps=g_steps, scale=scale) -> dict:
                g = gradient_guided(model, args.n, reward, scale, steps=g_steps, seed=args.seed, **common)
                return {**summary(g.rewards), **quality(g.images01, g.labels), "evaluations_per_sample": 3 * g.nfe,
                        "nfe": g.nfe, "seconds": g.seconds, "scale": scale, "steps": g_steps}  # fmt: skip

            row(f"gradient-{3 * g_steps}-scale{scale:g}", gradient)
    print(f"-> {path}")


if __name__ == "__main__":
    main()

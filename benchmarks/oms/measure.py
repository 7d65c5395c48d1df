"""What One More Step changes on mnist-unet, whose linear-beta schedule ends at a non-zero terminal SNR.

The bundled UNet's 1000-step linear-beta schedule ends at ``alphas_cumprod[-1] ~ 4.0e-5`` (VE level
``sigma_max ~ 157``), so its training inputs at the last timestep still carried ``sqrt(4.0e-5) ~ 0.0064`` of the
digit, while ``hasten.generate`` starts every sampler from pure noise (unit variance at the network's input).
One More Step (OMS) closes that gap with one prediction at SNR 0: ``x0_hat = E[x0 | label]`` (at SNR 0 the
noise carries no information), from which the base sampler starts at its first level,
``x = x0_hat + sigma_0 z`` in VE form (``sqrt(abar_0) x0_hat + sqrt(1 - abar_0) z`` at the network's input).

Variants, all with the same initial and step noise (the ``hasten-index-v2`` seeds of ``generate``):

* ``base``: ``generate``'s start, ``z * initial_noise_scale(sigma_0)``;
* ``oms_mean``: the ideal OMS: the exact class mean of the training digits as ``x0_hat`` (bounds what any
  learned OMS module can do, since the mean is the optimum of its loss);
* ``oms_mean_first``: the ideal OMS as hasten applies it: that start, and the class mean also stands in for
  the base network's prediction at the first level (so the first step is the DDIM jump from SNR 0);
* ``oms_module``: the trained OMS module (``--module PATH`` or a bundled name, from ``hasten.oms.train_oms``)
  through ``hasten.generate(..., oms=module)``, as hasten ships it;
* ``true_marginal`` (a diagnostic bound): the exact marginal the network was trained on at its first level, a
  random training digit of the label plus ``sigma_0 z``: what a perfect start distribution changes;
* ``first_x0_mean`` (a diagnostic, not OMS): the base start, but the denoiser's output at the first level
  replaced by the class mean: what the first step would do if the model itself were exact at SNR ~ 0.

Measured against the 5,000 held-out digits: FD and label accuracy (bundled classifier), per-class mean ink
(mean pixel in [0, 1]) against the held-out per-class ink, the spread of per-image ink (std, 5th/95th
percentile: the brightness range), the correlation of each class's mean image with the held-out class mean
and the RMSE of their 7x7-pooled low-frequency images; and, paired with ``base``, the mean absolute pixel
change per sample.

Usage: OMP_NUM_THREADS=1 python benchmarks/oms/measure.py [--n 1000] [--sampler dpmpp_2m:10 --sampler ddpm:50]
       [--variant base --variant oms_mean ...] [--module PATH] [--out benchmarks/results/oms/measure.json]
Results are written after every (sampler, variant), and a rerun skips the rows already in the file.
``--grids DIR --module mnist`` only writes the before/after grids of docs/guide/one-more-step.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import hasten
from hasten.data import load_mnist
from hasten.generate import default_labels, guided_denoiser
from hasten.metrics.quality import evaluate_images
from hasten.schedules.grids import get_sigmas
from hasten.seeds import initial_noise, step_seeds
from hasten.train import machine_description

VARIANTS = ("base", "oms_mean", "oms_mean_first", "oms_module", "first_x0_mean", "true_marginal")


def class_means(split: str = "train") -> Tensor:
    """Per-class mean digit in model space [-1, 1], ``[10, 1, 28, 28]``."""
    data = load_mnist(split)
    x = data.images.float() / 127.5 - 1.0
    return torch.stack([x[data.labels == c].mean(0) for c in range(10)])


def digits(labels: Tensor, rows: range, seed: int) -> Tensor:
    """One training digit of each row's label (model space), drawn from the row's index."""
    data = load_mnist("train")
    x = data.images.float() / 127.5 - 1.0
    out = []
    for label, index in zip(labels.tolist(), rows, strict=True):
        pool = torch.nonzero(data.labels == label).flatten()
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        out.append(x[pool[torch.randint(len(pool), (1,), generator=g)]][0])
    return torch.stack(out)


class FirstLevelOverride:
    """Denoiser wrapper: at the first level of the grid the output is ``x0`` (per row), elsewhere the model's."""

    def __init__(self, denoiser, sigma_0: float, x0: Tensor):
        self.denoiser, self.sigma_0, self.x0 = denoiser, sigma_0, x0

    def __call__(self, x, sigma, **cond):
        out = self.denoiser(x, sigma, **cond)
        if math.isclose(float(sigma[0]), self.sigma_0, rel_tol=1e-6):  # sigma arrives as a float32 [B] tensor
            return self.x0.to(out)
        return out


def sample_variant(model, variant, solver, steps, n, seed, batch, means, module=None):
    if variant == "oms_module":  # the shipped path: hasten.generate(..., oms=module)
        out = hasten.generate(model, n, solver=solver, steps=steps, seed=seed, batch_size=batch, oms=module)
        return out.images01, out.labels, out.seconds
    sigmas = get_sigmas("auto", steps, model.schedule)
    sigma_0 = float(sigmas[0])
    labels = default_labels(model, n)
    denoiser = guided_denoiser(model, 1.0)
    outputs = []
    start = time.perf_counter()
    for lo in range(0, n, batch):
        rows = range(lo, min(n, lo + batch))
        z = initial_noise(seed, rows, model.info.image_shape)
        y = labels[rows.start : rows.stop]
        cond = model.conditioning(y, rows)
        if variant == "base" or variant == "first_x0_mean":
            x = z * model.schedule.initial_noise_scale(sigma_0)
        elif variant in ("oms_mean", "oms_mean_first"):
            x = means[y] + sigma_0 * z
        elif variant == "true_marginal":
            x = digits(y, rows, seed) + sigma_0 * z
        else:
            raise ValueError(f"unknown variant {variant!r}; allowed: {VARIANTS}")
        first = variant in ("first_x0_mean", "oms_mean_first")
        d = FirstLevelOverride(denoiser, sigma_0, means[y]) if first else denoiser
        out = hasten.sample(d, x, sigmas, solver, cond=cond, noise_seeds=step_seeds(seed, rows))
        outputs.append(out)
    seconds = time.perf_counter() - start
    samples = torch.cat(outputs)
    return model.to_images(samples), labels, seconds


def image_stats(images01: Tensor, labels: Tensor, ref01: Tensor, ref_labels: Tensor) -> dict:
    ink = images01.mean((1, 2, 3))
    ref_ink = ref01.mean((1, 2, 3))
    per_class, corr, lowfreq = [], [], []
    for c in range(10):
        a, b = images01[labels == c], ref01[ref_labels == c]
        per_class.append({"class": c, "ink": float(a.mean()), "heldout_ink": float(b.mean())})
        ma, mb = a.mean(0).flatten(), b.mean(0).flatten()
        corr.append(float(torch.corrcoef(torch.stack([ma, mb]))[0, 1]))
        pa, pb = F.avg_pool2d(a.mean(0, keepdim=True), 7), F.avg_pool2d(b.mean(0, keepdim=True), 7)
        lowfreq.append(float((pa - pb).pow(2).mean().sqrt()))
    q = torch.tensor([0.05, 0.95], dtype=ink.dtype)
    return {
        "ink_mean": float(ink.mean()),
        "ink_std": float(ink.std()),
        "ink_p05_p95": torch.quantile(ink, q).tolist(),
        "heldout_ink_mean": float(ref_ink.mean()),
        "heldout_ink_std": float(ref_ink.std()),
        "heldout_ink_p05_p95": torch.quantile(ref_ink, q).tolist(),
        "class_ink_abs_error": sum(abs(p["ink"] - p["heldout_ink"]) for p in per_class) / 10,
        "class_mean_image_corr": sum(corr) / 10,
        "class_lowfreq_rmse_7x7": sum(lowfreq) / 10,
        "per_class": per_class,
    }


def write_grids(model, module, spec: str, seed: int, folder: pathlib.Path) -> None:
    """Before/after grids of the first 40 samples (4 of each label) at one sampler, with the same noise."""
    from hasten.viz import save_grid

    if module is None:
        raise SystemExit("--grids needs --module")
    solver, steps = spec.split(":")
    for name, oms in (("base", None), ("oms", module)):
        out = hasten.generate(model, 40, solver=solver, steps=int(steps), seed=seed, oms=oms)
        order = torch.argsort(out.labels, stable=True)  # one row per label
        save_grid(out.images01[order], folder / f"{name}.png", nrow=8, scale=2)


def module_cost(model, module, batch: int, repeats: int = 5) -> dict:
    """Median seconds of one OMS prediction and of one network call (the denoiser at sigma_max) on a batch."""
    z = torch.randn(batch, *model.info.image_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 10
    cond = model.conditioning(labels, range(batch))
    sigma = torch.full((batch,), float(model.schedule.sigma_max))
    times: dict[str, list[float]] = {"oms": [], "network": []}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved, so load drift falls on both
            t = time.perf_counter()
            module.predict_x0(z, labels)
            times["oms"].append(time.perf_counter() - t)
            t = time.perf_counter()
            model.denoiser(z, sigma, **cond)
            times["network"].append(time.perf_counter() - t)
    oms, network = (sorted(v)[len(v) // 2] for v in (times["oms"], times["network"]))
    return {"batch": batch, "oms_seconds": oms, "network_seconds": network, "ratio": oms / network}


def first_level_prediction(model, means: Tensor, n: int = 200, seed: int = 0) -> dict:
    """The model's own x0 prediction at its first level from generate's pure-noise start, against the class mean."""
    sigma_0 = float(get_sigmas("auto", 10, model.schedule)[0])
    labels = default_labels(model, n)
    z = initial_noise(seed, range(n), model.info.image_shape)
    with torch.no_grad():
        x0 = model.denoiser(z * model.schedule.initial_noise_scale(sigma_0), torch.full((n,), sigma_0),
                            **model.conditioning(labels, range(n)))  # fmt: skip
    target = means[labels]
    return {
        "n": n, "sigma_0": sigma_0,
        "rmse_to_class_mean": float((x0 - target).pow(2).mean().sqrt()),
        "class_mean_rmse_to_zero": float(target.pow(2).mean().sqrt()),
        "prediction_mean": float(x0.mean()), "class_mean_mean": float(target.mean()),
        "prediction_std_over_samples": float(torch.stack([x0[labels == c].std(0).mean() for c in range(10)]).mean()),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--sampler", action="append", help="solver:steps (repeatable); default dpmpp_2m:10, ddpm:50")
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--module", help="a trained OMS module file or bundled name (for the oms_module variant)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/oms/measure.json"))
    parser.add_argument(
        "--grids",
        type=pathlib.Path,
        help="only write base.png and oms.png here (40 samples, same noise, the first --sampler)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    samplers = args.sampler or ["dpmpp_2m:10", "ddpm:50"]
    variants = args.variant or ["base", "oms_mean", "oms_mean_first", "first_x0_mean", "true_marginal"] + (
        ["oms_module"] if args.module else []
    )
    if "oms_module" in variants and args.module is None:
        parser.error("variant oms_module needs --module")
    model = hasten.load("mnist-unet")
    means = class_means("train")
    module = None
    if args.module is not None:
        from hasten.oms import load_oms

        module = load_oms(args.module, model)
    if args.grids is not None:
        write_grids(model, module, samplers[0], args.seed, args.grids)
        return 0
    held = load_mnist("heldout")
    ref01, ref_labels = held.images.float() / 255.0, held.labels
    result = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    result.update({
        "model": model.info.name, "fingerprint": model.fingerprint, "n": args.n, "seed": args.seed,
        "alphas_cumprod_last": float(model.schedule.alphas_cumprod[-1]), "sigma_max": model.schedule.sigma_max,
        "machine": f"{machine_description(torch.device('cpu'))}, torch {torch.__version__}",
        "module": None if module is None else {"path": args.module, "record": module.record},
    })  # fmt: skip
    result["first_level_prediction"] = first_level_prediction(model, means, seed=args.seed)
    if module is not None:
        result["module_cost"] = module_cost(model, module, args.batch)
    done = {(r["sampler"], r["variant"], r["n"]) for r in result["rows"]}
    base_images = {}
    for spec in samplers:
        solver, steps = spec.split(":")
        for variant in variants:
            key = (spec, variant, args.n)
            if key in done:
                print(f"skip {key}: in {args.out}", file=sys.stderr)
                continue
            images, labels, seconds = sample_variant(model, variant, solver, int(steps), args.n, args.seed,
                                                     args.batch, means, module)  # fmt: skip
            row = {"sampler": spec, "variant": variant, "n": args.n, "sampling_seconds": seconds}
            row.update(evaluate_images(images, labels))
            row.pop("class_histogram", None)
            row.update(image_stats(images, labels, ref01, ref_labels))
            if variant == "base":
                base_images[spec] = images
            elif spec in base_images:  # paired: the same noise (base sampled in this run)
                row["mean_abs_change_vs_base"] = float((images - base_images[spec]).abs().mean())
                shift = images.mean((1, 2, 3)) - base_images[spec].mean((1, 2, 3))
                row["ink_shift_vs_base"] = {
                    "mean": float(shift.mean()),
                    "stderr": float(shift.std() / len(shift) ** 0.5),
                }
            if args.out.exists():  # rows another run added meanwhile are kept (runs of other samplers may overlap)
                rows = json.loads(args.out.read_text())["rows"]
                result["rows"] = [r for r in rows if (r["sampler"], r["variant"], r["n"]) != key]
            result["rows"].append(row)
            done.add(key)
            print(json.dumps({k: row[k] for k in ("sampler", "variant", "fd", "label_accuracy", "ink_mean",
                  "ink_std", "class_ink_abs_error", "class_mean_image_corr", "class_lowfreq_rmse_7x7")}
                  | {"change": row.get("mean_abs_change_vs_base")}), file=sys.stderr)  # fmt: skip
            write_json(args.out, result)
    write_json(args.out, result)  # the header (module cost, first-level prediction) even when every row was done
    return 0


def write_json(path: pathlib.Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())

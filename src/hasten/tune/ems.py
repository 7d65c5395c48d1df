"""Estimating DPM-Solver-v3's empirical model statistics (EMS) for a model, and caching them per model.

For each level ``lambda`` of a log-SNR-uniform grid, on ``x = x0 + sigma z`` (VE form; ``x0`` from the
training data or, for a model without bundled data, from the model's own high-accuracy samples):

* ``l = E[sigma diag(d eps / dx)] = 1 - E[diag(dD/dx)]``, by Hutchinson's estimator ``E[v * (J^T v)]``
  with Rademacher ``v`` (one reverse-mode vector-Jacobian product; works for any network);
* ``f = sigma eps - l x = (1 - l) x - D`` and its total derivative along the ODE,
  ``f' = -l' x + (1 - l) dx/dlambda - dD/dlambda`` with ``dx/dlambda = -(x - D)``; ``dD/dlambda`` by a
  central difference along the ODE direction (two extra evaluations, no forward-mode AD needed);
  ``l'`` by central differences of ``l`` on the grid (the same noise and probes at every level keep ``l``
  smooth in lambda);
* ``s = Cov(f, f') / Var(f)`` and ``b = E f' - s E f`` per dimension (least squares of ``f' ~ s f + b``).

The DPM-Solver-v3 repository announced its EMS script as TODO; the recipe above follows the paper's
App. C.1 and the public ScoreSDE script's structure (Hutchinson for ``l``, a JVP along the ODE for ``f'``).

Reference: Zheng et al., DPM-Solver-v3, NeurIPS 2023, Eq. (8)-(10) and App. C.1.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..progress import BudgetProgress
from ..solvers import OPTION_RESOLVERS
from ..solvers.dpm_solver_v3 import EMS, load_ems, save_ems

__all__ = ["EMS_LAMBDAS", "EMS_SAMPLES", "ems_for_model", "ems_path_for_model", "estimate_ems", "resolve_auto_ems"]

EMS_SAMPLES = 256  # images x0 for a model's statistics
EMS_LAMBDAS = 60  # log-SNR levels


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def estimate_ems(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    sigma_max: float,
    sigma_min: float,
    *,
    num_lambdas: int = 60,
    cond: Mapping[str, Tensor] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    step: float = 1e-3,
    smooth: int = 0,
    s_clip: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> EMS:
    """Estimate ``l``, ``s``, ``b`` on ``num_lambdas`` levels uniform in lambda between the sigmas.

    Args:
        denoiser: ``D(x, sigma_batch, **cond)`` in VE form (e.g. a model's denoiser, or a CFG wrapper).
        x0: Clean samples ``[K, ...]`` (data or the model's own samples); K of a few hundred is typical.
        cond: Per-sample conditioning (e.g. ``{"class_labels": y}`` with ``K`` rows), sliced with ``x0``.
        step: Relative lambda step of the central difference along the ODE.
        smooth: Half-width (grid points) of a moving average applied to ``l'``. The reference code smooths
            over +-5 of 1200 points; here the same noise and probes are used at every level, so ``l`` is
            already smooth in lambda and the default is no smoothing (on a coarse grid it would bias ``l'``).
        s_clip: Bound on ``|s|``: a least-squares slope from few samples can be wild, and ``e^{S}`` enters
            the update (10 means f changing e-fold over a tenth of a unit of lambda, far beyond real models).
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if num_lambdas < 3 or len(x0) < 2:
        raise ValueError(f"need at least 3 lambdas and 2 samples, got {num_lambdas} and {len(x0)}")
    x0 = x0.float()
    cond = dict(cond or {})
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), num_lambdas, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)  # one noise draw reused across levels: smoother statistics
    probes = torch.randint(0, 2, x0.shape, generator=gen).float().mul_(2).sub_(1)
    k = len(x0)
    total = 2 * num_lambdas

    def call(x: Tensor, sigma: float, rows: slice) -> Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        return denoiser(x, sig, **{name: v[rows] for name, v in cond.items()})

    # Pass 1: l = 1 - E[v * (J^T v)].
    ls = []
    for j, lam in enumerate(lambdas.tolist()):
        sigma = math.exp(-lam)
        acc = torch.zeros(x0.shape[1:], dtype=torch.float64)
        for rows in _batches(k, batch_size):
            x = (x0[rows] + sigma * noise[rows]).requires_grad_(True)
            with torch.enable_grad():
                out = call(x, sigma, rows)
                (vjp,) = torch.autograd.grad(out, x, probes[rows])
            acc += (probes[rows] * vjp).double().sum(0)
        ls.append(1.0 - acc / k)
        if progress is not None:
            progress(j + 1, total)
    l_grid = torch.stack(ls)
    # l' along lambda (central differences), smoothed.
    dl = torch.gradient(l_grid, spacing=(lambdas,), dim=0)[0]
    if smooth > 0:
        padded = torch.cat([dl[:1].expand(smooth, *dl.shape[1:]), dl, dl[-1:].expand(smooth, *dl.shape[1:])])
        dl = padded.unfold(0, 2 * smooth + 1, 1).mean(-1)
    # Pass 2: f and f' along the ODE; s and b by per-dimension least squares.
    s_grid, b_grid = [], []
    with torch.no_grad():
        for j, lam in enumerate(lambdas.tolist()):
            sigma = math.exp(-lam)
            l_j, dl_j = l_grid[j].float(), dl[j].float()
            sums = {name: torch.zeros(x0.shape[1:], dtype=torch.float64) for name in ("f", "g", "ff", "fg", "xx")}
            for rows in _batches(k, batch_size):
                x = x0[rows] + sigma * noise[rows]
                d = call(x, sigma, rows)
                dx = d - x  # dx/dlambda = -(x - D)
                d_plus = call(x + step * dx, sigma * math.exp(-step), rows)
                d_minus = call(x - step * dx, sigma * math.exp(step), rows)
                d_dlam = (d_plus - d_minus) / (2 * step)
                f = (1 - l_j) * x - d
                fp = -dl_j * x + (1 - l_j) * dx - d_dlam
                f64, g64 = f.double(), fp.double()
                sums["f"] += f64.sum(0)
                sums["g"] += g64.sum(0)
                sums["ff"] += (f64 * f64).sum(0)
                sums["fg"] += (f64 * g64).sum(0)
                sums["xx"] += (x.double() ** 2 + d.double() ** 2).sum(0)
            mean_f, mean_g = sums["f"] / k, sums["g"] / k
            var_f = sums["ff"] / k - mean_f**2
            cov = sums["fg"] / k - mean_f * mean_g
            # An f that varies no more than float32 rounding of the terms it is computed from (a Gaussian's,
            # where l is exact) is treated as constant: s = 0.
            s_j = (cov / (var_f + 1e-10 * sums["xx"] / k + 1e-20)).clamp(-s_clip, s_clip)
            s_grid.append(s_j)
            b_grid.append(mean_g - s_j * mean_f)
            if progress is not None:
                progress(num_lambdas + j + 1, total)
    meta = {"num_lambdas": num_lambdas, "samples": k, "sigma_max": sigma_max, "sigma_min": sigma_min, "seed": seed,
            "s_clip": s_clip}  # fmt: skip
    return EMS(lambdas, l_grid, torch.stack(s_grid), torch.stack(b_grid), meta)


def ems_for_model(
    model: Any, guidance: float = 1.0, *, samples: int | None = None, num_lambdas: int | None = None
) -> EMS:
    """The model's EMS at a guidance scale (see :func:`ems_path_for_model`)."""
    return load_ems(ems_path_for_model(model, guidance, samples=samples, num_lambdas=num_lambdas))


def ems_path_for_model(
    model: Any,
    guidance: float = 1.0,
    *,
    samples: int | None = None,
    num_lambdas: int | None = None,
    compute: bool = True,
):
    """The cached EMS file of the model at a guidance scale, estimated once when missing (``compute=False``:
    the path only, which may not exist yet).

    ``x0``: the model's bundled training data when it has one (MNIST), else its own reference samples.
    The cache key is the weights fingerprint, the guidance scale and the estimation settings
    (defaults :data:`EMS_SAMPLES` images, :data:`EMS_LAMBDAS` levels).
    """
    samples = EMS_SAMPLES if samples is None else samples
    num_lambdas = EMS_LAMBDAS if num_lambdas is None else num_lambdas
    from .. import distributed
    from ..data import load_dataset, to_model_space
    from ..generate import default_labels, generate, guided_denoiser
    from ..metrics.quality import cache_dir
    from ..metrics.reference import REFERENCE_SOLVER

    spec = {"model": model.fingerprint, "guidance": guidance, "samples": samples, "num_lambdas": num_lambdas, "v": 2}
    if model.condition_key:  # a pipeline's prompts are part of what the statistics describe
        spec["condition"] = model.condition_key
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "ems" / f"{key}.safetensors"
    if distributed.main_has(path) or not compute:  # rank 0's cache decides for every rank of a torchrun job
        return path
    labels = default_labels(model, samples)
    if model.info.data == "mnist":
        data = load_dataset("mnist")
        pick = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:samples]
        x0 = to_model_space(data.images[pick])
        if labels is not None and data.labels is not None:
            labels = data.labels[pick].long()
    else:  # the model's own high-accuracy samples (latents for a latent pipeline)
        ref = REFERENCE_SOLVER
        x0 = generate(
            model, samples, seed=7, guidance=guidance, solver=ref["solver"], steps=ref["steps"],
            schedule=ref["schedule"], **ref["options"],
        ).samples  # fmt: skip
    denoiser = guided_denoiser(model, guidance)
    cond = model.conditioning(labels, range(samples))
    schedule = model.schedule
    # Minutes on a CPU: show it on an interactive terminal.
    bar = BudgetProgress(sys.stderr.isatty(), f"DPM-Solver-v3 statistics of {model.info.name}", 2 * num_lambdas)
    try:
        ems = estimate_ems(denoiser, x0, float(schedule.sigma_max), float(schedule.sigma_min),
                           num_lambdas=num_lambdas, cond=cond,
                           progress=lambda done, total: bar.update(done, "once per model, then cached"))  # fmt: skip
    finally:
        bar.close()
    ems = EMS(ems.lambdas, ems.l, ems.s, ems.b, {**ems.meta, **spec})
    saved = save_ems(ems, path)  # rank 0 writes (hasten._io); the others read its file once it is there
    distributed.barrier()
    return saved


@OPTION_RESOLVERS.register("dpm_solver_v3")
def resolve_auto_ems(options: Mapping[str, Any], model: Any, guidance: float) -> dict[str, Any]:
    """DPM-Solver-v3's ``ems="auto"`` (its default) -> the path of the model's statistics at this guidance
    scale (:func:`ems_path_for_model`: estimated once, then cached). How :func:`hasten.generate`, plans and
    :meth:`hasten.pipelines.HastenScheduler.from_plan` give v3 its statistics without knowing v3."""
    if options.get("ems", "auto") != "auto":
        return dict(options)
    return {**options, "ems": str(ems_path_for_model(model, guidance))}

"""Error against a high-accuracy solve from the same initial noise (RMSE / PSNR), with a disk cache.

This is the measure DPM-Solver-v3 reports on Stable Diffusion: how far a fast sampler lands from where
an accurate solver of the same ODE lands, image by image. The reference is computed once per (model
fingerprint, noise seed, count, labels, guidance, reference solver) and cached as safetensors.

Reference: Zheng et al., "DPM-Solver-v3", NeurIPS 2023, Sec. 6 (MSE to a 1000-step reference).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib

import torch
from torch import Tensor

from .. import distributed
from .._io import atomic_path
from ..models.zoo import LoadedModel
from ..seeds import NOISE_CONVENTION
from .quality import cache_dir

__all__ = ["REFERENCE_SOLVER", "psnr", "reference_error", "reference_path", "reference_samples", "rmse"]

# Many steps of a third-order multistep solver on the EDM grid: converged to well below the errors measured.
# The Taylor 3M (third order from noise with its singlestep start; the default, named so the key says so).
REFERENCE_SOLVER = {"solver": "dpmpp_3m", "steps": 200, "schedule": "karras", "options": {"third_order_term": "taylor"}}


def rmse(x: Tensor, reference: Tensor) -> float:
    """Root-mean-square error over all pixels (images in [0, 1])."""
    return float((x.double() - reference.double()).pow(2).mean().sqrt())


def reference_error(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(rmse, psnr)`` of a sample set against its reference, where each process of a torchrun job holds its own
    rows of both (one process: all of them). Per-sample sums of squares are gathered in index order and reduced
    one way, so the numbers are the one-process numbers whatever the number of processes."""
    per_sample = (x.double() - reference.double()).pow(2).flatten(1).sum(1)
    gathered = distributed.gather_rows(per_sample if len(per_sample) else None)
    mse = float(gathered.sum()) / (len(gathered) * math.prod(x.shape[1:]))
    return math.sqrt(mse), (math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse))


def psnr(x: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (infinite when identical)."""
    mse = float((x.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def reference_path(
    model: LoadedModel,
    n: int,
    *,
    seed: int = 0,
    guidance: float = 1.0,
    label: int | None = None,
    steps: int | None = None,
    noise: str = NOISE_CONVENTION,
) -> tuple[pathlib.Path, dict]:
    """Where :func:`reference_samples` caches these samples (exists once computed), and what keys them."""
    solver = {**REFERENCE_SOLVER, **({"steps": steps} if steps is not None else {})}
    spec = {"model": model.fingerprint, "n": n, "seed": seed, "guidance": guidance, "label": label, **solver,
            "state": "float64", "noise": noise}  # fmt: skip
    if model.condition_key:  # a pipeline's prompts
        spec["condition"] = model.condition_key
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "references" / f"{key}.safetensors", spec


def reference_samples(
    model: LoadedModel,
    n: int,
    *,
    seed: int = 0,
    guidance: float = 1.0,
    label: int | None = None,
    steps: int | None = None,
    noise: str = NOISE_CONVENTION,
) -> Tensor:
    """High-accuracy samples ``[N, C, H, W]`` in [0, 1] for the same noise as ``generate(model, n, seed=...)``.

    ``steps`` overrides the reference solver's step count (default 200); ``noise`` is the noise convention
    (:mod:`hasten.seeds`; the legacy one reproduces numbers recorded before ``hasten-index-v2``).
    """
    from safetensors.torch import load_file, save_file

    from ..generate import generate

    path, spec = reference_path(model, n, seed=seed, guidance=guidance, label=label, steps=steps, noise=noise)
    solver = {k: spec[k] for k in REFERENCE_SOLVER}
    if distributed.main_has(path):  # rank 0's cache decides for every rank of a torchrun job
        return distributed.from_main(load_file(str(path))["images"] if distributed.reads_alone() else None)
    result = generate(
        model,
        n,
        solver=solver["solver"],
        steps=solver["steps"],
        schedule=solver["schedule"],
        seed=seed,
        guidance=guidance,
        label=label,
        state_dtype=torch.float64,  # the state accumulates in float64: far below the errors measured against it
        noise=noise,
        **solver["options"],
    )
    images = result.images01.float().contiguous()  # float32 images, as every sampler's (metrics take float32)
    with atomic_path(path) as tmp:
        save_file({"images": images}, str(tmp), metadata={"spec": json.dumps(spec)})
    return images

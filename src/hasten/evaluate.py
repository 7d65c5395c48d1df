"""Evaluate a model at one sampler setting: quality against held-out data, reference error and cost.

Library behind ``hasten evaluate`` and the model cards; ``hasten bench`` runs the same measurement over a
matrix of settings.
"""

from __future__ import annotations

from typing import Any

from . import distributed
from .generate import generate
from .metrics.cost import peak_memory_bytes
from .metrics.quality import evaluate_images
from .metrics.reference import REFERENCE_SOLVER, reference_error, reference_samples
from .models.zoo import LoadedModel

__all__ = ["evaluate_model"]


def evaluate_model(
    model: LoadedModel,
    *,
    n: int = 1000,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    schedule: str = "auto",
    seed: int = 0,
    guidance: float = 1.0,
    reference: bool = True,
    batch_size: int | None = None,
    **solver_options: Any,
) -> dict[str, Any]:
    """Sample ``n`` images and measure them; returns a JSON-able dict (and ``images01`` separately: the samples
    ``rows`` holds, all of them in one process).

    Under ``torchrun`` the samples (and the reference solve) are sharded over the processes by index, only
    per-sample results are gathered, and the metrics are computed from the whole set: the result is the
    one-process result (:mod:`hasten.distributed`), ``seconds`` the slowest process's sampling time.
    ``batch_size`` (default: even batches of at most 256, :func:`hasten.distributed.even_batch_size`) sets the
    batches, and so the split over processes."""
    batch_size = distributed.even_batch_size(n) if batch_size is None else batch_size
    if model.info.data != "mnist":
        raise ValueError(
            f"quality metrics exist for MNIST models only so far; {model.info.name!r} is trained on {model.info.data!r}"
        )
    gen = generate(
        model,
        n,
        solver=solver,
        steps=steps,
        schedule=schedule,
        seed=seed,
        guidance=guidance,
        batch_size=batch_size,
        gather=False,
        **solver_options,
    )  # fmt: skip  (under torchrun each process keeps its rows: only per-sample results are gathered)
    result: dict[str, Any] = {
        "model": model.info.name,
        "fingerprint": model.fingerprint,
        "solver": solver,
        "solver_options": solver_options,
        "steps": steps,
        "schedule": schedule,
        "guidance": guidance,
        "seed": seed,
        "nfe": gen.nfe,
        "seconds": gen.seconds,
        "images_per_second": n / gen.seconds,
        "peak_memory_bytes": peak_memory_bytes(),
        "bytes_on_disk": model.bytes_on_disk(),
        **evaluate_images(gen.images01, gen.labels, data=model.info.data, chunk=batch_size, shard=True),
    }
    if reference:
        ref = reference_samples(model, n, seed=seed, guidance=guidance)[gen.rows.start : gen.rows.stop]
        result["rmse_ref"], result["psnr_ref"] = reference_error(gen.images01, ref)
        result["reference"] = REFERENCE_SOLVER
    result["images01"] = gen.images01
    result["rows"] = [gen.rows.start, gen.rows.stop]
    return result

"""Run the matrix: every configuration from the same noise, measured the same way, one JSON line each.

Results go to ``DIR/results.jsonl`` (rewritten atomically after each configuration, so a kill never
leaves a corrupt file) next to ``DIR/matrix.json`` (the expanded matrix). ``resume=True`` skips finished
configurations; a folder holding a different matrix is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..generate import Generation, generate
from ..metrics.cost import peak_memory_bytes
from ..metrics.quality import evaluate_mnist
from ..metrics.reference import REFERENCE_SOLVER, psnr, reference_samples, rmse
from ..models.zoo import LoadedModel, load
from ..train import machine_description
from ..viz import save_grid
from .matrix import BenchConfig, Entry, expand
from .peers import diffusers_generate

__all__ = ["BenchError", "read_results", "run_bench"]

ROW_KEYS = ("library", "solver", "schedule", "nfe", "seconds", "fd", "rmse_ref")  # present in every row
QUALITY_KEYS = ("fd", "fd_real_vs_real", "precision", "recall", "confidence", "memorised_share")


class BenchError(ValueError):
    """A bench that cannot start as asked (its message says what to do)."""


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(folder) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment() -> dict[str, Any]:
    import diffusers

    from .. import __version__

    return {
        "machine": machine_description(torch.device("cpu")),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "hasten": __version__,
    }


def _sample(model: LoadedModel, entry: Entry, config: BenchConfig) -> Generation:
    if entry.library == "hasten":
        return generate(
            model, config.n, solver=entry.solver, steps=entry.steps, schedule=entry.schedule or "auto",
            seed=config.seed, guidance=entry.guidance, **entry.options,
        )  # fmt: skip
    return diffusers_generate(
        model, config.n, entry.solver, steps=entry.steps, seed=config.seed, guidance=entry.guidance
    )


def _measure(
    model: LoadedModel, entry: Entry, config: BenchConfig, reference: torch.Tensor, grids: pathlib.Path
) -> dict:
    runs = [_sample(model, entry, config) for _ in range(config.repeats)]
    gen = runs[0]
    seconds = statistics.median(r.seconds for r in runs)
    quality = evaluate_mnist(gen.images01, gen.labels)
    save_grid(gen.images01[:50], grids / f"{entry.key}.png", nrow=10, scale=2)
    return {
        "key": entry.key,
        "label": entry.label,
        "library": entry.library,
        "solver": entry.solver,
        "options": entry.options,
        "schedule": entry.schedule,
        "steps": entry.steps,
        "guidance": entry.guidance,
        "nfe": gen.nfe,
        "seconds": seconds,
        "seconds_all": [r.seconds for r in runs],
        "images_per_second": config.n / seconds,
        "peak_memory_bytes": peak_memory_bytes(),
        "rmse_ref": rmse(gen.images01, reference),
        "psnr_ref": psnr(gen.images01, reference),
        "grid": f"grids/{entry.key}.png",
        **{k: quality[k] for k in QUALITY_KEYS},
        "label_accuracy": quality.get("label_accuracy"),
    }


def run_bench(
    config: BenchConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) the matrix of ``config`` into ``out``; returns all rows, old and new."""
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    model = load(config.model)
    if model.info.data != "mnist":
        raise BenchError(f"bench measures MNIST models so far; {model.info.name!r} is trained on {model.info.data!r}")
    entries = expand(config, objective=model.info.objective, conditional=bool(model.info.num_classes))
    matrix = {"config": config.to_dict(), "model_fingerprint": model.fingerprint, "entries": [e.key for e in entries]}
    rows = read_results(folder)
    matrix_path = folder / "matrix.json"
    if rows or matrix_path.exists():
        if not resume:
            raise BenchError(
                f"{folder} already holds bench results; pass --resume to continue them, or use another --out"
            )
        old = json.loads(matrix_path.read_text()) if matrix_path.exists() else None
        if old != matrix:
            raise BenchError(
                f"{folder} holds results of a different matrix (settings or model changed); use another --out"
            )
    _write_atomic(matrix_path, json.dumps(matrix, indent=2) + "\n")
    env = _environment()
    done = {row["key"] for row in rows}
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    references = {}
    for g in sorted({e.guidance for e in entries}):
        references[g] = reference_samples(model, config.n, seed=config.seed, guidance=g)
        ref_entry = Entry(
            "reference", REFERENCE_SOLVER["solver"], {}, REFERENCE_SOLVER["schedule"], REFERENCE_SOLVER["steps"], g
        )
        if ref_entry.key not in done:
            quality = evaluate_mnist(references[g], None)
            save_grid(references[g][:50], grids / f"{ref_entry.key}.png", nrow=10, scale=2)
            rows.append({
                "key": ref_entry.key, "label": ref_entry.label, "library": "reference", "solver": ref_entry.solver,
                "options": {}, "schedule": ref_entry.schedule, "steps": ref_entry.steps, "guidance": g,
                "nfe": REFERENCE_SOLVER["steps"], "seconds": None, "images_per_second": None,
                "rmse_ref": 0.0, "psnr_ref": None, "grid": f"grids/{ref_entry.key}.png",
                **{k: quality[k] for k in QUALITY_KEYS},
                "model": model.info.name, "fingerprint": model.fingerprint, "n": config.n, "seed": config.seed,
                "environment": env,
            })  # fmt: skip
            _write_atomic(folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    todo = [e for e in entries if e.key not in done]
    for i, entry in enumerate(todo):
        row = _measure(model, entry, config, references[entry.guidance], grids)
        row |= {
            "model": model.info.name, "fingerprint": model.fingerprint, "n": config.n, "seed": config.seed,
            "repeats": config.repeats, "environment": env,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip
        rows.append(row)
        _write_atomic(folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if on_row is not None:
            on_row(row, i + 1, len(todo))
    return rows

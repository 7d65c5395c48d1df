"""Run the matrix: every configuration from the same noise, measured the same way, one JSON line each.

Results go to ``DIR/results.jsonl`` (rewritten atomically after each configuration, so a kill never
leaves a corrupt file) next to ``DIR/matrix.json`` (the expanded matrix). ``resume=True`` skips finished
configurations; a folder holding a different matrix is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .._io import write_text_atomic
from ..generate import Generation, generate, options_for_schedule
from ..metrics.cost import peak_memory_bytes, reset_peak_memory
from ..metrics.quality import evaluate_mnist
from ..metrics.reference import REFERENCE_SOLVER, psnr, reference_samples, rmse
from ..models.zoo import LoadedModel, load
from ..train import machine_description
from ..tune.plan import load_plan
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


WARMUP_N = 10  # images in the untimed warm-up run of each configuration


def _sample(model: LoadedModel, entry: Entry, config: BenchConfig, n: int | None = None) -> Generation:
    n = config.n if n is None else n
    if entry.solver == "plan":
        plan = load_plan(entry.options["file"])
        return generate(model, n, plan=plan, seed=config.seed, guidance=entry.guidance)
    if "accel" in entry.options or "cache_peer" in entry.options:
        return _sample_cached(model, entry, config, n)
    if "quant" in entry.options or "quant_peer" in entry.options:
        quantized, _ = _quantized_model(model, entry)
        return generate(quantized, n, solver=entry.solver, steps=entry.steps, seed=config.seed, guidance=entry.guidance)
    if entry.library == "hasten":
        return generate(
            model, n, solver=entry.solver, steps=entry.steps, schedule=entry.schedule or "auto",
            seed=config.seed, guidance=entry.guidance, **entry.options,
        )  # fmt: skip
    return diffusers_generate(model, n, entry.solver, steps=entry.steps, seed=config.seed, guidance=entry.guidance)


def _sample_cached(model: LoadedModel, entry: Entry, config: BenchConfig, n: int) -> Generation:
    from ..accel import AccelConfig
    from .cache_peers import peer_cache

    kwargs = {"solver": entry.solver, "steps": entry.steps, "seed": config.seed, "guidance": entry.guidance}
    if "accel" in entry.options:
        return generate(model, n, accel=AccelConfig.load(entry.options["accel"]), **kwargs)
    with peer_cache(entry.options["cache_peer"], model.network, entry.steps):
        return generate(model, n, **kwargs)


_QUANTIZED: dict[tuple[str, str], tuple[LoadedModel, dict[str, Any]]] = {}  # per bench run: loaded once


def _quantized_model(model: LoadedModel, entry: Entry) -> tuple[LoadedModel, dict[str, Any]]:
    """The quantised model of a quant row (a `hasten quantize` folder or a torchao peer), with its size and
    how it executes; refuses a folder quantised from another model."""
    from .quant_peers import quant_peer_model

    key = (model.fingerprint, json.dumps(entry.options, sort_keys=True))
    if key not in _QUANTIZED:
        if "quant_peer" in entry.options:
            _QUANTIZED[key] = quant_peer_model(model, entry.options["quant_peer"])
        else:
            quantized = load(entry.options["quant"])
            source = quantized.info.quantization["source"]
            if source["fingerprint"] != model.fingerprint:
                raise BenchError(
                    f"{entry.options['quant']} was quantised from {source['name']} ({source['fingerprint']}), not "
                    f"from the benchmarked model {model.info.name} ({model.fingerprint})"
                )
            execution = _execution_label(quantized.network)
            _QUANTIZED[key] = (quantized, {"bytes_on_disk": quantized.bytes_on_disk(), "execution": execution,
                                           "quantization": quantized.info.quantization})  # fmt: skip
    return _QUANTIZED[key]


def _execution_label(network: torch.nn.Module) -> str:
    """Which kernels the quantised layers of ``network`` run on its device, in words for the report."""
    from ..quant import execution_summary

    counts = execution_summary(network, next(network.buffers()).device)
    fast = {path: n for path, n in counts.items() if path != "simulated"}
    if not fast:
        return "simulated (fake-quantised float compute): no speed claim"
    kernels = ", ".join(f"{path} for {n}" for path, n in fast.items())
    return f"hasten kernels: {kernels} of {sum(counts.values())} quantised layers, the rest simulated"


def _measure(
    model: LoadedModel, entry: Entry, config: BenchConfig, reference: torch.Tensor, grids: pathlib.Path
) -> dict:
    _sample(model, entry, config, n=min(WARMUP_N, config.n))  # warm-up: first-call allocations, not timed
    peak_reset = reset_peak_memory()
    runs = [_sample(model, entry, config) for _ in range(config.repeats)]
    gen = runs[0]
    seconds = statistics.median(r.seconds for r in runs)
    quality = _quality(model, gen.images01, gen.labels)
    save_grid(gen.images01[:50], grids / f"{entry.key}.png", nrow=10, scale=2)
    return {
        "key": entry.key,
        "label": entry.label,
        "library": entry.library,
        "solver": entry.solver,
        # as run: generate() matches the integration space to the model (space="flow" for Heun/PLMS on flow)
        "options": options_for_schedule(entry.solver, model.schedule, entry.options)
        if entry.library == "hasten" and entry.solver != "plan"
        else entry.options,
        "schedule": entry.schedule,
        "steps": entry.steps,
        "guidance": entry.guidance,
        "nfe": gen.nfe,
        "seconds": seconds,
        "seconds_all": [r.seconds for r in runs],
        "images_per_second": config.n / seconds,
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_scope": "this configuration" if peak_reset else "process so far",
        "accel_stats": gen.accel_stats,
        **_model_facts(model, entry),
        "rmse_ref": rmse(gen.images01, reference),
        "psnr_ref": psnr(gen.images01, reference),
        "grid": f"grids/{entry.key}.png",
        **{k: quality[k] for k in QUALITY_KEYS},
        "label_accuracy": quality.get("label_accuracy"),
    }


def _quality(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """FD, precision/recall and the rest on MNIST models; other data has no bundled feature network, so a
    pipeline's rows report the error to the reference solve (and cost) only."""
    if model.info.data == "mnist":
        return evaluate_mnist(images, labels)
    return dict.fromkeys((*QUALITY_KEYS, "label_accuracy"))


def _model_facts(model: LoadedModel, entry: Entry) -> dict[str, Any]:
    """Size on disk and execution of the network a hasten or torchao row ran (quantisation rows above all)."""
    if "quant" in entry.options or "quant_peer" in entry.options:
        return dict(_quantized_model(model, entry)[1])
    if entry.library == "hasten":
        dtype = next(model.network.parameters()).dtype
        return {"bytes_on_disk": model.bytes_on_disk(), "execution": str(dtype).removeprefix("torch.")}
    return {}


def _same_matrix(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a folder's matrix is this one; options added to BenchConfig since the folder was written
    count as equal when the new matrix has them at their defaults (an upgrade must not orphan results)."""
    if old is None:
        return False
    defaults = BenchConfig().to_dict()
    old_config, new_config = dict(old.get("config", {})), dict(new["config"])
    for key in [k for k in new_config if k not in old_config and new_config[k] == defaults.get(k)]:
        del new_config[key]
    return {**old, "config": old_config} == {**new, "config": new_config}


class _Results:
    """The folder's ``results.jsonl`` and ``matrix.json``: refuses a foreign matrix, rewrites atomically."""

    def __init__(self, folder: pathlib.Path, matrix: dict[str, Any], resume: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.rows = read_results(folder)
        matrix_path = folder / "matrix.json"
        if self.rows or matrix_path.exists():
            if not resume:
                raise BenchError(
                    f"{folder} already holds bench results; pass --resume to continue them, or use another --out"
                )
            old = json.loads(matrix_path.read_text()) if matrix_path.exists() else None
            if not _same_matrix(old, matrix):
                raise BenchError(
                    f"{folder} holds results of a different matrix (settings or model changed); use another --out"
                )
        write_text_atomic(matrix_path, json.dumps(matrix, indent=2) + "\n")
        self.done = {row["key"] for row in self.rows}

    def log_run(self, started: float, measured: int) -> None:
        """Append this invocation's wall time (loading, reference, every row and its metrics) to ``runs.json``."""
        path = self.folder / "runs.json"
        runs = json.loads(path.read_text()) if path.exists() else []
        runs.append({
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - started, "rows_measured": measured,
        })  # fmt: skip
        write_text_atomic(path, json.dumps(runs, indent=2) + "\n")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.done.add(row["key"])
        write_text_atomic(self.folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))


def _stamp(model: str, fingerprint: str, config: BenchConfig, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "fingerprint": fingerprint, "n": config.n, "seed": config.seed, "repeats": config.repeats,
        "environment": env, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def run_bench(
    config: BenchConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) the matrix of ``config`` into ``out``; returns all rows, old and new.

    ``config.model == "gmm"`` benchmarks hasten's solvers on the analytic mixture instead: exact errors
    (``rmse_ref`` is the RMSE to the exact probability-flow solution), no FD, in seconds.
    """
    started = time.perf_counter()
    folder = pathlib.Path(out)
    if config.model == "gmm":
        return _run_gmm(config, folder, resume, on_row, started)
    _QUANTIZED.clear()
    own_scheduler = None
    if config.pipeline is not None:
        model = config.pipeline.load()
        # the guidance the pipeline runs at (hasten's CFG; Flux's distilled guidance is an input, not a row)
        config = dataclasses.replace(config, guidance=(model.default_guidance,))
        own_scheduler = type(model.pipeline.scheduler).__name__
    else:
        model = load(config.model)
        if model.info.data != "mnist":
            raise BenchError(
                f"bench measures MNIST models and diffusers pipelines (--pipeline); {model.info.name!r} is trained "
                f"on {model.info.data!r}"
            )
    entries = expand(config, objective=model.info.objective, conditional=model.unconditional() is not None,
                     network=model.network, own_scheduler=own_scheduler)  # fmt: skip
    matrix = {"config": config.to_dict(), "model_fingerprint": model.fingerprint, "entries": [e.key for e in entries]}
    if model.condition_key:  # a pipeline's prompts: other prompts are another matrix
        matrix["condition"] = model.condition_key
    results = _Results(folder, matrix, resume)
    env = _environment()
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    references = {}
    for g in sorted({e.guidance for e in entries}):
        steps = config.reference_steps
        references[g] = reference_samples(model, config.n, seed=config.seed, guidance=g, steps=steps)
        ref = Entry(
            "reference", REFERENCE_SOLVER["solver"], REFERENCE_SOLVER["options"], REFERENCE_SOLVER["schedule"], steps, g
        )
        if ref.key not in results.done:
            quality = _quality(model, references[g], None)
            save_grid(references[g][:50], grids / f"{ref.key}.png", nrow=10, scale=2)
            results.add({
                "key": ref.key, "label": ref.label, "library": "reference", "solver": ref.solver,
                "options": ref.options, "schedule": ref.schedule, "steps": ref.steps, "guidance": g,
                "nfe": ref.steps + 1,  # the Taylor 3M's singlestep start makes one extra call
                "seconds": None,
                "images_per_second": None, "rmse_ref": 0.0, "psnr_ref": None, "grid": f"grids/{ref.key}.png",
                **{k: quality[k] for k in QUALITY_KEYS}, **_stamp(model.info.name, model.fingerprint, config, env),
            })  # fmt: skip
    todo = [e for e in entries if e.key not in results.done]
    measured = 0
    try:
        for i, entry in enumerate(todo):
            row = _measure(model, entry, config, references[entry.guidance], grids)
            results.add(row | _stamp(model.info.name, model.fingerprint, config, env))
            measured += 1
            if on_row is not None:
                on_row(row, i + 1, len(todo))
    finally:  # an interrupted run (Ctrl-C) still records its time
        results.log_run(started, measured)
    return results.rows


GMM_SHAPE = (1, 8, 8)  # 64 independent coordinates per "image"
GMM_SIGMA_MAX = 80.0


def _run_gmm(config: BenchConfig, folder: pathlib.Path, resume: bool, on_row, started: float) -> list[dict[str, Any]]:
    """hasten's solvers on the analytic product mixture, against its exact PF-ODE solution."""
    from ..models.analytic import ProductMixture
    from ..schedules import VE, get_sigmas
    from ..solvers import sample

    mixture, schedule = ProductMixture(), VE(0.002, GMM_SIGMA_MAX)
    # Plans are made for one network's weights; the analytic mixture has none.
    entries = [
        e for e in expand(config, objective="gmm", conditional=False) if e.library == "hasten" and e.solver != "plan"
    ]
    matrix = {"config": config.to_dict(), "model_fingerprint": "gmm", "entries": [e.key for e in entries]}
    results = _Results(folder, matrix, resume)
    env = _environment()
    gen = torch.Generator().manual_seed(config.seed)
    x = mixture.sample((config.n, *GMM_SHAPE), sigma=GMM_SIGMA_MAX, generator=gen)  # exact p_sigma_max
    exact = mixture.exact_flow(x, GMM_SIGMA_MAX, 0.0)
    x32 = x.float()
    todo = [e for e in entries if e.key not in results.done]
    for i, entry in enumerate(todo):
        sigmas = get_sigmas(entry.schedule or "auto", entry.steps, schedule)
        times, out = [], None
        for _ in range(config.repeats):
            start = time.perf_counter()
            out = sample(mixture, x32, sigmas, entry.solver, generator=torch.Generator().manual_seed(config.seed + 1),
                         return_info=True, **entry.options)  # fmt: skip
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        row = {
            "key": entry.key, "label": entry.label, "library": "hasten", "solver": entry.solver,
            "options": entry.options, "schedule": entry.schedule, "steps": entry.steps, "guidance": 1.0,
            "nfe": out.nfe, "seconds": seconds, "seconds_all": times, "images_per_second": config.n / seconds,
            "fd": None, "rmse_ref": rmse(out.x, exact), "exact_error": rmse(out.x, exact), "psnr_ref": None,
        }  # fmt: skip
        results.add(row | _stamp("gmm", "gmm", config, env))
        if on_row is not None:
            on_row(row, i + 1, len(todo))
    results.log_run(started, len(todo))
    return results.rows

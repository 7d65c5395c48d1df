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
from ..recipe import Recipe
from ..train import machine_description
from ..tune.plan import load_plan
from ..viz import save_grid
from .matrix import BenchConfig, Entry, expand
from .peers import diffusers_generate

__all__ = ["BenchError", "read_results", "run_bench", "sample_recipe"]

ROW_KEYS = ("library", "solver", "schedule", "nfe", "seconds", "fd", "rmse_ref")  # present in every row
QUALITY_KEYS = ("fd", "fd_real_vs_real", "precision", "recall", "confidence", "memorised_share")


class BenchError(ValueError):
    """A bench that cannot start as asked (its message says what to do)."""


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(folder) / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}, is not valid JSON ({err.msg} at column {err.colno}); fix or remove that "
                "line (a bench rerun with --resume measures its row again)"
            ) from None
    return rows


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
    return sample_recipe(model, entry_recipe(model, entry, config), config.n if n is None else n)


def entry_recipe(model: LoadedModel, entry: Entry, config: BenchConfig) -> Recipe:
    """The recipe a bench entry measures."""
    common = {"model": model.info.name, "fingerprint": model.fingerprint, "guidance": entry.guidance,
              "seed": config.seed}  # fmt: skip
    options = dict(entry.options)
    if entry.library == "diffusers" and not {"cache_peer", "quant_peer"} & set(options):
        return Recipe(library="diffusers", solver=entry.solver, options=options, steps=entry.steps, **common)
    if entry.solver == "plan":
        plan = load_plan(options["file"])
        return Recipe(plan=plan, provenance={"plan_file": options["file"]}, **common)
    sampler = {"solver": entry.solver, "steps": entry.steps, "schedule": entry.schedule or "auto"}
    if "accel" in options:
        return Recipe.from_files(model, accel=options["accel"], **sampler, guidance=entry.guidance, seed=config.seed)
    if "cache_peer" in options:
        return Recipe(cache_peer=options["cache_peer"], **sampler, **common)
    if "quant" in options:
        return Recipe.from_files(model, quant=options["quant"], **sampler, guidance=entry.guidance, seed=config.seed)
    if "quant_peer" in options:
        return Recipe(quant_peer=options["quant_peer"], **sampler, **common)
    return Recipe(options=options, **sampler, **common)


def sample_recipe(model: LoadedModel, recipe: Recipe, n: int, *, seed: int | None = None) -> Generation:
    """Sample any recipe on ``model`` (the full-precision model it names): hasten's loop with its plan, cache
    and quantised weights, or a peer's scheduler, cache or quantisation on the same noise. The one place a
    bench row (and an ``optimize`` candidate) is run."""
    seed = recipe.seed if seed is None else seed
    if recipe.library == "diffusers":
        guidance = recipe.effective_guidance
        return diffusers_generate(model, n, recipe.solver, steps=recipe.steps, seed=seed,
                                  guidance=model.default_guidance if guidance is None else guidance)  # fmt: skip
    if recipe.quant is not None or recipe.quant_peer is not None:
        quantized, _ = _quantized_model(model, recipe)
        if recipe.quant_peer is None:
            return generate(quantized, n, recipe=recipe, seed=seed)
        return generate(quantized, n, seed=seed, **recipe.replace(quant_peer=None).generate_kwargs())
    if recipe.cache_peer is not None:
        from .cache_peers import peer_cache

        with peer_cache(recipe.cache_peer, model.network, recipe.steps):
            return generate(model, n, seed=seed, **recipe.replace(cache_peer=None).generate_kwargs())
    return generate(model, n, recipe=recipe, seed=seed)


_QUANTIZED: dict[tuple[str, str], tuple[LoadedModel, dict[str, Any]]] = {}  # per bench run: loaded once


def _quantized_model(model: LoadedModel, recipe: Recipe) -> tuple[LoadedModel, dict[str, Any]]:
    """The quantised model of a quant recipe (a `hasten quantize` folder or a torchao peer), with its size and
    how it executes; refuses a folder quantised from another model."""
    from .quant_peers import quant_peer_model

    key = (model.fingerprint, recipe.quant_peer or str(recipe.quant), recipe.execution)
    if key not in _QUANTIZED:
        if recipe.quant_peer is not None:
            _QUANTIZED[key] = quant_peer_model(model, recipe.quant_peer)
        else:
            if recipe.fingerprint != model.fingerprint:
                raise BenchError(
                    f"the recipe's weights ({recipe.fingerprint[:12]}) are not the benchmarked model's "
                    f"{model.info.name} ({model.fingerprint[:12]})"
                )
            quantized = recipe.load_model()
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
        **_model_facts(model, entry, config),
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


def _model_facts(model: LoadedModel, entry: Entry, config: BenchConfig) -> dict[str, Any]:
    """Size on disk and execution of the network a hasten or torchao row ran (quantisation rows above all)."""
    if "quant" in entry.options or "quant_peer" in entry.options:
        return dict(_quantized_model(model, entry_recipe(model, entry, config))[1])
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


def _matrix_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between a folder's matrix and this run's, in words (``n 10 -> 20, the model's weights``)."""
    if old is None:
        return "the folder has no matrix.json"
    old_config, new_config = old.get("config", {}), new["config"]
    changed = [f"{k} {old_config.get(k)!r} -> {new_config.get(k)!r}" for k in sorted({*old_config, *new_config})
               if old_config.get(k) != new_config.get(k)]  # fmt: skip
    if old.get("model_fingerprint") != new.get("model_fingerprint"):
        changed.append("the model's weights")
    if old.get("condition") != new.get("condition"):
        changed.append("the prompts")
    if not changed and old.get("entries") != new.get("entries"):
        changed.append("the rows (another hasten version or installed peers)")
    return ", ".join(changed) or "settings changed"


def _check_rows(model: LoadedModel, entries: list[Entry], config: BenchConfig) -> None:
    """Check every row's recipe against the model before the first row runs (a plan for other weights, a cache
    for another setting or network, a folder quantised from another model): a bad input stops the bench before
    it writes anything, not halfway through."""
    for entry in entries:
        try:
            recipe = entry_recipe(model, entry, config)
            if recipe.cache is not None:  # (a quantised folder's source is checked as the recipe is built)
                recipe.check_model(model)
        except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
            raise BenchError(f"row {entry.label}: {err.args[0] if err.args else err}") from None


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
                    f"{folder} holds results of a different matrix ({_matrix_differences(old, matrix)}); run with "
                    "those settings to continue it, or use another --out"
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
    _check_rows(model, entries, config)
    results = _Results(folder, matrix, resume)
    env = _environment()
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    references = {}
    for g in sorted({e.guidance for e in entries}):
        steps = config.reference_steps
        references[g] = reference_samples(model, config.n, seed=config.seed, guidance=g, steps=steps)
        ref = Entry("reference", REFERENCE_SOLVER["solver"], {}, REFERENCE_SOLVER["schedule"], steps, g)
        if ref.key not in results.done:
            quality = _quality(model, references[g], None)
            save_grid(references[g][:50], grids / f"{ref.key}.png", nrow=10, scale=2)
            results.add({
                "key": ref.key, "label": ref.label, "library": "reference", "solver": ref.solver, "options": {},
                "schedule": ref.schedule, "steps": ref.steps, "guidance": g, "nfe": ref.steps, "seconds": None,
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

"""Run the matrix: every recipe from the same noise, measured the same way, one JSON line each.

Results go to ``DIR/results.jsonl`` (rewritten atomically after each row, so a kill never leaves a corrupt
file) next to ``DIR/matrix.json`` (the expanded matrix). Each row records its ``recipe`` (JSON), its ``kind``
(``recipe.kind``, or ``"reference"``), its ``key`` (``recipe.key``) and its ``label`` (``recipe.describe()``).
``resume=True`` skips finished rows; a folder holding a different matrix, or written by an older hasten
(another :data:`~hasten.bench.matrix.MATRIX_VERSION`), is refused.

A student row (``--student``) samples the student's network at its own sampler from the same noise and is
scored against the benchmarked (teacher) model's reference solve at the guidance the student learned; its row
adds ``training`` (method, teacher, training seconds and device, from the student's distillation record).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..generate import Generation, generate, options_for_schedule
from ..metrics.cost import peak_memory_bytes, reset_peak_memory
from ..metrics.quality import evaluate_mnist
from ..metrics.reference import REFERENCE_SOLVER, reference_error, reference_samples, rmse
from ..models.zoo import LoadedModel, load
from ..recipe import STUDENT_RECORD, Recipe
from ..seeds import NOISE_CONVENTION
from ..viz import save_grid
from .matrix import MATRIX_VERSION, BenchConfig, expand, row_library
from .peers import diffusers_generate
from .store import BenchError, _environment, _Results, _stamp, read_results

__all__ = ["BenchError", "read_results", "recipe_model", "run_bench", "sample_recipe"]

ROW_KEYS = ("library", "solver", "schedule", "nfe", "seconds", "fd", "rmse_ref")  # present in every row
QUALITY_KEYS = ("fd", "fd_real_vs_real", "precision", "recall", "confidence", "memorised_share")


WARMUP_N = 10  # images in the untimed warm-up run of each configuration
GRID_N = 50  # images in each row's grid
GENERATE_BATCH = 256  # generate()'s batch size, which bench rows sample at: the chunks of the per-sample metrics


def _sample(model: LoadedModel, recipe: Recipe, config: BenchConfig, n: int | None = None) -> Generation:
    # under torchrun (samples split): each process keeps its rows, only per-sample results are gathered
    return sample_recipe(model, recipe, config.n if n is None else n, gather=False)


def sample_recipe(
    model: LoadedModel, recipe: Recipe, n: int, *, seed: int | None = None, gather: bool = True
) -> Generation:
    """Sample any recipe on ``model`` (the full-precision model it names): hasten's loop with its plan, cache
    and quantised weights, or a peer's scheduler, cache or quantisation on the same noise. The one place a
    bench row (and an ``optimize`` candidate) is run. A student's recipe runs on the student it names (loaded
    once; ``model`` is its teacher). Every recipe runs on the current noise convention (:mod:`hasten.seeds`), the
    one its references are solved from, whatever convention a saved recipe carries. ``gather`` is
    :func:`hasten.generate`'s (under torchrun: every process gets the whole set, or keeps its own rows)."""
    seed = recipe.seed if seed is None else seed
    recipe = recipe if recipe.noise == NOISE_CONVENTION else recipe.replace(noise=NOISE_CONVENTION)
    model = recipe_model(model, recipe)
    if recipe.library == "diffusers":
        own = getattr(getattr(model, "pipeline", None), "scheduler", None)
        named = recipe.options.get("scheduler")
        if recipe.solver == "pipeline" and named is not None and own is not None and type(own).__name__ != named:
            raise BenchError(f"the recipe runs the pipeline's own {named}; this pipeline's is {type(own).__name__}")
        guidance = recipe.effective_guidance
        return diffusers_generate(model, n, recipe.solver, steps=recipe.steps, seed=seed, gather=gather,
                                  guidance=model.default_guidance if guidance is None else guidance)  # fmt: skip
    if recipe.quant is not None or recipe.quant_peer is not None:
        quantized, _ = _quantized_model(model, recipe)
        if recipe.quant_peer is None:
            return generate(quantized, n, recipe=recipe, seed=seed, gather=gather)
        return generate(quantized, n, seed=seed, gather=gather, **recipe.replace(quant_peer=None).generate_kwargs())
    if recipe.cache_peer is not None:
        from .cache_peers import peer_cache

        with peer_cache(recipe.cache_peer, model.network, recipe.steps):
            return generate(model, n, seed=seed, gather=gather, **recipe.replace(cache_peer=None).generate_kwargs())
    return generate(model, n, recipe=recipe, seed=seed, gather=gather)


_QUANTIZED: dict[tuple[str, str], tuple[LoadedModel, dict[str, Any]]] = {}  # per bench run: loaded once
_STUDENTS: dict[str, LoadedModel] = {}  # by weights fingerprint: loaded once


def recipe_model(model: LoadedModel, recipe: Recipe) -> LoadedModel:
    """The full-precision model ``recipe`` samples: ``model``, or for a distilled student's recipe (judged
    against ``model``, its teacher) the student it names, loaded once and checked against the recipe."""
    if recipe.student is None or recipe.fingerprint == model.fingerprint:
        return model
    if recipe.fingerprint not in _STUDENTS:
        student = load(recipe.model, device=next(model.network.parameters()).device)
        if student.fingerprint != recipe.fingerprint:  # the folder holds other weights now than when it was named
            raise BenchError(f"student {recipe.model!r} holds weights {student.fingerprint[:12]}, not the recipe's "
                             f"{recipe.fingerprint[:12]}")  # fmt: skip
        _STUDENTS[recipe.fingerprint] = student
    return _STUDENTS[recipe.fingerprint]


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


def _guidance(model: LoadedModel, recipe: Recipe) -> float:
    """The guidance scale a row samples at (the model's default where the recipe leaves it open)."""
    guidance = recipe.effective_guidance
    return float(model.default_guidance if guidance is None else guidance)


def reference_guidance(model: LoadedModel, recipe: Recipe) -> float:
    """The guidance scale of the reference solve a row is judged against: the one it samples at, or for a
    student the teacher guidance whose samples it learned (a guidance-distilled student samples at 1)."""
    student = recipe.student
    return float(student.get("teacher_guidance", 1.0)) if student is not None else _guidance(model, recipe)


def _recipe_fields(recipe: Recipe, kind: str) -> dict[str, Any]:
    """What every row says about its recipe: key, label, kind and the recipe itself (JSON)."""
    key = recipe.key if kind != "reference" else f"reference-{recipe.key}"
    label = recipe.describe() if kind != "reference" else f"reference: {recipe.describe()}"
    return {"key": key, "label": label, "kind": kind, "recipe": recipe.to_dict()}


def _measure(
    teacher: LoadedModel, recipe: Recipe, config: BenchConfig, reference: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor]:
    """A row and the images of its grid (the first 50 samples), for the writer to save."""
    model = recipe_model(teacher, recipe)  # a student's row runs its own network
    _sample(model, recipe, config, n=min(WARMUP_N, config.n))  # warm-up: first-call allocations, not timed
    peak_reset = reset_peak_memory()
    runs = [_sample(model, recipe, config) for _ in range(config.repeats)]
    gen = runs[0]
    seconds = statistics.median(r.seconds for r in runs)
    quality = _quality(model, gen.images01, gen.labels, shard=True)
    error, peak = reference_error(gen.images01, reference[gen.rows.start : gen.rows.stop])
    grid = distributed.gather_rows(gen.images01[: max(0, min(len(gen.images01), GRID_N - gen.rows.start))])
    hasten_loop = recipe.library == "hasten"
    row = {
        **_recipe_fields(recipe, recipe.kind),
        "library": row_library(recipe),
        "solver": recipe.solver,
        # as run: generate() matches the integration space to the model (space="flow" for Heun/PLMS on flow)
        "options": options_for_schedule(recipe.solver, model.schedule, recipe.options)
        if hasten_loop and recipe.plan is None
        else dict(recipe.options),
        "schedule": recipe.schedule if hasten_loop else None,  # a diffusers scheduler spaces its own steps
        "steps": recipe.steps,
        "guidance": _guidance(model, recipe),
        "nfe": gen.nfe,
        "nfe_equivalent": nfe_equivalent(gen, recipe),
        "seconds": seconds,
        "seconds_all": [r.seconds for r in runs],
        "images_per_second": config.n / seconds,
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_scope": "this configuration" if peak_reset else "process so far",
        "accel_stats": gen.accel_stats,
        **_model_facts(model, recipe),
        "rmse_ref": error,
        "psnr_ref": peak,
        "grid": f"grids/{recipe.key}.png",
        **{k: quality[k] for k in QUALITY_KEYS},
        "label_accuracy": quality.get("label_accuracy"),
        **_training(recipe),
    }
    return row, grid


def nfe_equivalent(gen: Any, recipe: Recipe) -> float:
    """Network calls in full-call units: a cache's FLOP-weighted count (its stats), a skipping plan's cost per call
    (:attr:`hasten.tune.Plan.cost`), else the calls themselves."""
    stats = gen.accel_stats or {}
    if "nfe_equivalent" in stats:
        return float(stats["nfe_equivalent"])
    plan = recipe.plan
    if plan is not None and plan.cost is not None and plan.nfe:
        return gen.nfe * plan.cost / plan.nfe
    return float(gen.nfe)


def _training(recipe: Recipe) -> dict[str, Any]:
    """A student row's training cost and origin (its distillation record), beside its quality and speed."""
    student = recipe.student
    if student is None:
        return {}
    return {"training": {k: student[k] for k in (*STUDENT_RECORD, "training_seconds")}}


def _quality(
    model: LoadedModel, images: torch.Tensor, labels: torch.Tensor | None, *, shard: bool = False
) -> dict[str, Any]:
    """FD, precision/recall and the rest on MNIST models; other data has no bundled feature network, so a
    pipeline's rows report the error to the reference solve (and cost) only."""
    if model.info.data == "mnist":  # shard: images are this process's rows under torchrun (whole generate() batches)
        return evaluate_mnist(images, labels, chunk=GENERATE_BATCH, shard=shard)
    return dict.fromkeys((*QUALITY_KEYS, "label_accuracy"))


def _model_facts(model: LoadedModel, recipe: Recipe) -> dict[str, Any]:
    """Size on disk and execution of the network a hasten-loop row ran (quantisation rows above all)."""
    if recipe.quant is not None or recipe.quant_peer is not None:
        return dict(_quantized_model(model, recipe)[1])
    if recipe.library == "hasten":
        dtype = next(model.network.parameters()).dtype
        return {"bytes_on_disk": model.bytes_on_disk(), "execution": str(dtype).removeprefix("torch.")}
    return {}


def _check_runnable(model: LoadedModel, recipes: list[Recipe]) -> None:
    """Refuse, before anything runs, a recipe this model cannot run: a peer sampler, cache or quantisation that
    does not apply (or is not installed), a cache its network cannot take, quantised weights from other weights
    (loaded once here, then reused by their rows)."""
    from .cache_peers import cache_peers_for
    from .peers import PEERS
    from .quant_peers import quant_peers_available

    for recipe in recipes:
        where = f"row {recipe.describe()!r}"
        if recipe.library == "diffusers":
            if recipe.solver == "pipeline" and getattr(model, "pipeline", None) is None:
                raise BenchError(f"{where}: the pipeline's own scheduler needs a pipeline (--pipeline DIR)")
            if recipe.solver in PEERS and model.info.objective not in PEERS[recipe.solver].objectives:
                raise BenchError(f"{where}: {recipe.solver} does not support {model.info.objective!r} models")
        if recipe.cache_peer is not None and recipe.cache_peer not in cache_peers_for(model.network)[0]:
            raise BenchError(f"{where}: peer cache {recipe.cache_peer!r} does not apply to this network or is not "
                             "installed (pip install 'hasten[peers]')")  # fmt: skip
        if recipe.quant_peer is not None and recipe.quant_peer not in quant_peers_available():
            raise BenchError(f"{where}: torchao config {recipe.quant_peer!r} is unknown or torchao is not installed")
        row_model = recipe_model(model, recipe)  # a student: loaded (and checked against its recipe) now
        if recipe.quant is not None:
            _quantized_model(row_model, recipe)
        elif recipe.library == "hasten" and recipe.cache is not None:
            recipe.check_model(row_model)


SHARDS = ("auto", "rows", "samples")


def run_bench(
    config: BenchConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
    shard: str = "auto",
) -> list[dict[str, Any]]:
    """Run (or continue) the matrix of ``config`` into ``out``; returns all rows, old and new.

    Under ``torchrun`` the work is split over the processes by ``shard``: ``"rows"`` gives each process whole
    rows (round-robin; each samples its rows alone), ``"samples"`` splits every row's samples by index
    (:mod:`hasten.distributed`); ``"auto"`` takes rows while there are at least as many rows to run as processes
    (no per-row waits, no idle process on a small ``n``), samples otherwise. Either way every row's samples, metrics
    and key are those of one process; its ``seconds`` are measured as run, and ``environment`` records how.

    ``config.model == "gmm"`` benchmarks hasten's solvers on the analytic mixture instead: exact errors
    (``rmse_ref`` is the RMSE to the exact probability-flow solution), no FD, in seconds. A masked (discrete)
    model's bench compares its discrete samplers at equal call budgets (:mod:`hasten.bench.masked`).
    """
    started = time.perf_counter()
    folder = pathlib.Path(out)
    if shard not in SHARDS:
        raise BenchError(f"shard must be one of {', '.join(SHARDS)}, got {shard!r}")
    if config.model == "gmm":
        return _run_gmm(config, folder, resume, on_row, started)
    from ..discrete import is_masked_folder

    if config.pipeline is None and is_masked_folder(config.model):
        from .masked import run_masked_bench

        return run_masked_bench(config, folder, resume, on_row, started)
    _QUANTIZED.clear()
    _STUDENTS.clear()
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
    name = config.pipeline.folder if config.pipeline is not None else config.model  # how the recipes name it
    recipes = expand(config, objective=model.info.objective, conditional=model.unconditional() is not None,
                     network=model.network, own_scheduler=own_scheduler, model=name,
                     fingerprint=model.fingerprint)  # fmt: skip
    _check_runnable(model, recipes)
    matrix = {"version": MATRIX_VERSION, "config": config.to_dict(), "model_fingerprint": model.fingerprint,
              "entries": [r.key for r in recipes]}  # fmt: skip
    if model.condition_key:  # a pipeline's prompts: other prompts are another matrix
        matrix["condition"] = model.condition_key
    results = _Results(folder, matrix, resume)
    todo = [r for r in recipes if r.key not in results.done]
    processes = distributed.world_size() if distributed.sharding() else 1
    by_rows = processes > 1 and (shard == "rows" or (shard == "auto" and len(todo) >= processes))
    how = ("rows" if by_rows else "samples") if processes > 1 else None
    env = {**_environment(), "processes": processes, "shard": how}
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    references = {}
    for g in sorted({reference_guidance(model, r) for r in recipes}):
        steps = config.reference_steps
        references[g] = reference_samples(model, config.n, seed=config.seed, guidance=g, steps=steps)
        ref = Recipe(model=name, fingerprint=model.fingerprint, solver=REFERENCE_SOLVER["solver"],
                     options=REFERENCE_SOLVER["options"], schedule=REFERENCE_SOLVER["schedule"], steps=steps,
                     guidance=g, seed=config.seed)  # fmt: skip
        fields = _recipe_fields(ref, "reference")
        if fields["key"] not in results.done:
            quality = _quality(model, references[g], None)
            save_grid(references[g][:50], grids / f"{fields['key']}.png", nrow=10, scale=2)
            results.add({
                **fields, "library": "reference", "solver": ref.solver, "options": dict(ref.options),
                "schedule": ref.schedule, "steps": ref.steps, "guidance": g,
                "nfe": ref.steps + 1,  # the Taylor 3M's singlestep start makes one extra call
                "seconds": None, "images_per_second": None, "rmse_ref": 0.0, "psnr_ref": None,
                "grid": f"grids/{fields['key']}.png",
                **{k: quality[k] for k in QUALITY_KEYS}, **_stamp(model.info.name, model.fingerprint, config, env),
            })  # fmt: skip
    measured = 0

    def measure(recipe: Recipe) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        row, grid = _measure(model, recipe, config, references[reference_guidance(model, recipe)])
        return row | _stamp(model.info.name, model.fingerprint, config, env), {"grid": grid}

    try:
        # rows: each process measures todo[k + rank] of every round alone, rank 0 writes the round in order
        per_round = processes if by_rows else 1
        for first in range(0, len(todo), per_round):
            if by_rows:  # each process measures one row alone; rank 0 gets every row and grid
                done = distributed.map_tasks(measure, todo[first : first + per_round], tensors=True)
            else:
                done = [measure(todo[first])]
            for row, arrays in done:
                save_grid(arrays["grid"], folder / row["grid"], nrow=10, scale=2)
                results.add(row)
                measured += 1
                if on_row is not None:
                    on_row(row, measured, len(todo))
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

    extras = [flag for flag, given in (("--plan", config.plans), ("--accel", config.accels),
                                       ("--quant", config.quants), ("--recipe", config.recipes),
                                       ("--student", config.students)) if given]  # fmt: skip
    if extras:
        raise BenchError(
            "--model gmm benchmarks hasten's solvers on the analytic mixture, which has no network: "
            f"{', '.join(extras)} rows need a model (--model NAME)"
        )
    mixture, schedule = ProductMixture(), VE(0.002, GMM_SIGMA_MAX)
    recipes = [r for r in expand(config, objective="gmm", conditional=False, model="gmm") if r.kind == "stock"]
    matrix = {"version": MATRIX_VERSION, "config": config.to_dict(), "model_fingerprint": "gmm",
              "entries": [r.key for r in recipes]}  # fmt: skip
    results = _Results(folder, matrix, resume)
    env = _environment()
    gen = torch.Generator().manual_seed(config.seed)
    x = mixture.sample((config.n, *GMM_SHAPE), sigma=GMM_SIGMA_MAX, generator=gen)  # exact p_sigma_max
    exact = mixture.exact_flow(x, GMM_SIGMA_MAX, 0.0)
    x32 = x.float()
    todo = [r for r in recipes if r.key not in results.done]
    for i, recipe in enumerate(todo):
        sigmas = get_sigmas(recipe.schedule, recipe.steps, schedule)
        times, out = [], None
        for _ in range(config.repeats):
            start = time.perf_counter()
            out = sample(mixture, x32, sigmas, recipe.solver, generator=torch.Generator().manual_seed(config.seed + 1),
                         return_info=True, **recipe.options)  # fmt: skip
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        row = {
            **_recipe_fields(recipe, recipe.kind), "library": "hasten", "solver": recipe.solver,
            "options": dict(recipe.options), "schedule": recipe.schedule, "steps": recipe.steps, "guidance": 1.0,
            "nfe": out.nfe, "seconds": seconds, "seconds_all": times, "images_per_second": config.n / seconds,
            "fd": None, "rmse_ref": rmse(out.x, exact), "exact_error": rmse(out.x, exact), "psnr_ref": None,
        }  # fmt: skip
        results.add(row | _stamp("gmm", "gmm", config, env))
        if on_row is not None:
            on_row(row, i + 1, len(todo))
    results.log_run(started, len(todo))
    return results.rows

"""The bench of a masked (discrete) diffusion model: its samplers at equal network-call budgets.

Every row is one discrete sampler spec (``config.solvers``, e.g. ``first_hitting:order=confidence``) at one call
budget (``config.steps``: the ancestral sampler's steps, the first-hitting sampler's ``calls``; a spec that sets
its own budget is one row) and guidance scale, sampled from the same per-sample seeds, scored against the
held-out digits binarised at 0.5 (``data="mnist-binary"``: FD, precision/recall, classifier confidence and
label accuracy; the binarised real-vs-real FD at the same n beside). ``nfe`` is the most network calls any sample
took and ``mean_calls`` the average (the ancestral sampler skips calls where nothing changed). There is no
reference solve: a discrete sampler has no converged trajectory to compare to, so ``rmse_ref`` is None.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
from typing import Any

from ..metrics.quality import evaluate_images
from ..viz import save_grid
from .matrix import MATRIX_VERSION
from .store import BenchError, _environment, _Results, _stamp

__all__ = ["MASKED_SOLVERS", "MASKED_STEPS", "masked_rows", "run_masked_bench"]

# the samplers and call budgets a masked model's bench runs unless --solver / --steps say otherwise
MASKED_SOLVERS = ("ancestral", "first_hitting", "first_hitting:order=left_to_right", "first_hitting:order=confidence")
MASKED_STEPS = {"quick": (16, 64), "standard": (16, 64, 256), "full": (16, 32, 64, 128, 256, 784)}
QUALITY = ("fd", "fd_real_vs_real", "precision", "recall", "confidence", "label_accuracy", "memorised_share")


def masked_rows(config: Any, length: int) -> list[tuple[str, Any, float]]:
    """``(key, sampler, guidance)`` of every row, each sampler checked against the model's ``length`` now."""
    from ..discrete import parse_discrete_sampler
    from ..solvers._base import split_spec

    rows = []
    for spec in config.solvers:
        _, options = split_spec(spec)
        budgets: tuple[int | None, ...] = config.steps
        if {"steps", "calls", "tokens_per_call"} & set(options) or not config.steps:
            budgets = (None,)  # the spec sets its own budget
        for budget in budgets:
            try:
                sampler = parse_discrete_sampler(spec, budget)
                sampler.check_length(length)
            except (KeyError, TypeError, ValueError) as err:
                message = err.args[0] if err.args else str(err)
                raise ValueError(f"bench row {spec!r} at budget {budget}: {message}") from None
            for guidance in config.guidance:
                key = f"{sampler.describe()}-g{guidance:g}"
                rows.append((key, sampler, float(guidance)))
    return rows


def series_name(sampler: Any, guidance: float) -> str:
    """The sampler without its call budget (one line of the FD-calls plot per series)."""
    budget = type(sampler).BUDGET
    default = next(f.default for f in dataclasses.fields(sampler) if f.name == budget)
    name = dataclasses.replace(sampler, **{budget: default}).describe()
    return name + (f", guidance {guidance:g}" if guidance != 1 else "")


def run_masked_bench(config: Any, folder: pathlib.Path, resume: bool, on_row, started: float) -> list[dict[str, Any]]:
    """Run (or continue) a masked model's bench into ``folder`` (the continuous bench's files and resume rules)."""
    from .. import distributed
    from ..discrete import generate_masked, load_masked

    if distributed.sharding():  # every process would sample every row and write the same files
        raise BenchError(f"{config.model} is a masked model; its bench is not sharded over processes: run it "
                         "without torchrun")  # fmt: skip
    extras = [flag for flag, given in (("--plan", config.plans), ("--accel", config.accels),
                                       ("--quant", config.quants), ("--recipe", config.recipes),
                                       ("--student", config.students), ("--pipeline", config.pipeline),
                                       ("--peer", config.strict_peers and config.peers))
              if given]  # fmt: skip
    if extras:
        raise BenchError(f"{config.model} is a masked (discrete) diffusion model; {', '.join(extras)} rows apply to "
                         "continuous models only")  # fmt: skip
    if tuple(config.schedules) != ("auto",):
        raise BenchError(f"{config.model} is a masked model: discrete samplers have no noise schedule to choose "
                         f"(got schedules {', '.join(config.schedules)})")  # fmt: skip
    model = load_masked(config.model)
    if model.info.data != "mnist":
        raise BenchError(f"bench measures masked models of binarised MNIST; {model.info.name!r} is trained on "
                         f"{model.info.data!r}")  # fmt: skip
    try:
        rows = masked_rows(config, model.length)
    except ValueError as err:
        raise BenchError(str(err)) from None
    matrix = {"version": MATRIX_VERSION, "config": config.to_dict(), "model_fingerprint": model.fingerprint,
              "entries": [key for key, _, _ in rows]}  # fmt: skip
    results = _Results(folder, matrix, resume)
    env = {**_environment(), "processes": 1, "shard": None}
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    todo = [row for row in rows if row[0] not in results.done]
    if todo:  # one untimed call first: the first call of a process pays for lazy initialisation
        generate_masked(model, 2, "first_hitting", seed=config.seed, calls=1)
    measured = 0
    try:
        for key, sampler, guidance in todo:
            times, out = [], None
            for _ in range(config.repeats):  # the same seeds each time: the same samples, timed again
                out = generate_masked(model, config.n, sampler, seed=config.seed, guidance=guidance)
                times.append(out.seconds)
            assert out is not None
            quality = evaluate_images(out.images01, out.labels, data="mnist-binary")
            seconds = statistics.median(times)
            save_grid(out.images01[:50], grids / f"{key}.png", nrow=10, scale=2)
            row = {
                "key": key, "label": sampler.describe() + (f", guidance {guidance:g}" if guidance != 1 else ""),
                "kind": "discrete", "series": series_name(sampler, guidance), "library": "hasten",
                "solver": sampler.describe(), "sampler": sampler.to_dict(),
                "options": {}, "schedule": None, "steps": getattr(sampler, "steps", None), "guidance": guidance,
                "nfe": out.nfe, "mean_calls": out.mean_calls, "seconds": seconds, "seconds_all": times,
                "images_per_second": config.n / seconds, "rmse_ref": None, "psnr_ref": None, "grid": f"grids/{key}.png",
                "reference_data": "mnist-binary", **{k: quality.get(k) for k in QUALITY},
                **_stamp(model.info.name, model.fingerprint, config, env),
            }  # fmt: skip
            results.add(row)
            measured += 1
            if on_row is not None:
                on_row(row, measured, len(todo))
    finally:
        results.log_run(started, measured)
    return results.rows

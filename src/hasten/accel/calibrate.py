"""Calibration: the fastest setting of a caching technique whose quality loss stays within a target.

Nobody knows how to set cache thresholds (cache-dit#99: "a subjective prior"), so hasten measures them. For
one model, solver and step count, each technique has a few *ladders*: settings ordered from the least to the
most reuse (DeepCache: growing refresh interval for each skip branch, features reused as they are or
extrapolated; block caching: the same for each first/last-block split; first-
block cache: growing threshold; RAS: shrinking token ratio, with full steps every 10 or 5 steps; early exit:
growing uncertainty threshold, constant over the steps or ramping up from 0 or down to 0). Every
setting is run on calibration noise against the uncached run from the same noise; a ladder is climbed until
its first failure, and the setting that skips the most work (FLOP-weighted, from the accelerator's stats)
among those that passed is checked again on held-out noise. Quality loss is the relative FD increase over
the uncached run's FD, ``fd_cached / fd_uncached - 1``, with the pixel RMSE to the uncached images reported
beside it (and optionally bounded). When nothing passes, the result says so (``met=False``) and carries no
config: a harmful setting is never returned.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .. import distributed
from ..generate import generate
from ..metrics.features import FEATURE_NETS
from ..metrics.quality import evaluate_images
from .block_cache import BlockCacheConfig, FirstBlockCacheConfig, transformer_blocks
from .deepcache import DeepCacheConfig, unet_layout
from .early_exit import DiTLayout, EarlyExitConfig
from .hooks import AccelConfig
from .ras import RASConfig, _ras_parts

CALIBRATION_SEED = 1000  # noise the settings are chosen on
HELDOUT_SEED = 0  # noise the chosen setting is confirmed and reported on
TECHNIQUE_NAMES = ("deepcache", "block_cache", "first_block_cache", "ras", "early_exit")
INTERVALS = (2, 3, 4, 5, 6, 8)
THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32)
RATIOS = (0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
EXIT_THRESHOLDS = (0.05, 0.08, 0.1, 0.12, 0.16, 0.2, 0.3, 0.4, 0.6)


def ladders(technique: str, network: Any, *, exit_heads: Any = None) -> list[list[AccelConfig]]:
    """The settings tried for ``technique`` on ``network``, as ladders of growing reuse (``exit_heads``: the
    heads file early exit needs)."""
    if technique == "deepcache":
        producers, _, _ = unet_layout(network)
        branches = range(min(len(producers), 4))
        return [
            [DeepCacheConfig(interval=k, branch=b, extrapolate=x) for k in INTERVALS]
            for x in (0, 1, 2)
            for b in branches
        ]
    if technique == "block_cache":
        _, blocks = transformer_blocks(network)
        splits = [(f, last) for f, last in ((1, 0), (1, 1), (2, 1)) if f + last < len(blocks)]
        return [
            [BlockCacheConfig(interval=k, first_blocks=f, last_blocks=last, extrapolate=x) for k in INTERVALS]
            for x in (0, 1, 2)
            for f, last in splits
        ]
    if technique == "first_block_cache":
        _, blocks = transformer_blocks(network)
        splits = [(f, last) for f, last in ((1, 0), (1, 1)) if f + last < len(blocks)]
        return [
            [FirstBlockCacheConfig(threshold=t, first_blocks=f, last_blocks=last) for t in THRESHOLDS]
            for f, last in splits
        ]
    if technique == "ras":
        _ras_parts(network)
        return [[RASConfig(ratio=r, interval=k) for r in RATIOS] for k in (10, 5)]
    if technique == "early_exit":
        DiTLayout.of(network)
        if exit_heads is None:
            raise ValueError("early_exit needs its exit heads: give exit_heads (--exit-heads), made with "
                             "`hasten accelerate train-exits`")  # fmt: skip
        heads = str(exit_heads)
        return [
            [EarlyExitConfig(heads=heads, threshold=t) for t in EXIT_THRESHOLDS],
            [EarlyExitConfig(heads=heads, threshold=0.0, final_threshold=t) for t in EXIT_THRESHOLDS],
            [EarlyExitConfig(heads=heads, threshold=t, final_threshold=0.0) for t in EXIT_THRESHOLDS],
        ]
    raise ValueError(f"technique must be one of {', '.join(map(repr, TECHNIQUE_NAMES))}; got {technique!r}")


def techniques_for(network: Any, *, exit_heads: Any = None) -> list[str]:
    """The techniques that can hook ``network`` (DeepCache for UNets, block caches for transformers; early exit
    for DiTs when ``exit_heads`` are given)."""
    names = []
    for name in TECHNIQUE_NAMES:
        if name == "early_exit" and exit_heads is None:
            continue
        try:
            ladders(name, network, exit_heads=exit_heads)
        except TypeError:
            continue
        names.append(name)
    return names


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` found. ``config`` is None when no setting met the target (``met`` False)."""

    technique: str
    target: dict[str, Any]
    setting: dict[str, Any]  # model, solver, steps, guidance, n
    baseline: dict[str, Any]  # the uncached run: fd (calibration and held-out noise)
    rows: list[dict[str, Any]]  # every setting tried, on calibration noise
    config: AccelConfig | None = None
    heldout: dict[str, Any] | None = None  # the chosen setting on held-out noise
    speed: dict[str, Any] | None = None  # wall-clock speed-up of the chosen setting, paired

    @property
    def met(self) -> bool:
        return self.config is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "met": self.met,
            "config": None if self.config is None else self.config.to_dict(),
            "target": self.target,
            "setting": self.setting,
            "baseline": self.baseline,
            "heldout": self.heldout,
            "speed": self.speed,
            "rows": self.rows,
        }


def calibrate(
    model: Any,
    technique: str,
    *,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    guidance: float | None = None,
    recipe: Any = None,
    max_quality_loss: float = 0.05,
    max_rmse: float | None = None,
    n: int = 200,
    timing_repeats: int = 3,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    exit_heads: Any = None,
) -> Calibration:
    """Find the fastest setting of ``technique`` for ``model`` within a quality budget.

    Args:
        model: A loaded hasten model (``hasten.load``).
        technique: ``"deepcache"`` (UNets), ``"block_cache"``, ``"first_block_cache"``, ``"ras"`` or
            ``"early_exit"`` (transformers; ``"early-exit"`` is the same).
        solver, steps, guidance: The sampling setting the cache is calibrated for (a solver spec such as
            ``"unipc:order=3"`` takes options).
        recipe: Instead of those, any uncached :class:`hasten.Recipe` (e.g. a tuned plan): the cache is
            calibrated for exactly that sampler and grid, and the record names it (the plan's digest).
        max_quality_loss: Largest allowed relative FD increase over the uncached run (0.05 = 5%).
        max_rmse: Bound on the RMSE (images in [0, 1]) to the uncached images from the same noise; optional
            where hasten has a feature network for the model's data (MNIST), the only budget elsewhere
            (a diffusers pipeline from :func:`hasten.from_pipeline`).
        n: Images per evaluation (calibration and held-out noise each).
        timing_repeats: Paired timing repeats of the chosen setting against the uncached run.
        on_row: Called with each measured row (progress).
        exit_heads: The exit-heads file for ``"early_exit"`` (``hasten accelerate train-exits``).

    Reference: the issue's calibration design; DeepCache (Ma et al., 2024) and cache-dit (2025) leave these
    settings to the user.
    """
    if not 0.0 <= max_quality_loss < 10.0:
        raise ValueError(f"max_quality_loss must be a relative FD increase in [0, 10), got {max_quality_loss}")
    if max_rmse is not None and not max_rmse > 0:
        raise ValueError(f"max_rmse must be > 0, got {max_rmse}")
    has_fd = model.info.data in FEATURE_NETS
    if not has_fd and max_rmse is None:
        raise ValueError(
            f"hasten has no feature network for {model.info.data!r} data, so no FD budget: give max_rmse (the "
            "largest RMSE of the cached images to the uncached ones, pixels in [0, 1], e.g. 0.02)"
        )
    if n < 10:
        raise ValueError(f"n must be >= 10 images for an FD, got {n}")
    technique = technique.replace("-", "_") if isinstance(technique, str) else technique
    all_ladders = ladders(technique, model.network, exit_heads=exit_heads)  # also checks it can hook this network
    recipe = _uncached_recipe(model, recipe, solver, steps, guidance)
    kwargs = {k: v for k, v in recipe.generate_kwargs().items() if k != "accel"}

    def run(seed: int, accel: AccelConfig | None = None):
        return generate(model, n, seed=seed, accel=accel, **kwargs)

    def fd(images: Tensor) -> float | None:
        return float(evaluate_images(images, data=model.info.data)["fd"]) if has_fd else None

    base = run(CALIBRATION_SEED)
    base_fd = fd(base.images01)
    rows: list[dict[str, Any]] = []
    passing: list[tuple[float, AccelConfig]] = []
    live = not distributed.sharding()  # one process reports each row as it comes

    def climb(ladder: list[AccelConfig]) -> list[dict[str, Any]]:
        climbed = []
        for config in ladder:
            out = run(CALIBRATION_SEED, config)
            row = _row(config, out, base, base_fd, fd(out.images01), max_quality_loss, max_rmse)
            climbed.append(row)
            if live and on_row is not None:
                on_row(row)
            if not row["passed"]:
                break  # more reuse along this ladder only loses more
        return climbed

    # the ladders are independent: under torchrun each process climbs its own (hasten.distributed.map_tasks)
    for ladder, climbed in zip(all_ladders, distributed.map_tasks(climb, all_ladders), strict=True):
        for config, row in zip(ladder, climbed, strict=False):
            rows.append(row)
            if not live and on_row is not None:
                on_row(row)
            if row["passed"]:
                passing.append((row["saved_fraction"], config))
    result = Calibration(
        technique,
        {"max_quality_loss": max_quality_loss, "max_rmse": max_rmse},
        {**calibration_setting(model, recipe), "n": n, "seeds": [CALIBRATION_SEED, HELDOUT_SEED]},
        {"fd_calibration": base_fd},
        rows,
    )
    candidates = sorted((p for p in passing if p[0] > 0), key=lambda p: -p[0])
    if not candidates:
        return result
    held_base = run(HELDOUT_SEED)
    held_fd = fd(held_base.images01)
    result.baseline["fd_heldout"] = held_fd
    for _, config in candidates:  # the fastest that also passes on held-out noise
        out = run(HELDOUT_SEED, config)
        row = _row(config, out, held_base, held_fd, fd(out.images01), max_quality_loss, max_rmse)
        if on_row is not None:
            on_row({**row, "heldout": True})
        if row["passed"]:
            result.config, result.heldout = config, row
            break
    if result.config is not None:
        result.speed = paired_speedup(model, result.config, kwargs, n, timing_repeats)
    return result


def _uncached_recipe(model: Any, recipe: Any, solver: str, steps: int, guidance: float | None) -> Any:
    from ..recipe import Recipe
    from ..solvers import parse_solver

    if recipe is None:
        name, options = parse_solver(solver)
        return Recipe.from_files(model, solver=name, options=options, steps=steps, guidance=guidance)
    if (solver, steps, guidance) != ("dpmpp_2m", 20, None):
        raise TypeError("give a recipe or solver/steps/guidance, not both")
    if recipe.cache is not None or recipe.cache_peer is not None:
        raise ValueError("calibrate a cache for a recipe without one (its cache would be replaced)")
    return recipe


def calibration_setting(model: Any, recipe: Any) -> dict[str, Any]:
    """What a cache calibrated on ``recipe`` is valid for; :class:`hasten.Recipe` checks a cache against it."""
    guidance = recipe.effective_guidance
    setting = {
        "model": model.info.name, "fingerprint": model.fingerprint, "solver": recipe.solver,
        "options": dict(recipe.options), "schedule": recipe.schedule, "steps": recipe.steps,
        "guidance": model.default_guidance if guidance is None else guidance,
    }  # fmt: skip
    if recipe.plan is not None:
        setting["plan"] = recipe.plan.digest()
    return setting


def paired_speedup(model: Any, config: AccelConfig, kwargs: dict[str, Any], n: int, repeats: int) -> dict[str, Any]:
    """Median sampling seconds uncached and cached, alternating on the same noise (one warm-up each)."""
    generate(model, min(n, 10), seed=HELDOUT_SEED, **kwargs)
    generate(model, min(n, 10), seed=HELDOUT_SEED, accel=config, **kwargs)
    plain, cached = [], []
    for _ in range(max(1, repeats)):
        plain.append(generate(model, n, seed=HELDOUT_SEED, **kwargs).seconds)
        cached.append(generate(model, n, seed=HELDOUT_SEED, accel=config, **kwargs).seconds)
    t_plain, t_cached = statistics.median(plain), statistics.median(cached)
    return {"seconds_uncached": t_plain, "seconds_cached": t_cached, "speedup": t_plain / t_cached, "repeats": repeats}


def _row(config, out, base, base_fd, fd_value, max_loss, max_rmse) -> dict[str, Any]:
    loss = None if fd_value is None else fd_value / base_fd - 1.0  # no FD: the RMSE bound decides alone
    rmse = float((out.images01 - base.images01).pow(2).mean().sqrt())
    passed = (loss is None or loss <= max_loss) and (max_rmse is None or rmse <= max_rmse)
    stats = out.accel_stats or {}
    return {
        "config": config.to_dict(),
        "fd": fd_value,
        "fd_uncached": base_fd,
        "quality_loss": loss,
        "rmse_to_uncached": rmse,
        "saved_fraction": stats.get("saved_fraction", 0.0),
        "nfe_equivalent": stats.get("nfe_equivalent"),
        "cache_bytes": stats.get("cache_bytes"),
        "seconds": out.seconds,
        "seconds_uncached": base.seconds,
        "passed": passed,
    }

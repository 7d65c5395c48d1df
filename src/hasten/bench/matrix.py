"""The experiment matrix of ``hasten bench``: which rows run, as recipes.

Every row is a :class:`~hasten.recipe.Recipe`: a stock hasten configuration, a tuned plan, a calibrated cache
(with the uncached row and the peer caches at its setting), a quantised model (with the float row and
torchao's configs), a diffusers scheduler, a pipeline's own scheduler, a recipe file (``--recipe``), or a
distilled student of the model at its own sampler (``--student``).
``expand`` turns a :class:`BenchConfig` into the ordered list; a row's key is its recipe's ``key`` (so an
interrupted run can skip what it already finished), its kind ``recipe.kind`` and its label
``recipe.describe()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from ..config import Config, check_choice
from ..recipe import Recipe, RecipeError, load_recipe, read_cache_file, student_recipe
from ..solvers import parse_solver
from ..tune.plan import load_plan
from .peers import PEERS, peers_for

DISCRETE_SPACINGS = ("trailing", "leading", "linspace")

__all__ = ["MATRIX_VERSION", "PIPELINE_EMBEDS", "PRESETS", "BenchConfig", "PipelineSource", "expand", "row_library"]

# Recorded in matrix.json. 2: rows are recipes keyed by ``Recipe.key``; 1: the older ``Entry`` keys. A folder of
# another version is refused on --resume (its rows would not be recognised and would run again).
MATRIX_VERSION = 2


PIPELINE_EMBEDS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)


@dataclasses.dataclass(frozen=True)
class PipelineSource(Config):
    """A diffusers pipeline folder to benchmark and what to condition it on (see :func:`hasten.from_pipeline`).

    ``embeds`` names a safetensors file of encoded prompts (tensors named as in :data:`PIPELINE_EMBEDS`), for
    pipelines saved without text encoders; ``guidance`` None means the pipeline's default."""

    folder: str
    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None
    embeds: str = ""
    class_labels: tuple[int, ...] = ()
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    allow_pickle: bool = False  # also load pickled (.bin) weights where a part has no safetensors

    def __post_init__(self) -> None:
        if not (pathlib.Path(self.folder) / "model_index.json").exists():
            raise FileNotFoundError(f"{self.folder!r} is not a diffusers pipeline folder (no model_index.json)")
        if self.prompts and self.embeds:
            raise ValueError("give prompts or an embeddings file, not both")
        if self.embeds and not pathlib.Path(self.embeds).is_file():
            raise FileNotFoundError(f"no embeddings file {self.embeds!r}")

    def load(self, device: str = "cpu") -> Any:
        """The pipeline as a hasten model (:class:`hasten.pipelines.PipelineModel`) on ``device``."""
        from ..pipelines import from_pipeline

        tensors: dict[str, Any] = {}
        if self.embeds:
            from safetensors.torch import load_file

            tensors = load_file(self.embeds)
            unknown = sorted(set(tensors) - set(PIPELINE_EMBEDS))
            if unknown:
                raise ValueError(f"{self.embeds}: unknown tensors {unknown}; allowed: {', '.join(PIPELINE_EMBEDS)}")
        return from_pipeline(
            self.folder, prompt=list(self.prompts) or None, negative_prompt=self.negative_prompt,
            class_labels=list(self.class_labels) or None, guidance=self.guidance, height=self.height,
            width=self.width, device=device, allow_pickle=self.allow_pickle, **tensors,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BenchConfig(Config):
    """What ``hasten bench`` measures."""

    model: str = "mnist-dit"
    solvers: tuple[str, ...] = ("euler", "heun", "dpmpp_2m", "unipc")
    steps: tuple[int, ...] = (5, 10)
    schedules: tuple[str, ...] = ("auto",)
    guidance: tuple[float, ...] = (1.0,)
    peers: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc", "euler")
    n: int = 100
    seed: int = 0
    repeats: int = 1
    reference_steps: int = 200  # steps of the third-order reference solve the errors are measured against
    plans: tuple[str, ...] = ()  # plan files from `hasten tune`, each a row at its own guidance scale
    accels: tuple[str, ...] = ()  # cache configs from `hasten accelerate calibrate`: cached, uncached, peer rows
    cache_peers: bool = True  # with each cache config, the peer caches that apply and are installed
    quants: tuple[str, ...] = ()  # quantised model folders from `hasten quantize`: quantised, float, torchao rows
    quant_peers: bool = True  # with each quantised model, torchao's data-free configs (if torchao is installed)
    recipes: tuple[str, ...] = ()  # recipe files (`hasten optimize`, ...): one row each, at the bench's seed
    # distilled students of the model (folders from `hasten distill` or bundled names): one row each at the student's
    # own sampler, judged against the model's converged sampler; a student of other weights is refused unless forced
    students: tuple[str, ...] = ()
    force_students: bool = False
    pipeline: PipelineSource | None = None  # benchmark this diffusers pipeline instead of ``model``
    # peers named by the user (`--peer`): one that does not support the model's objective is refused, where a
    # preset's cross-model list keeps the ones that apply
    strict_peers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pipeline, dict):  # from JSON
            object.__setattr__(self, "pipeline", Config.from_dict(self.pipeline))
        if self.pipeline is not None and self.quants:
            raise ValueError(
                "--quant takes folders `hasten quantize` wrote from a hasten model; quantise a pipeline's denoiser in "
                "Python: hasten.quantize_(hasten.from_pipeline(pipe, ...), QuantConfig(...), calibration=...)"
            )
        if self.n < 10:
            raise ValueError(f"n must be >= 10 (metrics need samples), got {self.n}")
        if any(s < 1 for s in self.steps):
            raise ValueError(f"step counts must be >= 1, got {self.steps}")
        for peer in self.peers:
            check_choice("peer", peer, tuple(PEERS))
        for path in self.plans:
            load_plan(path)  # a missing or corrupt plan fails now, not mid-run
        for path in self.accels:
            accel_setting(path)
        for path in self.quants:
            quant_setting(path)
        for path in self.recipes:
            load_recipe(path)  # a missing, corrupt or inconsistent recipe fails now; its weights are checked by expand
        if self.students and self.pipeline is not None:
            raise ValueError("--student takes students `hasten distill` made of a hasten model, not of a pipeline")
        for student in self.students:
            student_recipe(student)  # not a student (or no such folder) fails now; its teacher is checked by expand


PRESETS: dict[str, BenchConfig] = {
    # The README's first command: finishes in a few minutes on 2 CPU cores.
    "quick": BenchConfig(reference_steps=100),
    "standard": BenchConfig(
        solvers=(
            "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "unipc", "unipc:variant=bh1",
            "plms:warmup=lower_order", "dpm_solver_v3",
        ),
        steps=(5, 10, 20),
        schedules=("auto", "logsnr"),
        peers=("ddim", "pndm", "dpmpp_2m", "dpmpp_2s", "unipc", "euler", "heun", "deis"),
        n=500,
        repeats=2,
    ),
    # Every stock multistep configuration at 5, 8 and 10 NFE: the comparison a tuned plan is judged by
    # (`hasten bench --preset tuning --plan plan.json`).
    "tuning": BenchConfig(
        solvers=(
            "euler", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc:variant=bh1", "unipc:order=3",
            "plms:warmup=lower_order", "dpm_solver_v3", "dpm_solver_v3:order=3",
        ),
        steps=(5, 8, 10),
        schedules=("auto", "karras", "logsnr", "time_uniform", "time_quadratic", "trailing"),
        peers=("ddim", "pndm", "dpmpp_2m", "dpmpp_2s", "unipc", "euler", "deis"),
        n=100,
        reference_steps=100,
    ),
    # Students beside the training-free samplers at the NFE students run at (`hasten bench --preset distill
    # --student DIR --plan PLAN`): 200 images, as the FD budgets of optimize and the caches use.
    "distill": BenchConfig(
        solvers=("euler", "dpmpp_2m", "unipc"), steps=(1, 2, 4), peers=(), n=200, repeats=2, reference_steps=100
    ),
    # Only what `--accel` files add: each cache config, the uncached run at its setting, the peer caches.
    # 200 images (FD changes of a few percent need them) and three timed repeats.
    "caching": BenchConfig(solvers=(), steps=(), peers=(), n=200, repeats=3, reference_steps=100),
    # Only what `--quant` folders add: each quantised model, the float model at its setting, torchao's configs.
    "quantization": BenchConfig(solvers=(), steps=(), peers=(), n=200, repeats=3, reference_steps=100),
    "full": BenchConfig(
        solvers=(
            "euler", "heun", "ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_3s", "dpmpp_2m", "dpmpp_3m",
            "dpmpp_3m:third_order_term=\"reference\"", "unipc", "unipc:variant=bh2", "unipc:order=3",
            "plms", "plms:warmup=lower_order", "dpm_solver_v3", "dpm_solver_v3:order=3",
        ),
        steps=(4, 6, 8, 10, 15, 20, 30),
        schedules=("karras", "logsnr", "time_uniform", "time_quadratic"),
        guidance=(1.0, 2.0),
        peers=tuple(PEERS),
        n=1000,
        repeats=3,
    ),
}  # fmt: skip


def expand(
    config: BenchConfig,
    *,
    objective: str,
    conditional: bool,
    network: Any = None,
    own_scheduler: str | None = None,
    model: str | None = None,
    fingerprint: str = "",
) -> list[Recipe]:
    """Every row as a recipe, hasten's first; diffusers peers only where they support the model's objective, and
    ``own_scheduler`` (a pipeline's scheduler class) at every step count: what the pipeline runs today.

    ``model`` and ``fingerprint`` name the benchmarked model in the recipes (default: ``config.model`` or the
    pipeline folder, any weights); a plan, cache, quantised folder or recipe file made for other weights is
    refused here, before anything runs. For flow-matching models a generic peer name maps to its flow variant
    ("euler" -> "flow_euler"). Each cache config adds its cached row, the uncached row at the same setting and,
    with ``cache_peers`` and a ``network`` to inspect, the installed peer caches that apply to it; each quantised
    folder its row, the float row at its setting and torchao's configs; each student (``config.students``) one
    row at its own sampler, refused when it was distilled from other weights than ``fingerprint`` unless
    ``force_students``. A recipe that two sources add (the
    uncached row of a cache that the stock matrix already has) is one row.
    """
    if model is None:
        model = config.pipeline.folder if config.pipeline is not None else config.model
    common: dict[str, Any] = {"model": model, "fingerprint": fingerprint, "seed": config.seed}
    rows: dict[str, Recipe] = {}

    def add(recipe: Recipe) -> None:
        rows.setdefault(recipe.key, recipe)

    guidance = config.guidance if conditional else (1.0,)
    # diffusers' timestep spacings exist for discrete (DDPM-type) schedules only; flow models skip them
    schedules = [s for s in config.schedules if not (objective == "flow" and s in DISCRETE_SPACINGS)]
    for g in guidance:
        for spec in config.solvers:
            name, options = parse_solver(spec)
            for schedule in schedules:
                for steps in config.steps:
                    add(Recipe(solver=name, options=options, schedule=schedule, steps=steps, guidance=g, **common))
        for path in config.plans:
            plan = load_plan(path)
            if plan.guidance == g:  # the plan's content is in the key: an edited plan is a new row
                with _naming("--plan", path):
                    add(Recipe(plan=plan, provenance={"plan_file": str(path)}, **common))
        _cache_rows(config, g, common, network, add)
        _quant_rows(config, g, common, add)
        supported = set(peers_for(objective))
        peers = [p if p in supported else f"flow_{p}" for p in config.peers]
        unsupported = [named for named, p in zip(config.peers, peers, strict=True) if p not in supported]
        if config.strict_peers and unsupported:
            raise ValueError(
                f"peer {unsupported[0]!r} does not support {objective!r} models; peers that do: "
                f"{', '.join(peers_for(objective))}"
            )
        for peer in dict.fromkeys(p for p in peers if p in supported):
            for steps in config.steps:
                add(Recipe(library="diffusers", solver=peer, steps=steps, guidance=g, **common))
        if own_scheduler is not None:
            for steps in config.steps:
                add(Recipe(library="diffusers", solver="pipeline", options={"scheduler": own_scheduler}, steps=steps,
                           guidance=g, **common))  # fmt: skip
    for path in config.recipes:
        add(_recipe_row(path, config, conditional, model, fingerprint))
    for student in config.students:
        with _naming("--student", student):
            add(student_recipe(student, teacher_fingerprint=fingerprint, teacher=model, seed=config.seed,
                               force=config.force_students))  # fmt: skip
    return list(rows.values())


@contextlib.contextmanager
def _naming(flag: str, path: str) -> Iterator[None]:
    """Name the file a refused row came from (a plan for other weights says so, but not which file it was)."""
    try:
        yield
    except RecipeError as err:
        raise RecipeError(f"{flag} {pathlib.Path(path).name}: {err}") from None


def _recipe_row(path: str, config: BenchConfig, conditional: bool, model: str, fingerprint: str) -> Recipe:
    """A recipe file as a row: refused when made for other weights; sampled from the bench's noise (seed)."""
    recipe = load_recipe(path)
    student = recipe.student  # a student's recipe (`hasten optimize` may pick one) is judged against its teacher
    if student is not None and fingerprint and "teacher" not in recipe.forced:
        if student["teacher_fingerprint"] != fingerprint:
            raise ValueError(
                f"recipe {path!r} samples a student of {student['teacher']!r} (weights "
                f"{student['teacher_fingerprint'][:12]}), not of the benchmarked {model!r} (weights "
                f"{fingerprint[:12]}): bench it with --model {student['teacher']}"
            )
    elif recipe.fingerprint and fingerprint and recipe.fingerprint != fingerprint:
        raise ValueError(
            f"recipe {path!r} is for model {recipe.model!r} (weights {recipe.fingerprint[:12]}), not the benchmarked "
            f"{model!r} (weights {fingerprint[:12]}): bench it with --model {recipe.model}"
        )
    if not conditional and recipe.effective_guidance not in (None, 1.0):
        raise ValueError(
            f"recipe {path!r} samples at guidance {recipe.effective_guidance:g}; {model!r} has no unconditional "
            "branch (guidance 1 only)"
        )
    return recipe.replace(seed=config.seed, provenance={**recipe.provenance, "recipe_file": str(path)})


def row_library(recipe: Recipe) -> str:
    """Whose technique a row measures, for the report's colours and columns: a peer cache's or torchao's library,
    else the recipe's sampling loop (hasten or diffusers)."""
    from .cache_peers import CACHE_PEERS

    if recipe.cache_peer is not None:
        return CACHE_PEERS[recipe.cache_peer].library
    if recipe.quant_peer is not None:
        return "torchao"
    return recipe.library


def accel_setting(path: str) -> dict[str, Any]:
    """The sampling setting a calibrated cache config was made for (solver, steps, guidance)."""
    from ..accel.hooks import read_accel_file

    _, calibration = read_accel_file(path)  # a missing, corrupt or foreign file fails now, not mid-run
    setting = calibration.get("setting")
    if not setting or not {"solver", "steps"} <= set(setting):
        raise ValueError(
            f"{path!r} does not say which solver and steps it was calibrated for; bench cache rows need a file "
            "written by `hasten accelerate calibrate`"
        )
    return setting


def quant_setting(path: str) -> dict[str, Any]:
    """The quantisation record of a folder written by ``hasten quantize`` (source model, calibration)."""
    folder = pathlib.Path(path)
    info = folder / "hasten.json"
    if not info.exists():
        raise FileNotFoundError(
            f"{path!r} is not a model folder (no hasten.json); pass a folder from `hasten quantize`"
        )
    try:
        record = json.loads(info.read_text()).get("quantization")
    except json.JSONDecodeError as err:
        raise ValueError(f"{info} is not valid JSON: {err}") from err
    if not record or not {"source", "calibration"} <= set(record):
        raise ValueError(f"{path!r} holds a float model; bench quantisation rows need a folder from `hasten quantize`")
    return record


def _quant_rows(config: BenchConfig, guidance: float, common: dict[str, Any], add) -> None:
    """For each quantised folder: the float row at its calibration setting, the quantised row, torchao's."""
    from ..models.zoo import folder_fingerprint
    from .quant_peers import QUANT_PEERS, quant_peers_available

    peers = [p for p in quant_peers_available() if p in QUANT_PEERS] if config.quant_peers else []
    for path in config.quants:
        setting = quant_setting(path)["calibration"]
        if float(setting.get("guidance") or 1.0) != guidance:
            continue
        sampler = {"solver": setting["solver"], "steps": int(setting["steps"]), "schedule": "auto",
                   "guidance": guidance, **common}  # fmt: skip
        add(Recipe(**sampler))
        with _naming("--quant", path):
            add(Recipe(quant=str(path), quant_fingerprint=folder_fingerprint(path), **sampler))
        for peer in peers:
            add(Recipe(quant_peer=peer, **sampler))


def _cache_rows(config: BenchConfig, guidance: float, common: dict[str, Any], network: Any, add) -> None:
    """For each cache config: the uncached row at its calibration setting, the cached row, the peer caches."""
    from .cache_peers import cache_peers_for

    peers = cache_peers_for(network)[0] if (config.cache_peers and network is not None) else []
    for path in config.accels:
        accel_setting(path)  # says what is missing from a file without its calibration setting
        cache, setting = read_cache_file(path)
        if float(setting.get("guidance") or 1.0) != guidance:
            continue
        if setting.get("plan"):  # calibrated for a tuned plan: its rows run that plan, given with --plan
            plans = {plan.digest(): plan for plan in map(load_plan, config.plans)}
            if setting["plan"] not in plans:
                raise ValueError(f"--accel {path} was calibrated for a tuned plan (digest {setting['plan'][:12]}); "
                                 "pass that plan with --plan as well")  # fmt: skip
            sampler = {"plan": plans[setting["plan"]], "guidance": guidance, **common}
        else:
            sampler = {"solver": setting["solver"], "options": setting.get("options") or {},
                       "steps": int(setting["steps"]), "schedule": setting.get("schedule", "auto"),
                       "guidance": guidance, **common}  # fmt: skip
        add(Recipe(**sampler))
        with _naming("--accel", path):
            add(Recipe(cache=cache, cache_setting=setting, provenance={"cache_file": str(path)}, **sampler))
        for peer in peers:
            add(Recipe(cache_peer=peer, **sampler))

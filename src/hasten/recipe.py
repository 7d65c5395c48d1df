"""Recipes: one frozen, hashable, JSON description of how to sample a model, every speed-up included.

A :class:`Recipe` names the model (reference + weights fingerprint), the sampler (a registered solver with its
options on a stock grid, or a tuned :class:`~hasten.tune.Plan`), the guidance scale, an optional feature cache
(:class:`~hasten.accel.AccelConfig`, with the setting it was calibrated for), optional quantised weights (a
folder from ``hasten quantize``), the noise seed and the one noise convention. ``hasten.generate(model, n,
recipe=r)``, ``hasten sample --recipe``, ``hasten bench`` rows and ``hasten optimize`` all speak it, and
``tune``, ``accelerate calibrate`` and ``quantize`` write one beside their own files.

A recipe checks itself when built: the solver and its options exist, a plan is for the recipe's weights, a
cache was calibrated for the recipe's solver, grid and step count, and quantised weights came from the recipe's
weights. A failed check raises :class:`RecipeError` with the reason; ``force=True`` accepts it and records
which checks were forced (they stay in the JSON, so a forced recipe is never mistaken for a checked one).
Checks that need the loaded network (a UNet cache on a transformer) run in :meth:`Recipe.check_model`, before
any sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from ._io import write_text_atomic
from .accel.hooks import AccelConfig, read_accel_file
from .seeds import CONVENTIONS, NOISE_CONVENTION
from .solvers import DEFAULT_SOLVER
from .tune.plan import Plan, PlanError

__all__ = [
    "NOISE_CONVENTION",
    "RECIPE_FORMAT",
    "RECIPE_SCHEMA_VERSION",
    "Recipe",
    "RecipeError",
    "describe_recipe",
    "load_recipe",
    "read_cache_file",
    "recipe_path_beside",
    "save_recipe",
    "student_recipe",
    "training_cost",
]

RECIPE_FORMAT = "hasten-recipe"
RECIPE_SCHEMA_VERSION = 1
LIBRARIES = ("hasten", "diffusers")
EXECUTIONS = ("auto", "kernel", "float8", "simulated")
FORCEABLE = ("model", "plan", "cache", "quant", "teacher", "oms")


class RecipeError(ValueError):
    """A recipe that is corrupt, of another schema, inconsistent, or made for other weights (the message says why)."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_number(name: str, value: Any, *, low: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecipeError(f"recipe {name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise RecipeError(f"recipe {name} must be >= {low:g}, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """How to sample one model: sampler, grid, guidance, cache, quantisation, seed and noise convention.

    Args:
        model: A bundled model name or a model folder (the full-precision weights).
        fingerprint: sha256 of ``model``'s weights (``LoadedModel.fingerprint``); "" accepts any weights.
        solver, options, schedule, steps: A registered solver (``hasten.available()``), its options, the
            discretisation and the step count. With ``plan`` they come from the plan.
        plan: A tuned plan (grid + per-step decisions); made for ``fingerprint``'s weights.
        guidance: Classifier-free guidance scale; None: the plan's, else the model's default.
        cache: A feature cache installed for the run; ``cache_setting`` is what it was calibrated for
            (solver, steps, guidance, and the plan's digest when calibrated on a plan).
        quant: A folder of quantised weights (``hasten quantize``) made from ``fingerprint``'s weights; the
            recipe samples that network. ``execution`` picks its kernels.
        library: Whose sampling loop runs: ``"hasten"``, or ``"diffusers"`` (``solver`` then names a diffusers
            scheduler of the bench, :data:`hasten.bench.peers.PEERS`, run through diffusers' own loop).
        cache_peer, quant_peer: A peer's cache (DeepCache package, cache-dit, diffusers' first-block cache) or
            torchao quantisation config in place of hasten's, at the peer's documented defaults (bench rows).
        seed, noise: The noise seed and the noise convention (:mod:`hasten.seeds`; recipes written before
            ``hasten-index-v2`` keep ``hasten-cpu-randn-v1``, honoured in one process).
        forced: The checks accepted with ``force=True`` (``"plan"``, ``"cache"``, ``"quant"``, ``"model"``;
            ``"teacher"``: a student judged against a teacher it was not distilled from, see :func:`student_recipe`).
        provenance: How the recipe was made and what it scored (not part of its identity). ``provenance["student"]``
            marks a distilled student at its own sampler (:func:`student_recipe`): its teacher and training cost.
    """

    model: str
    fingerprint: str = ""
    solver: str = DEFAULT_SOLVER
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedule: str = "auto"
    steps: int = 10
    plan: Plan | None = None
    guidance: float | None = None
    cache: AccelConfig | None = None
    cache_setting: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    quant: str | None = None
    quant_fingerprint: str = ""
    execution: str = "auto"
    library: str = "hasten"
    cache_peer: str | None = None
    quant_peer: str | None = None
    seed: int = 0
    noise: str = NOISE_CONVENTION
    oms: str | None = None
    oms_fingerprint: str = ""
    forced: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    force: dataclasses.InitVar[bool] = False

    def __post_init__(self, force: bool) -> None:
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "cache_setting", dict(self.cache_setting))
        object.__setattr__(self, "provenance", dict(self.provenance))
        forced = set(self.forced)
        unknown = sorted(forced - set(FORCEABLE))
        if unknown:
            raise RecipeError(f"recipe forced checks {unknown} are unknown; known: {', '.join(FORCEABLE)}")
        if not isinstance(self.model, str) or not self.model:
            raise RecipeError(f"recipe model must be a model name or folder, got {self.model!r}")
        if self.noise not in CONVENTIONS:
            raise RecipeError(
                f"recipe noise convention {self.noise!r} is unknown; this hasten knows {', '.join(CONVENTIONS)}"
            )
        if self.library not in LIBRARIES:
            raise RecipeError(f"recipe library must be one of {', '.join(LIBRARIES)}, got {self.library!r}")
        if self.execution not in EXECUTIONS:
            raise RecipeError(f"recipe execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError(f"recipe seed must be an integer >= 0, got {self.seed!r}")
        if self.guidance is not None:
            _check_number("guidance", self.guidance, low=0.0)
            object.__setattr__(self, "guidance", float(self.guidance))
        if self.plan is not None:
            self._check_plan(force, forced)
        else:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise RecipeError(f"recipe steps must be an integer >= 1, got {self.steps!r}")
            if self.library == "hasten":
                self._check_solver()
            else:
                self._check_peer_sampler()
        if self.plan is not None and self.plan.skip is not None and (self.cache is not None or self.cache_peer):
            raise RecipeError(
                "this recipe's plan skips blocks at some steps and a cache decides which blocks run too: they cannot "
                "share a network (use a plain plan with the cache, or the skipping plan alone)"
            )
        if self.plan is not None and self.plan.assembly is not None and (self.cache is not None or self.cache_peer):
            raise RecipeError(
                "this recipe's plan runs a student at some steps and a cache would reuse one network's features in "
                "the other's calls (use a plain plan with the cache, or the assembled plan alone)"
            )
        if self.cache is not None and self.cache_peer is not None:
            raise RecipeError(f"a recipe takes hasten's cache or a peer's ({self.cache_peer!r}), not both")
        if self.quant is not None and self.quant_peer is not None:
            raise RecipeError(f"a recipe takes hasten's quantised weights or a peer's ({self.quant_peer!r}), not both")
        if self.cache is not None:
            self._check_cache(force, forced)
        elif self.cache_setting:
            raise RecipeError("recipe has a cache_setting but no cache")
        if self.oms is not None:
            self._check_oms(force, forced)
        elif self.oms_fingerprint:
            raise RecipeError("recipe has an oms_fingerprint but no oms")
        if self.quant is not None:
            self._check_quant(force, forced)
        elif self.execution != "auto":
            raise RecipeError(f"recipe execution {self.execution!r} applies to quantised weights only (set quant)")
        object.__setattr__(self, "forced", tuple(sorted(forced)))

    # -- checks ------------------------------------------------------------------------------------------

    def _check_solver(self) -> None:
        from .solvers import get_solver

        try:
            get_solver(self.solver, **self.options)
        except KeyError as err:
            raise RecipeError(str(err.args[0]) if err.args else str(err)) from None
        except (TypeError, ValueError) as err:
            raise RecipeError(f"recipe solver {self.solver!r} with options {dict(self.options)}: {err}") from None
        from .schedules.grids import DISCRETISATIONS

        if self.schedule != "auto":
            try:
                DISCRETISATIONS.get(self.schedule)
            except KeyError as err:
                raise RecipeError(f"recipe schedule: {err.args[0]}") from None

    def _check_peer_sampler(self) -> None:
        from .bench.peers import PEERS

        if self.solver == "pipeline":  # a pipeline's own scheduler, named by its class
            if set(self.options) - {"scheduler"}:
                raise RecipeError(
                    f"recipe solver 'pipeline' takes the option 'scheduler' only, got {sorted(self.options)}"
                )
        elif self.solver not in PEERS:
            raise RecipeError(
                f"recipe {self.library} sampler {self.solver!r} is unknown; known: pipeline, {', '.join(PEERS)}"
            )
        elif self.options:
            raise RecipeError(f"the {self.library} sampler {self.solver!r} takes no options, got {dict(self.options)}")

    def _check_plan(self, force: bool, forced: set[str]) -> None:
        if self.library != "hasten":
            raise RecipeError(f"a plan is a hasten sampler; a {self.library} row cannot carry one")
        if self.options:
            raise RecipeError("a plan supplies the solver and its options; do not give options with it")
        object.__setattr__(self, "solver", "plan")
        object.__setattr__(self, "schedule", "plan")
        object.__setattr__(self, "steps", self.plan.num_steps)
        if self.plan.fingerprint and self.fingerprint and self.plan.fingerprint != self.fingerprint:
            if not (force or "plan" in forced):
                raise RecipeError(
                    f"the plan was made for weights {self.plan.fingerprint[:12]} ({self.plan.model!r}), not for the "
                    f"recipe's {self.fingerprint[:12]} ({self.model!r}); plans are model-specific: tune one for "
                    "these weights, or force it"
                )
            forced.add("plan")

    def _check_cache(self, force: bool, forced: set[str]) -> None:
        if not isinstance(self.cache, AccelConfig):
            raise RecipeError(f"recipe cache must be an AccelConfig, got {type(self.cache).__name__}")
        setting = self.cache_setting
        if not setting:
            return  # a hand-written cache config: nothing recorded to check against
        problems = []
        if "steps" in setting and int(setting["steps"]) != self.steps:
            problems.append(f"{setting['steps']} steps (this recipe runs {self.steps})")
        if self.plan is not None:
            if setting.get("plan") != self.plan.digest():
                problems.append("another grid (it was not calibrated on this plan)")
        elif setting.get("plan"):
            problems.append(f"a tuned plan (this recipe runs {self.solver} on the {self.schedule!r} grid)")
        else:
            if "solver" in setting and setting["solver"] != self.solver:
                problems.append(f"solver {setting['solver']!r} (this recipe runs {self.solver!r})")
            elif dict(setting.get("options") or {}) != dict(self.options) and "options" in setting:
                problems.append(f"solver options {setting['options']} (this recipe uses {dict(self.options)})")
            if setting.get("schedule", "auto") != self.schedule:
                problems.append(f"the {setting.get('schedule', 'auto')!r} grid (this recipe uses {self.schedule!r})")
        g_cache, g_here = setting.get("guidance"), self.effective_guidance
        if g_cache is not None and g_here is not None and float(g_cache) != float(g_here):
            problems.append(f"guidance {g_cache:g} (this recipe samples at {g_here:g})")
        fp = setting.get("fingerprint")
        if fp and self.fingerprint and fp != self.fingerprint:
            problems.append(f"weights {fp[:12]} (this recipe's are {self.fingerprint[:12]})")
        if problems:
            if not (force or "cache" in forced):
                raise RecipeError(
                    "the cache was calibrated for " + "; ".join(problems) + ": a cache's reuse schedule is set per "
                    "step, so calibrate it for this setting (`hasten accelerate calibrate`), or force it"
                )
            forced.add("cache")

    def _check_quant(self, force: bool, forced: set[str]) -> None:
        folder = pathlib.Path(self.quant)
        info = folder / "hasten.json"
        try:
            record = json.loads(info.read_text()).get("quantization")
        except FileNotFoundError:
            raise RecipeError(f"recipe quant {self.quant!r} is not a model folder (no hasten.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecipeError(f"{info} is not valid JSON: {err}") from None
        if not record or "source" not in record:
            raise RecipeError(f"recipe quant {self.quant!r} holds a float model, not one from `hasten quantize`")
        source = record["source"].get("fingerprint", "")
        if source and self.fingerprint and source != self.fingerprint:
            if not (force or "quant" in forced):
                raise RecipeError(
                    f"{self.quant!r} was quantised from weights {source[:12]} ({record['source'].get('name')!r}), "
                    f"not from the recipe's {self.fingerprint[:12]} ({self.model!r}): quantise this model, or force it"
                )
            forced.add("quant")

    def _check_oms(self, force: bool, forced: set[str]) -> None:
        """A One More Step module (:mod:`hasten.oms`): it exists, and is the file the recipe was written with."""
        from .oms import oms_fingerprint

        if self.library != "hasten":
            raise RecipeError(f"One More Step is hasten's; a {self.library} sampler cannot start from it")
        if not isinstance(self.oms, str) or not self.oms:
            raise RecipeError(f"recipe oms must be a bundled OMS name or a file path, got {self.oms!r}")
        try:
            actual = oms_fingerprint(self.oms)
        except FileNotFoundError as err:
            raise RecipeError(str(err)) from None
        if self.oms_fingerprint and actual != self.oms_fingerprint:
            if not force and "oms" not in forced:
                raise RecipeError(
                    f"the OMS module {self.oms!r} changed since the recipe was written (file {actual}, recipe "
                    f"{self.oms_fingerprint}); rewrite the recipe, or force it"
                )
            forced.add("oms")
        object.__setattr__(self, "oms_fingerprint", self.oms_fingerprint or actual)

    def check_model(self, model: Any) -> None:
        """Refuse sampling ``model`` with this recipe: other weights, or a cache that cannot hook its network.

        ``model`` is what :meth:`load_model` returns (the quantised network when ``quant`` is set).
        """
        expected = self.quant_fingerprint if self.quant is not None else self.fingerprint
        if expected and model.fingerprint != expected and "model" not in self.forced:
            what = f"quantised weights {self.quant!r}" if self.quant is not None else f"model {self.model!r}"
            raise RecipeError(
                f"this recipe samples {what} (weights {expected[:12]}), not {model.info.name!r} (weights "
                f"{model.fingerprint[:12]}); load it with Recipe.load_model(), or build the recipe with force=True"
            )
        if self.cache is not None:
            from .accel import accelerate_

            try:
                accelerate_(model, self.cache).remove()  # installs on this network, or says why it cannot
            except (TypeError, ValueError) as err:
                raise RecipeError(f"the recipe's cache cannot apply to {model.info.name!r}: {err}") from None
        if self.oms is not None:
            from .oms import load_oms

            try:
                load_oms(self.oms, model)
            except ValueError as err:
                raise RecipeError(f"the recipe's OMS module cannot start {model.info.name!r}: {err}") from None

    # -- identity ----------------------------------------------------------------------------------------

    @property
    def effective_guidance(self) -> float | None:
        """The guidance scale the recipe asks for (None: the model's default)."""
        if self.guidance is not None:
            return self.guidance
        return None if self.plan is None else self.plan.guidance

    @property
    def kind(self) -> str:
        """What a bench row of this recipe measures: peer (another library's sampler), cache, quant, plan, student
        (a distilled student at its own sampler, :func:`student_recipe`) or stock."""
        if self.library != "hasten":
            return "peer"
        if self.cache is not None or self.cache_peer is not None:
            return "cache"
        if self.quant is not None or self.quant_peer is not None:
            return "quant"
        if self.plan is not None:
            return "plan"
        return "student" if self.student is not None else "stock"

    @property
    def student(self) -> dict[str, Any] | None:
        """The student record of a distilled student's recipe (teacher, method, training cost), else None."""
        return self.provenance.get("student")

    def identity(self) -> dict[str, Any]:
        """Everything that decides the samples (and their cost), as plain data: what the hash covers."""
        data = self.to_dict()
        for key in ("provenance", "format", "schema_version"):
            data.pop(key)
        if data["quant_fingerprint"]:  # quantised weights are identified by their fingerprint, wherever they lie
            data["quant"] = None
        if data.get("oms") is not None:  # an OMS module is identified by its file's fingerprint, wherever it lies
            data["oms"] = None
        if data["plan"] is not None:  # a plan's scores and search record do not change what it samples
            data["plan"] = {k: v for k, v in data["plan"].items() if k not in ("scores", "search")}
        return data

    def digest(self) -> str:
        """sha256 of :meth:`identity`: equal for recipes that sample the same way, whatever their provenance."""
        return hashlib.sha256(_canonical(self.identity()).encode()).hexdigest()

    @property
    def key(self) -> str:
        return self.digest()[:16]

    def __hash__(self) -> int:
        return hash(self.digest())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.digest() == other.digest()

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (checked again); ``force`` / ``forced`` carry over unless given."""
        return dataclasses.replace(self, **changes)

    # -- running -----------------------------------------------------------------------------------------

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`hasten.generate` this recipe stands for (seed excluded)."""
        peers = [p for p in (self.cache_peer, self.quant_peer) if p is not None]
        if self.library != "hasten" or peers:
            what = f"the {self.library} sampler {self.solver!r}" if self.library != "hasten" else f"peer {peers[0]!r}"
            raise RecipeError(
                f"this recipe runs {what}: sample it with hasten.bench.runner.sample_recipe, not hasten.generate"
            )
        kwargs: dict[str, Any] = {"guidance": self.guidance, "accel": self.cache}
        if self.oms is not None:
            from .oms import load_oms

            kwargs["oms"] = load_oms(self.oms)
        if self.plan is not None:
            return kwargs | {"plan": self.plan, "force_plan": True}  # checked against the recipe's weights above
        return kwargs | {"solver": self.solver, "steps": self.steps, "schedule": self.schedule, **self.options}

    def load_model(self, *, device: str = "cpu") -> Any:
        """The model this recipe samples (its quantised weights when ``quant`` is set), checked against it."""
        from .models.zoo import load

        model = load(self.quant if self.quant is not None else self.model, device=device)
        if self.execution != "auto":
            from .quant import set_execution

            set_execution(model.network, self.execution)
        self.check_model(model)
        return model

    def describe(self, *, steps: bool = True) -> str:
        """One line for people: the sampler, then every technique on top of it (see :func:`describe_recipe`)."""
        return describe_recipe(self.to_dict(), steps=steps)

    # -- JSON --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT,
            "schema_version": RECIPE_SCHEMA_VERSION,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "library": self.library,
            "cache_peer": self.cache_peer,
            "quant_peer": self.quant_peer,
            "solver": self.solver,
            "options": dict(self.options),
            "schedule": self.schedule,
            "steps": self.steps,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "guidance": self.guidance,
            "cache": None if self.cache is None else self.cache.to_dict(),
            "cache_setting": dict(self.cache_setting),
            "quant": self.quant,
            "quant_fingerprint": self.quant_fingerprint,
            "execution": self.execution,
            "seed": self.seed,
            "noise": self.noise,
            # written only when set, so the recipes written before One More Step keep their digests
            **({"oms": self.oms, "oms_fingerprint": self.oms_fingerprint} if self.oms is not None else {}),
            "forced": list(self.forced),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping) or data.get("format") != RECIPE_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise RecipeError(f"not a hasten recipe (format {got!r}, expected {RECIPE_FORMAT!r})")
        version = data.get("schema_version")
        if version != RECIPE_SCHEMA_VERSION:
            raise RecipeError(
                f"recipe schema version {version!r} is not supported; this hasten reads {RECIPE_SCHEMA_VERSION}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"format", "schema_version"})
        if unknown:
            raise RecipeError(f"recipe has unknown fields {unknown}; known: {', '.join(sorted(fields))}")
        kwargs = {k: v for k, v in data.items() if k in fields}
        if "model" not in kwargs:
            raise RecipeError("recipe is missing the field 'model'")
        try:
            if kwargs.get("plan") is not None:
                kwargs["plan"] = Plan.from_dict(kwargs["plan"])
            if kwargs.get("cache") is not None:
                kwargs["cache"] = AccelConfig.from_dict(kwargs["cache"])
        except (PlanError, TypeError, ValueError) as err:
            raise RecipeError(f"recipe's {'plan' if 'plan' in str(err) else 'cache'} is invalid: {err}") from None
        kwargs["forced"] = tuple(kwargs.get("forced") or ())
        return cls(**kwargs)

    @classmethod
    def from_files(
        cls,
        model: Any,
        *,
        plan: str | os.PathLike | Plan | None = None,
        accel: str | os.PathLike | AccelConfig | None = None,
        quant: str | os.PathLike | None = None,
        force: bool = False,
        **fields: Any,
    ) -> Recipe:
        """A recipe for a loaded ``model`` from the files the other commands write: a plan, a cache config (its
        calibration record becomes ``cache_setting``) and a quantised folder. How ``hasten sample`` builds one."""
        provenance = dict(fields.pop("provenance", {}))
        if plan is not None and not isinstance(plan, Plan):
            from .tune.plan import load_plan

            provenance["plan_file"] = str(plan)
            plan = load_plan(plan)
        cache_setting: dict[str, Any] = {}
        if accel is not None and not isinstance(accel, AccelConfig):
            provenance["cache_file"] = str(accel)
            accel, cache_setting = read_cache_file(accel)
        quant_fingerprint = ""
        if getattr(model.info, "quantization", None):  # a quantised model: the recipe names its source
            record = model.info.quantization
            quant, quant_fingerprint = str(model.folder), model.fingerprint
            source = record["source"]
            folder = source.get("folder")  # older folders record the source's name only
            source_name = _folder_ref(folder) if folder else source.get("name", "")
            fingerprint = source.get("fingerprint", "")
        elif quant is not None:
            from .models.zoo import folder_fingerprint

            source_name, fingerprint = _model_ref(model), model.fingerprint
            quant_fingerprint = folder_fingerprint(quant)
        else:
            source_name, fingerprint = _model_ref(model), model.fingerprint
        return cls(
            model=source_name, fingerprint=fingerprint, plan=plan, cache=accel, cache_setting=cache_setting,
            quant=None if quant is None else str(quant), quant_fingerprint=quant_fingerprint, provenance=provenance,
            force=force, **fields,
        )  # fmt: skip


def describe_recipe(data: Mapping[str, Any], *, steps: bool = True) -> str:
    """One line for people from a recipe's JSON (:meth:`Recipe.to_dict`): the sampler, then every technique on
    top of it. The one label of a recipe: ``Recipe.describe``, bench row labels and the bench report's series
    names all come from here. ``steps=False`` leaves the step count out (a line across step counts; a plan is
    one point and keeps its own). Reads the JSON alone, no files, so a recorded bench row describes itself on
    any machine."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(data["options"].items()))
    name = f"{data['solver']}{f'[{opts}]' if opts else ''}"
    count = f"{data['steps']} steps"
    plan = None if data["plan"] is None else Plan.from_dict(data["plan"])
    if data["library"] != "hasten":
        head = f"{data['library']}:{name}" + (f" ({count})" if steps else "")
    elif plan is not None:
        file = data["provenance"].get("plan_file") or f"plan {plan.digest()[:8]}"
        head = f"plan[{pathlib.Path(file).name}] ({plan.num_steps} steps, NFE {plan.nfe}"
        if plan.assembly is not None:  # the label says which steps another network runs, and what the plan costs
            swapped = ",".join(map(str, plan.assembly.steps))
            head += f", {pathlib.Path(plan.assembly.student).name} at steps {swapped}, cost {plan.cost:.2f}"
        elif plan.skip is not None and plan.cost is not None:
            head += f", block skips, cost {plan.cost:.2f}"
        head += ")"
    else:
        head = f"{name} ({data['schedule']}{f', {count}' if steps else ''})"
    student = data["provenance"].get("student")
    if student is not None:  # the network is not the benchmarked model's: say whose it is first
        head = f"student[{pathlib.Path(data['model']).name}, {student['method']}] {head}"
    parts = [head]
    if data["cache"] is not None:
        parts.append(f"cache {cache_label(AccelConfig.from_dict(data['cache']))}")
    if data["quant"] is not None:
        parts.append(f"quant[{pathlib.Path(data['quant']).name}]")
    parts += [peer for peer in (data["cache_peer"], data["quant_peer"]) if peer is not None]
    if data.get("oms") is not None:
        parts.append(f"oms[{pathlib.Path(data['oms']).stem}]")
    guidance = data["guidance"] if data["guidance"] is not None or plan is None else plan.guidance
    if guidance not in (None, 1.0):
        parts.append(f"w={guidance:g}")
    return " + ".join(parts)


STUDENT_RECORD = ("method", "teacher", "teacher_fingerprint", "nfe", "seconds", "extra_seconds", "device", "machine")


def student_recipe(
    student: str | os.PathLike,
    *,
    teacher_fingerprint: str = "",
    teacher: str = "",
    seed: int = 0,
    force: bool = False,
) -> Recipe:
    """A distilled student (a bundled name or a model folder from ``hasten distill``, whose ``hasten.json`` holds
    ``sampler`` and ``distillation``) as a recipe: its weights at its own default sampler. Its distillation record
    (teacher, method, training seconds and device) goes to ``provenance["student"]`` with ``teacher_guidance``,
    the guidance scale of the teacher samples it learned: the converged sampler it is judged against.

    A student distilled from other weights than ``teacher_fingerprint`` (``teacher`` names them) is refused,
    naming both, unless ``force`` (recorded in ``forced`` as ``"teacher"``)."""
    from .models.zoo import BUNDLED, ModelInfo, folder_fingerprint

    folder = pathlib.Path(student)
    if not (folder / "hasten.json").is_file():
        folder = BUNDLED / str(student)
    if not (folder / "hasten.json").is_file():
        raise RecipeError(f"student {str(student)!r} is not a bundled model or a model folder (no hasten.json)")
    try:
        info = ModelInfo.from_dict(json.loads((folder / "hasten.json").read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{folder / 'hasten.json'} is not a hasten model description: {err}") from None
    record, sampler = info.distillation, info.sampler
    missing = [k for k in STUDENT_RECORD if k not in record]
    if not record or not sampler or missing:
        raise RecipeError(
            f"{str(student)!r} is not a distilled student: its hasten.json has no "
            + ("'distillation' and 'sampler' records" if not (record and sampler) else f"distillation {missing}")
            + " (a folder written by `hasten distill`)"
        )
    forced: tuple[str, ...] = ()
    if teacher_fingerprint and record["teacher_fingerprint"] != teacher_fingerprint:
        if not force:
            raise RecipeError(
                f"student {str(student)!r} was distilled from {record['teacher']!r} (weights "
                f"{record['teacher_fingerprint'][:12]}), not from {teacher or 'this teacher'!r} (weights "
                f"{teacher_fingerprint[:12]}): judge it against its own teacher ({record['teacher']!r}), or force it"
            )
        forced = ("teacher",)
    card = {k: record[k] for k in STUDENT_RECORD}
    spent = float(record["seconds"]) + float(record["extra_seconds"]) + float(record.get("parent_seconds", 0.0))
    card["training_seconds"] = round(spent, 1)  # a student of a student counts the students before it
    card["teacher_guidance"] = info.learned_guidance
    return Recipe(
        model=_folder_ref(folder), fingerprint=folder_fingerprint(folder), solver=sampler["solver"],
        options=sampler.get("options") or {}, schedule=sampler.get("schedule", "auto"), steps=int(sampler["steps"]),
        guidance=sampler.get("guidance"), seed=seed, forced=forced, provenance={"student": card},
    )  # fmt: skip


def training_cost(student: Mapping[str, Any]) -> str:
    """A student's training cost in one phrase for tables: ``progressive, 12.5 min on cpu``."""
    seconds = float(student["training_seconds"])
    spent = f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
    return f"{student['method']}, {spent} on {student['device']}"


def read_cache_file(path: str | os.PathLike) -> tuple[AccelConfig, dict[str, Any]]:
    """The cache config in a file from ``hasten accelerate calibrate`` and the setting it was calibrated for, as
    a recipe's ``cache_setting`` (solver, steps, guidance...; not the image count, seeds or model name)."""
    config, calibration = read_accel_file(path)
    setting = {k: v for k, v in (calibration.get("setting") or {}).items() if k not in ("n", "seeds", "model")}
    return config, setting


def cache_label(config: AccelConfig) -> str:
    """``block_cache(interval=2, ...)``: a cache config in one line (its options that differ from the defaults)."""
    defaults = type(config)().to_dict() if _has_defaults(type(config)) else {}
    data = config.to_dict()
    opts = ", ".join(f"{k}={v}" for k, v in data.items() if k != "_type" and defaults.get(k, object()) != v)
    return f"{data['_type']}({opts})"


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _model_ref(model: Any) -> str:
    """How a recipe names a loaded model: its bundled name, else its folder."""
    if model.folder is None:  # a diffusers pipeline adapted in memory (hasten.from_pipeline)
        return model.info.name
    return _folder_ref(model.folder)


def _folder_ref(folder: str | os.PathLike) -> str:
    from .models.zoo import BUNDLED

    folder = pathlib.Path(folder).resolve()
    return folder.name if folder.parent == BUNDLED.resolve() else str(folder)


FOLDER_FIELDS = ("model", "quant")  # fields that may name a model folder


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> pathlib.Path:
    """Write ``recipe`` as JSON atomically. Model folders are written relative to the recipe's own folder, so a
    recipe and the folders it names can move together (a bundled model stays a name)."""
    path = pathlib.Path(path)
    data = recipe.to_dict()
    for field in FOLDER_FIELDS:
        value = data[field]
        if value is not None and (pathlib.Path(value) / "hasten.json").is_file():
            data[field] = os.path.relpath(pathlib.Path(value).resolve(), path.parent.resolve())
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file; :class:`RecipeError` names what is wrong."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe file {path} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        for field in FOLDER_FIELDS:  # relative folders are relative to the recipe file (see save_recipe)
            value = data.get(field)
            if isinstance(value, str) and not pathlib.Path(value).is_absolute():
                beside = path.parent / value
                if (beside / "hasten.json").is_file():
                    data[field] = str(beside.resolve())
    try:
        return Recipe.from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def recipe_path_beside(path: str | os.PathLike) -> pathlib.Path:
    """Where a command writes the recipe for its output: ``X.recipe.json`` beside a file, inside a folder."""
    path = pathlib.Path(path)
    if path.is_dir() or not path.suffix:
        return path / "recipe.json"
    return path.with_name(path.name.removesuffix(path.suffix) + ".recipe.json")

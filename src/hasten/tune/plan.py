"""Plans: a serialisable sampling recipe (the grid plus every step's solver decision) for one model.

A plan is what ``hasten tune`` finds and what ``hasten sample --plan`` and ``hasten bench`` replay. On disk
it is JSON with a format tag and a schema version; it names the model and its weights fingerprint so a plan
is never silently applied to another model, and records its NFE, its scores and how it was found.

Reference: Liu et al., USF / S^3, ICLR 2024 (a sampler as a sequence of per-step decisions); Li et al.,
AutoDiffusion, ICCV 2023 (searched time steps and per-step block skipping).

A plan may also carry a per-step architecture: ``skip``, the skippable blocks (:mod:`hasten.accel.skip`)
each step leaves out (schema 2), or ``assembly``, a cheaper student of the model that runs some of the steps
in its place (:mod:`hasten.accel.assembly`; schema 3). Plans with neither are written exactly as before
(schema 1, the same digest); plans with either record their ``cost`` in NFE-equivalents (FLOP-weighted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from .._io import write_text_atomic
from ..solvers import PerStepSolver, Solver, get_solver

__all__ = ["PLAN_FORMAT", "PLAN_SCHEMA_VERSION", "Assembly", "Plan", "PlanError", "load_plan", "save_plan"]

PLAN_FORMAT = "hasten-plan"
# the newest schema: 3 for plans with a per-step student, 2 for per-step block skips, 1 for the plain plans
PLAN_SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)


class PlanError(ValueError):
    """A plan file that is corrupt, of another schema version, inconsistent, or made for another model."""


@dataclasses.dataclass(frozen=True)
class Assembly:
    """Per-step model assembly: the steps (indices, sorted, at least one) at which ``student`` (a bundled model's
    name or a model folder) answers the network calls in the model's place. ``fingerprint`` is the student's
    weights fingerprint (a student changed since the plan was made is refused); ``call_share`` is one student call's
    FLOPs over one of the model's (:func:`hasten.accel.assembly.call_share`), what the plan's ``cost`` counts."""

    student: str
    fingerprint: str
    steps: tuple[int, ...]
    call_share: float

    def __post_init__(self) -> None:
        if not isinstance(self.student, str) or not self.student:
            raise PlanError(f"plan assembly: student must name a model (bundled name or folder), got {self.student!r}")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise PlanError(f"plan assembly: fingerprint must be the student's weights', got {self.fingerprint!r}")
        steps = self.steps
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
            raise PlanError(f"plan assembly: steps must be a non-empty list of step indices, got {steps!r}")
        bad = [k for k in steps if isinstance(k, bool) or not isinstance(k, int) or k < 0]
        if bad:
            raise PlanError(f"plan assembly: step {bad[0]!r} is not a step index (an integer >= 0)")
        if len(set(steps)) != len(steps):
            raise PlanError(f"plan assembly names a step twice: {list(steps)}")
        object.__setattr__(self, "steps", tuple(sorted(steps)))
        share = self.call_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise PlanError(f"plan assembly: call_share must be in (0, 1] (the student's FLOPs per call over the "
                            f"model's), got {share!r}")  # fmt: skip
        object.__setattr__(self, "call_share", float(share))

    def to_dict(self) -> dict[str, Any]:
        return {"student": self.student, "fingerprint": self.fingerprint, "steps": list(self.steps),
                "call_share": self.call_share}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Assembly:
        if isinstance(data, Assembly):
            return data
        if not isinstance(data, Mapping):
            raise PlanError(f"plan assembly must be a mapping (student, fingerprint, steps, call_share), got {data!r}")
        unknown = sorted(set(data) - {"student", "fingerprint", "steps", "call_share"})
        if unknown:
            raise PlanError(f"plan assembly has unknown field(s) {unknown}; it takes student, fingerprint, steps and "
                            "call_share")  # fmt: skip
        try:
            steps = data["steps"]
            return cls(data["student"], data["fingerprint"], tuple(steps) if isinstance(steps, list) else steps,
                       data["call_share"])  # fmt: skip
        except KeyError as err:
            raise PlanError(f"plan assembly is missing the field {err.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampling recipe: ``sigmas`` (descending VE levels, ``len(steps) + 1`` of them) and the solver per step.

    ``solver`` and ``options`` configure every step; ``steps`` (optional) holds per-step option overrides,
    one mapping per step (e.g. UniPC's ``order``, ``corrector`` and ``variant``). ``nfe`` is the number of
    denoiser calls per image batch, ``guidance`` the classifier-free guidance scale the plan was made for.
    ``model`` / ``fingerprint`` identify the model; ``scores`` and ``search`` record what was measured and how.

    ``skip`` (optional) is the per-step architecture: one tuple of skippable block indices per step
    (:func:`hasten.accel.skip.skippable_blocks` numbers them), the blocks that step leaves out; stored sorted,
    and None when no step skips anything (such a plan is the plain plan). ``cost`` is its NFE-equivalent
    (``nfe`` minus the skipped blocks' FLOP share of each call, see :meth:`cost_with`), set by the tuner.

    ``assembly`` (optional, an :class:`Assembly` or its dict) is the other per-step architecture: a student of
    the model runs the listed steps. Its ``cost`` follows from the assembly (each swapped step's calls count
    ``call_share``) and is set here. A plan takes skips or an assembly, not both.
    """

    sigmas: tuple[float, ...]
    solver: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: tuple[Mapping[str, Any], ...] | None = None
    nfe: int | None = None
    guidance: float = 1.0
    model: str = ""
    fingerprint: str = ""
    scores: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    search: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    skip: tuple[tuple[int, ...], ...] | None = None
    cost: float | None = None
    assembly: Assembly | None = None

    def __post_init__(self) -> None:
        sig = [float(s) for s in self.sigmas]
        if len(sig) < 2:
            raise PlanError(f"a plan needs at least 2 sigmas (1 step), got {len(sig)}")
        if not all(math.isfinite(s) and s >= 0 for s in sig):
            raise PlanError(f"plan sigmas must be finite and >= 0, got {sig}")
        bad = [i for i in range(len(sig) - 1) if not sig[i] > sig[i + 1]]
        if bad:
            i = bad[0]
            raise PlanError(
                f"plan sigmas must be strictly descending; sigmas[{i}]={sig[i]} <= sigmas[{i + 1}]={sig[i + 1]}"
            )
        object.__setattr__(self, "sigmas", tuple(sig))
        if self.steps is not None:
            if len(self.steps) != len(sig) - 1:
                raise PlanError(f"plan has {len(sig) - 1} steps but {len(self.steps)} per-step decisions")
            object.__setattr__(self, "steps", tuple(dict(s) for s in self.steps))
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "skip", _normalised_skip(self.skip, len(sig) - 1))
        if self.assembly is not None:
            self._set_assembly(Assembly.from_dict(self.assembly))
        elif self.skip is None:
            object.__setattr__(self, "cost", None)  # a plain plan costs its NFE
        if self.cost is not None and not (isinstance(self.cost, int | float) and 0 < self.cost < math.inf):
            raise PlanError(f"plan cost must be a finite number > 0 (NFE-equivalents), got {self.cost!r}")
        try:
            self.build_solver()
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"plan solver {self.solver!r} with these options is invalid: {err}") from None

    def _set_assembly(self, assembly: Assembly) -> None:
        if self.skip is not None:
            raise PlanError("a plan takes per-step block skips or a per-step student (assembly), not both")
        late = [k for k in assembly.steps if k >= self.num_steps]
        if late:
            raise PlanError(f"plan assembly names step {late[0]}, but the plan has {self.num_steps} steps "
                            f"(indices 0..{self.num_steps - 1})")  # fmt: skip
        object.__setattr__(self, "assembly", assembly)
        nfe = self.num_steps if self.nfe is None else self.nfe
        cost = float(nfe - (1.0 - assembly.call_share) * nfe / self.num_steps * len(assembly.steps))
        if self.cost is not None and not math.isclose(self.cost, cost, rel_tol=1e-6):
            raise PlanError(f"plan cost {self.cost!r} does not match its assembly's ({cost:.6g} NFE-equivalents)")
        object.__setattr__(self, "cost", cost)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def per_step_architecture(self) -> str | None:
        """``"skip"`` or ``"assembly"`` when the plan decides which network (part) runs at each step, else None."""
        return "skip" if self.skip is not None else "assembly" if self.assembly is not None else None

    def build_solver(self, **overrides: Any) -> Solver:
        """The executable solver: one configured solver, or a :class:`~hasten.solvers.PerStepSolver`.

        ``overrides`` replace global options (e.g. the resolved ``ems`` path of a DPM-Solver-v3 plan).
        """
        options = {**self.options, **overrides}
        if self.steps is None:
            return get_solver(self.solver, **options)
        return PerStepSolver(tuple(get_solver(self.solver, **{**options, **s}) for s in self.steps))

    def check_network(self, network: Any) -> None:
        """Refuse a skip index the network has no block for (naming the step and the index)."""
        if self.skip is None:
            return
        from ..accel.skip import check_skip, skippable_blocks

        try:
            check_skip(self.skip, len(skippable_blocks(network)))
        except (TypeError, ValueError) as err:
            raise PlanError(str(err)) from None

    def cost_with(self, shares: Sequence[float]) -> float:
        """NFE-equivalent cost: each step's calls weighted by the FLOP share left after its skipped blocks.

        ``shares`` are the blocks' FLOP shares of one call (:func:`hasten.accel.skip.block_flop_shares`). Calls
        are spread evenly over the steps (one per step for the tuner's plans).
        """
        nfe = self.num_steps if self.nfe is None else self.nfe
        if self.skip is None:
            return float(nfe)
        per_step = nfe / self.num_steps
        return float(sum(per_step * (1.0 - sum(shares[b] for b in blocks)) for blocks in self.skip))

    def check_model(self, name: str, fingerprint: str, *, force: bool = False) -> None:
        """Refuse a plan made for other weights (``force`` overrides, e.g. for a fine-tune)."""
        if force or not self.fingerprint or self.fingerprint == fingerprint:
            return
        raise PlanError(
            f"this plan was made for model {self.model!r} (weights {self.fingerprint[:12]}), not for {name!r} "
            f"(weights {fingerprint[:12]}); plans are model-specific: tune one for this model, or force it"
        )

    def digest(self) -> str:
        """sha256 of what the plan samples (model, grid, solver decisions, guidance; not its scores or search)."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("scores", "search", "cost")}
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def describe(self) -> str:
        """One line: solver, steps, NFE and the per-step decisions in short form."""
        head = f"{self.solver}, {self.num_steps} steps, NFE {self.nfe}"
        if self.skip is not None:
            cost = "" if self.cost is None else f" (cost {self.cost:.2f} NFE-equivalent)"
            skips = " ".join(f"{i}:{'-'.join(map(str, b))}" for i, b in enumerate(self.skip) if b)
            head += f"{cost}; skips step:blocks {skips}"
        if self.assembly is not None:
            swapped = ",".join(map(str, self.assembly.steps))
            head += f" (cost {self.cost:.2f} NFE-equivalent); {self.assembly.student} at steps {swapped}"
        if not self.steps:
            return head
        return head + "; steps: " + " ".join(",".join(f"{k}={v}" for k, v in sorted(s.items())) for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": PLAN_FORMAT,
            "schema_version": 3 if self.assembly is not None else 2 if self.skip is not None else 1,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "guidance": self.guidance,
            "nfe": self.nfe,
            "sigmas": list(self.sigmas),
            "solver": self.solver,
            "options": dict(self.options),
            "steps": None if self.steps is None else [dict(s) for s in self.steps],
            "scores": dict(self.scores),
            "search": dict(self.search),
        }
        if self.skip is not None:  # a plain plan keeps schema 1's fields (and so its digest and its readers)
            data["skip"] = [list(b) for b in self.skip]
            data["cost"] = self.cost
        if self.assembly is not None:
            data["assembly"] = self.assembly.to_dict()
            data["cost"] = self.cost
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a hasten plan (format {data.get('format') if isinstance(data, Mapping) else None!r})")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMAS:
            raise PlanError(
                f"plan schema version {version!r} is not supported; this hasten reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))}"
            )
        if version == 1 and ("skip" in data or "cost" in data):
            raise PlanError("a schema 1 plan has no per-step architecture ('skip', 'cost'); skips need schema 2")
        if version != 3 and "assembly" in data:
            raise PlanError(f"a schema {version} plan has no per-step student ('assembly'); assemblies need schema 3")
        try:
            return cls(
                sigmas=tuple(data["sigmas"]), solver=data["solver"], options=data.get("options") or {},
                steps=None if data.get("steps") is None else tuple(data["steps"]), nfe=data.get("nfe"),
                guidance=float(data.get("guidance", 1.0)), model=data.get("model", ""),
                fingerprint=data.get("fingerprint", ""), scores=data.get("scores") or {},
                search=data.get("search") or {},
                skip=None if data.get("skip") is None else tuple(tuple(b) for b in data["skip"]),
                cost=data.get("cost"),
                assembly=None if data.get("assembly") is None else Assembly.from_dict(data["assembly"]),
            )  # fmt: skip
        except KeyError as err:
            raise PlanError(f"plan is missing the field {err.args[0]!r}") from None


def _normalised_skip(skip: Any, num_steps: int) -> tuple[tuple[int, ...], ...] | None:
    """Per-step skip sets as sorted tuples of distinct ints; None when absent or empty at every step."""
    if skip is None:
        return None
    if isinstance(skip, str | bytes) or not isinstance(skip, Sequence):
        raise PlanError(f"plan skip must be a list of block-index lists, one per step, got {skip!r}")
    if len(skip) != num_steps:
        raise PlanError(f"plan has {num_steps} steps but {len(skip)} per-step skip sets")
    out = []
    for step, blocks in enumerate(skip):
        if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence):
            raise PlanError(f"plan skip at step {step} must be a list of block indices, got {blocks!r}")
        bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or b < 0]
        if bad:
            raise PlanError(f"plan skip at step {step} has {bad[0]!r}; block indices are integers >= 0")
        if len(set(blocks)) != len(blocks):
            raise PlanError(f"plan skip at step {step} names a block twice: {list(blocks)}")
        out.append(tuple(sorted(blocks)))
    return tuple(out) if any(out) else None


def save_plan(plan: Plan, path: str | os.PathLike) -> pathlib.Path:
    """Write ``plan`` as JSON atomically (a kill never leaves a half-written plan)."""
    return write_text_atomic(path, json.dumps(plan.to_dict(), indent=2) + "\n")


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; :class:`PlanError` names what is wrong."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no plan file at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"plan file {path} is not valid JSON: {err}") from None
    return Plan.from_dict(data)


def plan_from_stock(sigmas: Sequence[float], solver: str, **options: Any) -> Plan:
    """A plan that replays a stock configuration (a registered solver on a given grid)."""
    return Plan(tuple(float(s) for s in sigmas), solver, options)

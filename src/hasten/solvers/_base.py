"""The solver contract, the solver registry and the one shared sampling loop.

A solver is a frozen config (its options) with a pure ``step``: given the current ``x`` at
``sigmas[i]``, the explicit state it returned last time and a counted model, it returns ``x`` at
``sigmas[i + 1]`` and its new state. No hidden step counters: everything a step needs is in
:class:`StepInfo` and the state, so tests can seed a multistep history exactly (diffrax / torchsde style).

Reference: Karras et al., EDM, Alg. 1-2 (one readable loop); Kidger, diffrax (pure ``step`` with
explicit solver state and a declared order).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from .._context import sampling_run
from ..config import Config
from ..registry import Registry
from ..schedules.grids import from_sigmas
from ..schedules.noise import FlowMatching
from .brownian import BrownianNoise, IndependentNoise, RecordedNoise

__all__ = [
    "DEFAULT_SOLVER",
    "OPTION_RESOLVERS",
    "SOLVERS",
    "Model",
    "NonFiniteOutputError",
    "OptionResolver",
    "SampleOutput",
    "Solver",
    "StepHook",
    "StepInfo",
    "available",
    "ddim_step",
    "get_solver",
    "parse_solver",
    "register_solver",
    "sample",
]

# noise(sigma, sigma_next): standard normal noise of that move; noise(sigma, sigma_next, draw=k), k >= 1: extra
# independent draws for the same move (candidate moves, hasten.solvers.svdd), per row reproducible like the first
NoiseFn = Callable[..., Tensor]


class NonFiniteOutputError(FloatingPointError):
    """The denoiser returned NaN or infinity; the message names the step index and sigma."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Where a step is: its index and the whole discretisation (Python floats, float64)."""

    index: int
    sigmas: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def sigma(self) -> float:
        return self.sigmas[self.index]

    @property
    def sigma_next(self) -> float:
        return self.sigmas[self.index + 1]

    @property
    def remaining(self) -> int:
        """Steps left including this one (1 at the final step)."""
        return self.num_steps - self.index


class Model(Protocol):
    """What a solver calls: the bound, counted denoiser ``model(x, sigma) -> x0_hat``.

    Keyword arguments are conditioning for this call only, added to the run's ``cond`` (a float is
    broadcast to a ``[B]`` tensor as ``sigma`` is): how a solver for two-time networks passes the level it
    jumps to (``target_sigma``, :mod:`hasten.solvers.gamma`).
    """

    def __call__(self, x: Tensor, sigma: float, **cond: Any) -> Tensor: ...


class StepHook(Protocol):
    """Told where sampling is before every step (caches and early exit key their state on it)."""

    def begin_step(self, info: StepInfo) -> None: ...


@dataclasses.dataclass(frozen=True)
class Solver(Config):
    """Base of every solver. Subclasses are frozen dataclasses whose fields are the solver's options.

    ``name`` is the registry key (k-diffusion vocabulary) of the preset a solver's options match (see
    :class:`_PresetName`); ``order`` (class attribute) the global convergence order, unless the subclass
    has an ``order`` option. ``step`` must be pure apart from calling ``model`` and ``noise``.
    """

    name: ClassVar[_PresetName]  # set below, once the registry exists
    order: ClassVar[int] = 1

    @property
    def convergence_order(self) -> int:
        """The global order of accuracy the order tests check."""
        return int(self.order)

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def brownian_noise(self) -> bool:
        """Whether its noise comes from one Brownian path (:mod:`~hasten.solvers.brownian`), not fresh draws."""
        return False

    def min_steps(self) -> int:
        """The fewest steps this solver can take."""
        return 1

    @classmethod
    def options_for_schedule(cls, options: Mapping[str, Any], schedule: Any) -> dict[str, Any]:
        """``options`` completed with the defaults this solver takes from the model's noise schedule.

        An option the caller set is kept. The base rule: a solver with a ``space`` option (Heun, PLMS)
        integrates a flow-matching model in flow coordinates; in VE coordinates Heun's first step from
        sigma ~ 1e4 wrecked the bundled DiT (FD 23,072 against 411). A solver with another
        schedule-dependent default overrides this.
        """
        if isinstance(schedule, FlowMatching) and "space" in cls.option_names() and "space" not in options:
            return {**options, "space": "flow"}
        return dict(options)

    def step(
        self, model: Model, x: Tensor, info: StepInfo, state: Any, noise: NoiseFn
    ) -> tuple[Tensor, Any]:  # pragma: no cover - interface
        """Advance ``x`` from ``info.sigma`` to ``info.sigma_next``; returns ``(x_next, new_state)``."""
        raise TypeError(f"{type(self).__name__} does not implement step()")


def ddim_step(x: Tensor, denoised: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """First-order exponential-integrator step: DDIM (eta = 0) = DPM-Solver-1 = Euler in VE form.

    ``sigma`` and ``sigma_next`` are numbers, or ``[B]`` tensors of per-row levels (distillation targets).

    ``x' = (sigma' / sigma) x + (1 - sigma' / sigma) D``; exact when ``D`` is constant along the path.

    Reference: Song et al., DDIM, Eq. 12; Lu et al., DPM-Solver, Eq. 3.7 (first order).
    """
    ratio = sigma_next / sigma
    if isinstance(ratio, Tensor) and ratio.ndim == 1:  # per-row levels
        ratio = ratio.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.lerp(denoised, x, ratio)  # one pass: D + (s'/s)(x - D)


@dataclasses.dataclass(frozen=True)
class _SolverSpec:
    """A registry entry: the class, the option preset the name stands for, and the name it is an alias of."""

    cls: type[Solver]
    defaults: Mapping[str, Any]
    alias_of: str | None = None


SOLVERS: Registry[_SolverSpec] = Registry("solver")
DEFAULT_SOLVER = "dpmpp_2m"  # what generate, sample and recipes run when no solver is named


class OptionResolver(Protocol):
    """Fills in solver options that depend on the model being sampled (more than its schedule).

    Called as ``resolver(options, model, guidance)`` with the caller's options, the
    :class:`hasten.LoadedModel` and the guidance scale; returns the options to run with. Registered in
    :data:`OPTION_RESOLVERS` under a solver name by the module that knows how (DPM-Solver-v3's
    ``ems="auto"``: :mod:`hasten.tune.ems`), so the sampling entry point needs no solver-specific code.
    """

    def __call__(self, options: Mapping[str, Any], model: Any, guidance: float) -> dict[str, Any]: ...


OPTION_RESOLVERS: Registry[OptionResolver] = Registry("option resolver")


def register_solver(
    name: str, *, alias_of: str | None = None, **defaults: Any
) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator: register ``cls`` under ``name`` with an option preset (stackable).

    One class may stand behind several names (``dpmpp_2m`` and ``dpmpp_3m`` are one class with
    ``order=2`` and ``order=3``); each name is a distinct preset, and a configured solver's ``name`` is the
    preset its options match. ``alias_of`` registers a second name for an already registered, identical
    preset (``ddpm`` is ``euler_ancestral``): the solver then reports the original name.
    """

    def decorator(cls: type[Solver]) -> type[Solver]:
        if alias_of is not None:
            if defaults:
                raise TypeError(f"alias {name!r} takes its preset from {alias_of!r}; give no options")
            target = SOLVERS.get(alias_of)
            if target.cls is not cls or target.alias_of is not None:
                raise TypeError(f"alias {name!r}: {alias_of!r} is not a preset of {cls.__name__}")
            SOLVERS.add(name, _SolverSpec(cls, target.defaults, alias_of))
            return cls
        unknown = set(defaults) - set(cls.option_names())
        if unknown:
            raise TypeError(f"preset {name!r}: {cls.__name__} has no option(s) {sorted(unknown)}")
        resolved = {**_field_defaults(cls), **defaults}
        for other in SOLVERS.names():
            spec = SOLVERS.get(other)
            if spec.cls is cls and spec.alias_of is None and {**_field_defaults(cls), **spec.defaults} == resolved:
                raise ValueError(f"preset {name!r} equals {other!r}; register it with alias_of={other!r}")
        SOLVERS.add(name, _SolverSpec(cls, dict(defaults)))
        return cls

    return decorator


def _field_defaults(cls: type[Solver]) -> dict[str, Any]:
    """The options of ``cls`` that have a default, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


class _PresetName:
    """``Solver.name``: the registered name of the preset a solver's options match.

    On an instance: the most specific preset of its class whose options all equal the instance's (so
    ``get_solver("dpmpp_3m").name == "dpmpp_3m"`` and ``DPMSolverMultistep(order=2, eta=1.0).name ==
    "dpmpp_2m_sde"``); an instance matching no preset (``DPMSolverMultistep(order=1)``) carries its class's
    name. On a class: the preset its default options match (``DPMSolverMultistep.name == "dpmpp_2m"``),
    else its only preset. A subclass may set ``name`` to a plain string instead (unregistered solvers).
    """

    def __get__(self, obj: Solver | None, cls: type[Solver]) -> str:
        presets = [(n, s) for n in SOLVERS.names() if (s := SOLVERS.get(n)).cls is cls and s.alias_of is None]
        candidates = [_field_defaults(cls)]
        if obj is not None:
            candidates.insert(0, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        for values in candidates:
            # the most specific matching preset (most options pinned); names break ties
            matches = sorted(
                (-len(s.defaults), n)
                for n, s in presets
                if all(k in values and values[k] == v for k, v in s.defaults.items())
            )
            if matches:
                return matches[0][1]
        return presets[0][0] if presets else ""


Solver.name = _PresetName()  # type: ignore[assignment]


def available() -> list[str]:
    """Names of all registered solvers."""
    return SOLVERS.names()


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """Resolve a solver name (plus options) or pass a configured solver through.

    Raises:
        KeyError: unknown name (the message lists the available solvers).
        TypeError: an option the solver does not take (the message lists those it does).
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"options {sorted(options)} given with an already-configured solver {solver!r}")
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name or a Solver, got {type(solver).__name__}")
    spec = SOLVERS.get(solver)
    try:
        return spec.cls.create(**{**spec.defaults, **options})
    except TypeError as err:
        raise TypeError(f"solver {solver!r}: {err}") from None


def parse_solver(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a solver spec: ``"unipc:variant=bh2,order=3"`` -> ``("unipc", {"variant": "bh2", "order": 3})``.

    Values are parsed as JSON when they can be (numbers, true/false), else kept as strings.
    """
    name, options = split_spec(spec)
    get_solver(name, **options)  # validates the name and every option now, not mid-run
    return name, options


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` -> ``(name, options)``, values parsed as JSON where they can be; no validation (the
    spec grammar of every sampler registry: continuous solvers and discrete samplers)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"solver option {item!r} in {spec!r} must look like key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


class _CountedModel:
    """Binds conditioning, checks every output and counts denoiser calls (NFE)."""

    def __init__(self, denoiser: Callable[..., Tensor], cond: Mapping[str, Any], x: Tensor, check_finite: bool):
        self.denoiser, self.cond, self.check_finite = denoiser, dict(cond), check_finite
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.nfe = 0
        self.step_index = 0

    def __call__(self, x: Tensor, sigma: float, **cond: Any) -> Tensor:
        sigma_b = torch.full((x.shape[0],), sigma, dtype=self.dtype, device=self.device)
        for key, value in cond.items():  # this call's own conditioning (see Model)
            if key in self.cond:
                raise TypeError(f"conditioning {key!r} is bound for the whole run; a solver cannot set it per call")
            if isinstance(value, float | int):
                cond[key] = torch.full((x.shape[0],), float(value), dtype=self.dtype, device=self.device)
        out = self.denoiser(x, sigma_b, **self.cond, **cond)
        self.nfe += 1
        if not isinstance(out, Tensor):
            raise TypeError(f"the denoiser must return a Tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"the denoiser returned shape {tuple(out.shape)} for input shape {tuple(x.shape)} "
                f"at step {self.step_index} (sigma={sigma:.6g})"
            )
        out = out.to(self.dtype)
        # A sum is a cheap screen (NaN/inf propagate); only a non-finite sum needs the full check,
        # which also rules out a finite tensor whose sum merely overflowed.
        if self.check_finite and not math.isfinite(out.sum().item()) and not bool(torch.isfinite(out).all()):
            raise NonFiniteOutputError(
                f"the denoiser returned non-finite values at step {self.step_index} (sigma={sigma:.6g})"
            )
        return out


@dataclasses.dataclass
class SampleOutput:
    """What :func:`sample` returns with ``return_info=True``."""

    x: Tensor
    nfe: int
    sigmas: tuple[float, ...]
    solver: Solver
    state: Any = None  # the solver's final state: pass it as ``state=`` to continue sampling

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def sample(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor | None = None,
    solver: str | Solver = "dpmpp_2m",
    *,
    plan: Any = None,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    noise_seeds: Sequence[int] | None = None,
    step_noise: Tensor | Sequence[Tensor] | None = None,
    hooks: Sequence[StepHook] = (),
    callback: Callable[[int, float, Tensor], Tensor | None] | None = None,
    state: Any = None,
    denoise_to_zero: bool = False,
    check_finite: bool = True,
    return_info: bool = False,
    **options: Any,
) -> Tensor | SampleOutput:
    """Solve the diffusion ODE/SDE from ``sigmas[0]`` to ``sigmas[-1]`` with the chosen solver.

    Args:
        denoiser: ``D(x, sigma, **cond) -> x0_hat`` in VE form (see :mod:`hasten.models`).
        x: Starting point at noise level ``sigmas[0]`` (e.g. ``noise * sigmas[0]``), shape ``[B, ...]``.
        sigmas: Descending VE noise levels, length ``steps + 1``; the last may be 0.
        solver: A registered name (see :func:`available`) or a configured :class:`Solver`.
        plan: A :class:`hasten.tune.Plan` (from ``hasten tune``): supplies the grid and every step's solver,
            so ``sigmas``, ``solver`` and solver options must not be given with it.
        cond: Conditioning passed to every denoiser call (``{"class_labels": y}``).
        generator: Random source for stochastic solvers: it seeds the Brownian path of solvers with
            ``brownian=True`` (their default; the same generator seed then gives one path at any step
            count) or draws independent noise per call (``brownian=False``).
        noise_seeds: One seed per row of ``x`` instead of ``generator``: each row's step noise then comes from
            its own Brownian path (or its own generator with ``brownian=False``), so it does not depend on the
            rows beside it (``hasten.seeds``: what ``generate`` passes, so a sharded run equals one process's).
        step_noise: The noise itself instead of a random source: one tensor shaped like ``x`` per step, handed to a
            stochastic step from ``sigmas[i]`` to ``sigmas[i + 1]`` (the noise maps an inversion recorded,
            :func:`hasten.invert`); a solver that asks for noise inside a step is refused.
        hooks: Objects told ``begin_step(info)`` before each step (caches, early exit).
        callback: Called as ``callback(i, sigma_next, x)`` after every step. A tensor it returns replaces ``x``
            (as diffusers' ``callback_on_step_end`` replaces latents: inpainting's blending of the known
            region); multistep histories are kept.
        state: Initial solver state (to resume, or to seed a multistep history exactly).
        denoise_to_zero: If the grid ends above 0, finish with one extra denoiser call (DPM-Solver's
            option); counted in NFE.
        check_finite: Raise :class:`NonFiniteOutputError` on NaN/inf denoiser outputs.
        return_info: Return a :class:`SampleOutput` with the NFE instead of the tensor alone.
        **options: Solver options, e.g. ``order=3``, ``variant="bh2"``, ``eta=0.5``.

    Returns:
        ``x`` at ``sigmas[-1]`` (or the denoised result), in the input's dtype; numerics run in
        float32 (or float64 for float64 inputs).

    Example:
        >>> import torch, hasten
        >>> gmm = hasten.models.ProductMixture()
        >>> sigmas = hasten.schedules.karras(10, 0.01, 20.0)
        >>> x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        >>> hasten.sample(gmm, x, sigmas, "dpmpp_2m").shape
        torch.Size([4, 8])
    """
    if plan is not None:
        if sigmas is not None or options or solver != "dpmpp_2m":
            raise TypeError("a plan supplies the grid and the solver; do not pass sigmas, solver or options with it")
        if getattr(plan, "skip", None) is not None:  # the loop never sees the network its blocks belong to
            raise ValueError(
                "this plan skips blocks per step, which needs the network: sample it with hasten.generate(model, "
                "plan=plan), or pass plan.sigmas and plan.build_solver() inside hasten.accel.skip.skip_blocks(network, "
                "plan.skip)"
            )
        sigmas, solver = plan.sigmas, plan.build_solver()
    if sigmas is None:
        raise TypeError("sample() needs sigmas (a descending grid, e.g. hasten.get_sigmas(...)) or a plan")
    solver = get_solver(solver, **options)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    grid = tuple(from_sigmas(sigmas).tolist())
    if len(grid) - 1 < solver.min_steps():
        raise ValueError(f"solver {solver.name!r} needs at least {solver.min_steps()} steps, got {len(grid) - 1}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.to(work)
    if not math.isfinite(xw.sum().item()) and not bool(torch.isfinite(xw).all()):
        raise ValueError("the starting point x contains NaN or infinity")
    model = _CountedModel(denoiser, cond or {}, xw, check_finite)

    noise: NoiseFn
    if step_noise is not None:
        if generator is not None or noise_seeds is not None:
            raise TypeError("pass one of generator, noise_seeds or step_noise")
        noise = RecordedNoise(step_noise, grid, xw.shape, work, xw.device)
    elif noise_seeds is not None:
        if generator is not None:
            raise TypeError("pass generator or noise_seeds, not both")
        noise_seeds = [int(s) for s in noise_seeds]
        if len(noise_seeds) != xw.shape[0]:
            raise ValueError(f"noise_seeds has {len(noise_seeds)} seeds for {xw.shape[0]} rows of x")
        if solver.stochastic and solver.brownian_noise:
            noise = BrownianNoise(noise_seeds, xw.shape, work, xw.device)
        else:
            rows = [torch.Generator().manual_seed(s) for s in noise_seeds] if solver.stochastic else None
            noise = IndependentNoise(xw.shape, work, xw.device, rows)
    elif solver.stochastic and solver.brownian_noise:
        where = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=where))
        noise = BrownianNoise(seed, xw.shape, work, xw.device)
    else:
        noise = IndependentNoise(xw.shape, work, xw.device, generator)

    with sampling_run() as run:  # network-level accelerators key their state on this run and step
        for i in range(len(grid) - 1):
            info = StepInfo(i, grid)
            model.step_index, run.step = i, info
            for hook in hooks:
                hook.begin_step(info)
            xw, state = solver.step(model, xw, info, state, noise)
            if callback is not None:
                edited = callback(i, grid[i + 1], xw)
                if edited is not None:
                    if not isinstance(edited, Tensor):
                        raise TypeError(f"callback returned {type(edited).__name__}; return None or a replacement x")
                    if edited.shape != xw.shape:
                        raise ValueError(f"callback returned shape {tuple(edited.shape)} for x of {tuple(xw.shape)}")
                    xw = edited.to(device=xw.device, dtype=work)
        if denoise_to_zero and grid[-1] > 0:
            model.step_index = len(grid) - 1
            run.step = StepInfo(len(grid) - 2, grid)  # part of the last step
            xw = model(xw, grid[-1])
    out = xw.to(x.dtype)
    return SampleOutput(out, model.nfe, grid, solver, state) if return_info else out


SPACES = ("ve", "flow")


def space_coordinates(sigma: float, space: str) -> tuple[float, float]:
    """Time ``u`` and state scale ``a`` of an integration space: the state there is ``y = a x``, ``u = a sigma``.

    In both spaces the probability-flow ODE reads ``dy/du = (y - D) / u``:

    * ``"ve"``: ``u = sigma``, ``a = 1`` (Karras/EDM; k-diffusion's Euler, Heun and PLMS).
    * ``"flow"``: rectified-flow coordinates ``u = sigma / (1 + sigma)``, ``a = 1 / (1 + sigma)``, where
      ``dy/du`` is the velocity ``eps - x0``. A flow-matching grid is uniform in ``u`` and starts near
      ``u = 1`` (VE sigma ~ 1e4), so methods that are not exponential integrators (Heun, Adams-Bashforth)
      belong here for flow models, as in diffusers' ``FlowMatchHeunDiscreteScheduler``.

    Reference: Liu et al., rectified flow, ICLR 2023 (the linear interpolation ``x_t = (1 - t) x0 + t eps``);
    Karras et al., EDM, Sec. 4 (the choice of ``sigma(t)`` and ``s(t)`` changes a solver's truncation error).
    """
    if space == "ve":
        return sigma, 1.0
    if space == "flow":
        a = 1.0 / (1.0 + sigma)
        return sigma * a, a
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def sigma_of(u: float, space: str) -> float:
    """Inverse of :func:`space_coordinates`: the VE sigma at time ``u`` of ``space``."""
    if space == "ve":
        return u
    if space == "flow":
        return u / (1.0 - u)
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def lambda_of(sigma: float) -> float:
    """Half log-SNR of a VE noise level, ``lambda = -log sigma`` (``inf`` at sigma = 0)."""
    return math.inf if sigma == 0 else -math.log(sigma)

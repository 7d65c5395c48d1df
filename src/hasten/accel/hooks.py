"""The accelerator core: removable forward hooks, state keyed by sampling run, step and guidance branch.

``accelerate_(module, config)`` installs one technique (DeepCache, block caching, RAS) on a network and
returns an :class:`Accelerator` handle with ``reset()``, ``remove()`` and ``stats``. Its patches are hooks
in :mod:`hasten.hooks` (one registry per module, shared with quantisation and any other hook), named
``"hasten.accel"`` on the network and ``"hasten.accel/<submodule>"`` on the modules it caches. The design
follows diffusers' hooks with two differences that answer the complaints users file against caches:

* State is keyed by the sampling run, the guidance branch and the sample shape, and cleared whenever
  :func:`hasten.sample` starts a new run, so nothing leaks from one generation into the next. The step is
  the loop's step index (:mod:`hasten._context`), never a position looked up from a timestep value.
* Every technique reports what it saved in network-evaluation equivalents, from FLOPs counted once on the
  first full call (``torch.utils.flop_counter``), so a cache's saving can be compared with a solver's.

Outside :func:`hasten.sample` (a hand-written loop), every network call counts as one step and the state
persists until ``reset()``: call it between generations there.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .._context import current_branch, current_run
from .._io import write_text_atomic
from ..config import Config, check_choice
from ..hooks import HookHandle, add_hook, get_hook, remove_hooks
from ..registry import Registry

ACCEL_SCHEMA = 1
ACCEL_HOOK = "hasten.accel"  # the hook on the network itself; its parts are named ACCEL_HOOK + "/<module>"
SCHEDULES = ("uniform", "nonuniform")
TECHNIQUES: Registry[type[Accelerator]] = Registry("acceleration technique")


@dataclasses.dataclass(frozen=True)
class AccelConfig(Config):
    """Base of every acceleration config: plain data, saved and loaded as JSON."""

    technique: ClassVar[str] = ""

    def save(self, path: str | Path, *, calibration: Mapping[str, Any] | None = None) -> Path:
        """Write the config (and how it was calibrated, if given) atomically as JSON."""
        data: dict[str, Any] = {"hasten_accel": ACCEL_SCHEMA, "config": self.to_dict()}
        if calibration is not None:
            data["calibration"] = dict(calibration)
        return write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AccelConfig:
        """Read a config written by :meth:`save` (or by ``hasten accelerate calibrate``)."""
        config, _ = read_accel_file(path)
        if not isinstance(config, cls):
            raise TypeError(f"{str(path)!r} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


def read_accel_file(path: str | Path) -> tuple[AccelConfig, dict[str, Any]]:
    """The config in a file written by :meth:`AccelConfig.save` and its calibration record (``{}`` if none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"acceleration config {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"acceleration config {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "config" not in data:
        raise ValueError(f"{str(path)!r} is not a hasten acceleration config (no 'config' entry)")
    if data.get("hasten_accel") != ACCEL_SCHEMA:
        raise ValueError(
            f"{str(path)!r} has acceleration schema {data.get('hasten_accel')!r}; this hasten reads {ACCEL_SCHEMA}"
        )
    try:
        config = AccelConfig.from_dict(data["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"acceleration config {str(path)!r}: {err}") from None
    return config, dict(data.get("calibration") or {})


def check_window(start: float, stop: float) -> None:
    """``start`` / ``stop``: the fractions of the steps between which a cache may reuse."""
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"need 0 <= start <= stop <= 1, got start={start}, stop={stop}")


def window_steps(start: float, stop: float, num_steps: int) -> range:
    """The steps inside the ``[start, stop)`` fraction of ``num_steps``; every other step is computed in full."""
    return range(math.ceil(start * num_steps), math.ceil(stop * num_steps))


@dataclasses.dataclass(frozen=True)
class RefreshSchedule(AccelConfig):
    """When a cache refreshes: every ``interval`` steps, always outside the ``[start, stop)`` fraction.

    Args:
        interval: Steps between full computations; 1 never reuses (bitwise the uncached result).
        schedule: ``"uniform"`` (every ``interval``-th step) or ``"nonuniform"`` (the same number of full
            steps, denser near the start and the end of sampling, where features change fastest).
        start: Fraction of the steps computed in full before any reuse (users ask for ~0.05).
        stop: Fraction of the steps after which every step is computed in full again.
    """

    interval: int = 3
    schedule: str = "uniform"
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_window(self.start, self.stop)

    @functools.lru_cache(maxsize=32)  # noqa: B019 - configs are small frozen values; asked once per network call
    def refresh_steps(self, num_steps: int) -> frozenset[int]:
        """The step indices computed in full on a grid of ``num_steps`` steps (always includes step 0)."""
        span = window_steps(self.start, self.stop, num_steps)
        full = (set(range(num_steps)) - set(span)) | {0}
        if not span:
            return frozenset(full)
        if self.schedule == "uniform":
            full.update(span[:: self.interval])
        else:
            count = math.ceil(len(span) / self.interval)
            if count == 1:
                full.add(span[0])
            else:  # cosine spacing: dense at both ends of the cached span
                for k in range(count):
                    u = (1 - math.cos(math.pi * k / (count - 1))) / 2
                    full.add(span[round(u * (len(span) - 1))])
        return frozenset(full)

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        if num_steps is None:  # outside hasten's loop: the grid length is unknown
            if self.schedule != "uniform" or self.stop < 1.0 or self.start > 0.0:
                raise ValueError(
                    f"a {self.schedule!r} schedule with start={self.start}, stop={self.stop} needs the number of "
                    "steps: sample with hasten.sample/generate, or call reset(num_steps=N) before the loop"
                )
            return step % self.interval == 0
        return step in self.refresh_steps(num_steps)


def check_extrapolate(order: Any) -> None:
    if not isinstance(order, int) or not 0 <= order <= 2:
        raise ValueError(f"extrapolate must be 0 (reuse as is), 1 (linear) or 2 (quadratic), got {order!r}")


@dataclasses.dataclass
class AccelStats:
    """What an accelerator did since it was installed or last ``reset()``.

    ``calls`` network calls, of which ``computed`` ran in full and ``reused`` took cached features;
    ``nfe_saved`` is the work skipped in units of full network calls (FLOP-weighted), so
    ``calls - nfe_saved`` is the NFE-equivalent cost; ``cache_bytes`` is what the caches hold now.
    """

    calls: int = 0
    computed: int = 0
    reused: int = 0
    nfe_saved: float = 0.0
    cache_bytes: int = 0

    @property
    def nfe_equivalent(self) -> float:
        return self.calls - self.nfe_saved

    @property
    def saved_fraction(self) -> float:
        return self.nfe_saved / self.calls if self.calls else 0.0

    def since(self, earlier: AccelStats) -> AccelStats:
        """The calls made after ``earlier`` was taken (``cache_bytes`` stays the current value)."""
        return AccelStats(
            self.calls - earlier.calls,
            self.computed - earlier.computed,
            self.reused - earlier.reused,
            self.nfe_saved - earlier.nfe_saved,
            self.cache_bytes,
        )

    @classmethod
    def combine(cls, parts: Sequence[Mapping[str, Any] | None]) -> AccelStats | None:
        """The stats of several processes' shares of one run (``dataclasses.asdict`` of each; None: no cache):
        counts add up, ``cache_bytes`` is the largest process's."""
        present = [part for part in parts if part is not None]
        if not present:
            return None
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "cache_bytes"]
        return cls(
            **{name: sum(part[name] for part in present) for name in fields},
            cache_bytes=max(part["cache_bytes"] for part in present),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "nfe_equivalent": self.nfe_equivalent,
            "saved_fraction": self.saved_fraction,
        }


@dataclasses.dataclass
class CallState:
    """The network call in progress: its cache slot, step and whether it computes in full."""

    slot: dict[str, Any]
    step: int
    num_steps: int | None
    full: bool = True
    skipped: set[str] = dataclasses.field(default_factory=set)  # modules that returned cached values


class Accelerator(abc.ABC):
    """Handle of an installed technique. Subclasses patch modules in :meth:`_install` and decide per call.

    Attributes:
        module: The network the technique is installed on.
        config: The technique's :class:`AccelConfig`.
    """

    config_type: ClassVar[type[AccelConfig]]
    forecast_names: set[str] | None = None  # cached values that reach fresh modules (None: all of them)

    def __init__(self, module: nn.Module, config: AccelConfig) -> None:
        self.module, self.config = module, config
        self._handles: list[HookHandle] = []
        self._slots: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        self._num_steps: int | None = None
        self._call: CallState | None = None
        self._flops: dict[tuple[int, ...], dict[str, float]] = {}  # per sample shape: module name -> FLOP share
        self._flop_mode: FlopCounterMode | None = None
        self._removed = False
        self._stats = AccelStats()
        try:
            self._install()
            self._handles.append(add_hook(module, ACCEL_HOOK, _RootHook(self)))
        except BaseException:
            remove_hooks(self._handles)  # a failed install leaves the network as it was
            raise

    # -- public -----------------------------------------------------------------------------------------

    @property
    def stats(self) -> AccelStats:
        self._stats.cache_bytes = _tensor_bytes(self._slots.values())
        return dataclasses.replace(self._stats)

    def reset(self, *, num_steps: int | None = None) -> None:
        """Drop every cached feature and zero the stats. ``num_steps`` tells a hand-written loop's length."""
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        self._slots.clear()
        self._num_steps = num_steps
        self._stats = AccelStats()

    def remove(self) -> None:
        """Take every hook of this technique off (other hooks stay); with no other hooks on the network, its
        ``forward`` attributes are exactly the original again."""
        if self._removed:
            raise RuntimeError(f"this {type(self).__name__} was already removed")
        remove_hooks(self._handles)  # all or nothing: refused while another library's patch wraps ours
        self._handles.clear()
        self._slots.clear()
        self._removed = True

    def __enter__(self) -> Accelerator:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._removed:
            self.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, stats={self.stats})"

    # -- for subclasses ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _install(self) -> None:
        """Patch the technique's modules (with :meth:`_patch`); raise to refuse a network it cannot hook."""

    @abc.abstractmethod
    def _begin_call(self, call: CallState) -> None:
        """Decide ``call.full`` before the network runs (a dynamic technique may revise it during the call)."""

    def _skipped_share(self, call: CallState, shares: Mapping[str, float]) -> float:
        """Fraction of a full call's FLOPs this call skipped (default: the modules it served from cache)."""
        return sum(shares.get(name, 0.0) for name in call.skipped)

    def _patch(self, module: nn.Module, name: str, new_forward: Callable[..., Any]) -> None:
        """Hook ``module`` with ``new_forward(forward, *args, **kwargs)`` (``forward``: the rest of its chain);
        undone by :meth:`remove`. ``name`` is the module's path in the network (keys its cache and FLOP share)."""
        hook = functools.partial(self._measured, name, new_forward)
        self._handles.append(add_hook(module, f"{ACCEL_HOOK}/{name}", hook))

    def _cached_forward(self, name: str) -> Callable[..., Any]:
        """A forward that stores its output on full calls and serves it (or its extrapolation) on reused calls."""

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None or call.full:
                out = original(*args, **kwargs)
                if call is not None:
                    self._store(call, name, out)
                return out
            call.skipped.add(name)
            return self._serve(call, name)

        return forward

    def _store(self, call: CallState, name: str, value: Any) -> None:
        """Keep ``value`` as the newest full-step value of ``name``, with older steps' values for a forecast."""
        forecast = self.forecast_names is None or name in self.forecast_names
        keep = 1 + int(getattr(self.config, "extrapolate", 0)) if forecast else 1
        history = [(step, v) for step, v in call.slot.get(name, ()) if step != call.step]
        call.slot[name] = [(call.step, value), *history][:keep]

    def _serve(self, call: CallState, name: str) -> Any:
        """The cached value of ``name`` at this step: the newest one, or its polynomial forecast in the step index
        through the last ``extrapolate + 1`` full steps (Lagrange form; fewer points early in a run).

        Reference: Taylor forecast of cached features, Liu et al., "From Reusing to Forecasting: Accelerating
        Diffusion Models with TaylorSeers", 2025, Eq. 6 (finite differences of full steps).
        """
        history = call.slot[name]
        if len(history) == 1:
            return history[0][1]
        steps = [step for step, _ in history]
        weights = []
        for j, sj in enumerate(steps):
            w = 1.0
            for m, sm in enumerate(steps):
                if m != j:
                    w *= (call.step - sm) / (sj - sm)
            weights.append(w)
        return _combine([v for _, v in history], weights)

    # -- internals --------------------------------------------------------------------------------------

    def _measured(
        self, name: str, new_forward: Callable[..., Any], original: Callable[..., Any], *a: Any, **k: Any
    ) -> Any:
        mode = self._flop_mode
        if mode is None or not name:
            return new_forward(original, *a, **k)
        before = mode.get_total_flops()
        out = new_forward(original, *a, **k)
        shares = self._flops.setdefault(self._measuring, {})
        shares[name] = shares.get(name, 0.0) + (mode.get_total_flops() - before)
        return out

    def _root_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._call is not None:  # re-entrant call (the network calls itself): no caching inside
            return original(*args, **kwargs)
        x = _first_tensor(args, kwargs)
        run = current_run()  # a new run has already cleared the slots (_RootHook.new_run)
        key = (current_branch(), tuple(x.shape))
        slot = self._slots.setdefault(key, {"_calls": 0})
        if run is not None and run.step is not None:
            step, num_steps = run.step.index, run.step.num_steps
        else:
            step, num_steps = slot["_calls"], self._num_steps
        call = CallState(slot, step, num_steps, full=slot["_calls"] == 0)
        if slot["_calls"] > 0:
            self._begin_call(call)
        shape = tuple(x.shape[1:])
        self._call = call
        try:
            if shape not in self._flops and call.full:
                out = self._count_flops(shape, original, args, kwargs)
            else:
                out = original(*args, **kwargs)
        finally:
            self._call = None
        slot["_calls"] += 1
        self._stats.calls += 1
        if call.full and not call.skipped:
            self._stats.computed += 1
        else:
            self._stats.reused += 1
            self._stats.nfe_saved += self._skipped_share(call, self._flops.get(shape, {}))
        return out

    def _count_flops(self, shape: tuple[int, ...], original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Run one full call under a FLOP counter; keep each patched module's share of the total."""
        self._measuring = shape
        with FlopCounterMode(display=False) as mode:
            self._flop_mode = mode
            try:
                out = original(*args, **kwargs)
            except BaseException:
                self._flops.pop(shape, None)
                raise
            finally:
                self._flop_mode = None
        total = mode.get_total_flops()
        shares = self._flops.setdefault(shape, {})
        for name in shares:
            shares[name] = shares[name] / total if total else 0.0
        self._flops_counted(shape, total)
        return out

    def _flops_counted(self, shape: tuple[int, ...], total: float) -> None:
        """Called after the FLOP-counting call with its total (a technique with side costs measures them here)."""
        return


class _RootHook:
    """The accelerator's hook on the network itself: per-call decisions, and a new run clears every cache."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.accelerator._root_forward(forward, *args, **kwargs)

    def new_run(self) -> None:
        self.accelerator._slots.clear()  # a new generation: nothing carries over


def accelerate_(model: Any, config: AccelConfig) -> Accelerator:
    """Install an acceleration technique on a network in place; returns its handle.

    Args:
        model: A ``torch.nn.Module`` (a diffusers UNet or transformer) or a loaded hasten model (its
            ``network`` is used).
        config: The technique and its settings, e.g. ``DeepCacheConfig(interval=3)``, or a config loaded
            with ``AccelConfig.load(path)``.

    Returns:
        An :class:`Accelerator`: ``.stats``, ``.reset()``, ``.remove()``; also a context manager that
        removes itself on exit.

    Example:
        >>> acc = hasten.accelerate_(model, hasten.accel.DeepCacheConfig(interval=3))  # doctest: +SKIP
        >>> images = hasten.generate(model, 16, steps=20).images                      # doctest: +SKIP
        >>> acc.stats.nfe_saved, acc.remove()                                         # doctest: +SKIP
    """
    module = _network_of(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"accelerate_ needs a torch.nn.Module or a loaded hasten model, got {type(model).__name__}")
    if not isinstance(config, AccelConfig):
        raise TypeError(f"config must be an AccelConfig (e.g. DeepCacheConfig()), got {type(config).__name__}")
    existing = accelerator_of(module)
    if existing is not None:
        raise RuntimeError(
            f"{type(module).__name__} already has {type(existing.config).__name__} installed; "
            "call .remove() on its handle before installing another"
        )
    for name in TECHNIQUES:
        cls = TECHNIQUES.get(name)
        if isinstance(config, cls.config_type):
            return cls(module, config)
    raise TypeError(f"no technique handles {type(config).__name__}; known: {', '.join(TECHNIQUES.names())}")


def accelerator_of(model: Any) -> Accelerator | None:
    """The accelerator installed on a network (or a loaded model's network), if any, among its hooks."""
    module = _network_of(model)
    hook = get_hook(module, ACCEL_HOOK) if isinstance(module, nn.Module) else None
    return hook.accelerator if isinstance(hook, _RootHook) else None


def _network_of(model: Any) -> Any:
    return model.network if not isinstance(model, nn.Module) and hasattr(model, "network") else model


def _combine(values: list[Any], weights: list[float]) -> Any:
    """``sum(w * v)`` through tensors, tuples and lists of the same structure."""
    first = values[0]
    if isinstance(first, Tensor):
        out = first * weights[0]
        for v, w in zip(values[1:], weights[1:], strict=True):
            out = out.add(v, alpha=w)
        return out
    if isinstance(first, tuple | list):
        return type(first)(_combine(list(parts), weights) for parts in zip(*values, strict=True))
    return first


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise TypeError("the accelerated network was called without a tensor input")


def _tensor_bytes(values: Iterable[Any]) -> int:
    total = 0
    for value in values:
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            total += _tensor_bytes(value.values())
        elif isinstance(value, tuple | list):
            total += _tensor_bytes(value)
    return total

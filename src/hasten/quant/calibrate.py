"""Calibration data for post-training quantisation, collected along the model's own sampling trajectory.

A diffusion network sees very different activations at different noise levels, so ranges calibrated on
one time step fail on the others. :func:`collect_calibration` runs the full-precision model with the
sampler settings the user will deploy (solver, steps, guidance) and records the network's inputs at every
call: the noisy sample, the time input and the conditioning, for each guidance branch. From that record
it keeps

* ``"trajectory"`` (Q-Diffusion's time-step-aware calibration): ``n`` samples at every step (or at
  ``points`` evenly spaced steps);
* ``"normal"`` (PTQ4DM's normally distributed time-step calibration): ``n`` samples whose time inputs are
  drawn from N(0.4 T, (0.4 T)^2), clipped to [0, T] (T the largest time input seen), each taken from the
  step nearest to its draw;
* ``"single"`` (the naive baseline): ``n`` samples of the middle step only.

Any layer's inputs are then one forward pass away, so the set stays small (network inputs only) and is
reusable for any subset of layers. It records the model's fingerprint; :func:`hasten.quant.quantize_`
refuses a set made for another model, or one that does not say which model it was made on.

Reference: Li et al., "Q-Diffusion", ICCV 2023, sec. 4.2; Shang et al., "Post-training Quantization on
Diffusion Models" (PTQ4DM), CVPR 2023, sec. 4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from .._context import current_branch, current_run
from .._io import atomic_path
from ..config import check_choice
from .modules import time_argument

__all__ = ["MIN_SAMPLES", "MODES", "CalibrationSet", "collect_calibration"]

MODES = ("trajectory", "normal", "single")
MIN_SAMPLES = 32  # fewer calibration samples than this give ranges that depend on which images were drawn
NORMAL_MEAN, NORMAL_STD = 0.4, 0.4  # PTQ4DM's distribution of calibration time steps, as fractions of T


@dataclasses.dataclass
class NetworkCall:
    """The inputs of one network call (batch-first tensors) and where in sampling it happened."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    t: float | None
    step: int
    branch: str

    @property
    def batch_size(self) -> int:
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.dim() >= 2:
                return value.shape[0]
        raise ValueError("a recorded network call has no batched tensor input")

    def select(self, rows: Tensor) -> NetworkCall:
        """The same call restricted to some batch rows (per-sample tensors are indexed, the rest kept)."""
        size = self.batch_size

        def pick(value: Any) -> Any:
            if isinstance(value, dict):  # e.g. SDXL's added_cond_kwargs
                return {k: pick(v) for k, v in value.items()}
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == size:
                return value[rows]
            return value

        return NetworkCall(
            tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()}, self.t, self.step,
            self.branch,
        )  # fmt: skip

    def run(self, network: nn.Module) -> Any:
        return network(*self.args, **self.kwargs)


@dataclasses.dataclass
class CalibrationSet:
    """Recorded network inputs for calibration, with how they were collected."""

    calls: list[NetworkCall]
    setting: dict[str, Any]
    fingerprint: str | None = None

    def __len__(self) -> int:
        return sum(call.batch_size for call in self.calls)

    @property
    def times(self) -> list[float]:
        """The distinct network time inputs covered, ascending (empty if the network takes none)."""
        return sorted({call.t for call in self.calls if call.t is not None})

    @property
    def branches(self) -> list[str]:
        return sorted({call.branch for call in self.calls})

    def chunks(self, batch_size: int = 64):
        """Every call split into batches of at most ``batch_size`` samples."""
        for call in self.calls:
            size = call.batch_size
            for start in range(0, size, batch_size):
                yield call.select(torch.arange(start, min(start + batch_size, size)))

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the set as one safetensors file (tensors) with its description in the metadata."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        calls = []
        for i, call in enumerate(self.calls):
            spec: dict[str, Any] = {"t": call.t, "step": call.step, "branch": call.branch, "args": [], "kwargs": {}}
            for j, value in enumerate(call.args):
                spec["args"].append(_store(tensors, f"{i}.arg{j}", value))
            for name, value in call.kwargs.items():
                spec["kwargs"][name] = _store(tensors, f"{i}.kw.{name}", value)
            calls.append(spec)
        meta = {"hasten_calibration": "1", "setting": json.dumps(self.setting), "calls": json.dumps(calls),
                "fingerprint": self.fingerprint or ""}  # fmt: skip
        path = pathlib.Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationSet:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("hasten_calibration") != "1":
                    raise ValueError(f"{str(path)!r} is not a hasten calibration set (format 1)")
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read calibration set {str(path)!r}: {err}") from err
        calls = []
        for spec in json.loads(meta["calls"]):
            args = tuple(_restore(tensors, a) for a in spec["args"])
            kwargs = {k: _restore(tensors, v) for k, v in spec["kwargs"].items()}
            calls.append(NetworkCall(args, kwargs, spec["t"], spec["step"], spec["branch"]))
        return cls(calls, json.loads(meta["setting"]), meta.get("fingerprint") or None)


def _store(tensors: dict[str, Tensor], key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):  # e.g. SDXL's added_cond_kwargs: a dict of tensors
        return {"dict": {k: _store(tensors, f"{key}.{k}", v) for k, v in value.items()}}
    return {"value": value}


def _restore(tensors: dict[str, Tensor], spec: dict[str, Any]) -> Any:
    if "dict" in spec:
        return {k: _restore(tensors, v) for k, v in spec["dict"].items()}
    return tensors[spec["tensor"]] if "tensor" in spec else spec["value"]


def _clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value.detach().clone() if isinstance(value, Tensor) else value


def collect_calibration(
    model: Any,
    *,
    n: int = 128,
    mode: str = "trajectory",
    points: int | None = None,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 1000,
    **sample_options: Any,
) -> CalibrationSet:
    """Sample ``n`` images with the full-precision ``model`` (a :class:`hasten.LoadedModel`) and keep the
    network inputs the chosen ``mode`` asks for (see the module docstring).

    ``seed`` defaults to a seed the bench never uses for evaluation, so calibration and evaluation noise
    are disjoint. Returns a :class:`CalibrationSet` whose ``setting`` records all of the above.
    """
    from ..generate import generate

    check_choice("mode", mode, MODES)
    if n < MIN_SAMPLES:
        raise ValueError(f"n must be at least {MIN_SAMPLES} calibration samples, got {n}")
    if points is not None and not 1 <= points <= steps:
        raise ValueError(f"points must be between 1 and steps={steps}, got {points}")
    network = model.network
    recorded: list[NetworkCall] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        run = current_run()
        step = run.step.index if run is not None and run.step is not None else len(recorded)
        call = NetworkCall(tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()},
                           time_argument(module, args, kwargs), step, current_branch() or "cond")  # fmt: skip
        recorded.append(call)

    handle = network.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gen = generate(model, n, solver=solver, steps=steps, guidance=guidance, seed=seed, **sample_options)
    finally:
        handle.remove()
    setting = {"mode": mode, "n": n, "points": points, "solver": solver, "steps": steps,
               "guidance": 1.0 if guidance is None else guidance,
               "seed": seed, "nfe": gen.nfe, **{k: v for k, v in sample_options.items() if _jsonable(v)}}  # fmt: skip
    calls = _merge_batches(recorded)
    generator = torch.Generator().manual_seed(seed)
    if mode == "trajectory":
        step_ids = sorted({c.step for c in calls})
        if points is not None:
            keep = {step_ids[round(i * (len(step_ids) - 1) / max(points - 1, 1))] for i in range(points)}
            calls = [c for c in calls if c.step in keep]
    elif mode == "single":
        step_ids = sorted({c.step for c in calls})
        middle = step_ids[len(step_ids) // 2]
        calls = [c for c in calls if c.step == middle]
    else:
        calls = _normal_draw(calls, n, generator)
    return CalibrationSet(calls, setting, getattr(model, "fingerprint", None))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _merge_batches(calls: list[NetworkCall]) -> list[NetworkCall]:
    """One call per (step, branch, time): generate() may have split the images into several batches."""
    groups: dict[tuple, list[NetworkCall]] = {}
    for call in calls:
        groups.setdefault((call.step, call.branch, call.t), []).append(call)
    merged = []
    for (step, branch, t), parts in groups.items():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        sizes = [part.batch_size for part in parts]
        args = tuple(_join([p.args[i] for p in parts], sizes) for i in range(len(parts[0].args)))
        kwargs = {k: _join([p.kwargs[k] for p in parts], sizes) for k in parts[0].kwargs}
        merged.append(NetworkCall(args, kwargs, t, step, branch))
    return merged


def _join(values: list[Any], sizes: list[int]) -> Any:
    """One input of several batches of a call: per-sample tensors (first dimension = that batch's size)
    joined; shared inputs (Flux's positional ids, a scalar time) kept once; dicts (SDXL's added conditions)
    joined entry by entry."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values], sizes) for k in first}
    per_sample = all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == size
                     for v, size in zip(values, sizes, strict=True))  # fmt: skip
    if per_sample and len({v.shape[1:] for v in values}) == 1:
        return torch.cat(values)
    return first


def _normal_draw(calls: list[NetworkCall], n: int, generator: torch.Generator) -> list[NetworkCall]:
    """PTQ4DM: n time inputs ~ N(0.4 T, 0.4 T) clipped to [0, T]; each takes one sample of the nearest step."""
    timed = [c for c in calls if c.t is not None]
    if not timed:
        raise ValueError("the 'normal' calibration mode needs a network with a time input; use 'trajectory'")
    t_max = max(c.t for c in timed)  # type: ignore[type-var]
    draws = (torch.randn(n, generator=generator) * NORMAL_STD + NORMAL_MEAN).clamp(0, 1) * t_max
    times = torch.tensor([c.t for c in timed])
    chosen: dict[int, list[int]] = {}
    for draw in draws.tolist():
        index = int(torch.argmin((times - draw).abs()))
        size = timed[index].batch_size
        chosen.setdefault(index, []).append(int(torch.randint(0, size, (1,), generator=generator)))
    return [timed[i].select(torch.tensor(sorted(rows))) for i, rows in sorted(chosen.items())]

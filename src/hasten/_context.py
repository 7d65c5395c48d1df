"""Where sampling is right now, published for network-level accelerators (caches, early exit).

:func:`hasten.sample` opens a :class:`SamplingRun` for every call and moves its ``step`` before each
solver step; :class:`hasten.models.CFGDenoiser` names the guidance branch around its network call.
Accelerators read both through :func:`current_run` and :func:`current_branch` instead of guessing the step
from a timestep value (DeepCache's ``list(timesteps).index(t)`` picks the wrong phase when timesteps
repeat, diffusers#9090) and reset their state whenever a new run starts, so nothing leaks between
generations. Context variables keep concurrent samplers (threads, async) apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

_run_ids = itertools.count(1)
_RUN: contextvars.ContextVar[SamplingRun | None] = contextvars.ContextVar("hasten_sampling_run", default=None)
_BRANCH: contextvars.ContextVar[str] = contextvars.ContextVar("hasten_guidance_branch", default="")


@dataclasses.dataclass
class SamplingRun:
    """One call of the sample loop: a unique ``run_id`` and the current :class:`~hasten.solvers.StepInfo`."""

    run_id: int
    step: Any = None  # StepInfo of the step being taken; None before the first step


@contextlib.contextmanager
def sampling_run() -> Iterator[SamplingRun]:
    """Open a new run (fresh ``run_id``) for the duration of one sampling call."""
    run = SamplingRun(next(_run_ids))
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


def current_run() -> SamplingRun | None:
    """The innermost open sampling run, or None outside :func:`hasten.sample`."""
    return _RUN.get()


def current_step_index() -> int | None:
    """The index of the solver step being taken in the innermost run; None outside a run or before its first step
    (what per-step hooks key on: a plan's block skips, its per-step student)."""
    run = _RUN.get()
    return None if run is None or run.step is None else run.step.index


@contextlib.contextmanager
def guidance_branch(name: str) -> Iterator[None]:
    """Mark the network calls inside as belonging to one guidance branch (``"cond"``, ``"uncond"``, ...)."""
    token = _BRANCH.set(name)
    try:
        yield
    finally:
        _BRANCH.reset(token)


def current_branch() -> str:
    """The guidance branch of the current network call; ``""`` when no guidance wrapper named one."""
    return _BRANCH.get()

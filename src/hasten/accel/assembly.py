"""Per-step model assembly: a plan's steps split between the model's network and a cheaper student of it.

A plan may say "steps 0, 2 and 5 run the pruned network". This module is the network side of that: which
students may stand in for a model's network (:func:`check_student`), what one of their calls costs against the
model's (:func:`call_share`, FLOP-counted like block skips), and :func:`assemble`, which hooks the model's
network so that at the chosen steps the student's network answers the call instead (same inputs, same output
convention). Plans (:mod:`hasten.tune.plan`) hold only the student's reference, its weights fingerprint and the
step indices; :func:`hasten.generate` loads the student (:func:`load_student`) and installs the hook for the run
of such a plan, and takes it off after it, whatever happens.

A student may stand in only where its output means what the model's does: the same objective, time
convention, noise schedule, image shape and classes, and weights derived from the model's own (a pruned or
distilled student whose lineage contains the model's fingerprint). A stranger network with the same shapes
would run, and silently sample something else.

The step is the loop's step index published by :func:`hasten.sample` (:mod:`hasten._context`); outside a
sampling run the model's own network answers.

Reference: Li et al., AutoDiffusion, ICCV 2023 (which sub-network runs at which step, searched with the steps);
Zhu et al., A-SDM / model assembly (a slimmed network at some steps of the sampling trajectory, the full one at
the others).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._context import current_step_index
from ..hooks import add_hook, hooks_of, remove_hooks

__all__ = ["ASSEMBLY_HOOK", "assemble", "call_share", "check_student", "installed_assembly", "load_student"]

ASSEMBLY_HOOK = "hasten.plan/assembly"
# what a student must share with the model for its output to mean the same thing at the same input
CONVENTIONS = ("objective", "time_scale", "image_shape", "num_classes")


def check_student(model: Any, student: Any, *, ancestor: str = "") -> None:
    """Refuse a student that cannot answer the model's network calls (a :class:`ValueError` naming why).

    The student must descend from the weights ``ancestor`` (a fingerprint; by default the model's own). A plan
    forced onto other weights (a fine-tune or the quantised copy of its model) passes the fingerprint it was
    tuned for: the student must descend from those.
    """
    name, other = model.info.name, student.info.name
    for field in CONVENTIONS:
        mine, theirs = getattr(model.info, field), getattr(student.info, field)
        if _plain(mine) != _plain(theirs):
            raise ValueError(f"student {other!r} has {field} {theirs!r} where {name!r} has {mine!r}: it cannot "
                             "stand in for its network at a step")  # fmt: skip
    if not _same_schedule(model.schedule, student.schedule):
        raise ValueError(f"student {other!r} has another noise schedule than {name!r}: it cannot stand in for its "
                         "network at a step")  # fmt: skip
    if model.network is student.network:
        raise ValueError(f"student {other!r} is {name!r} itself (the same network object)")
    # students whose network means something else than the model's at the same input: a consistency function,
    # a two-time (CTM) network, a fused ensemble, or a network that learned the guided prediction
    for field, what in (("consistency", "a consistency model"), ("target_level", "a two-time (CTM) network"),
                        ("ensemble", "an ensemble")):  # fmt: skip
        if getattr(student.info, field, None):
            raise ValueError(f"student {other!r} is {what}: its network's output is not the model's kind of "
                             "prediction, so it cannot stand in for the network at a step")  # fmt: skip
    record = student.info.distillation or {}
    learned = student.info.learned_guidance
    if learned != 1.0:
        raise ValueError(f"student {other!r} learned guidance {learned:g} (a guided prediction): it cannot stand in "
                         f"for {name!r}'s unguided network at a step")  # fmt: skip
    ancestor = ancestor or model.fingerprint
    ancestors = [record.get("teacher_fingerprint")] + [s.get("fingerprint") for s in record.get("lineage") or []]
    if ancestor not in ancestors:
        origin = f"from {record.get('teacher')!r} (weights {str(record.get('teacher_fingerprint'))[:12]})"
        raise ValueError(
            f"student {other!r} was not made from the weights of {name!r} ({ancestor[:12]}): it was "
            f"{origin if record else 'not distilled or pruned from any model'}; a student runs some steps only "
            "of the model it was pruned or distilled from"
        )


def _same_schedule(a: Any, b: Any) -> bool:
    """The same kind of schedule over the same noise levels (VP-discrete tables are compared level by level)."""
    if type(a) is not type(b):
        return False
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    return float(a.sigma_max) == float(b.sigma_max) and bool(torch.allclose(a.ve_sigma(t), b.ve_sigma(t), rtol=1e-9))


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def load_student(model: Any, reference: str, fingerprint: str = "", *, ancestor: str = "") -> Any:
    """Load the student ``reference`` (a bundled name or a model folder) beside ``model`` (its device and dtype),
    checked with :func:`check_student` (``ancestor`` as there); ``fingerprint``, when given, must be the student's
    weights'. The loaded student is cached while its folder is unchanged."""
    parameter = next(model.network.parameters(), None)
    # (a float32 model loads its student as saved: casting is only for a model in another precision)
    floating = parameter is not None and parameter.is_floating_point()
    dtype = parameter.dtype if floating and parameter.dtype != torch.float32 else None
    try:
        student = _load_cached(reference, _folder_stamp(reference), str(model.device), dtype)
    except FileNotFoundError as err:
        raise ValueError(f"the plan's student: {err}") from None
    if fingerprint and student.fingerprint != fingerprint:
        raise ValueError(
            f"the plan was tuned with student {reference!r} of weights {fingerprint[:12]}, but {reference!r} now has "
            f"weights {student.fingerprint[:12]}: tune the plan again for these weights"
        )
    check_student(model, student, ancestor=ancestor)
    return student


def _folder_stamp(reference: str) -> tuple:
    """What identifies the student folder's current contents cheaply: each file's name, size and mtime."""
    from ..models.zoo import model_folder

    folder = model_folder(reference)
    if not folder.is_dir():
        return ()
    stats = ((p.name, p.stat()) for p in folder.iterdir() if p.is_file())
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


@functools.lru_cache(maxsize=4)
def _load_cached(reference: str, stamp: tuple, device: str, dtype: torch.dtype | None) -> Any:
    """The loaded student, kept across calls (a plan's every ``generate`` call would otherwise reload it: ~50 ms,
    5% of a 100-image mnist-dit run); a changed folder (``stamp``) loads again. Inference only, never handed out
    beyond the hook."""
    from ..models.zoo import load

    return load(reference, device=device, dtype=dtype)


def call_share(model: Any, student: Any) -> float:
    """FLOPs of one student network call over one of the model's (``torch.utils.flop_counter``, as block skips and
    the caches count), each on the same one-image input at a middle noise level."""
    labels = torch.zeros(1, dtype=torch.long) if model.info.num_classes else None
    cond = {key: v.to(model.device) for key, v in model.conditioning(labels, range(1)).items()}
    x = torch.zeros(1, *model.info.image_shape, device=model.device)
    sigma = torch.ones(1, dtype=torch.float64, device=model.device)
    flops = []
    for loaded in (model, student):
        mode = FlopCounterMode(display=False)
        with torch.no_grad(), mode:
            loaded.denoiser(x, sigma, **cond)
        flops.append(mode.get_total_flops())
    if not flops[0]:
        raise RuntimeError(f"{model.info.name}'s network call counted no FLOPs; cannot weigh its student")
    return flops[1] / flops[0]


class _AssemblyHook:
    """Calls the student's network at the steps in ``steps``; the model's own otherwise (and outside a run)."""

    def __init__(self, student: nn.Module, steps: frozenset[int], fingerprint: str) -> None:
        self.student = student
        self.steps = steps
        self.fingerprint = fingerprint
        self.calls = 0  # calls that reached the hook
        self.swapped = 0

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if current_step_index() not in self.steps:
            return forward(*args, **kwargs)
        self.swapped += 1
        return self.student(*args, **kwargs)


@contextlib.contextmanager
def assemble(model: Any, student: Any, steps: Iterable[int]) -> Iterator[_AssemblyHook]:
    """Hook ``model.network`` so that the solver steps ``steps`` (indices) call ``student.network`` instead.

    The student is not checked here (:func:`load_student` does that); the hook (named ``"hasten.plan/assembly"``)
    comes off when the block exits, also on an error. Yields the hook (it counts ``calls`` and ``swapped``).
    """
    if installed_assembly(model.network) is not None:
        raise RuntimeError(f"{model.info.name} already has a per-step student installed; take it off first")
    hook = _AssemblyHook(student.network, frozenset(int(k) for k in steps), student.fingerprint)
    handle = add_hook(model.network, ASSEMBLY_HOOK, hook)
    try:
        yield hook
    finally:
        remove_hooks([handle])


def installed_assembly(network: nn.Module) -> tuple[str, frozenset[int]] | None:
    """The per-step student installed on ``network``: ``(student fingerprint, steps)``, or None."""
    registry = hooks_of(network)
    if registry is None or ASSEMBLY_HOOK not in registry.names:
        return None
    hook = registry[ASSEMBLY_HOOK]
    return (hook.fingerprint, hook.steps) if isinstance(hook, _AssemblyHook) else None

"""Per-step block skipping: a plan's architecture decisions (which blocks run at which step), as hooks.

A plan may say "step 3 skips blocks 4-6". This module is the network side of that: which modules of a
network are *skippable* (numbered 0, 1, ... in a fixed order), what each costs (its share of one network
call's FLOPs), and :func:`skip_blocks`, which hooks each block that some step skips so that it returns its
input unchanged at those steps (the residual stream passes through). Plans (:mod:`hasten.tune.plan`) only
hold the indices; :func:`hasten.generate` installs these hooks for the run of a plan that has skips and
takes them off after it, whatever happens.

Skippable means "a module whose output has its input's shape and is its input plus a residual branch", so
skipping is the identity on the stream:

* transformers (``transformer_blocks`` / ``blocks``: diffusers' DiT, PixArt): every block (``h -> h``);
* ``UNet2DModel``-style UNets: the self-attention layers (residual, output factor 1) and the resnets whose
  input and output widths match (no shortcut convolution, output factor 1), in ``named_modules`` order. Down-
  and up-sampling resnets and the ones that change width are not skippable: their input cannot stand in for
  their output.

The step is the loop's step index published by :func:`hasten.sample` (:mod:`hasten._context`); outside a
sampling run nothing is skipped.

Reference: Li et al., AutoDiffusion, ICCV 2023 (per-step layer skipping searched with the time steps).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .._context import current_step_index
from ..hooks import HookHandle, add_hook, hooks_of, remove_hooks

__all__ = [
    "SKIP_HOOK",
    "block_flop_shares",
    "check_skip",
    "installed_skip",
    "skip_blocks",
    "skip_by_block",
    "skippable_blocks",
]

SKIP_HOOK = "hasten.plan/skip"  # hooks are named SKIP_HOOK + "/<module path>"
BLOCK_LISTS = ("transformer_blocks", "blocks")


def skippable_blocks(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's skippable modules in index order, as ``(path, module)``; refused with a reason if none."""
    for list_name in BLOCK_LISTS:
        blocks = getattr(network, list_name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return [(f"{list_name}.{i}", block) for i, block in enumerate(blocks)]
    found = [(name, module) for name, module in network.named_modules() if _residual_unit(module)]
    if not found:
        raise TypeError(
            f"{type(network).__name__} has no skippable blocks (a {' or '.join(BLOCK_LISTS)} ModuleList, or UNet "
            "attention layers and width-preserving resnets)"
        )
    return found


def _residual_unit(module: nn.Module) -> bool:
    kind = type(module).__name__
    if kind == "Attention":  # diffusers' Attention adds its input back itself when residual_connection is set
        return bool(getattr(module, "residual_connection", False)) and getattr(module, "rescale_output_factor", 1) == 1
    if kind == "ResnetBlock2D":
        return (
            module.in_channels == module.out_channels
            and getattr(module, "conv_shortcut", None) is None
            and getattr(module, "output_scale_factor", 1) == 1
            and not getattr(module, "up", False)
            and not getattr(module, "down", False)
        )
    return False


class _SkipHook:
    """Returns the block's input at the steps in ``steps``; runs the block otherwise (and outside a run)."""

    def __init__(self, steps: frozenset[int]) -> None:
        self.steps = steps
        self.calls = 0  # calls that reached the hook
        self.skipped = 0

    def __call__(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if current_step_index() not in self.steps:
            return forward(*args, **kwargs)
        self.skipped += 1
        h = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if not isinstance(h, Tensor):
            raise TypeError("a skipped block must take its hidden state first (or as hidden_states=)")
        return h


def check_skip(skip: Sequence[Sequence[int]], num_blocks: int, *, what: str = "plan") -> None:
    """Refuse a block index outside ``0 .. num_blocks - 1``, naming the step and the index."""
    for step, blocks in enumerate(skip):
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(
                f"{what} skips block {bad[0]} at step {step}, but the network has {num_blocks} skippable blocks "
                f"(indices 0..{num_blocks - 1})"
            )


@contextlib.contextmanager
def skip_blocks(network: nn.Module, skip: Sequence[Sequence[int]] | None) -> Iterator[dict[str, _SkipHook]]:
    """Hook the blocks that ``skip[step]`` names so they pass their input through at those steps.

    ``skip`` holds one sequence of block indices (see :func:`skippable_blocks`) per solver step; None or all
    empty installs nothing. The hooks (named ``"hasten.plan/skip/<path>"``) come off when the block exits,
    also on an error; yields ``{path: hook}`` (each hook counts its ``calls`` and ``skipped``).
    """
    if not skip or not any(skip):
        yield {}
        return
    blocks = skippable_blocks(network)
    check_skip(skip, len(blocks))
    if installed_skip(network):
        raise RuntimeError(f"{type(network).__name__} already has per-step block skips installed; take them off first")
    hooks: dict[str, _SkipHook] = {}
    handles: list[HookHandle] = []
    try:
        for index, (path, module) in enumerate(blocks):
            steps = frozenset(step for step, chosen in enumerate(skip) if index in chosen)
            if steps:
                hooks[path] = _SkipHook(steps)
                handles.append(add_hook(module, f"{SKIP_HOOK}/{path}", hooks[path]))
        yield hooks
    finally:
        remove_hooks(handles)


def installed_skip(network: nn.Module) -> dict[str, frozenset[int]]:
    """The per-step skips installed on ``network``: ``{block path: steps it is skipped at}`` (empty: none)."""
    found = {}
    for module in network.modules():
        registry = hooks_of(module)
        for name in () if registry is None else registry.names:
            if name.startswith(SKIP_HOOK + "/") and isinstance(registry[name], _SkipHook):
                found[name[len(SKIP_HOOK) + 1 :]] = registry[name].steps
    return found


def skip_by_block(network: nn.Module, skip: Sequence[Sequence[int]] | None) -> dict[str, frozenset[int]]:
    """``skip`` (per step: block indices) as :func:`installed_skip` reports it (per block path: steps)."""
    if not skip:
        return {}
    blocks = skippable_blocks(network)
    check_skip(skip, len(blocks))
    by_block = {
        path: frozenset(s for s, chosen in enumerate(skip) if i in chosen) for i, (path, _) in enumerate(blocks)
    }
    return {path: steps for path, steps in by_block.items() if steps}


def block_flop_shares(network: nn.Module, call: Callable[[], Any]) -> tuple[float, ...]:
    """Each skippable block's share of the FLOPs of the network calls ``call()`` makes (one is enough).

    Counted with ``torch.utils.flop_counter`` (matrix products and convolutions, what dominates the time), as
    the accelerators count their savings, so a skipping plan's cost is in the same NFE-equivalent units.
    """
    blocks = skippable_blocks(network)
    flops = [0.0] * len(blocks)
    mode = FlopCounterMode(display=False)

    def counting(index: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        before = mode.get_total_flops()
        out = forward(*args, **kwargs)
        flops[index] += mode.get_total_flops() - before
        return out

    handles = [
        add_hook(module, f"{SKIP_HOOK}.flops/{path}", functools.partial(counting, i))
        for i, (path, module) in enumerate(blocks)
    ]
    try:
        with mode:
            call()
    finally:
        remove_hooks(handles)
    total = mode.get_total_flops()
    if not total:
        raise RuntimeError("the network call counted no FLOPs; cannot weigh its blocks")
    return tuple(f / total for f in flops)

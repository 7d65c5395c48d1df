"""One registry of forward hooks per module: how caches, quantisation and early exit share one network.

Every hasten feature that changes what a module's ``forward`` does (an accelerator's cached blocks, the
quantised network's time publisher, the bench's step hook for a peer cache) goes through this module, so
several of them can sit on one network and come off again in any order.

A *hook* is a callable ``hook(forward, *args, **kwargs) -> output`` that receives the next ``forward`` in
the chain and decides whether and how to call it. It may also define ``new_run()``, called before the
first call of every new :func:`hasten.sample` run (the :class:`hasten._context.SamplingRun` id changes),
to drop per-run state such as cached features.

The first hook on a module creates a :class:`HookRegistry` stored as ``module._hasten_hooks`` and puts
one dispatching ``forward`` in ``module.__dict__``; the dispatcher calls the hooks in order at every call.

* **Order.** A hook wraps the hooks registered before it: the last one added is outermost, the first one
  added sits next to the module's own ``forward``.
* **Names** are unique per module; adding a taken name is refused, so is removing an unknown one.
* **Removal in any order.** The chain is built at each call from the registry's current hooks, so taking a
  middle hook off leaves the others running unchanged.
* **Exact restore.** When the last hook comes off, the dispatcher and the registry attribute are deleted
  (or the ``forward`` that was in ``module.__dict__`` before is put back), so the module is what it was:
  parameters and buffers are never touched, and its outputs are bit-identical.

**Other libraries' patches.** Packages such as DeepCache, cache-dit and diffusers' own ``HookRegistry``
assign ``module.forward`` themselves. The registry coexists with them as follows:

* a patch made *before* the first hasten hook is wrapped and put back when the last hasten hook comes off;
* a patch made *after* it wraps the dispatcher, which keeps running the hasten hooks; hooks can still be
  added and removed, but removing the *last* one is refused with an error naming the foreign ``forward``
  (deleting the dispatcher would drop that patch, keeping it would leave a trace). Take the other patch
  off first (they restore the dispatcher they saved), then the hasten hooks.

Reference: the design follows diffusers' ``HookRegistry`` (``diffusers/hooks/hooks.py``: named hooks per
module, a rewritten ``forward``, stateful hooks reset per run); unlike it, the chain is resolved per call
instead of by rewiring stored function references, and removal restores ``module.__dict__`` exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

from ._context import current_run

__all__ = [
    "HookHandle",
    "HookRegistry",
    "add_hook",
    "get_hook",
    "hooked_modules",
    "hooks_of",
    "remove_hook",
    "remove_hooks",
]

REGISTRY_ATTRIBUTE = "_hasten_hooks"
Hook = Callable[..., Any]  # hook(forward, *args, **kwargs) -> output; optional hook.new_run()


class HookRegistry:
    """The named hooks of one module, innermost first, and the dispatching ``forward`` that runs them.

    Created by :func:`add_hook` on a module's first hook and deleted with its last; use :func:`hooks_of`
    to read it. ``names`` lists the hooks innermost first; ``registry[name]`` is one hook.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._hooks: dict[str, Hook] = {}
        self._run_id: int | None = None
        self._had_own_forward = "forward" in module.__dict__
        self._inner = module.forward  # the class's forward, or a patch another library made before us
        self._dispatch = functools.update_wrapper(functools.partial(_dispatch, self), self._inner)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._hooks)

    def __getitem__(self, name: str) -> Hook:
        if name not in self._hooks:
            raise KeyError(f"{type(self.module).__name__} has no hook named {name!r}; it has: {list(self._hooks)}")
        return self._hooks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._hooks

    def __len__(self) -> int:
        return len(self._hooks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return f"HookRegistry({type(self.module).__name__}, hooks={list(self._hooks)})"

    def foreign_forward(self) -> Any:
        """The ``forward`` another library put over this registry's dispatcher, or None if the dispatcher is on top."""
        current = self.module.__dict__.get("forward")
        return None if current is self._dispatch else current

    # -- used by add_hook / remove_hooks ------------------------------------------------------------------

    def _install(self) -> None:
        self.module.forward = self._dispatch
        setattr(self.module, REGISTRY_ATTRIBUTE, self)

    def _uninstall(self) -> None:
        if self._had_own_forward:
            self.module.forward = self._inner
        else:
            del self.module.forward
        delattr(self.module, REGISTRY_ATTRIBUTE)


def _dispatch(registry: HookRegistry, *args: Any, **kwargs: Any) -> Any:
    """The module's ``forward`` while it has hooks: start a new run's state if needed, then run the chain."""
    hooks = list(registry._hooks.values())  # a snapshot: a hook removed during the call does not break it
    run = current_run()
    if run is not None and run.run_id != registry._run_id:
        registry._run_id = run.run_id
        for hook in hooks:
            new_run = getattr(hook, "new_run", None)
            if new_run is not None:
                new_run()
    forward = registry._inner
    for hook in hooks:
        forward = functools.partial(hook, forward)
    return forward(*args, **kwargs)


class HookHandle:
    """One added hook; :meth:`remove` takes exactly it off (see :func:`remove_hooks` for several at once)."""

    def __init__(self, module: nn.Module, name: str, hook: Hook) -> None:
        self.module, self.name, self.hook = module, name, hook

    @property
    def active(self) -> bool:
        registry = hooks_of(self.module)
        return registry is not None and registry._hooks.get(self.name) is self.hook

    def remove(self) -> None:
        remove_hooks([self])

    def __repr__(self) -> str:
        return f"HookHandle({type(self.module).__name__}, {self.name!r}, active={self.active})"


def hooks_of(module: nn.Module) -> HookRegistry | None:
    """The module's hook registry, or None when it has no hasten hook."""
    registry = module.__dict__.get(REGISTRY_ATTRIBUTE)
    return registry if isinstance(registry, HookRegistry) and registry.module is module else None


def get_hook(module: nn.Module, name: str) -> Hook | None:
    """The hook called ``name`` on ``module``, or None."""
    registry = hooks_of(module)
    return None if registry is None else registry._hooks.get(name)


def add_hook(module: nn.Module, name: str, hook: Hook) -> HookHandle:
    """Wrap ``module``'s forward in ``hook`` (outside every hook added before); returns a removable handle.

    Args:
        module: Any ``torch.nn.Module``.
        name: Unique on this module (e.g. ``"hasten.quant.time"``); a taken name is refused.
        hook: ``hook(forward, *args, **kwargs) -> output``; an optional ``hook.new_run()`` is called before the
            module's first call in each new sampling run.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"hooks go on a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a hook name must be a non-empty string, got {name!r}")
    if not callable(hook):
        raise TypeError(f"hook {name!r} must be callable as hook(forward, *args, **kwargs), got {type(hook).__name__}")
    registry = hooks_of(module)
    if registry is not None and name in registry._hooks:
        raise ValueError(
            f"{type(module).__name__} already has a hook named {name!r} (hooks: {list(registry._hooks)}); "
            "remove it before adding another under that name"
        )
    if registry is None:
        registry = HookRegistry(module)
        registry._install()
    registry._hooks[name] = hook
    return HookHandle(module, name, hook)


def remove_hooks(handles: Iterable[HookHandle]) -> None:
    """Take several hooks off at once: every one is checked before any is removed, so an error changes nothing.

    Refused: a handle whose hook is no longer installed, and emptying a registry whose dispatcher another
    library's ``forward`` now wraps (see the module docstring).
    """
    handles = list(handles)
    by_registry: dict[int, tuple[HookRegistry, set[str]]] = {}
    for handle in handles:
        registry = hooks_of(handle.module)
        if not handle.active or registry is None:
            raise RuntimeError(f"hook {handle.name!r} on {type(handle.module).__name__} was already removed")
        by_registry.setdefault(id(registry), (registry, set()))[1].add(handle.name)
    for registry, names in by_registry.values():
        foreign = registry.foreign_forward()
        if names >= set(registry._hooks) and foreign is not None:
            raise RuntimeError(
                f"cannot remove the last hasten hook from {type(registry.module).__name__}: its forward was "
                f"replaced by {foreign!r} after hasten's hooks went on; remove that patch first"
            )
    for registry, names in by_registry.values():
        for name in names:
            del registry._hooks[name]
        if not registry._hooks:
            registry._uninstall()


def remove_hook(module: nn.Module, name: str) -> Hook:
    """Take the hook called ``name`` off ``module`` (refused by name if it has none); returns the hook."""
    registry = hooks_of(module)
    if registry is None or name not in registry._hooks:
        names = [] if registry is None else list(registry._hooks)
        raise ValueError(f"{type(module).__name__} has no hook named {name!r}; it has: {names}")
    hook = registry._hooks[name]
    remove_hooks([HookHandle(module, name, hook)])
    return hook


def hooked_modules(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every submodule of ``root`` (``""`` for root itself) that carries hasten hooks, with their names."""
    found = {}
    for name, module in root.named_modules():
        registry = hooks_of(module)
        if registry is not None:
            found[name] = registry.names
    return found

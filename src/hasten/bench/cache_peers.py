"""Peer caches in the same run: the DeepCache package, cache-dit and diffusers' cache hooks on our networks.

Each peer is installed on the network for one generation (so its state starts empty, as in a fresh
pipeline call), driven by hasten's sample loop, and taken off again with the network's ``forward``
restored exactly. The settings are each peer's documented defaults, the values users start from; the
hasten rows beside them are calibrated. Where a peer needs a pipeline to learn the step, hasten's step
index is passed to it instead (the DeepCache package looks the step up in ``pipe.scheduler.timesteps``
with ``.item()``, which works for batch 1 only).

The peers patch ``forward`` attributes themselves; hasten's own addition (the DeepCache step) is a hook
in :mod:`hasten.hooks` (``"hasten.bench.deepcache_step"``), taken off before the peer restores its patches.
A network that already carries hasten hooks (a quantised network's time hook) keeps them: a peer wraps
them and puts them back when it is disabled.

Packages: ``pip install "hasten[peers]"`` (DeepCache, cache-dit); diffusers' hooks come with diffusers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from torch import nn

from .._context import current_run
from ..hooks import add_hook

__all__ = ["CACHE_PEERS", "CachePeer", "cache_peers_for", "peer_cache"]


@dataclasses.dataclass(frozen=True)
class CachePeer:
    library: str  # shown in the report
    package: str  # import name that must be installed
    network: str  # "unet" or "transformer"
    params: dict[str, Any]  # the peer's documented default settings


CACHE_PEERS: dict[str, CachePeer] = {
    # DeepCache README: cache_interval=3, cache_branch_id=0.
    "deepcache": CachePeer("DeepCache", "DeepCache", "unet", {"cache_interval": 3, "cache_branch_id": 0}),
    # diffusers FirstBlockCacheConfig default threshold.
    "diffusers_fbc": CachePeer("diffusers", "diffusers", "transformer", {"threshold": 0.05}),
    # cache-dit DBCacheConfig defaults (residual_diff_threshold 0.08, 8 warm-up steps) with F1B0 for 6 blocks.
    "cache_dit": CachePeer(
        "cache-dit",
        "cache_dit",
        "transformer",
        {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08, "max_warmup_steps": 8},
    ),
}


def _kind(network: nn.Module) -> str:
    if all(hasattr(network, a) for a in ("down_blocks", "up_blocks", "mid_block")):
        return "unet"
    return "transformer" if isinstance(getattr(network, "transformer_blocks", None), nn.ModuleList) else "other"


def cache_peers_for(network: nn.Module) -> tuple[list[str], list[str]]:
    """(peers that apply to this network and are installed, peers that apply but are not installed)."""
    kind = _kind(network)
    applicable = [name for name, peer in CACHE_PEERS.items() if peer.network == kind]
    installed = [n for n in applicable if importlib.util.find_spec(CACHE_PEERS[n].package) is not None]
    return installed, [n for n in applicable if n not in installed]


@contextlib.contextmanager
def peer_cache(name: str, network: nn.Module, steps: int) -> Iterator[None]:
    """Install peer cache ``name`` on ``network`` for the duration; every ``forward`` is restored after."""
    if name not in CACHE_PEERS:
        raise ValueError(f"unknown cache peer {name!r}; known: {', '.join(CACHE_PEERS)}")
    own_forward = {m for m in network.modules() if "forward" in m.__dict__}
    blocks = getattr(network, "transformer_blocks", None)
    try:
        with {"deepcache": _deepcache, "diffusers_fbc": _diffusers_fbc, "cache_dit": _cache_dit}[name](
            network, steps, CACHE_PEERS[name].params
        ):
            yield
    finally:
        for module in network.modules():  # peers leave bound methods behind as instance attributes
            if "forward" in module.__dict__ and module not in own_forward:
                del module.forward
        if blocks is not None and network.transformer_blocks is not blocks:
            network.transformer_blocks = blocks


@contextlib.contextmanager
def _deepcache(network: nn.Module, steps: int, params: dict[str, Any]) -> Iterator[None]:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=network))
    helper.set_params(**params)
    own = network.__dict__.get("forward")  # a hasten hook dispatcher, if the network has hooks
    helper.enable()
    # The package's own network-level wrapper looks the step up in a scheduler; take it off again (its block
    # patches stay) and tell it the step from hasten's loop through a hook instead.
    if own is None:
        del network.forward
    else:
        network.forward = own

    def step_from_loop(forward: Any, *args: Any, **kwargs: Any) -> Any:
        run = current_run()
        helper.cur_timestep = run.step.index if run is not None and run.step is not None else helper.cur_timestep
        return forward(*args, **kwargs)

    handle = add_hook(network, "hasten.bench.deepcache_step", step_from_loop)
    try:
        yield
    finally:
        handle.remove()
        helper.disable()


@contextlib.contextmanager
def _diffusers_fbc(network: nn.Module, steps: int, params: dict[str, Any]) -> Iterator[None]:
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    apply_first_block_cache(network, FirstBlockCacheConfig(**params))
    # What a pipeline's `with transformer.cache_context("cond")` does (DiT is not a CacheMixin model).
    _set_cache_context(network, CacheContext("cond", num_inference_steps=steps))
    try:
        yield
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(network)
        for hook in ("fbc_leader_block_hook", "fbc_block_hook"):
            registry.remove_hook(hook, recurse=True)
        _set_cache_context(network, None)


@contextlib.contextmanager
def _cache_dit(network: nn.Module, steps: int, params: dict[str, Any]) -> Iterator[None]:
    import cache_dit
    from cache_dit.caching.cache_adapters.cache_adapter import CachedAdapter

    # cache-dit logs every install on its own handlers (some created during the install itself), and warns that
    # there is no pipeline, which is how the bench installs it by design; keep the output readable (errors show)
    levels: dict[logging.Logger, int] = {}

    def quiet() -> None:
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("cache_dit"):
                logger = logging.getLogger(name)
                levels.setdefault(logger, logger.level)
                logger.setLevel(logging.ERROR)

    quiet()

    # diffusers' DiT reads transformer_blocks[0].norm1 after its block loop; cache-dit swaps the list for one
    # wrapper module during the forward, so the wrapper gets the first block's norm1 (the same module).
    first = network.transformer_blocks[0]
    collect = CachedAdapter.__dict__["collect_unified_blocks"]

    def collect_with_norm(cls: Any, *args: Any, **kwargs: Any) -> Any:
        found = collect.__func__(cls, *args, **kwargs)
        for by_name in found:
            for wrapped in by_name.values():
                for module in wrapped:
                    if hasattr(first, "norm1"):
                        module.norm1 = first.norm1
        return found

    CachedAdapter.collect_unified_blocks = classmethod(collect_with_norm)
    try:
        adapter = cache_dit.BlockAdapter(
            transformer=network, blocks=network.transformer_blocks, forward_pattern=cache_dit.ForwardPattern.Pattern_3
        )
        cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(num_inference_steps=steps, **params))
    finally:
        CachedAdapter.collect_unified_blocks = collect
    try:
        quiet()
        yield
    finally:
        quiet()
        cache_dit.disable_cache(network)
        for logger, level in levels.items():
            logger.setLevel(level)

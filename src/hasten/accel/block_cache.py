"""Block caching for transformers: reuse the middle blocks' residual when it is not expected to change.

A DiT is a stack of blocks ``h <- B_k(h)``. The first ``first_blocks`` always run (they see the new input
and tell how much this step differs from the last full one), the last ``last_blocks`` always run (they
fit the output to the current input), and the middle stack ``M`` is either computed, storing its residual
``R = M(h) - h``, or skipped, returning ``h + R`` from the last full call. Two rules decide:

* :class:`BlockCacheConfig`: a fixed refresh schedule (every ``interval`` steps, optionally denser at the
  ends, never inside the first ``start`` / after the ``stop`` fraction of steps).
* :class:`FirstBlockCacheConfig`: reuse while the first blocks' residual ``r`` has changed by less than
  ``threshold`` relative to its value at the last full call, ``mean|r - r_full| / mean|r_full|``
  (measured over the batch, as the reference implementations do).

Works on any model that runs a ``transformer_blocks`` (or ``blocks``) list of modules taking the hidden
state first and returning it (diffusers ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ...), and on
dual-stream blocks that also carry the text tokens, ``(h, c) <- B_k(h, c)`` returned as ``(c, h)`` as SD3's
and Flux's blocks do: there the middle stack's residual is kept for both streams (a block that ends the text
stream, SD3's last, returns ``None`` for it, and so does its skipped stand-in).

Reference: first-block cache: ParaAttention "First Block Cache" (2024) and diffusers'
``FirstBlockCacheConfig``; Fn/Bn compute blocks: cache-dit "DBCache" (2025); fixed-interval block reuse:
Chen et al., "Delta-DiT", 2024 and FORA (Selvaraju et al., 2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from .hooks import (
    TECHNIQUES,
    AccelConfig,
    Accelerator,
    CallState,
    RefreshSchedule,
    check_extrapolate,
    check_window,
    window_steps,
)

BLOCK_LISTS = ("transformer_blocks", "blocks")


@dataclasses.dataclass(frozen=True)
class _BlockSplit(AccelConfig):
    first_blocks: int = 1
    last_blocks: int = 0

    def _check_split(self) -> None:
        for option in ("first_blocks", "last_blocks"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{option} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BlockCacheConfig(RefreshSchedule, _BlockSplit):
    """Fixed-interval block reuse: the middle blocks run on the schedule's refresh steps only.

    Args:
        first_blocks: Blocks always computed before the cached middle stack.
        last_blocks: Blocks always computed after it.
        interval, schedule, start, stop: The refresh schedule (see :class:`RefreshSchedule`).
        extrapolate: Order of the forecast of the middle residual from the last full steps (0, 1 or 2).
    """

    technique: ClassVar[str] = "block_cache"
    type_tag: ClassVar[str] = "block_cache"
    extrapolate: int = 0

    def __post_init__(self) -> None:
        RefreshSchedule.__post_init__(self)
        self._check_split()
        check_extrapolate(self.extrapolate)


@dataclasses.dataclass(frozen=True)
class FirstBlockCacheConfig(_BlockSplit):
    """First-block-residual caching: skip the middle blocks while the first blocks' residual barely moves.

    Args:
        threshold: Largest relative L1 change of the first blocks' residual that still reuses, in (0, 1].
        first_blocks: Blocks always computed (and compared) before the middle stack.
        last_blocks: Blocks always computed after it.
        max_reuse: Most consecutive reused calls before a forced full call (None: no limit).
        start, stop: Fractions of the steps outside which every call is computed in full.
    """

    technique: ClassVar[str] = "first_block_cache"
    type_tag: ClassVar[str] = "first_block_cache"
    threshold: float = 0.05
    max_reuse: int | None = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        self._check_split()
        if self.first_blocks < 1:
            raise ValueError(f"first_blocks must be >= 1 (the residual is measured on them), got {self.first_blocks}")
        if not isinstance(self.threshold, int | float) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] (a relative change), got {self.threshold!r}")
        if self.max_reuse is not None and (not isinstance(self.max_reuse, int) or self.max_reuse < 1):
            raise ValueError(f"max_reuse must be None or an integer >= 1, got {self.max_reuse!r}")
        check_window(self.start, self.stop)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's block list (``transformer_blocks`` or ``blocks``), with a clear error if it has none."""
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return name, blocks
    raise TypeError(
        f"block caching needs a transformer with a {' or '.join(BLOCK_LISTS)} ModuleList; "
        f"{type(model).__name__} has neither (for UNets use DeepCacheConfig)"
    )


@TECHNIQUES.register("block_cache")
class BlockCache(Accelerator):
    """Installed block cache (fixed interval or first-block residual); one class runs both rules.

    Reference: ParaAttention First Block Cache (2024); cache-dit DBCache (2025).
    """

    config_type = _BlockSplit
    config: BlockCacheConfig | FirstBlockCacheConfig

    def _install(self) -> None:
        list_name, blocks = transformer_blocks(self.module)
        first, last = self.config.first_blocks, self.config.last_blocks
        if first + last >= len(blocks):
            raise ValueError(
                f"first_blocks + last_blocks must leave a middle block to cache: {first} + {last} >= "
                f"{len(blocks)} blocks in {list_name}"
            )
        self.middle = [f"{list_name}.{i}" for i in range(first, len(blocks) - last)]
        self._formats: dict[str, tuple[bool, bool]] = {}
        for i in range(first):
            self._patch(blocks[i], f"{list_name}.{i}", self._head_forward(f"{list_name}.{i}", i == 0, i == first - 1))
        for i, name in enumerate(self.middle):
            idx = first + i
            self._patch(blocks[idx], name, self._middle_forward(name, i == 0, i == len(self.middle) - 1))

    def _begin_call(self, call: CallState) -> None:
        config = self.config
        if isinstance(config, BlockCacheConfig):
            call.full = config.is_refresh(call.step, call.num_steps)
            return
        call.full = False  # provisional: the first blocks' residual decides (see _decide)
        if call.num_steps is not None and call.step not in window_steps(config.start, config.stop, call.num_steps):
            call.full = True
        if config.max_reuse is not None and call.slot.get("reused_in_row", 0) >= config.max_reuse:
            call.full = True
        call.slot["decided"] = call.full  # a forced full call needs no comparison

    def _head_forward(self, name: str, is_first: bool, decides: bool) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is not None and is_first:
                call.slot["h_in"] = _hidden(args, kwargs)
            out = original(*args, **kwargs)
            if call is not None and decides:
                self._decide(call, _streams(out, name)[0] - call.slot.pop("h_in"))
            return out

        return forward

    def _decide(self, call: CallState, residual: Tensor) -> None:
        slot = call.slot
        if not isinstance(self.config, FirstBlockCacheConfig):
            return
        if not slot.get("decided", True):
            ref = slot["head_residual"]
            change = (residual - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)
            call.full = bool(change >= self.config.threshold)
        if call.full:
            slot["head_residual"] = residual
        slot["reused_in_row"] = 0 if call.full else slot.get("reused_in_row", 0) + 1

    def _middle_forward(self, name: str, is_first: bool, is_last: bool) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            call = self._call
            h, c = _hidden(args, kwargs), _context(args, kwargs)
            if call is None or call.full:
                if call is not None and is_first:
                    call.slot["middle_in"] = (h, c)
                out = original(*args, **kwargs)
                h_out, c_out, pair = _streams(out, name)
                self._formats[name] = (pair, c_out is None)  # what this block's skipped stand-in returns
                if call is not None and is_last:
                    h_in, c_in = call.slot.pop("middle_in")
                    self._store(call, "middle_residual", h_out - h_in)
                    if c_out is not None and c_in is not None:
                        self._store(call, "middle_context_residual", c_out - c_in)
                return out
            call.skipped.add(name)
            if is_first:
                h = h + self._serve(call, "middle_residual")
                if c is not None and "middle_context_residual" in call.slot:
                    c = c + self._serve(call, "middle_context_residual")
            pair, context_ends = self._formats[name]
            return ((None if context_ends else c), h) if pair else h

        return forward


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise TypeError("block caching expects each block to take the hidden state first (or as hidden_states=)")
    return h


def _context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The text stream a dual-stream block takes second (SD3, Flux), if any."""
    c = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return c if isinstance(c, Tensor) else None


def _streams(out: Any, name: str) -> tuple[Tensor, Tensor | None, bool]:
    """``(hidden, context, is_pair)`` of a block's output: a tensor, or diffusers' dual-stream ``(context, hidden)``."""
    if isinstance(out, Tensor):
        return out, None, False
    if isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], Tensor):
        if out[0] is None or isinstance(out[0], Tensor):
            return out[1], out[0], True
    raise TypeError(
        f"block {name} returned {type(out).__name__}; block caching supports blocks that return the hidden state "
        "or a dual-stream (text, hidden) pair of tensors"
    )

"""Network-level acceleration: feature caching for UNets and transformers, installed with ``accelerate_``.

``accelerate_(model, DeepCacheConfig(...))`` (UNets), ``BlockCacheConfig`` (transformer blocks: first-block
residual or fixed interval), ``RASConfig`` (region-adaptive sampling for DiTs), ``EarlyExitConfig`` (trained
exit heads for DiTs, ``train_exit_heads``); ``calibrate`` finds the fastest setting of a technique within a
quality budget. See ``docs/guide/caching.md`` and ``docs/guide/early-exit.md``.
"""

from .block_cache import BlockCache, BlockCacheConfig, FirstBlockCacheConfig, transformer_blocks
from .deepcache import DeepCache, DeepCacheConfig, unet_layout
from .early_exit import EarlyExit, EarlyExitConfig, ExitHeads, train_exit_heads
from .hooks import (
    TECHNIQUES,
    AccelConfig,
    Accelerator,
    AccelStats,
    RefreshSchedule,
    accelerate_,
    accelerator_of,
)
from .ras import RAS, RASConfig

__all__ = [
    "RAS",
    "TECHNIQUES",
    "AccelConfig",
    "AccelStats",
    "Accelerator",
    "BlockCache",
    "BlockCacheConfig",
    "DeepCache",
    "DeepCacheConfig",
    "EarlyExit",
    "EarlyExitConfig",
    "ExitHeads",
    "FirstBlockCacheConfig",
    "RASConfig",
    "RefreshSchedule",
    "accelerate_",
    "accelerator_of",
    "train_exit_heads",
    "transformer_blocks",
    "unet_layout",
]

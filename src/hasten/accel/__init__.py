"""Network-level acceleration: feature caching for UNets and transformers, installed with ``accelerate_``.

``accelerate_(model, DeepCacheConfig(...))`` (UNets), ``BlockCacheConfig`` (transformer blocks: first-block
residual or fixed interval), ``RASConfig`` (region-adaptive sampling for DiTs); ``calibrate`` finds the
fastest setting of a technique within a quality budget. See ``docs/guide/caching.md``.
"""

from .block_cache import BlockCache, BlockCacheConfig, FirstBlockCacheConfig, transformer_blocks
from .deepcache import DeepCache, DeepCacheConfig, unet_layout
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
    "FirstBlockCacheConfig",
    "RASConfig",
    "RefreshSchedule",
    "accelerate_",
    "accelerator_of",
    "transformer_blocks",
    "unet_layout",
]

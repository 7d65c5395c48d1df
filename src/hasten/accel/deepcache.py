"""DeepCache / A-SDM feature inheritance for UNets: recompute the shallow branch, reuse the deep one.

A UNet's up path consumes the down path's skip connections in reverse order, and the deep features
(everything below a chosen skip) change slowly from one step to the next. On a full step the whole UNet
runs and every deep module's output is stored; on a cached step only the modules on the shallow side of
the chosen skip run (the input convolution, the down layers that produce skips ``0..branch``, the up
layers that consume them, the output head) and the deep modules return their stored outputs.

``branch`` counts skips from the top: 0 keeps only the input convolution's skip fresh (cheapest, most
reuse), larger values recompute more of the shallow path (closer to the uncached result). The layout is
read from the diffusers UNet's ``down_blocks`` / ``mid_block`` / ``up_blocks`` (``UNet2DModel``,
``UNet2DConditionModel`` and anything shaped like them), at the granularity of resnet (+attention) layers.

Reference: Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024, Sec. 3.2-3.3
(skip-branch selection, uniform and non-uniform 1:N refresh); Zhu et al., "A-SDM: Accelerating Stable
Diffusion through Model Assembly and Feature Inheritance", 2024 (feature inheritance across steps).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from .hooks import TECHNIQUES, Accelerator, CallState, RefreshSchedule, check_extrapolate


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig(RefreshSchedule):
    """DeepCache settings: a refresh schedule (see :class:`RefreshSchedule`) and the skip branch.

    Args:
        branch: Index of the deepest skip connection recomputed on cached steps (0 = shallowest).
        extrapolate: Order of the forecast of cached features from the last ``extrapolate + 1`` full steps
            (0: reuse as is; 1: linear; 2: quadratic), TaylorSeer-style. Each order keeps one more copy.
    """

    technique: ClassVar[str] = "deepcache"
    type_tag: ClassVar[str] = "deepcache"
    branch: int = 0
    extrapolate: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"branch must be an integer >= 0, got {self.branch!r}")
        check_extrapolate(self.extrapolate)


@dataclasses.dataclass
class _Layer:
    """One position along the UNet: the modules that form it and the block that holds them."""

    name: str
    modules: list[tuple[str, nn.Module]]
    block: tuple[str, nn.Module]


def unet_layout(unet: nn.Module) -> tuple[list[_Layer], list[_Layer | None], list[_Layer]]:
    """Read a UNet's skip structure: (skip producers, up path in forward order, skip consumers).

    The producers are the input convolution, every down (resnet+attention) layer and every downsampler;
    the up path lists up layers and upsamplers in forward order; consumer ``k`` from the end uses skip ``k``.
    """
    missing = [a for a in ("down_blocks", "up_blocks", "mid_block") if not hasattr(unet, a)]
    if missing:
        raise TypeError(
            f"DeepCache needs a UNet with down_blocks, mid_block and up_blocks; {type(unet).__name__} lacks "
            f"{', '.join(missing)} (for transformers use BlockCacheConfig or RASConfig)"
        )
    producers = [_Layer("conv_in", [], ("conv_in", unet))]
    for b, block in enumerate(unet.down_blocks):
        bname = f"down_blocks.{b}"
        producers += _layers(bname, block)
        for d, down in enumerate(getattr(block, "downsamplers", None) or []):
            producers.append(_Layer(f"{bname}.downsamplers.{d}", [(f"{bname}.downsamplers.{d}", down)], (bname, block)))
    up_path: list[_Layer] = []
    consumers: list[_Layer] = []
    for b, block in enumerate(unet.up_blocks):
        bname = f"up_blocks.{b}"
        layers = _layers(bname, block)
        consumers += layers
        up_path += layers
        for u, up in enumerate(getattr(block, "upsamplers", None) or []):
            up_path.append(_Layer(f"{bname}.upsamplers.{u}", [(f"{bname}.upsamplers.{u}", up)], (bname, block)))
    if len(producers) != len(consumers):
        raise TypeError(
            f"unsupported UNet layout in {type(unet).__name__}: {len(producers)} skip connections produced but "
            f"{len(consumers)} consumed by the up blocks' resnets"
        )
    return producers, up_path, consumers


def _layers(bname: str, block: nn.Module) -> list[_Layer]:
    resnets = getattr(block, "resnets", None)
    if resnets is None:
        raise TypeError(f"UNet block {bname} ({type(block).__name__}) has no resnets; DeepCache cannot split it")
    attentions = getattr(block, "attentions", None) or []
    out = []
    for i, resnet in enumerate(resnets):
        modules = [(f"{bname}.resnets.{i}", resnet)]
        if i < len(attentions) and attentions[i] is not None:
            modules.append((f"{bname}.attentions.{i}", attentions[i]))
        out.append(_Layer(f"{bname}.layers.{i}", modules, (bname, block)))
    return out


@TECHNIQUES.register("deepcache")
class DeepCache(Accelerator):
    """Installed DeepCache: deep modules serve their stored outputs on cached steps.

    Reference: Ma, Fang & Wang, "DeepCache", CVPR 2024, Sec. 3.2.
    """

    config_type = DeepCacheConfig
    config: DeepCacheConfig

    def _install(self) -> None:
        unet = self.module
        producers, up_path, consumers = unet_layout(unet)
        branch = self.config.branch
        if branch >= len(producers):
            raise ValueError(
                f"branch must be < {len(producers)} for this UNet ({len(producers)} skip connections), got {branch}"
            )
        cached: list[_Layer] = producers[branch + 1 :]
        first_fresh = up_path.index(consumers[len(consumers) - 1 - branch])
        cached += up_path[:first_fresh]
        # Patch a whole block when all of its layers are cached (one call instead of one per layer).
        by_block: dict[str, list[_Layer]] = {}
        for layer in cached:
            by_block.setdefault(layer.block[0], []).append(layer)
        blocks = {f"down_blocks.{i}": m for i, m in enumerate(unet.down_blocks)}
        blocks.update({f"up_blocks.{i}": m for i, m in enumerate(unet.up_blocks)})
        total = {lay.block[0]: 0 for lay in producers + up_path}
        for lay in producers + up_path:
            total[lay.block[0]] += 1
        names = []
        for bname, layers in by_block.items():
            if len(layers) == total[bname] and bname in blocks:
                names.append((bname, blocks[bname]))
            else:
                names += [m for lay in layers for m in lay.modules]
        if unet.mid_block is not None:
            names.append(("mid_block", unet.mid_block))
        self.cached_modules = [n for n, _ in names]
        # Only one cached output reaches a fresh module: the input of the first fresh up layer. Every other
        # cached output feeds cached modules only, so it is served as stored and never forecast.
        if first_fresh == 0:
            boundary = "mid_block"
        else:
            before = up_path[first_fresh - 1]
            whole = before.block[0] in self.cached_modules
            boundary = before.block[0] if whole else before.modules[-1][0]
        self.forecast_names = {boundary}
        for name, module in names:
            self._patch(module, name, self._cached_forward(name))

    def _begin_call(self, call: CallState) -> None:
        call.full = self.config.is_refresh(call.step, call.num_steps)

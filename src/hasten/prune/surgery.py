"""Structured pruning of a diffusion network: channels through Torch-Pruning's dependency graph, or whole blocks.

Two structures:

* ``channels``: Torch-Pruning (the field's library for this; hasten writes no graph surgery) removes the same
  share of every prunable group of coupled channels, ranked by an importance (``taylor``: Diff-Pruning's
  first-order Taylor score of the diffusion loss over time steps, :mod:`hasten.prune.importance`; ``magnitude``:
  the weights' L2 norm). What is prunable depends on the network:

  - **UNets** (``down_blocks`` / ``up_blocks``, e.g. diffusers ``UNet2DModel`` and ``UNet2DConditionModel``):
    every convolution and linear layer's output channels (resnets, shortcuts, skip concatenations, attention
    projections, the time-embedding MLP), except the layer that writes the output image. The dependency graph
    is traced with diffusers' classic attention processor (Diff-Pruning's pitfall: the fused processor hides the
    q/k/v widths), restored afterwards; up- and down-samplers learn their new ``channels``.
  - **Transformers** (``transformer_blocks``, e.g. ``DiTTransformer2DModel``): the "bottleneck" only, the
    attention head dimension (q/k/v width) and the MLP's hidden width of every block; the residual stream keeps
    its width. Its sine-cosine position table, the adaLN-Zero projections (chunked in six) and the embeddings
    all share that width and Torch-Pruning does not prune a buffer, so pruning it would break the network.
* ``blocks``: whole transformer blocks are removed (the residual stream passes through unchanged), the least
  important first by LD-Pruner's output-change score (:func:`hasten.prune.importance.block_scores`); the
  config's ``num_layers`` says so, so such a folder is a plain diffusers folder.

The pruned network's widths are written as a structure record (:mod:`hasten.models.structure`), so any loader
rebuilds it from the base config without Torch-Pruning.

Reference: Fang, Ma & Wang, "Structural Pruning for Diffusion Models" (Diff-Pruning), NeurIPS 2023; Fang et al.,
"DepGraph: Towards Any Structural Pruning" (Torch-Pruning), CVPR 2023; Castells et al., "LD-Pruner", CVPR-W 2024.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "STRUCTURES",
    "copy_with_gradients",
    "example_inputs",
    "flops_and_params",
    "network_kind",
    "network_speedup",
    "prune_channels",
    "remove_blocks",
    "unet_features",
]

STRUCTURES = ("channels", "blocks")


def network_kind(network: nn.Module) -> str:
    """``"unet"`` or ``"transformer"``: which pruning layout applies; anything else is refused by name."""
    if isinstance(getattr(network, "transformer_blocks", None), nn.ModuleList):
        return "transformer"
    if hasattr(network, "down_blocks") and hasattr(network, "up_blocks"):
        return "unet"
    raise TypeError(
        f"hasten prunes diffusers UNets (down_blocks/up_blocks) and transformers (transformer_blocks); "
        f"{type(network).__name__} is neither"
    )


def example_inputs(network: nn.Module, image_shape: Sequence[int], batch: int, cond: dict[str, Tensor]) -> tuple:
    """``(x, t, class_labels)`` for tracing and timing: the positional inputs both diffusers networks take."""
    param = next(network.parameters())
    x = torch.randn(batch, *image_shape, device=param.device, dtype=param.dtype)
    t = torch.full((batch,), 500.0, device=param.device, dtype=param.dtype)
    return (x, t, cond.get("class_labels"))


def _call(network: nn.Module, inputs: tuple) -> Tensor:
    x, t, labels = inputs
    return network(x, t, class_labels=labels, return_dict=False)[0]


def flops_and_params(network: nn.Module, inputs: tuple) -> tuple[float, int]:
    """Multiply-accumulates of one call per image (``torch.utils.flop_counter``: FLOPs / 2) and parameters."""
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        _call(network, inputs)
    return mode.get_total_flops() / 2 / inputs[0].shape[0], sum(p.numel() for p in network.parameters())


def network_speedup(base: nn.Module, pruned: nn.Module, inputs: tuple, *, repeats: int = 5) -> dict[str, float]:
    """Wall-clock time of one network call of each (same inputs, calls interleaved so both see the same machine
    state; the median of ``repeats`` after a warm-up) and the ratio ``base / pruned``."""
    times: dict[str, list[float]] = {"base": [], "pruned": []}
    with torch.no_grad():
        for net in (base, pruned):
            _call(net, inputs)  # warm-up: allocator, oneDNN primitives
        for _ in range(repeats):
            for key, net in (("base", base), ("pruned", pruned)):
                if inputs[0].is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                _call(net, inputs)
                if inputs[0].is_cuda:
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - start)
    base_s, pruned_s = statistics.median(times["base"]), statistics.median(times["pruned"])
    return {"base_seconds": base_s, "pruned_seconds": pruned_s, "speedup": base_s / pruned_s}


def _transformer_roots(network: nn.Module) -> tuple[list[nn.Module], dict[nn.Module, int]]:
    """The bottleneck layers a transformer's pruning starts from (q/k/v, the MLP's first projection) and the
    head counts of the q/k/v projections."""
    roots, heads = [], {}
    for block in network.transformer_blocks:
        for attn in (m for m in block.modules() if hasattr(m, "to_q") and hasattr(m, "heads")):
            for proj in (attn.to_q, attn.to_k, attn.to_v):
                roots.append(proj)
                heads[proj] = attn.heads
    return roots + _mlp_inputs(network), heads


def _mlp_inputs(network: nn.Module) -> list[nn.Module]:
    """The first linear layer of every transformer block's MLP (its output is the hidden width)."""
    layers = []
    for block in network.transformer_blocks:
        ff = getattr(block, "ff", None)
        first = None if ff is None else next((m for m in ff.modules() if isinstance(m, nn.Linear)), None)
        if first is not None:
            layers.append(first)
    return layers


def _attention_modules(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if hasattr(m, "set_processor") and hasattr(m, "to_q")]


def prune_channels(
    network: nn.Module,
    inputs: tuple,
    ratio: float,
    importance: Any,
    *,
    round_to: int | None = None,
    levels: Sequence[int] | None = None,
    mlp_ratio: float | None = None,
    kept: dict[nn.Module, list[int]] | None = None,
) -> nn.Module:
    """Prune ``network`` in place: ``ratio`` of every prunable group's channels (see the module docstring), the
    lowest by ``importance`` (a Torch-Pruning importance; a Taylor importance reads the parameters' ``.grad``).
    ``levels`` (UNets): only the channels of these resolution levels (0 = full resolution) are pruned.
    ``mlp_ratio`` (transformers): the MLPs' hidden widths lose this share instead of ``ratio``.
    ``kept``: layers of ``network`` as keys; each value becomes the original indices of the output channels that
    layer keeps (what the feature loss compares a pruned feature map with)."""
    import torch_pruning as tp
    from diffusers.models.attention_processor import AttnProcessor

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"the pruning ratio must be in [0, 1), got {ratio}")
    kind = network_kind(network)
    part_ratios = {} if levels is None else {m: 0.0 for m in _layers_outside(network, levels)}
    if mlp_ratio is not None:
        if kind != "transformer":
            raise TypeError(f"mlp_ratio is for a transformer's MLPs; {type(network).__name__} is a UNet (see levels)")
        if not 0.0 <= mlp_ratio < 1.0:
            raise ValueError(f"mlp_ratio must be in [0, 1), got {mlp_ratio}")
        part_ratios |= {m: mlp_ratio for m in _mlp_inputs(network)}
    attention = _attention_modules(network)
    processors = [m.processor for m in attention]
    for module in attention:
        module.set_processor(AttnProcessor())  # q/k/v widths visible to the tracer (Diff-Pruning's pitfall)
    heads: dict[nn.Module, int] = {m.to_q: m.heads for m in attention} | {m.to_k: m.heads for m in attention}
    heads |= {m.to_v: m.heads for m in attention}
    ignored: list[nn.Module]
    if kind == "transformer":
        roots, heads = _transformer_roots(network)
        keep = {id(m) for m in roots}
        # every other module with weights of its own (projections, norms, embeddings) keeps its output width
        ignored = [
            m for m in network.modules()
            if id(m) not in keep and next(m.parameters(recurse=False), None) is not None
        ]  # fmt: skip
    else:
        ignored = [_output_layer(network)]
    norms = {m: m.num_channels // m.num_groups for m in network.modules() if isinstance(m, nn.GroupNorm)}
    was_training, grads = network.training, [p.requires_grad for p in network.parameters()]
    network.eval().requires_grad_(True)  # the dependency graph traces autograd: a frozen network shows nothing
    try:
        pruner = tp.pruner.MetaPruner(
            network, inputs, importance=_WholeNormGroups(importance, norms) if norms else importance,
            pruning_ratio=ratio, pruning_ratio_dict=part_ratios, ignored_layers=ignored, num_heads=heads,
            prune_head_dims=True, prune_num_heads=False, round_to=round_to,
            forward_fn=lambda module, example: _call(module, example),
            customized_pruners={nn.GroupNorm: _group_norm_channels()},
        )  # fmt: skip
        for group in pruner.step(interactive=True):
            if kept:
                _track_kept(group, pruner.DG, kept)
            group.prune()
        _regroup_norms(norms)
    finally:
        for module, processor in zip(attention, processors, strict=True):
            module.set_processor(processor)
        network.train(was_training)
        for p, flag in zip(network.parameters(), grads, strict=False):
            p.requires_grad_(flag)
    _sync_widths(network)
    return network


def _track_kept(group: Any, graph: Any, kept: dict[nn.Module, list[int]]) -> None:
    """Drop from ``kept`` the output channels ``group`` is about to remove from the layers it tracks (the indices
    a group names are positions in the layer as it is now, after earlier groups)."""
    from torch_pruning._helpers import to_plain_idxs

    for dep, idxs in group:
        layer = dep.target.module
        if layer in kept and graph.is_out_channel_pruning_fn(dep.handler):
            if len(kept[layer]) != _out_width(layer):
                raise RuntimeError(f"kept channels of {type(layer).__name__} out of step with its width")
            gone = {int(i) for i in to_plain_idxs(idxs)}
            kept[layer] = [c for position, c in enumerate(kept[layer]) if position not in gone]


def _out_width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def unet_features(network: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """A UNet's feature maps for feature distillation: ``(block, layer)`` for every down, mid and up block, whose
    output's channels are ``layer``'s output channels (the sampler's convolution where the block ends in one, else
    its last resnet's ``conv2``: attention and shortcuts add onto that same residual width)."""
    if network_kind(network) != "unet":
        raise TypeError(f"{type(network).__name__} is not a UNet")
    blocks = [*network.down_blocks, *([network.mid_block] if network.mid_block is not None else []), *network.up_blocks]
    features = []
    for block in blocks:
        samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
        layer = getattr(samplers[-1], "conv", None) if samplers else None
        if not isinstance(layer, nn.Conv2d):
            layer = block.resnets[-1].conv2
        features.append((block, layer))
    return features


def _group_norm_channels() -> Any:
    """Torch-Pruning's GroupNorm handler, told the norm has no channel groups of its own (built on first use:
    Torch-Pruning is an optional extra, so it is not imported with this module).

    Torch-Pruning treats a GroupNorm like a grouped convolution: it removes the same positions from every group,
    so 32 channels in 16 groups can only become 16 channels in 16 groups of one, which changes every group's
    statistics (a diffusion UNet pruned that way did not recover in a 30-minute fine-tune). Here the norm's
    channels are pruned like any other's; :class:`_WholeNormGroups` makes the ranking take whole groups and
    :func:`_regroup_norms` sets ``num_groups`` afterwards, so the groups that stay see exactly the statistics they
    saw before."""
    from torch_pruning.pruner.function import GroupNormPruner

    class GroupNormChannels(GroupNormPruner):
        def get_in_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1

        def get_out_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1

    return GroupNormChannels()


class _WholeNormGroups:
    """A Torch-Pruning importance whose channels that share a GroupNorm group share one score (their mean).

    Ranked by that score, the lowest ``k`` channels are whole groups whenever ``k`` is a multiple of the group
    size (the ratio decides ``k``; a UNet's widths are usually multiples of every group size at round ratios).
    Groups are joined across the norms a channel reaches (a skip connection feeds two norms); a norm that sees
    this dependency group's channels only partly in a group (a concatenation that splits a group) is not used
    for the ranking: its grouping cannot be kept and :func:`_regroup_norms` regroups it."""

    def __init__(self, base: Any, group_sizes: dict[nn.Module, int]) -> None:
        self.base, self.group_sizes = base, group_sizes

    def __call__(self, group: Any) -> Tensor | None:
        imp = self.base(group)
        if imp is None:
            return None
        parent = list(range(len(imp)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for item in group:
            module = item.dep.target.module
            size = self.group_sizes.get(module)
            if size is None or item.root_idxs is None:
                continue
            blocks: dict[int, list[int]] = {}
            for idx, root in zip(item.idxs, item.root_idxs, strict=True):
                blocks.setdefault(int(idx) // size, []).append(int(root))
            for members in blocks.values():
                if len(members) == size:  # the whole norm group is in this dependency group
                    for other in members[1:]:
                        parent[find(other)] = find(members[0])
        roots = torch.tensor([find(i) for i in range(len(imp))], device=imp.device)
        mean = torch.zeros_like(imp).index_add_(0, roots, imp) / torch.bincount(roots, minlength=len(imp)).clamp(
            min=1
        ).to(imp)
        # ties between two groups with equal means would interleave them in the ranking: break them by group
        return mean[roots] + roots.to(imp) * torch.finfo(imp.dtype).eps * mean.abs().max().clamp(min=1e-30)


def _regroup_norms(group_sizes: dict[nn.Module, int]) -> None:
    """After pruning, give every GroupNorm its old group size back (``num_groups = channels / size``), or the
    nearest group count that divides its channels when whole groups could not be kept."""
    for norm, size in group_sizes.items():
        channels = norm.num_channels
        if channels % size == 0:
            norm.num_groups = channels // size
            continue
        want = max(1, round(channels / size))
        norm.num_groups = min(
            (g for g in range(1, channels + 1) if channels % g == 0), key=lambda g: (abs(g - want), -g)
        )


def _layers_outside(network: nn.Module, levels: Sequence[int]) -> list[nn.Module]:
    """The convolutions and linear layers of a UNet's resolution levels not in ``levels`` (their widths are
    kept): ``down_blocks[i]`` is level ``i``, ``up_blocks[j]`` level ``L - 1 - j``, the mid block level ``L - 1``,
    ``conv_in`` level 0. Only layers are named, not norms: a group's width belongs to the layers that write it
    (a skip's norm in the next level's block reads it)."""
    if network_kind(network) != "unet":
        raise TypeError(f"levels are a UNet's resolution levels; {type(network).__name__} has none")
    depth = len(network.down_blocks)
    bad = sorted({int(v) for v in levels if not 0 <= int(v) < depth})
    if bad or not levels:
        raise ValueError(f"levels {list(levels)}: this UNet has levels 0..{depth - 1}")
    by_level: dict[int, list[nn.Module]] = {0: [network.conv_in]}
    for i, block in enumerate(network.down_blocks):
        by_level.setdefault(i, []).append(block)
    for j, block in enumerate(network.up_blocks):
        by_level.setdefault(depth - 1 - j, []).append(block)
    if getattr(network, "mid_block", None) is not None:
        by_level.setdefault(depth - 1, []).append(network.mid_block)
    keep = [level for level in by_level if level not in {int(v) for v in levels}]
    return [
        m for level in keep for part in by_level[level] for m in part.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]


def _output_layer(network: nn.Module) -> nn.Module:
    """The layer that writes the network's output (a UNet's ``conv_out``, else its last conv/linear layer)."""
    layer = getattr(network, "conv_out", None)
    if isinstance(layer, nn.Conv2d | nn.Linear):
        return layer
    layers = [m for m in network.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return layers[-1]


def _sync_widths(network: nn.Module) -> None:
    """Width attributes Torch-Pruning does not know: up/down-samplers check ``channels`` against their input, and
    an attention module's ``inner_dim`` is its q width."""
    for module in network.modules():
        conv = getattr(module, "conv", None)
        if hasattr(module, "channels") and isinstance(conv, nn.Conv2d):
            module.channels, module.out_channels = conv.in_channels, conv.out_channels
        if hasattr(module, "to_q") and hasattr(module, "inner_dim") and isinstance(module.to_q, nn.Linear):
            module.inner_dim = module.to_q.out_features
            if hasattr(module, "inner_kv_dim") and isinstance(getattr(module, "to_k", None), nn.Linear):
                module.inner_kv_dim = module.to_k.out_features


def remove_blocks(network: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Remove the transformer blocks ``indices`` in place (the residual stream skips them) and record the new
    depth in the network's config (``num_layers``), so ``config.json`` builds the shallower network."""
    if network_kind(network) != "transformer":
        raise TypeError(
            f"structure 'blocks' removes transformer blocks; {type(network).__name__} has none "
            "(prune a UNet's channels: structure 'channels')"
        )
    blocks = network.transformer_blocks
    drop = sorted(set(int(i) for i in indices))
    bad = [i for i in drop if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"block indices {bad} are out of range for {len(blocks)} blocks")
    if len(drop) >= len(blocks):
        raise ValueError(f"removing {len(drop)} of {len(blocks)} blocks leaves none")
    network.transformer_blocks = nn.ModuleList([b for i, b in enumerate(blocks) if i not in drop])
    if hasattr(network, "register_to_config"):
        network.register_to_config(num_layers=len(network.transformer_blocks))
    return network


def copy_with_gradients(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with its parameters' ``.grad`` (a Taylor importance reads them; a parameter's
    deep copy does not carry its gradient)."""
    clone = copy.deepcopy(network)
    for theirs, ours in zip(network.parameters(), clone.parameters(), strict=True):
        ours.grad = None if theirs.grad is None else theirs.grad.clone()
    return clone

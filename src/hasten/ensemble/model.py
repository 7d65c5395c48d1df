"""Ensembles of diffusion models as one model: the output average and adaptive feature aggregation (AFA).

Two ways to combine ``N`` members that share image shape and classes:

* **Output average** (:class:`OutputAverage`): ``D(x, sigma) = sum_i w_i D_i(x, sigma)`` with ``sum_i w_i = 1``.
  Every member is a VE denoiser returning ``x0_hat``, so members of different architectures, objectives and
  schedules average alike (the UNet's eps and the DiT's flow velocity both become ``x0_hat``). The ensemble
  samples on the first member's schedule; every other member must cover its noise levels.
* **AFA** (:class:`FeatureEnsemble`): frozen networks of one architecture run in lockstep. At each chosen block
  the members' outputs ``F_i`` are fused by a small learned spatial attention (:class:`Aggregator`, one head per
  fused tensor), ``F = sum_i A_i * F_i`` with ``A = softmax_i(logits_i)`` per pixel, and ``F`` is passed on in
  *every* member, so all members continue from the fused features. Only the aggregator trains
  (:mod:`hasten.ensemble.build`).

How AFA runs ``N`` networks in lockstep: the batch is stacked ``N`` times and sent through the first member's
network; a routing hook on each of its parameter-holding layers (convolutions, linear layers, norms,
embeddings) sends row block ``k`` through member ``k``'s copy of that layer, so block outputs hold all members'
features at once and a fusion hook on the block replaces each row block by the fused tensor. Every layer outside
the routed ones acts per sample (activations, attention, resampling, additions), so row block ``k`` is exactly
member ``k``'s computation up to the first fusion. Both hooks go through :mod:`hasten.hooks` and act only while
the ensemble runs: the first member's network stays usable on its own.

An ensemble folder holds ``hasten.json`` with an ``ensemble`` record (the method, the members by bundled name
or path with their weight fingerprints, the fused blocks) and ``ensemble.safetensors`` (the average's weights
or the aggregator's parameters); :func:`hasten.load` opens it through
:data:`hasten.models.zoo.FOLDER_FORMATS`, checking every member's fingerprint.

Reference: Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025 (the
spatial-aware block-wise aggregator; its exact internal layout is not published in what was available here,
the heads below are this module's own design); output averaging is the standard ensemble baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import HookHandle, add_hook, remove_hooks
from ..models.adapters import Denoiser
from ..models.zoo import (
    BUNDLED,
    FOLDER_FORMATS,
    FolderFormat,
    LoadedModel,
    ModelInfo,
    load,
    make_denoiser,
    weights_fingerprint,
)

__all__ = [
    "METHODS",
    "RECORD",
    "WEIGHTS_FILE",
    "Aggregator",
    "EnsembleModel",
    "FeatureEnsemble",
    "OutputAverage",
    "check_members",
    "default_blocks",
    "ensemble_info",
    "save_ensemble",
]

RECORD = "ensemble"  # the hasten.json record of an ensemble folder (a key of FOLDER_FORMATS)
WEIGHTS_FILE = "ensemble.safetensors"
METHODS = ("average", "afa")
ROUTE_HOOK = "hasten.ensemble.route"
FUSE_HOOK = "hasten.ensemble.fuse"


# -- checks -------------------------------------------------------------------------------------------------


def _label(index: int, spec: str) -> str:
    return f"member {index + 1} ({spec})"


def check_members(members: Sequence[LoadedModel], specs: Sequence[str], method: str) -> None:
    """Refuse members that cannot be combined by ``method``, naming the member and what differs.

    Every method: the same image shape and classes; no two-time (CTM) network, no ensemble as a member. The
    average: the first member's noise levels within every member's. AFA: one architecture (UNet), objective, time
    scale and network configuration, plain float folders (no quantised, pruned or consistency member).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; allowed: {', '.join(METHODS)}")
    if not members:
        raise ValueError("an ensemble needs at least one member")
    first = members[0]
    for i, member in enumerate(members):
        label = _label(i, specs[i])
        if member.info.ensemble:
            raise ValueError(f"{label} is itself an ensemble; list its members instead")
        if member.info.target_level:
            raise ValueError(f"{label} is a two-time (CTM) network, which takes a target level the others do not")
        for field in ("image_shape", "num_classes"):
            mine, theirs = getattr(member.info, field), getattr(first.info, field)
            if mine != theirs:
                raise ValueError(
                    f"{label} differs from {_label(0, specs[0])} in {field}: {mine!r} vs {theirs!r}; members of an "
                    "ensemble must make the same images"
                )
    if method == "average":
        low, high = first.denoiser.sigma_min, first.denoiser.sigma_max
        for i, member in enumerate(members[1:], start=1):
            if member.denoiser.sigma_min > low * (1 + 1e-6) or member.denoiser.sigma_max < high * (1 - 1e-6):
                raise ValueError(
                    f"the average samples on the first member's noise levels [{low:.4g}, {high:.4g}], which "
                    f"{_label(i, specs[i])} does not cover ([{member.denoiser.sigma_min:.4g}, "
                    f"{member.denoiser.sigma_max:.4g}]); list the member with the narrowest range first"
                )
        return
    for i, member in enumerate(members):
        label = _label(i, specs[i])
        if member.info.arch != "unet":
            raise ValueError(
                f"the feature method (afa) fuses UNet blocks; {label} is a {member.info.arch!r} network (use "
                "--method average for other architectures)"
            )
        for record in ("quantization", "pruning", "consistency"):
            if getattr(member.info, record):
                raise ValueError(f"the feature method (afa) needs plain float members; {label} has a {record} record")
        for field in ("arch", "objective", "time_scale"):
            mine, theirs = getattr(member.info, field), getattr(first.info, field)
            if mine != theirs:
                raise ValueError(
                    f"the feature method (afa) needs identical architectures: {label} differs from "
                    f"{_label(0, specs[0])} in {field}: {mine!r} vs {theirs!r} (use --method average)"
                )
        mine, theirs = _network_config(member.network), _network_config(first.network)
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            details = ", ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in changed[:4])
            raise ValueError(
                f"the feature method (afa) needs identical architectures: {label}'s network differs from "
                f"{_label(0, specs[0])}'s in {details} (use --method average)"
            )
        shapes = {k: tuple(v.shape) for k, v in member.network.state_dict().items()}
        first_shapes = {k: tuple(v.shape) for k, v in first.network.state_dict().items()}
        if shapes != first_shapes:
            key = next(k for k in sorted(set(shapes) | set(first_shapes)) if shapes.get(k) != first_shapes.get(k))
            raise ValueError(
                f"the feature method (afa) needs identical architectures: {label}'s weight {key} has shape "
                f"{shapes.get(key)} vs {first_shapes.get(key)} in {_label(0, specs[0])}"
            )


def _network_config(network: nn.Module) -> dict[str, Any]:
    config = dict(getattr(network, "config", {}) or {})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


# -- the output average -------------------------------------------------------------------------------------


class OutputAverage(Denoiser):
    """``D(x, sigma, **cond) = sum_i w_i D_i(x, sigma, **cond)``: the weighted average of the members' ``x0_hat``.

    Args:
        denoisers: The members' VE denoisers (any architecture or objective).
        weights: ``[N]``, non-negative, summing to 1.
    """

    def __init__(self, denoisers: Sequence[nn.Module], weights: Tensor) -> None:
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        check_weights(weights.tolist(), len(denoisers))
        self.members = nn.ModuleList(denoisers)
        self.register_buffer("weights", weights, persistent=False)
        self.schedule = denoisers[0].schedule  # the sampler's grid comes from the first member
        self.sigma_min = max(float(d.sigma_min) for d in denoisers)
        self.sigma_max = min(float(d.sigma_max) for d in denoisers)

    def forward(self, x: Tensor, sigma: float | Tensor, **cond: Any) -> Tensor:
        total = None
        for weight, member in zip(self.weights.tolist(), self.members, strict=True):
            if weight == 0.0:
                continue  # a member with no weight costs nothing
            part = member(x, sigma, **dict(cond)) * weight
            total = part if total is None else total + part
        assert total is not None  # check_weights: the weights sum to 1
        return total


def check_weights(weights: Sequence[float], count: int) -> None:
    """Refuse output-average weights that are not ``count`` finite numbers >= 0 summing to 1."""
    if len(weights) != count:
        raise ValueError(f"the average needs one weight per member ({count}), got {len(weights)}: {list(weights)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"average weights must be finite numbers >= 0, got {list(weights)}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"average weights must sum to 1, got {list(weights)} (sum {sum(weights):.6g})")


# -- AFA -----------------------------------------------------------------------------------------------------


def default_blocks(network: nn.Module) -> tuple[str, ...]:
    """AFA's fusion points on a diffusers UNet: every down block, the mid block, every up block and the output
    convolution (so the members' predictions are fused too and the ensemble gives one output)."""
    names = [f"down_blocks.{i}" for i in range(len(network.down_blocks))]
    if getattr(network, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(network.up_blocks))]
    return (*names, "conv_out")


def _sinusoid(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class FusionHead(nn.Module):
    """The attention logits of one fused tensor: one map per member from its features, the noisy input (resized
    to the block's resolution), the time/class state and learned per-member offsets.

    The output layer starts at zero, so a fresh aggregator weighs the members equally everywhere."""

    def __init__(self, channels: int, in_channels: int, state_dim: int, members: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Conv2d(channels, hidden, 1)
        self.noisy = nn.Conv2d(in_channels, hidden, 1)
        self.state = nn.Linear(state_dim, hidden)
        self.member = nn.Parameter(torch.zeros(members, hidden))  # tells members apart beyond their features
        self.preference = nn.Parameter(torch.zeros(members))  # a member's logit offset everywhere
        self.out = nn.Conv2d(hidden, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: Tensor, noisy: Tensor, state: Tensor) -> Tensor:
        """``feats`` [N, B, C, H, W], ``noisy`` [B, C_in, H, W], ``state`` [B, E] -> logits [N, B, 1, H, W]."""
        n, b, c, h, w = feats.shape
        normed = F.group_norm(feats.reshape(n * b, c, h, w).float(), 1)  # each member's features, scale-free
        hidden = (
            self.features(normed).view(n, b, -1, h, w)
            + self.noisy(noisy)[None]
            + self.state(state)[None, :, :, None, None]
            + self.member[:, None, :, None, None]
        )
        logits = self.out(F.silu(hidden).flatten(0, 1)).view(n, b, 1, h, w)
        return logits + self.preference.view(n, 1, 1, 1, 1)


class Aggregator(nn.Module):
    """AFA's trainable part: a time/class state and one :class:`FusionHead` per fused tensor.

    Args:
        points: ``(block name, tensor index, channels)`` of every fused tensor (found by
            :func:`fusion_points`).
        members: Number of members ``N``.
        in_channels: Channels of the noisy network input.
        num_classes: The members' classes (0: unconditional); the state embeds labels 0..num_classes (null).
        hidden: Width of every head.
    """

    STATE_DIM = 64

    def __init__(
        self, points: Sequence[tuple[str, int, int]], members: int, in_channels: int, num_classes: int, hidden: int
    ) -> None:
        super().__init__()
        self.points = [tuple(p) for p in points]
        self.time = nn.Sequential(nn.Linear(32, self.STATE_DIM), nn.SiLU(), nn.Linear(self.STATE_DIM, self.STATE_DIM))
        self.label = nn.Embedding(num_classes + 1, self.STATE_DIM) if num_classes else None
        self.heads = nn.ModuleDict(
            {
                head_key(block, index): FusionHead(channels, in_channels, self.STATE_DIM, members, hidden)
                for block, index, channels in self.points
            }
        )

    def state(self, timestep: Tensor, labels: Tensor | None) -> Tensor:
        state = self.time(_sinusoid(timestep, 32))
        if self.label is not None and labels is not None:
            state = state + self.label(labels.long())
        return state


def head_key(block: str, index: int) -> str:
    return f"{block.replace('.', '_')}__{index}"


def _tensors(out: Any) -> list[Tensor]:
    """The distinct tensors of a block's output (a tensor or nested tuples), in order."""
    found: list[Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            if not any(value is seen for seen in found):
                found.append(value)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)
        else:
            raise TypeError(f"a fused block must return tensors or tuples of them, got {type(value).__name__}")

    walk(out)
    return found


def _replace(out: Any, mapping: dict[int, Tensor]) -> Any:
    if isinstance(out, Tensor):
        return mapping[id(out)]
    items = [_replace(item, mapping) for item in out]
    return tuple(items) if isinstance(out, tuple) else items


def fusion_points(network: nn.Module, blocks: Sequence[str], image_shape: tuple[int, ...], num_classes: int):
    """``(block, tensor index, channels)`` of every tensor the blocks output, found by one dry run; a block
    that is not a submodule, or an output that is not an image-shaped ``[B, C, H, W]`` tensor, is refused."""
    modules = dict(network.named_modules())
    for block in blocks:
        if block not in modules or block == "":
            examples = ", ".join(default_blocks(network))
            raise ValueError(f"block {block!r} is not a module of the member network; e.g. {examples}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks must be distinct, got {list(blocks)}")
    seen: dict[str, list[tuple[int, ...]]] = {}

    def recorder(name: str):
        def hook(forward, *args, **kwargs):
            out = forward(*args, **kwargs)
            seen[name] = [tuple(t.shape) for t in _tensors(out)]
            return out

        return hook

    handles = [add_hook(modules[b], "hasten.ensemble.probe", recorder(b)) for b in blocks]
    try:
        param = next(network.parameters())
        x = torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype)
        cond = {"class_labels": torch.zeros(1, dtype=torch.long, device=param.device)} if num_classes else {}
        with torch.no_grad():
            network(x, torch.zeros(1, device=param.device, dtype=param.dtype), **cond)
    finally:
        remove_hooks(handles)
    points = []
    for block in blocks:
        if block not in seen:
            raise ValueError(f"block {block!r} does not run in the network's forward")
        for index, shape in enumerate(seen[block]):
            if len(shape) != 4:
                raise ValueError(f"block {block!r} outputs a tensor of shape {shape}; AFA fuses [B, C, H, W] features")
            points.append((block, index, shape[1]))
    return points


class FeatureEnsemble(nn.Module):
    """``N`` same-architecture networks run as one network with AFA fusion (see the module docstring).

    Called like a member (``forward(sample, timestep, class_labels=None, return_dict=True)``), it returns the
    fused prediction, in the members' own objective; :func:`hasten.models.zoo.make_denoiser` wraps it as it
    would a member. With one member no hook is installed and the network runs untouched.

    Args:
        networks: The members' networks, frozen (the first one runs the computation; it is hooked).
        aggregator: The attention heads; its ``points`` name the fused blocks.
    """

    def __init__(self, networks: Sequence[nn.Module], aggregator: Aggregator) -> None:
        super().__init__()
        self.base = networks[0]
        self.others = nn.ModuleList(networks[1:])
        self.aggregator = aggregator
        self.count = len(networks)
        self.blocks = tuple(dict.fromkeys(block for block, _, _ in aggregator.points))
        self._run: dict[str, Any] | None = None  # the current call's inputs while forward runs
        self._handles: list[HookHandle] = []
        if self.count > 1:
            self._install()

    @property
    def config(self):  # what tools that read a diffusers network's config see (the members' own)
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    def _install(self) -> None:
        others = [dict(net.named_modules()) for net in self.others]
        for name, module in self.base.named_modules():
            if next(iter(module.parameters(recurse=False)), None) is not None:
                self._handles.append(add_hook(module, ROUTE_HOOK, self._router(name, [o[name] for o in others])))
        for block in self.blocks:
            self._handles.append(add_hook(self.base.get_submodule(block), FUSE_HOOK, self._fuser(block)))

    def remove_hooks(self) -> None:
        """Take the ensemble's hooks off the first member's network (it is then exactly that member again)."""
        if self._handles:
            remove_hooks(self._handles)
            self._handles = []

    def _router(self, name: str, copies: list[nn.Module]):
        def route(forward, x, *args, **kwargs):
            if self._run is None:  # the first member used on its own
                return forward(x, *args, **kwargs)
            if x.shape[0] % self.count:
                raise RuntimeError(f"layer {name!r} got {x.shape[0]} rows, not a multiple of {self.count} members")
            chunks = x.chunk(self.count)
            outs = [forward(chunks[0], *args, **kwargs)]
            outs += [copy(chunk, *args, **kwargs) for copy, chunk in zip(copies, chunks[1:], strict=True)]
            return torch.cat(outs)

        return route

    def _fuser(self, block: str):
        def fuse(forward, *args, **kwargs):
            out = forward(*args, **kwargs)
            if self._run is None:
                return out
            mapping = {id(t): self._fuse(block, i, t) for i, t in enumerate(_tensors(out))}
            return _replace(out, mapping)

        return fuse

    def _fuse(self, block: str, index: int, tensor: Tensor) -> Tensor:
        run = self._run
        assert run is not None
        n, b = self.count, run["batch"]
        feats = tensor.view(n, b, *tensor.shape[1:])
        if "state" not in run:
            run["state"] = self.aggregator.state(run["timestep"], run["labels"])
        h, w = tensor.shape[-2:]
        noisy = F.adaptive_avg_pool2d(run["sample"].float(), (h, w))
        logits = self.aggregator.heads[head_key(block, index)](feats, noisy, run["state"])
        weights = torch.softmax(logits, dim=0).to(tensor.dtype)
        fused = (weights * feats).sum(0)
        return fused.unsqueeze(0).expand(n, *fused.shape).reshape(tensor.shape)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None, **kwargs: Any):
        if self.count == 1:
            return self.base(sample, timestep, class_labels=class_labels, **kwargs)
        if self._run is not None:
            raise RuntimeError("a FeatureEnsemble is not re-entrant")
        b, n = sample.shape[0], self.count
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.expand(b) if t.ndim == 0 else t).reshape(b)
        labels = None if class_labels is None else class_labels.reshape(b)
        self._run = {"batch": b, "sample": sample, "timestep": t, "labels": labels}
        try:
            out = self.base(
                sample.repeat(n, *([1] * (sample.ndim - 1))),
                t.repeat(n),
                class_labels=None if labels is None else labels.repeat(n),
                **kwargs,
            )
        finally:
            self._run = None
        stacked = out if isinstance(out, Tensor) else (out.sample if hasattr(out, "sample") else out[0])
        rows = stacked.view(n, b, *stacked.shape[1:])
        # a fused output convolution leaves every row block equal (take one); otherwise average the members'
        prediction = rows[0] if "conv_out" in self.blocks else rows.mean(0)
        if isinstance(out, Tensor):
            return prediction
        if hasattr(out, "sample"):
            return type(out)(sample=prediction)
        return (prediction,)


# -- the folder ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EnsembleModel(LoadedModel):
    """A loaded ensemble: a :class:`LoadedModel` whose denoiser combines ``members`` (also LoadedModels)."""

    members: list[LoadedModel] = dataclasses.field(default_factory=list)

    def bytes_on_disk(self) -> int:
        """The ensemble's own file and every member's weights: what sampling it reads."""
        return (self.folder / WEIGHTS_FILE).stat().st_size + sum(m.bytes_on_disk() for m in self.members)


@dataclasses.dataclass
class AveragedModel(EnsembleModel):
    """The output average of models already in memory (:func:`average`): what it needs beyond its denoiser
    (conditioning, guidance's unconditional inputs, decoding and encoding images) comes from the first member, so
    ``hasten.from_pipeline`` models average as bundled ones do."""

    def bytes_on_disk(self) -> int:
        return sum(m.bytes_on_disk() for m in self.members)

    @property
    def default_guidance(self) -> float:  # type: ignore[override]
        return self.members[0].default_guidance

    @property
    def x0_processing(self):  # type: ignore[override]
        return self.members[0].x0_processing

    @property
    def condition_key(self) -> str:  # type: ignore[override]
        return self.members[0].condition_key

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return self.members[0].pixel_shape

    def conditioning(self, labels: Tensor | None, rows: range) -> dict[str, Tensor]:
        return self.members[0].conditioning(labels, rows)

    def unconditional(self) -> dict[str, Tensor] | None:
        return self.members[0].unconditional()

    def to_images(self, x: Tensor) -> Tensor:
        return self.members[0].to_images(x)

    def from_images(self, images01: Tensor) -> Tensor:
        return self.members[0].from_images(images01)


def average(models: Sequence[LoadedModel], weights: Sequence[float] | None = None, *, name: str | None = None
            ) -> AveragedModel:  # fmt: skip
    """The output average of loaded models, in memory: bundled models, model folders or pipeline models.

    ``weights`` default to equal. Members are checked as for a saved average (image shape, classes, the first
    member's noise levels within every member's); pipeline members must also be conditioned alike (the same
    prompt encoding, ``condition_key``), since the first member's conditioning is passed to all of them. To save an
    average of model folders, use :func:`hasten.ensemble.build_ensemble` instead.
    """
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one member")
    specs = [m.info.name for m in models]
    check_members(models, specs, "average")
    for i, member in enumerate(models[1:], start=1):
        if member.condition_key != models[0].condition_key:
            raise ValueError(
                f"{_label(i, specs[i])} is conditioned otherwise than member 1 ({specs[0]!r}): an average passes one "
                "conditioning to every member, so build them with the same prompt (or prompt_embeds)"
            )
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    check_weights(weights, len(models))
    denoiser = OutputAverage([m.denoiser for m in models], torch.tensor(weights, dtype=torch.float64))
    info = ensemble_info(name or "average(" + ", ".join(specs) + ")", models, specs, "average", {"weights": weights})
    digest = hashlib.sha256(json.dumps(weights).encode())
    for member in models:
        digest.update(member.fingerprint.encode())
    network = nn.ModuleList([m.network for m in models])
    return AveragedModel(denoiser, network, info, models[0].folder, digest.hexdigest()[:16], members=models)


def member_spec(name_or_path: str | os.PathLike) -> str:
    """How ``hasten.json`` names a member: a bundled name as given, a folder as an absolute path."""
    text = str(name_or_path)
    if not (pathlib.Path(text) / "hasten.json").exists() and (BUNDLED / text / "hasten.json").exists():
        return text
    return str(pathlib.Path(text).resolve())


def ensemble_info(
    name: str, members: Sequence[LoadedModel], specs: Sequence[str], method: str, extra: dict[str, Any]
) -> ModelInfo:
    """The ensemble's ``hasten.json``: the first member's description with the ``ensemble`` record.

    AFA's output is in the members' own objective; the average returns ``x0_hat`` (its ``objective`` says
    ``x0`` when the members' objectives differ)."""
    first = members[0].info
    same = all(m.info.objective == first.objective and m.info.time_scale == first.time_scale for m in members)
    archs = sorted({m.info.arch for m in members})
    record = {
        "method": method,
        "members": [{"model": spec, "fingerprint": m.fingerprint} for spec, m in zip(specs, members, strict=True)],
        **extra,
    }
    return ModelInfo(
        name=name,
        arch=archs[0] if len(archs) == 1 else "+".join(archs),
        objective=first.objective if same else "x0",
        image_shape=first.image_shape,
        num_classes=first.num_classes,
        data=first.data,
        time_scale=first.time_scale if same else 1.0,
        ensemble=record,
    )


def save_ensemble(folder: str | os.PathLike, info: ModelInfo, tensors: dict[str, Tensor], card: str) -> pathlib.Path:
    """Write ``hasten.json``, ``ensemble.safetensors`` and ``MODEL_CARD.md`` into ``folder``, each atomically."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / "hasten.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(card)
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _member_folder(spec: str, folder: pathlib.Path) -> str:
    """A member named in ``hasten.json``: a bundled name, an absolute folder, or a folder relative to the
    ensemble's (so an ensemble and its members move together)."""
    if (pathlib.Path(spec) / "hasten.json").exists() or (BUNDLED / spec / "hasten.json").exists():
        return spec
    relative = folder / spec
    return str(relative) if (relative / "hasten.json").exists() else spec


def load_members(
    record: dict[str, Any], folder: pathlib.Path, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[list[LoadedModel], list[str]]:
    """The members named by an ``ensemble`` record, each checked against its recorded fingerprint."""
    members, specs = [], []
    for i, entry in enumerate(record.get("members", [])):
        spec = str(entry["model"])
        try:
            member = load(_member_folder(spec, folder), device=device, dtype=dtype)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{folder / 'hasten.json'} names {_label(i, spec)}, which is neither a bundled model nor a model "
                "folder here"
            ) from None
        if member.fingerprint != entry["fingerprint"]:
            raise ValueError(
                f"{_label(i, spec)} of the ensemble {folder} has weights fingerprint {member.fingerprint}, but the "
                f"ensemble was built on {entry['fingerprint']}: the member changed since; rebuild the ensemble"
            )
        members.append(member)
        specs.append(spec)
    return members, specs


def build_afa_network(members: Sequence[LoadedModel], blocks: Sequence[str], hidden: int) -> FeatureEnsemble:
    """A fresh (untrained: equal weights everywhere) AFA network over ``members``."""
    first = members[0]
    points = fusion_points(first.network, blocks, first.info.image_shape, first.info.num_classes)
    param = next(first.network.parameters())
    aggregator = Aggregator(points, len(members), first.info.image_shape[0], first.info.num_classes, hidden)
    return FeatureEnsemble([m.network for m in members], aggregator.to(param.device))


def _load_ensemble(
    folder: pathlib.Path, info: ModelInfo, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> EnsembleModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = info.ensemble
    method = record.get("method")
    if method not in METHODS:
        raise ValueError(f"{folder / 'hasten.json'}: unknown ensemble method {method!r}; allowed: {', '.join(METHODS)}")
    members, specs = load_members(record, folder, device, dtype)
    check_members(members, specs, method)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {folder / WEIGHTS_FILE}: {str(err).splitlines()[0]}") from None
    if method == "average":
        network: nn.Module = nn.ModuleList([m.network for m in members])
        denoiser: Any = OutputAverage([m.denoiser for m in members], tensors["weights"].cpu())
    else:
        blocks = tuple(record["blocks"])
        network = build_afa_network(members, blocks, int(record["hidden"]))
        try:
            network.aggregator.load_state_dict(  # type: ignore[union-attr]
                {k.removeprefix("aggregator."): v for k, v in tensors.items()}
            )
        except RuntimeError as err:
            detail = " ".join(line.strip() for line in str(err).splitlines())[:400]
            raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the recorded blocks: {detail}") from None
        # the aggregator stays float32 whatever the members' dtype (its weights are cast per fused tensor)
        network.eval().requires_grad_(False)
        denoiser = make_denoiser(network, info)
    digest = hashlib.sha256(weights_fingerprint(folder, WEIGHTS_FILE).encode())
    for member in members:  # the same aggregator over other members is another model
        digest.update(member.fingerprint.encode())
    return EnsembleModel(denoiser, network, info, folder, digest.hexdigest()[:16], members=members)


FOLDER_FORMATS.add(RECORD, FolderFormat(WEIGHTS_FILE, load_model=_load_ensemble))

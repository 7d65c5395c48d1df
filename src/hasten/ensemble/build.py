"""``hasten ensemble``: build an ensemble folder (the output average at once, AFA by training its aggregator).

AFA trains only the aggregator, on the members' own denoising loss (noise, velocity or flow target on the
members' schedule, exactly :func:`hasten.train`'s objective) on their training data, with labels replaced by
the null class at ``cfg_dropout`` so classifier-free guidance keeps working. The run is :class:`TrainingLoop`'s:
one atomic safetensors checkpoint (aggregator, optimizer, generator) with JSON counters in ``out/checkpoint/``,
a time budget across resumes, and a rerun with ``resume=True`` continues bit-identically; the settings and the
members' fingerprints must match to resume.

Reference: Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025 (only the
aggregator trains, on the ordinary denoising loss, members frozen).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import torch

from ..config import RunConfig
from .model import (
    METHODS,
    build_afa_network,
    check_members,
    check_weights,
    default_blocks,
    ensemble_info,
    member_spec,
    save_ensemble,
)

__all__ = ["EnsembleConfig", "EnsembleResult", "build_ensemble"]


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(RunConfig):
    """Settings of one ensemble (all but ``minutes`` and ``checkpoint_minutes`` must match to resume).

    Args:
        members: Bundled model names or model folders; the first one's schedule is the ensemble's.
        method: ``"average"`` (weighted output average) or ``"afa"`` (adaptive feature aggregation).
        weights: The average's weights, one per member, summing to 1 (empty: equal). AFA refuses them.
        blocks: AFA's fused blocks, module names of the member network (empty: every down, mid and up block and
            the output convolution). The average refuses them.
        hidden: Width of AFA's attention heads.
        minutes: AFA's training time in all, across resumes (required for AFA, refused for the average).
        batch_size, lr, cfg_dropout, checkpoint_minutes, seed: AFA's training (as for ``hasten train``).
    """

    members: tuple[str, ...] = ()
    method: str = "afa"
    weights: tuple[float, ...] = ()
    blocks: tuple[str, ...] = ()
    hidden: int = 16
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-3
    cfg_dropout: float = 0.1
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.members, str) or not all(isinstance(m, str) and m for m in self.members):
            raise TypeError(f"members must be a sequence of model names or folders, got {self.members!r}")
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if self.method not in METHODS:
            raise ValueError(f"unknown ensemble method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.method == "average":
            if self.weights:
                check_weights([float(w) for w in self.weights], len(self.members))
            for name, value, default in (("blocks", self.blocks, ()), ("minutes", self.minutes, None)):
                if value != default:
                    raise ValueError(f"{name} is an AFA setting; the output average takes none (got {value!r})")
            return
        if self.weights:
            raise ValueError(f"weights are the output average's; AFA learns its own (got {list(self.weights)})")
        if self.minutes is None or not 0 < self.minutes < math.inf:
            raise ValueError(f"AFA trains its aggregator: minutes must be a finite number > 0, got {self.minutes!r}")
        if not 0 < self.checkpoint_minutes < math.inf or not 0 < self.lr < math.inf:
            raise ValueError(f"need checkpoint_minutes > 0 and lr > 0, got {self.checkpoint_minutes}, {self.lr}")
        if self.batch_size < 1 or self.hidden < 1:
            raise ValueError(f"need batch_size >= 1 and hidden >= 1, got {self.batch_size}, {self.hidden}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclasses.dataclass
class EnsembleResult:
    folder: pathlib.Path
    method: str
    steps: int
    seconds: float
    final_loss: float | None
    resumed_from_step: int


def build_ensemble(
    config: EnsembleConfig | None = None,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
    name: str | None = None,
    **settings: Any,
) -> EnsembleResult:
    """Build the ensemble ``config`` describes into the model folder ``out`` (loads with :func:`hasten.load`).

    ``hasten.ensemble.build_ensemble(members=("mnist-unet", "runs/seed1"), method="afa", minutes=10, out="afa")``
    is the same as passing an :class:`EnsembleConfig`. ``out`` must not hold files unless ``resume`` (then the
    AFA run there continues; refused if its settings or members' weights differ) or ``overwrite`` (then the
    ensemble's files there are replaced; a folder holding an AFA checkpoint is still refused: resume it or delete
    it).

    Raises:
        FileExistsError: ``out`` holds files and neither ``resume`` nor ``overwrite``, or holds no AFA run to resume.
        ValueError: members that cannot be combined by the method (named), bad settings.
    """
    from ..train import find_checkpoint

    if config is None:
        config = EnsembleConfig.create(**settings)
    elif settings:
        raise TypeError(f"pass either an EnsembleConfig or its settings, not both (got {', '.join(sorted(settings))})")
    if out is None:
        raise TypeError("build_ensemble() needs out: the folder to write the ensemble into")
    folder = pathlib.Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder for the ensemble")
    if resume and overwrite:
        raise ValueError("resume continues the run in the folder, overwrite replaces it: pass one of them")
    if folder.is_dir() and any(folder.iterdir()):
        checkpoint = find_checkpoint(folder)
        if resume and (config.method != "afa" or checkpoint is None):
            raise FileExistsError(f"{folder} holds files but no AFA checkpoint to resume; choose another folder")
        if overwrite and checkpoint is not None:
            raise FileExistsError(
                f"{folder} holds an AFA training checkpoint ({checkpoint}); resume it (--resume), delete it, or "
                "choose another folder"
            )
        if not resume and not overwrite:
            raise FileExistsError(
                f"{folder} already holds files; choose another folder, resume its AFA run (--resume) or replace "
                "the ensemble there (--force)"
            )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None: the time budget alone), got {max_steps}")
    from ..models.zoo import load

    device = torch.device(device)
    specs = [member_spec(m) for m in config.members]
    members = [load(m, device=device) for m in config.members]
    check_members(members, specs, config.method)
    name = name or folder.name
    if config.method == "average":
        weights = list(config.weights) or [1.0 / len(members)] * len(members)
        info = ensemble_info(name, members, specs, "average", {"weights": weights})
        save_ensemble(folder, info, {"weights": torch.tensor(weights, dtype=torch.float64)}, _card(info, None))
        return EnsembleResult(folder, "average", 0, 0.0, None, 0)
    return _train_afa(config, folder, members, specs, device, max_steps, progress, name)


def _train_afa(config, folder, members, specs, device, max_steps, progress, name) -> EnsembleResult:
    from ..data import load_dataset, to_model_space
    from ..train import TrainingLoop, _loss

    first = members[0].info
    if not first.data:
        raise ValueError(f"AFA trains on the members' data; {specs[0]} names no data set")
    blocks = tuple(config.blocks) or default_blocks(members[0].network)
    torch.manual_seed(config.seed)
    network = build_afa_network(members, blocks, config.hidden)
    aggregator = network.aggregator.train()
    trainable = list(aggregator.parameters())
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    dataset = load_dataset(first.data)
    images = to_model_space(dataset.images).to(device)
    labels = dataset.labels.to(device) if dataset.labels is not None else None
    schedule = members[0].schedule
    ab = getattr(schedule, "alphas_cumprod", None)  # the DDPM table of eps / v members (train.py's objective)
    if first.objective in ("eps", "v") and ab is None:
        raise ValueError(f"AFA training of {first.objective!r} members needs a discrete DDPM schedule, got {schedule}")
    if first.objective not in ("eps", "v", "flow"):
        raise ValueError(
            f"AFA trains on hasten train's objectives (eps, v, flow); the members predict {first.objective}"
        )
    ab = None if ab is None else ab.to(device=device, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    loop = TrainingLoop(
        folder, config, {"aggregator": aggregator}, {"opt": opt}, gen, budget_seconds=float(config.minutes) * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="ensembling (afa)", progress=progress,
    )  # fmt: skip
    fingerprints = [m.fingerprint for m in members]
    loop.counters["method.member_fingerprints"] = fingerprints
    resumed_from = loop.resume(device)
    if resumed_from and loop.counters["method.member_fingerprints"] != fingerprints:
        raise ValueError(
            f"{folder} holds a run over other member weights (fingerprints "
            f"{loop.counters['method.member_fingerprints']}, now {fingerprints}); use another --out"
        )
    null = first.num_classes

    def step(index: int) -> float:
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen, device=device)
        y = None
        if labels is not None:
            y = labels[idx].clone()
            drop = torch.rand(config.batch_size, generator=gen, device=device) < config.cfg_dropout
            y[drop] = null
        loss = _loss(network, images[idx], y, first.objective, ab, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    counters = loop.run(step, batch_size=config.batch_size, max_steps=max_steps)
    training = loop.record(aggregator, device)
    extra = {"blocks": list(blocks), "hidden": config.hidden, "training": training}
    info = ensemble_info(name, members, specs, "afa", extra)
    tensors = {f"aggregator.{k}": v for k, v in aggregator.state_dict().items()}
    save_ensemble(folder, info, tensors, _card(info, training))
    return EnsembleResult(folder, "afa", counters["step"], counters["seconds"], counters["loss_ema"], resumed_from)


def _card(info, training: dict[str, Any] | None) -> str:
    """A short model card: what the ensemble is and what it costs (quality is measured apart)."""
    record = info.ensemble
    members = "\n".join(
        f"  {i + 1}. `{m['model']}` (weights `{m['fingerprint']}`)" for i, m in enumerate(record["members"])
    )
    n = len(record["members"])
    if record["method"] == "average":
        how = f"the weighted average of the members' data predictions, weights {record['weights']}"
        cost = f"{n} network calls per step where a member makes one (members with weight 0 are skipped)"
    else:
        how = (
            f"adaptive feature aggregation (AFA): at the blocks {', '.join(record['blocks'])} the members' "
            "features are fused by a learned spatial attention and every member continues from the fused features"
        )
        cost = f"{n} member forwards per network call plus the aggregator ({training['parameters']:,} parameters)"
    text = f"""# {info.name}

An ensemble made by `hasten ensemble --method {record["method"]}`: {how}.

* **Members** (loaded by name or folder when the ensemble loads; a changed member is refused by fingerprint):
{members}
* **Cost:** {cost}.
"""
    if training is not None:
        text += (
            f"* **Training (aggregator only, members frozen):** {training['steps']:,} updates of batch "
            f"{training['config']['batch_size']} ({training['images_seen']:,} images), lr {training['config']['lr']}, "
            f"{training['seconds'] / 60:.1f} minutes on {training['machine']}; final denoising loss (running "
            f"average) {training['final_loss_ema']:.4g}.\n"
        )
    text += "* **Quality:** not measured here: `hasten evaluate --model <this folder>`, docs/guide/ensembling.md.\n"
    return text

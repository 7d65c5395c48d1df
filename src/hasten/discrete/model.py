"""A masked diffusion network on token grids (binarised MNIST: 784 tokens of 2 values + MASK) and its training.

The network is time-agnostic (MDLM's SUBS parameterisation): it sees the partly masked grid as one-hot channels (the
``V`` values and MASK), runs hasten's preset diffusers ``UNet2DModel`` with its timestep held at 0, and returns
``V`` logits per position. Training draws ``t`` by antithetic sampling on ``[eps, 1]``, masks each token with
probability ``1 - alpha_t`` and minimises :func:`~hasten.discrete.masking.mdlm_loss` per token, with the training
loop every hasten model uses (EMA, atomic checkpoints, exact resume).

Reference: Sahoo et al., MDLM, NeurIPS 2024, Sec. 3 and App. B (antithetic time sampling, SUBS); the card in
docs/architecture.md, "Masked diffusion".
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from .masking import LogLinearMask, mdlm_loss

__all__ = ["OBJECTIVE", "MaskedTrainConfig", "MaskedUNet", "binarise", "train_masked"]

OBJECTIVE = "mdlm"  # hasten.json's objective of a masked diffusion model folder
VOCAB = 2  # binarised pixels: 0 (ink absent) and 1 (ink present); MASK = 2


def binarise(images: Tensor) -> Tensor:
    """uint8 images ``[N, 1, H, W]`` -> tokens ``[N, H * W]``: 1 where the pixel is at least half bright."""
    if images.dtype != torch.uint8:
        raise TypeError(f"binarise takes uint8 images, got {images.dtype}")
    return (images >= 128).long().flatten(1)


class MaskedUNet(nn.Module):
    """``forward(tokens [B, L], class_labels) -> logits [B, L, V]`` with a diffusers UNet inside (``self.unet``)."""

    def __init__(self, unet: nn.Module, vocab: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.unet, self.vocab, self.grid = unet, int(vocab), tuple(grid)

    @classmethod
    def build(cls, vocab: int, grid: tuple[int, int], num_classes: int) -> MaskedUNet:
        from diffusers import UNet2DModel

        from ..models.zoo import _PRESETS

        unet = UNet2DModel(
            sample_size=grid[0], in_channels=vocab + 1, out_channels=vocab,
            num_class_embeds=(num_classes + 1) if num_classes else None, **_PRESETS["unet"],
        )  # fmt: skip
        return cls(unet, vocab, grid)

    def forward(self, tokens: Tensor, class_labels: Tensor | None = None) -> Tensor:
        length = tokens.shape[1]
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"this network takes {self.grid[0]}x{self.grid[1]} = {self.grid[0] * self.grid[1]} "
                             f"tokens, got {length}")  # fmt: skip
        if int(tokens.max()) > self.vocab or int(tokens.min()) < 0:
            raise ValueError(f"tokens must lie in 0..{self.vocab} ({self.vocab} = MASK)")
        onehot = F.one_hot(tokens, self.vocab + 1).to(next(self.unet.parameters()).dtype)  # [B, L, V + 1]
        return self.forward_onehot(onehot, class_labels)

    def forward_onehot(self, onehot: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The logits ``[B, L, V]`` of one-hot (or relaxed, rows on the simplex) tokens ``[B, L, V + 1]``:
        differentiable in ``onehot``, which DRAKES's relaxed sampling needs."""
        b, length, channels = onehot.shape
        if length != self.grid[0] * self.grid[1] or channels != self.vocab + 1:
            raise ValueError(f"this network takes one-hot tokens [B, {self.grid[0] * self.grid[1]}, "
                             f"{self.vocab + 1}], got {tuple(onehot.shape)}")  # fmt: skip
        image = onehot.transpose(1, 2).reshape(b, self.vocab + 1, *self.grid)
        timestep = torch.zeros(b, device=onehot.device)  # time-agnostic
        out = self.unet(image, timestep, class_labels=class_labels).sample  # [B, V, H, W]
        return out.reshape(b, self.vocab, length).transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class MaskedTrainConfig(RunConfig):
    """Settings of a masked diffusion training run (all but the budget must match to resume)."""

    type_tag: ClassVar[str] = "masked_training"
    BUDGET: ClassVar[tuple[str, ...]] = ("minutes", "max_steps", "checkpoint_minutes")
    data: str = "mnist"
    minutes: float = 10.0
    max_steps: int = 10**9
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("minutes", self.minutes > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 1, ">= 1"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("cfg_dropout", 0 <= self.cfg_dropout < 1, "in [0, 1)"), ("eps", 0 <= self.eps < 1, "in [0, 1)"),
            ("checkpoint_minutes", self.checkpoint_minutes > 0, "> 0"),
        )  # fmt: skip
        for option, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{option} must be {allowed}, got {getattr(self, option)!r}")


def train_masked(
    out: str | os.PathLike,
    config: MaskedTrainConfig | None = None,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train a masked diffusion model of binarised ``config.data`` into the folder ``out``; rerun to resume.

    The folder is a diffusers ``UNet2DModel`` folder (the network inside :class:`MaskedUNet`) plus ``hasten.json``
    (objective ``mdlm``, the vocabulary, the training record), written at the end; the checkpoint lives in the
    same folder meanwhile, as with ``hasten train`` (``hasten train --objective mdlm`` runs this). The batches and
    masks are drawn on the CPU from the run's generator, so a run resumes exactly on any ``device``. Returns the
    training record."""
    from ..data import load_dataset
    from ..models.zoo import ModelInfo, save_model
    from ..train import TrainingLoop, ema_update, optimizer_step

    config = MaskedTrainConfig() if config is None else config
    folder = pathlib.Path(out)
    if (folder / "hasten.json").exists():
        raise FileExistsError(f"{folder} already holds a finished model; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config.data)
    if dataset.shape[0] != 1:
        raise ValueError(f"masked training binarises one-channel images; {config.data} has {dataset.shape[0]}")
    tokens = binarise(dataset.images)
    labels = dataset.labels
    num_classes = dataset.num_classes
    grid = tuple(dataset.shape[1:])
    schedule, mask_id = LogLinearMask(config.eps), VOCAB
    torch.manual_seed(config.seed)
    device = torch.device(device)
    net = MaskedUNet.build(VOCAB, grid, num_classes).to(device).train()
    ema = MaskedUNet.build(VOCAB, grid, num_classes).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    loop = TrainingLoop(
        folder, config, {"model": net, "ema": ema}, {"opt": opt}, gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="masked training", progress=progress,
    )  # fmt: skip
    loop.resume(device)
    params = list(net.parameters())

    def step(index: int) -> float:
        idx = torch.randint(0, len(tokens), (config.batch_size,), generator=gen)
        x0 = tokens[idx]
        y = None
        if labels is not None:
            y = labels[idx].clone()
            y[torch.rand(config.batch_size, generator=gen) < config.cfg_dropout] = num_classes  # the null class
        # antithetic times on [eps, 1]: one uniform offset, evenly spread over the batch
        u = (
            torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(config.batch_size) / config.batch_size
        ) % 1
        t = (1 - config.eps) * u + config.eps
        x_t = schedule.mask(x0, t, mask_id, gen)
        x0, x_t, t = x0.to(device), x_t.to(device), t.to(device)
        y = None if y is None else y.to(device)
        loss = mdlm_loss(net(x_t, y), x0, x_t, t, mask_id, schedule).mean() / x0.shape[1]  # per token
        optimizer_step(opt, loss, params, config.grad_clip, lr=config.lr, warmup_steps=config.warmup_steps,
                       index=index)  # fmt: skip
        ema_update(ema, net, index, config.ema_decay)
        return float(loss.detach())

    loop.run(step, batch_size=config.batch_size, max_steps=config.max_steps)
    record = loop.record(ema, device) | {
        "weights": "EMA",
        "vocab": VOCAB,
        "tokens": "pixels >= 128 of the uint8 images",
    }
    info = ModelInfo(name=folder.name, arch="unet", objective=OBJECTIVE, image_shape=dataset.shape,
                     num_classes=num_classes, data=config.data, training=record)  # fmt: skip
    save_model(ema.unet.cpu(), info, folder)  # the UNet's diffusers files; hasten.json last, so it marks a finished run
    return record

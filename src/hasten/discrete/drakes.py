"""DRAKES: reward fine-tuning of a masked diffusion model by backpropagation through its relaxed sampler.

Maximise ``E_{x0 ~ P_theta}[r(x0)] - alpha KL(P_theta || P_pre)`` over whole sampling trajectories of the ancestral
sampler (``steps`` uniform times). A trajectory is drawn with the model being tuned: the first ``steps - truncate``
steps hard and detached (truncated backpropagation), the last ``truncate`` steps relaxed by Gumbel-softmax::

    q(x_s | x_t) on a masked position:  unmask * p_theta(v | x_t) for each value v,  1 - unmask to stay masked
    x_s = c x_t + (1 - c) softmax((log q + g) / tau),  g ~ Gumbel,  c = 1 - x_t[MASK]   (unmasked rows carried over)
    x0  = onehot(argmax x_s) + x_s - stopgrad(x_s)                                        (straight-through)

and the reward of ``x0``'s images is backpropagated into ``theta`` through the relaxed steps. The KL of one step is
exact for this sampler: the "stay masked" probability is the same under both models, so only the unmasked values
differ, and ``KL_step = unmask * sum_{l still masked} KL(p_theta(. | x_t)_l || p_pre(. | x_t)_l)``; a relaxed
position counts by its MASK weight ``x_t[MASK]``. It is summed over the relaxed steps (DRAKES's ``truncate_kl``),
with the pretrained model under ``no_grad``. The KL is over the positions STILL MASKED: on an unmasked position the
SUBS parameterisation makes both models one-hot on the observed token, so a KL weighted by the copy flag (as the
public code appears to do) is identically 0 (tested). ``loss = -mean r(x0) + alpha mean KL``.

Reference: Wang et al., "Fine-Tuning Discrete Diffusion Models via Reward Optimization with Applications to DNA
and Protein Design" (DRAKES), ICLR 2025, Alg. 1 and Sec. 4 (Gumbel-softmax, truncated backpropagation, KL to the
pretrained model); ChenyuWang-Monica/DRAKES ``_sample_finetune_gradient`` (straight-through output, ``truncate_kl``);
Jang et al., 2017 / Maddison et al., 2017 (Gumbel-softmax).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RunConfig
from .model import OBJECTIVE, MaskedUNet
from .sampling import AncestralSampler, Randomness, uniform

__all__ = ["DrakesConfig", "fine_tune", "relaxed_step", "relaxed_trajectory", "still_masked_kl", "token_images"]


@dataclasses.dataclass(frozen=True)
class DrakesConfig(RunConfig):
    """Settings of a DRAKES fine-tuning run (all but the budget must match to resume).

    ``base``: the pretrained masked model (a bundled name or folder; also the KL reference). ``reward``: the name of
    the reward (a registered spec, or the name a callable reward is recorded under). ``label``: the class the
    sequences are conditioned on; None is the null class of a class-conditional model (unconditional sampling).
    """

    type_tag: ClassVar[str] = "drakes"
    BUDGET: ClassVar[tuple[str, ...]] = ("minutes", "max_steps", "checkpoint_minutes")
    base: str = "mnist-mdm"
    reward: str = ""
    label: int | None = None
    steps: int = 16
    truncate: int = 4
    tau: float = 1.0
    alpha: float = 1e-3
    lr: float = 1e-4
    batch_size: int = 16
    minutes: float = 10.0
    max_steps: int = 10**9
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    eps: float = 1e-3
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        checks = (
            ("base", isinstance(self.base, str) and bool(self.base), "a model name or folder"),
            ("reward", isinstance(self.reward, str) and bool(self.reward), "a reward name"),
            ("label", self.label is None or (integer(self.label) and self.label >= 0), "None or a class >= 0"),
            ("steps", integer(self.steps) and self.steps >= 1, "an integer >= 1"),
            ("truncate", integer(self.truncate) and 1 <= self.truncate <= self.steps,
             f"an integer in 1..steps ({self.steps}): the relaxed steps the reward's gradient flows through"),
            ("tau", self.tau > 0, "> 0"), ("alpha", self.alpha >= 0, ">= 0"), ("lr", self.lr > 0, "> 0"),
            ("batch_size", integer(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("minutes", self.minutes > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("grad_clip", self.grad_clip > 0, "> 0"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("eps", 0 <= self.eps < 1, "in [0, 1)"), ("checkpoint_minutes", self.checkpoint_minutes > 0, "> 0"),
        )  # fmt: skip
        for option, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{option} must be {allowed}, got {getattr(self, option)!r}")

    def sampler(self) -> AncestralSampler:
        """The ancestral sampler whose trajectories are tuned (sample the tuned model with it)."""
        return AncestralSampler(steps=self.steps, eps=self.eps)


def token_images(x0: Tensor, grid: tuple[int, int]) -> Tensor:
    """One-hot (or straight-through) tokens ``[B, L, V]`` -> images ``[B, 1, H, W]`` with pixel ``v / (V - 1)``,
    differentiable (the discrete model's ``to_images`` on hard tokens)."""
    vocab = x0.shape[-1]
    levels = torch.arange(vocab, dtype=x0.dtype, device=x0.device) / max(vocab - 1, 1)
    return (x0 * levels).sum(-1).reshape(x0.shape[0], 1, *grid)


def relaxed_step(logp: Tensor, xs: Tensor, unmask: float, tau: float, u: Tensor) -> Tensor:
    """One Gumbel-softmax step of the ancestral sampler on relaxed tokens ``xs`` ``[B, L, V + 1]`` (MASK last).

    ``logp``: ``log p_theta(. | xs)`` ``[B, L, V]``; ``u``: ``U(0, 1)`` draws ``[B, L, V + 1]`` (the same draws
    make :meth:`AncestralSampler.move`'s hard step, to which this tends as ``tau -> 0``)."""
    stay = math.log1p(-unmask) if unmask < 1 else -math.inf
    log_q = torch.cat([logp + math.log(unmask), torch.full_like(logp[..., :1], stay)], dim=-1)
    g = -torch.log(-torch.log(u.to(logp.dtype).clamp_min(torch.finfo(logp.dtype).tiny)))
    soft = torch.softmax((log_q + g) / tau, dim=-1)
    keep = 1 - xs[..., -1:]  # the copy flag: 1 on unmasked positions
    return keep * xs + (1 - keep) * soft


def still_masked_kl(logp: Tensor, logp_pre: Tensor, xs: Tensor, unmask: float) -> Tensor:
    """One step's KL per sequence ``[B]``: ``unmask * sum_l xs_l[MASK] * KL(p_theta,l || p_pre,l)``."""
    kl = (logp.exp() * (logp - logp_pre)).sum(-1)  # [B, L]
    return unmask * (xs[..., -1] * kl).sum(-1)


def relaxed_trajectory(
    net: MaskedUNet,
    pre: MaskedUNet | None,
    n: int,
    sampler: AncestralSampler,
    truncate: int,
    tau: float,
    generator: Randomness,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` trajectories of ``sampler`` by ``net``: straight-through one-hot ``x0`` ``[n, L, V]`` (differentiable
    through the last ``truncate`` steps; ``truncate = 0``: no gradient at all) and the KL to ``pre`` over those steps
    ``[n]`` (zeros without ``pre``)."""
    if not 0 <= truncate <= sampler.steps:
        raise ValueError(f"truncate must be in 0..{sampler.steps} (the sampler's steps), got {truncate}")
    vocab = net.vocab
    device = next(net.parameters()).device
    x = torch.full((n, net.grid[0] * net.grid[1]), vocab, dtype=torch.long, device=device)
    with torch.no_grad():  # the hard, detached part of the trajectory
        for i in range(sampler.steps - truncate):
            if bool((x != vocab).all()):
                break
            x = sampler.move(net(x, labels).double(), x, i, generator)
    xs = F.one_hot(x, vocab + 1).to(next(net.parameters()).dtype)
    kl = torch.zeros(n, dtype=xs.dtype, device=device)
    for i in range(sampler.steps - truncate, sampler.steps):
        unmask = sampler.unmask_probability(i)
        logp = net.forward_onehot(xs, labels).log_softmax(-1)
        if pre is not None:
            with torch.no_grad():
                logp_pre = pre.forward_onehot(xs.detach(), labels).log_softmax(-1)
            kl = kl + still_masked_kl(logp, logp_pre, xs, unmask)
        u = uniform(tuple(xs.shape), generator).to(device)
        xs = relaxed_step(logp, xs, unmask, tau, u)
    values = xs[..., :vocab]
    hard = F.one_hot(values.argmax(-1), vocab).to(values.dtype)
    return hard + values - values.detach(), kl


def fine_tune(
    out: str | os.PathLike,
    config: DrakesConfig,
    reward: str | Callable[[Tensor], Tensor] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``config.base`` by DRAKES into the folder ``out`` (a masked model folder :func:`load_masked`
    reads); rerun to resume. ``reward`` is ``config.reward``'s registered spec by default, or a differentiable
    callable on images recorded under that name. Returns the training record (its ``drakes`` entry names the
    reward, alpha and the base model's fingerprint).

    Raises:
        ValueError: a reward without a gradient, a label the base model does not have.
        FileExistsError: ``out`` already holds a finished model.
    """
    from ..models.zoo import ModelInfo, save_model
    from ..rewards import get_reward
    from ..train import TrainingLoop, ema_update, optimizer_step
    from .generate import load_masked

    folder = pathlib.Path(out)
    if (folder / "hasten.json").exists():
        raise FileExistsError(f"{folder} already holds a finished model; choose another folder")
    scorer = get_reward(config.reward if reward is None else reward)
    if config.reward.startswith("class:"):
        warnings.warn(
            f"reward {config.reward!r} is hasten's bundled classifier, whose features are also the FD space: a model "
            "tuned on it can raise both without better digits; judge it by a held-out oracle", stacklevel=2,
        )  # fmt: skip
    base = load_masked(config.base)
    classes = base.info.num_classes
    if config.label is not None and not config.label < (classes or 0):
        raise ValueError(f"label {config.label} is not a class of {config.base} (classes 0..{(classes or 0) - 1})")
    label = classes if (config.label is None and classes) else config.label  # the null class: unconditional
    pre = base.network.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    net = copy.deepcopy(pre).train().requires_grad_(True)
    ema = copy.deepcopy(pre)
    folder.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    loop = TrainingLoop(
        folder, config, {"model": net, "ema": ema}, {"opt": opt}, gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="DRAKES", progress=progress,
    )  # fmt: skip
    loop.resume(torch.device("cpu"))
    sampler = config.sampler()
    labels = None if label is None else torch.full((config.batch_size,), label, dtype=torch.long)
    params = list(net.parameters())

    def step(index: int) -> float:
        x0, kl = relaxed_trajectory(net, pre, config.batch_size, sampler, config.truncate, config.tau, gen, labels)
        r = scorer(token_images(x0, net.grid))
        if not r.requires_grad:
            raise ValueError(f"reward {config.reward!r} has no gradient in the images; DRAKES backpropagates "
                             "through it (use SVDD for a reward without one)")  # fmt: skip
        loss = -r.mean() + config.alpha * kl.mean()
        optimizer_step(opt, loss, params, config.grad_clip)
        ema_update(ema, net, index, config.ema_decay)
        # the reward and KL of the last batch, kept in the checkpoint (the loop restores "method." counters)
        loop.counters["method.reward"] = float(r.detach().mean())
        loop.counters["method.kl"] = float(kl.detach().mean())
        return float(loss.detach())

    loop.run(step, batch_size=config.batch_size, max_steps=config.max_steps)
    record = loop.record(ema, torch.device("cpu")) | {
        "weights": "EMA",
        "vocab": base.vocab,
        "drakes": {
            "reward": config.reward, "alpha": config.alpha, "base": config.base, "base_fingerprint": base.fingerprint,
            "label": "null class" if config.label is None and classes else config.label,
            "sampler": sampler.to_dict(), "truncate": config.truncate, "tau": config.tau,
            "last_batch_reward": loop.counters.get("method.reward"), "last_batch_kl": loop.counters.get("method.kl"),
        },
    }  # fmt: skip
    info = ModelInfo(name=folder.name, arch=base.info.arch, objective=OBJECTIVE, image_shape=base.info.image_shape,
                     num_classes=classes, data=base.info.data, training=record)  # fmt: skip
    save_model(ema.unet, info, folder)  # hasten.json last: it marks a finished run
    return record

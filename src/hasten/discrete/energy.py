"""Energy-corrected masked diffusion sampling (EDLM): importance sampling of a sequence-level denoiser.

A masked model's step draws every masked position from its own marginal ``p_theta(x0^l | x_t)``: the factorised
proposal, wrong whenever the step unmasks several dependent positions at once (parallel decoding). EDLM replaces it
by the sequence-level ``p(x0 | x_t) ∝ p_theta(x0 | x_t) exp(-E(x0, x_t))`` and samples that by importance
sampling with the factorised draw as proposal: draw ``k`` candidates ``x0^(i) ~ p_theta(. | x_t)``, weight them
``w_i ∝ exp(-E_i / temperature)`` (low energy = likely, as training makes it), pick one by ``Cat(w)`` and let
the positions the step unmasks take that candidate's values.

The **autoregressive energy** needs no training of the energy itself::

    E(x0, x_t) = -log p_AR(x0) + log p_theta(x0 | x_t)   =>   p(x0 | x_t) ∝ p_AR(x0) on sequences that agree
                                                             with x_t's unmasked tokens

so the weights are the ordinary importance ratios ``p_AR / p_theta`` of the candidates. ``log p_AR(x0)`` sums
over *every* position (the unmasked tokens' conditionals depend on the masked ones before them). hasten trains
a small class-conditional masked-convolution autoregressive model (:class:`PixelCNN`,
:func:`train_autoregressive`) for binarised digits with the training loop every hasten model uses.

An energy is ``energy(x0 [B, L], x_t [B, L], rows [B], proposal [B]) -> [B]``: ``rows`` the batch rows, as for
masked models (so per-sequence labels follow a call on a subset), and ``proposal`` = ``log p_theta(x0 | x_t)``
(summed over the masked positions of ``x_t``), which the sampler has at hand; an energy that has no use for it
ignores it.

Reference: Xu et al., "Energy-Based Diffusion Language Models for Text Generation" (EDLM), ICLR 2025, Sec. 3-4
(AR energy, importance sampling inside a window of times); MinkaiXu/Energy-Diffusion-LLM ``diffusion.py`` (whose
released sampler weights by ``exp(+E)``, issue #3: the sign here is the paper's). van den Oord et al., "Pixel
Recurrent Neural Networks", ICML 2016 (masked convolutions, type A/B).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from .sampling import DISCRETE_SAMPLERS, DiscreteSample, FirstHittingSampler, Randomness, categorical

__all__ = [
    "ARTrainConfig",
    "AutoregressiveEnergy",
    "CorrectedSample",
    "EnergyCorrectedSampler",
    "PixelCNN",
    "load_autoregressive",
    "train_autoregressive",
]

Energy = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, x_t, rows, proposal log-prob) -> [B]
AR_FILE, AR_META = "autoregressive.safetensors", "autoregressive.json"


class _MaskedConv(nn.Conv2d):
    """A convolution that sees only pixels before the centre in raster order (type ``"A"``) or up to and including
    it (``"B"``), so a stack of them (A first) predicts each pixel from the pixels before it."""

    def __init__(self, kind: str, channels_in: int, channels_out: int, size: int) -> None:
        super().__init__(channels_in, channels_out, size, padding=size // 2)
        mask = torch.ones(size, size)
        mask[size // 2, size // 2 + (kind == "B") :] = 0
        mask[size // 2 + 1 :] = 0
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """``forward(tokens [B, L], labels [B] | None) -> logits [B, L, V]``: at position ``l`` the distribution of
    token ``l`` given tokens ``0..l-1`` (raster order of the ``grid``) and the class (``num_classes`` = no class).

    A 7x7 type-A masked convolution, ``blocks`` residual blocks of a 3x3 type-B masked convolution and a 1x1, a
    class embedding added after the first layer, and a 1x1 head. Small by design: it is the energy of a corrector,
    evaluated ``k`` times per corrected step."""

    def __init__(self, vocab: int, grid: tuple[int, int], num_classes: int, channels: int = 48, blocks: int = 5):
        super().__init__()
        self.vocab, self.grid, self.num_classes = int(vocab), tuple(grid), int(num_classes)
        self.settings = {"vocab": self.vocab, "grid": list(self.grid), "num_classes": self.num_classes,
                         "channels": channels, "blocks": blocks}  # fmt: skip
        self.first = _MaskedConv("A", vocab, channels, 7)
        self.label = nn.Embedding(num_classes + 1, channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(), _MaskedConv("B", channels, channels, 3), nn.ReLU(), nn.Conv2d(channels, channels, 1)
            )
            for _ in range(blocks)
        )  # fmt: skip
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, vocab, 1))

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        b, length = tokens.shape
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"this autoregressive model takes {self.grid[0] * self.grid[1]} tokens, got {length}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab:
            raise ValueError(f"an autoregressive model scores clean tokens in 0..{self.vocab - 1} (no MASK)")
        onehot = F.one_hot(tokens, self.vocab).to(self.first.weight.dtype)  # zero padding = no value
        h = self.first(onehot.transpose(1, 2).reshape(b, self.vocab, *self.grid))
        if labels is None:
            labels = torch.full((b,), self.num_classes, dtype=torch.long, device=tokens.device)
        h = h + self.label(labels)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).reshape(b, self.vocab, length).transpose(1, 2)

    def log_prob(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """``log p_AR(tokens)`` per sequence (``[B]``, nats): the chain rule over all positions."""
        logp = self.forward(tokens, labels).double().log_softmax(-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1).sum(dim=1)


@dataclasses.dataclass(frozen=True)
class ARTrainConfig(RunConfig):
    """Settings of an autoregressive energy's training run (all but the budget must match to resume)."""

    type_tag: ClassVar[str] = "autoregressive_training"
    BUDGET: ClassVar[tuple[str, ...]] = ("minutes", "max_steps", "checkpoint_minutes")
    data: str = "mnist"
    channels: int = 48
    blocks: int = 5
    minutes: float = 10.0
    max_steps: int = 10**9
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_minutes: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("channels", self.channels >= 1, ">= 1"), ("blocks", self.blocks >= 0, ">= 0"),
            ("minutes", self.minutes > 0, "> 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 1, ">= 1"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("label_dropout", 0 <= self.label_dropout < 1, "in [0, 1)"),
            ("checkpoint_minutes", self.checkpoint_minutes > 0, "> 0"),
        )  # fmt: skip
        for option, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{option} must be {allowed}, got {getattr(self, option)!r}")


def train_autoregressive(
    out: str | os.PathLike, config: ARTrainConfig | None = None, *, tokens: Tensor | None = None,
    labels: Tensor | None = None, num_classes: int | None = None, grid: tuple[int, int] | None = None,
    vocab: int = 2, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Train a :class:`PixelCNN` by maximum likelihood into the folder ``out``; rerun to resume.

    By default on ``config.data`` binarised as the masked models see it (:func:`~hasten.discrete.model.binarise`);
    ``tokens`` (``[N, L]``) with ``grid``, ``labels`` and ``num_classes`` train on given sequences instead (tests,
    other data). The folder gets ``autoregressive.safetensors`` (EMA weights) and ``autoregressive.json`` (the
    network's settings and the training record), written at the end; the checkpoint lives there meanwhile.
    Returns the training record."""
    from safetensors.torch import save_file

    from .._io import atomic_path, write_text_atomic
    from ..train import TrainingLoop, ema_update, optimizer_step
    from .model import binarise

    config = ARTrainConfig() if config is None else config
    folder = pathlib.Path(out)
    if (folder / AR_META).exists():
        raise FileExistsError(f"{folder} already holds a finished autoregressive model; choose another folder")
    if tokens is None:
        from ..data import load_dataset

        dataset = load_dataset(config.data)
        if dataset.shape[0] != 1:
            raise ValueError(f"the autoregressive energy binarises one-channel images; {config.data} has "
                             f"{dataset.shape[0]}")  # fmt: skip
        tokens, labels, num_classes, grid = (
            binarise(dataset.images),
            dataset.labels,
            dataset.num_classes,
            dataset.shape[1:],
        )
    elif grid is None or tokens.ndim != 2 or grid[0] * grid[1] != tokens.shape[1]:
        raise ValueError(f"tokens [N, L] need a grid with L cells; got tokens {tuple(tokens.shape)}, grid {grid}")
    num_classes = int(num_classes or 0)
    if labels is not None and (not num_classes or int(labels.max()) >= num_classes):
        raise ValueError(f"labels need num_classes above their largest value, got num_classes {num_classes}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    net = PixelCNN(vocab, tuple(grid), num_classes, config.channels, config.blocks).train()
    ema = PixelCNN(vocab, tuple(grid), num_classes, config.channels, config.blocks).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    loop = TrainingLoop(
        folder, config, {"model": net, "ema": ema}, {"opt": opt}, gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="autoregressive training", progress=progress,
    )  # fmt: skip
    loop.resume(torch.device("cpu"))
    params = list(net.parameters())

    def step(index: int) -> float:
        idx = torch.randint(0, len(tokens), (config.batch_size,), generator=gen)
        x0, y = tokens[idx], None
        if labels is not None:
            y = labels[idx].clone()
            y[torch.rand(config.batch_size, generator=gen) < config.label_dropout] = num_classes  # no class
        loss = -net.log_prob(x0, y).float().mean() / x0.shape[1]  # nats per token
        optimizer_step(opt, loss, params, config.grad_clip, lr=config.lr, warmup_steps=config.warmup_steps,
                       index=index)  # fmt: skip
        ema_update(ema, net, index, config.ema_decay)
        return float(loss.detach())

    loop.run(step, batch_size=config.batch_size, max_steps=config.max_steps)
    record = loop.record(ema, torch.device("cpu")) | {"weights": "EMA", "loss": "nats per token"}
    with atomic_path(folder / AR_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp))
    write_text_atomic(folder / AR_META, json.dumps({"network": ema.settings, "training": record}, indent=2))
    return record


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str) -> PixelCNN:
    from safetensors.torch import load_file

    meta_path = pathlib.Path(folder) / AR_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no autoregressive energy in {folder!r} (no {AR_META}); train one with "
                                "hasten.discrete.energy.train_autoregressive")  # fmt: skip
    s = json.loads(meta_path.read_text())["network"]
    net = PixelCNN(s["vocab"], tuple(s["grid"]), s["num_classes"], s["channels"], s["blocks"])
    net.load_state_dict(load_file(str(pathlib.Path(folder) / AR_FILE)))
    return net.eval().requires_grad_(False)


def load_autoregressive(folder: str | os.PathLike) -> PixelCNN:
    """A trained :class:`PixelCNN` from its folder (loaded once per process)."""
    return _load_cached(str(pathlib.Path(folder).resolve()))


class AutoregressiveEnergy:
    """``E(x0, x_t) = -log p_AR(x0) + log p_theta(x0 | x_t)``: the corrected step samples ``p_AR`` restricted to the
    sequences that agree with ``x_t``.

    ``model`` is ``model(x0 [B, L], rows [B]) -> logits [B, L, V]`` of the next-token conditionals (position ``l``
    given ``0..l-1``), or a :class:`PixelCNN`, called with ``labels[rows]`` (``labels`` ``[N]`` of the whole batch;
    None: unconditional, the null class of a conditional network). :meth:`for_labels` rebinds the labels, which
    the corrected sampler does with the labels the masked model carries."""

    def __init__(self, model: PixelCNN | Callable[[Tensor, Tensor], Tensor], labels: Tensor | None = None) -> None:
        self.model, self.labels = model, labels

    def for_labels(self, labels: Tensor | None) -> AutoregressiveEnergy:
        bound = copy.copy(self)
        bound.labels = labels
        return bound

    @torch.no_grad()
    def log_prob(self, x0: Tensor, rows: Tensor) -> Tensor:
        if isinstance(self.model, PixelCNN):
            device = self.model.first.weight.device
            y = None if self.labels is None else self.labels[rows.cpu()].to(device)
            return self.model.log_prob(x0.to(device), y).cpu()
        logp = self.model(x0, rows).double().log_softmax(-1)
        return logp.gather(-1, x0[..., None]).squeeze(-1).sum(dim=1)

    def __call__(self, x0: Tensor, x_t: Tensor, rows: Tensor, proposal: Tensor) -> Tensor:
        return -self.log_prob(x0, rows) + proposal.to(torch.float64)


@dataclasses.dataclass
class CorrectedSample(DiscreteSample):
    energy_calls: Tensor | None = None  # [B]: energy evaluations (one per candidate scored) of each sequence


def _resolve_energy(energy: Any) -> Energy:
    if energy is None:
        raise ValueError("the edlm sampler needs an energy: a folder of a trained autoregressive energy "
                         "(train_autoregressive) or an energy callable (hasten.discrete.energy)")  # fmt: skip
    if isinstance(energy, str | os.PathLike):
        return AutoregressiveEnergy(load_autoregressive(energy))
    if not callable(energy):
        raise TypeError(f"energy must be a folder or a callable (x0, x_t, rows, proposal) -> [B], got {energy!r}")
    return energy


@DISCRETE_SAMPLERS.register("edlm")
@dataclasses.dataclass(frozen=True)
class EnergyCorrectedSampler(FirstHittingSampler):
    """The first-hitting sampler with EDLM's importance-sampling correction of the factorised step.

    At an event whose share of still-masked tokens (first-hitting's stand-in for ``t``: the expected share at time
    ``t`` is ``t``) lies in ``window = (is_end, is_start)``, ``k`` candidates ``x0^(i)`` are drawn from the
    factorised ``p_theta(. | x_t)`` (every masked position; unmasked ones carried over), scored by the ``energy``
    (``k`` evaluations per sequence), and one is picked with probability ``∝ exp(-E_i / temperature)``; the
    positions the event unmasks take its values. Outside the window, and always with ``k = 1`` (the first
    candidate is the plain sampler's own draw and no weights are drawn), it is the plain first-hitting sampler,
    draw for draw. The correction matters only when an event unmasks several positions (``tokens_per_call > 1``
    or a ``calls`` budget): at one token per call the factorised step is already exact.

    ``energy``: a folder holding an autoregressive energy (:func:`train_autoregressive`; class-conditional, it is
    given the labels of the masked model it corrects), or a callable ``(x0, x_t, rows, proposal) -> [B]``
    (a configured sampler then records only its type). The returned :class:`CorrectedSample` counts network calls
    and energy evaluations per sequence.

    Reference: Xu et al., EDLM, ICLR 2025, Sec. 4 (importance sampling, the window ``[is_end, is_start]``; defaults
    of the public sampling script: ``k = 2``, window ``(0.4, 1.0)``, temperature 1).
    """

    energy: Any = None
    k: int = 2
    window: tuple[float, float] = (0.4, 1.0)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (candidates per corrected step) must be an integer >= 1, got {self.k!r}")
        window = tuple(self.window) if isinstance(self.window, list | tuple) else None
        if (
            window is None or len(window) != 2 or not all(isinstance(v, int | float) for v in window)
            or not 0 <= window[0] <= window[1] <= 1
        ):  # fmt: skip
            raise ValueError(
                f"window must be (is_end, is_start) with 0 <= is_end <= is_start <= 1, got {self.window!r}"
            )
        object.__setattr__(self, "window", (float(window[0]), float(window[1])))
        if not isinstance(self.temperature, int | float) or not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.energy is not None and not isinstance(self.energy, str | os.PathLike) and not callable(self.energy):
            raise TypeError(
                f"energy must be a folder or a callable (x0, x_t, rows, proposal) -> [B], got {self.energy!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not isinstance(self.energy, str | os.PathLike | None):
            data["energy"] = f"<{type(self.energy).__name__}>"  # an object: its type only (it is not plain data)
        elif isinstance(self.energy, os.PathLike):
            data["energy"] = os.fspath(self.energy)
        return data

    def run(self, model, x: Tensor, mask_id: int, generator: Randomness) -> CorrectedSample:
        energy = _resolve_energy(self.energy) if self.k > 1 else None
        if energy is not None and hasattr(energy, "for_labels"):
            energy = energy.for_labels(getattr(model, "labels", None))  # the labels the masked model was made for
        energy_calls = torch.zeros(x.shape[0], dtype=torch.long)

        def draw(logits: Tensor, x_rows: Tensor, rows: Tensor) -> Tensor:
            values = categorical(logits, generator, self.categorical_dtype, rows)  # candidate 1: the plain draw
            if energy is None:
                return values
            masked = x_rows == mask_id
            share = masked.double().mean(dim=1)
            inside = ((share >= self.window[0]) & (share <= self.window[1])).nonzero().flatten()
            if not len(inside):
                return values
            chosen = self.correct(energy, logits[inside], x_rows[inside], rows[inside], values[inside], mask_id,
                                  generator)  # fmt: skip
            energy_calls[rows[inside].cpu()] += self.k
            values = values.clone()
            values[inside] = chosen
            return values

        out = self.unmask(model, x, mask_id, generator, draw)
        return CorrectedSample(out.tokens, out.calls, energy_calls)

    def correct(
        self, energy: Energy, logits: Tensor, x_t: Tensor, rows: Tensor, first: Tensor, mask_id: int,
        generator: Randomness,
    ) -> Tensor:  # fmt: skip
        """One importance-sampling pick among ``k`` candidates (``first`` and ``k - 1`` fresh factorised draws)."""
        k, b = self.k, x_t.shape[0]
        draws = [first] + [categorical(logits, generator, self.categorical_dtype, rows) for _ in range(k - 1)]
        masked = x_t == mask_id
        candidates = torch.stack([torch.where(masked, d, x_t) for d in draws])  # [k, b, L]
        logp = logits.to(torch.float64).log_softmax(-1)
        picked = logp.expand(k, *logp.shape).gather(-1, candidates[..., None]).squeeze(-1)  # [k, b, L]
        proposal = (picked * masked).sum(dim=-1)  # log p_theta(x0 | x_t): masked positions only (SUBS carry-over)
        energies = energy(candidates.flatten(0, 1), x_t.repeat(k, 1), rows.repeat(k), proposal.flatten())
        energies = torch.as_tensor(energies, dtype=torch.float64).cpu()
        if energies.shape != (k * b,):
            raise ValueError(f"the energy returned shape {tuple(energies.shape)} for {k * b} candidates; expected "
                             f"[{k * b}] (one energy per candidate)")  # fmt: skip
        energies = energies.reshape(k, b).T  # [b, k]
        if torch.isnan(energies).any() or (energies == -math.inf).any():
            raise ValueError("the energy returned NaN or -inf for some candidates; energies must be numbers or +inf "
                             "(an impossible candidate)")  # fmt: skip
        if (energies == math.inf).all(dim=1).any():
            raise ValueError(f"the energy is +inf for all {k} candidates of a sequence: nothing to pick")
        pick = categorical(-energies / self.temperature, generator, "float64", rows)  # w_i ∝ exp(-E_i / T)
        return candidates.transpose(0, 1)[torch.arange(b), pick.cpu()]

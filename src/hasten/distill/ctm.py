"""Consistency Trajectory Models: a student that jumps from any level ``t`` to any lower level ``s`` in one call.

Reference: Kim et al., "Consistency Trajectory Model: Learning Probability Flow ODE Trajectory of Diffusion",
ICLR 2024, Eq. 7 (``G``), Eq. 9-11 (soft consistency matching, DSM term) and Alg. 2 (gamma-sampling);
sony/ctm ``cm/karras_diffusion.py`` (the target built through the stop-gradient target network).

The jump, in hasten's VE form: ``G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s)``, a DDIM step whose
``x0`` estimate ``g`` also knows where it lands; ``G(x, t, t) = x`` exactly, and ``g(x, t, t)`` is the
denoiser ``E[x0 | x_t]`` (the ODE's slope at ``t``). One update, on a training grid ``sigma_0 > ... > sigma_N = 0``:

* rows draw ``t = sigma_i``; the batch draws ``k`` in ``1..max_teacher_steps``; ``u = sigma_min(i + k, N)``;
  rows draw ``s`` uniformly on the grid between ``u`` and 0;
* the teacher solves the ODE from ``x_t`` to ``u`` (``k`` DDIM steps, one call each, with the run's guidance);
* **soft consistency**: ``|| Z(G_theta(x_t, t, s), s) - Z(G_ema(x_u, u, s), s) ||^2`` where ``Z(y, s) =
  G_ema(y, s, 0)`` maps to the data end through the stop-gradient target network (the run's EMA; the paper keeps
  a separate target EMA) -- gradients flow through ``Z`` into the estimate, not into the EMA's weights;
* **DSM**: ``max(1, 1 / t^2) || g_theta(x_t, t, t) - x0 ||^2`` keeps ``g(x, t, t)`` the denoiser, weighted
  by ``dsm_weight`` times, with ``adaptive_dsm`` (default, as the paper's commands), the ratio of the two
  terms' gradient norms at the student's output layer. With guidance
  (``--guidance w``, beyond the paper) the regression target is the guided teacher's estimate instead of
  ``x0``, so both terms describe the same guided ODE.

Distances are squared errors in model space: the paper's LPIPS and its feature distances need a pretrained
image network that hasten's metrics already use (training against it would game the quality numbers).

**No GAN term.** The paper's best numbers add a discriminator stage: a StyleGAN-XL-style projected
discriminator on frozen pretrained feature networks, trained after CTM+DSM converges, at lr 8e-6 with the
generator updated every second step. It needs those feature networks (not available offline, and the metric
networks must not be trained against), it is unstable, and it costs more than the rest on a CPU, so this
method does not implement it.

**The student network** is the teacher's network plus a :class:`TargetLevelEmbedding`: sinusoidal features of
the target's time label through a two-layer MLP whose last layer starts at zero, added to every timestep
embedding of the network (a diffusers ``TimestepEmbedding``) through :mod:`hasten.hooks`. So the student
starts as the teacher's network with ``g = D`` at every target. The denoiser's conditioning input
``target_sigma`` (a VE level) reaches the network as ``target_time`` (:mod:`hasten.models.adapters`); without it
the target is the current level (``g(x, t, t)``, the denoiser), so every ordinary solver samples the student as
a diffusion model. Its folder is a diffusers folder whose weights file also holds the embedding's weights and
whose ``hasten.json`` has a ``target_level`` record; :func:`hasten.load` opens it through
:data:`hasten.models.zoo.FOLDER_FORMATS`. Its default sampler is ``ctm_gamma`` (:mod:`hasten.solvers.gamma`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..hooks import add_hook
from ..models.structure import build_pruned, pruning_record
from ..models.zoo import FOLDER_FORMATS, FolderFormat
from ._base import DistillConfig, DistillMethod, check_schedule, register_method

__all__ = ["CTM", "CTMOptions", "TargetLevelEmbedding", "attach_target_embedding", "jump"]

EMBEDDING_NAME = "target_level_embedding"  # the submodule's name in the network (its weights' key prefix)
HOOK_NAME = "hasten.ctm.target_level"
RECORD = "target_level"  # the hasten.json record of a two-time folder


class TargetLevelEmbedding(nn.Module):
    """Embeds the level a two-time network jumps to and adds it to the network's timestep embeddings.

    ``network_hook`` (on the network) reads the ``target_time`` input (default: the network's own timestep) and
    embeds it for this call; ``embedding_hook`` (on each timestep embedding) adds it to that module's output.

    Args:
        out_dim: Width of the timestep embeddings it is added to.
        channels: Sinusoidal features of the target's time label.
    """

    def __init__(self, out_dim: int, channels: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)  # starts as the teacher: g(x, t, s) = D(x, t) for every s
        nn.init.zeros_(self.mlp[-1].bias)
        self._current: Tensor | None = None  # this call's embedding, set by network_hook

    def forward(self, target_time: Tensor) -> Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        features = get_timestep_embedding(target_time.float(), self.channels, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)  # fmt: skip
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def network_hook(self, forward, *args: Any, **kwargs: Any) -> Any:
        target = kwargs.pop("target_time", None)
        if target is None:
            target = args[1] if len(args) > 1 else kwargs["timestep"]
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        target = torch.as_tensor(target, device=sample.device).reshape(-1).expand(sample.shape[0])
        self._current = self(target)
        try:
            return forward(*args, **kwargs)
        finally:
            self._current = None

    def embedding_hook(self, forward, *args: Any, **kwargs: Any) -> Tensor:
        out = forward(*args, **kwargs)
        return out if self._current is None else out + self._current.to(out.dtype)


def timestep_embeddings(network: nn.Module) -> tuple[list[nn.Module], int]:
    """The network's diffusers ``TimestepEmbedding`` modules and their common width (refused if none or mixed)."""
    from diffusers.models.embeddings import TimestepEmbedding

    stamps = [m for m in network.modules() if isinstance(m, TimestepEmbedding)]
    if not stamps:
        raise ValueError(f"{type(network).__name__} has no diffusers TimestepEmbedding to add the target level to")
    widths = {m.linear_2.out_features for m in stamps}
    if len(widths) != 1:
        raise ValueError(f"{type(network).__name__}'s timestep embeddings differ in width ({sorted(widths)})")
    return stamps, widths.pop()


def attach_target_embedding(network: nn.Module, channels: int = 64) -> TargetLevelEmbedding:
    """Make ``network`` a two-time network: add a :class:`TargetLevelEmbedding` (as the submodule
    ``target_level_embedding``, so its weights save with the network's) and its hooks."""
    stamps, width = timestep_embeddings(network)
    param = next(network.parameters())
    embedding = TargetLevelEmbedding(width, channels).to(device=param.device, dtype=param.dtype)
    network.add_module(EMBEDDING_NAME, embedding)
    add_hook(network, HOOK_NAME, embedding.network_hook)
    for module in stamps:
        add_hook(module, HOOK_NAME, embedding.embedding_hook)
    return embedding


def _load_two_time_network(network_class: Any, folder: pathlib.Path) -> nn.Module:
    from safetensors.torch import load_file

    record = json.loads((folder / "hasten.json").read_text())[RECORD]
    network = build_pruned(network_class, folder, pruning_record(folder))
    attach_target_embedding(network, int(record["channels"]))
    network.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))  # strict: all of it
    return network


FOLDER_FORMATS.add(RECORD, FolderFormat("diffusion_pytorch_model.safetensors", _load_two_time_network))


def output_layer(network: nn.Module) -> nn.Parameter:
    """The weight of the network's last layer (its last parameter of two or more dimensions, the target-level
    embedding aside): where the adaptive DSM weight compares gradients."""
    weights = [p for name, p in network.named_parameters() if p.ndim >= 2 and not name.startswith(EMBEDDING_NAME)]
    if not weights:
        raise ValueError(f"{type(network).__name__} has no weight matrix to balance the loss terms at")
    return weights[-1]


def jump(x: Tensor, g: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """``G = (s / t) x + (1 - s / t) g`` per row; ``x`` itself where ``t = 0`` (then ``s = 0`` too)."""
    view = (-1, *([1] * (x.ndim - 1)))
    ratio = torch.where(t > 0, s / t.clamp_min(1e-30), torch.ones_like(t)).to(x.dtype).view(view)
    return torch.lerp(g, x, ratio)


@dataclasses.dataclass(frozen=True)
class CTMOptions(Config):
    """Options of ``--method ctm``.

    Args:
        gamma: The student sampler's gamma (``ctm_gamma``): 0 deterministic jumps, 1 multistep consistency.
        schedule: The grid family of training and sampling (``auto``: the model's default grid).
        grid_steps: Steps of the training grid; 0 = the smallest multiple of ``nfe`` that is >= 18 (the paper's
            CIFAR-10 grid). A multiple of ``nfe``, so the sampler's levels lie on it where the grid family nests.
        max_teacher_steps: Most teacher ODE steps from ``t`` to ``u`` per update (the paper's ``num_heun_step``;
            each costs a teacher call on the batch).
        dsm_weight: Weight of the DSM term (0 turns it off).
        adaptive_dsm: Scale the DSM term so its gradient at the network's output layer is as large as the
            consistency term's (the paper's setting). At initialisation on mnist-dit the DSM term's value is ~14x
            the consistency term's (0.131 and 0.009 on a batch of 64).
        embedding_channels: Sinusoidal features of the target level.
    """

    gamma: float = 0.0
    schedule: str = "auto"
    grid_steps: int = 0
    max_teacher_steps: int = 4
    dsm_weight: float = 1.0
    adaptive_dsm: bool = True
    embedding_channels: int = 64


@register_method("ctm")
class CTM(DistillMethod):
    """Consistency Trajectory Model distillation: see the module docstring."""

    Options = CTMOptions

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: CTMOptions) -> None:
        if not 0.0 <= options.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {options.gamma}")
        check_schedule(options.schedule)
        if options.grid_steps < 0 or options.grid_steps % config.nfe:
            raise ValueError(f"grid_steps must be 0 or a multiple of nfe ({config.nfe}), got {options.grid_steps}")
        if options.max_teacher_steps < 1:
            raise ValueError(f"max_teacher_steps must be >= 1, got {options.max_teacher_steps}")
        if not options.dsm_weight >= 0 or not math.isfinite(options.dsm_weight):
            raise ValueError(f"dsm_weight must be a finite number >= 0, got {options.dsm_weight}")
        if options.embedding_channels < 2 or options.embedding_channels % 2:
            raise ValueError(f"embedding_channels must be an even number >= 2, got {options.embedding_channels}")
        if teacher.info.quantization or teacher.info.target_level:
            raise ValueError("ctm trains from a float one-time teacher, not a quantised folder or another CTM student")
        timestep_embeddings(teacher.network)  # where the target level goes; refused by name if there is none

    @property
    def student_info(self):
        info = super().student_info
        return dataclasses.replace(info, target_level={"channels": self.options.embedding_channels})

    @property
    def grid_steps(self) -> int:
        return self.options.grid_steps or self.config.nfe * math.ceil(18 / self.config.nfe)

    def sampler(self) -> dict[str, Any]:
        return {"solver": "ctm_gamma", "options": {"gamma": self.options.gamma}, "schedule": self.options.schedule,
                "steps": self.config.nfe, "guidance": 1.0}  # fmt: skip

    def two_time_network(self) -> nn.Module:
        """A copy of the teacher's network with a fresh target-level embedding. It trains in eval mode: the
        teacher's networks have no dropout, and diffusers' DiT would drop labels per block with the global RNG."""
        network = self.copy_network(self.teacher.network, trainable=True).eval()
        attach_target_embedding(network, self.options.embedding_channels)
        return network

    def build(self):
        self.student = self.two_time_network()
        self.ema = self.two_time_network().requires_grad_(False)
        self.ema.load_state_dict(self.student.state_dict())
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=0.0)
        self.grid = self.sigmas(self.grid_steps, self.options.schedule).to(self.device, torch.float64)
        return {"student": self.student, "ema": self.ema}, {"opt": self.opt}

    def g(self, network: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """``g(x, t, s)`` of a two-time network; rows with ``t = 0`` are called at the grid's lowest level
        (their result is unused: ``jump`` returns ``x`` there)."""
        t_call = torch.where(t > 0, t, self.grid[-2])
        s_call = torch.minimum(s, t_call)
        return self.student_denoiser(network)(x, t_call, target_sigma=s_call, **self.cond(labels))

    def G(self, network: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        return jump(x, self.g(network, x, t, s, labels), t, s)

    def teacher_ode(self, x: Tensor, i: Tensor, j: Tensor, labels: Tensor | None) -> Tensor:
        """The teacher's DDIM steps along the training grid from index ``i`` to ``j`` (per row)."""
        steps = int((j - i).max())
        for step in range(steps):
            a = (i + step).clamp_max(j)
            b = (a + 1).clamp_max(j)
            sigma_a, sigma_b = self.grid[a], self.grid[b]
            denoised = self.teacher_denoise(x, sigma_a.clamp_min(float(self.grid[-2])), labels)
            x = torch.where((a < j).view(-1, *([1] * (x.ndim - 1))), jump(x, denoised, sigma_a, sigma_b), x)
        return x

    def loss_terms(self, x0: Tensor, noise: Tensor, i: Tensor, j: Tensor, m: Tensor, labels: Tensor | None):
        """The soft-consistency and the DSM term (batch means, DSM unweighted by ``dsm_weight``; None when
        ``dsm_weight`` is 0) for rows at grid indices ``t = i``, ``u = j``, ``s = m`` (``i < j <= m``)."""
        t, u, s = self.grid[i], self.grid[j], self.grid[m]
        view = (-1, *([1] * (x0.ndim - 1)))
        x_t = x0 + t.to(x0.dtype).view(view) * noise
        zero = torch.zeros_like(s)
        with torch.no_grad():
            x_u = self.teacher_ode(x_t, i, j, labels)
            target = self.G(self.ema, self.G(self.ema, x_u, u, s, labels), s, zero, labels)
        estimate = self.G(self.ema, self.G(self.student, x_t, t, s, labels), s, zero, labels)
        consistency = (estimate - target).pow(2).flatten(1).mean(1).mean()
        if not self.options.dsm_weight:
            return consistency, None
        # the data, or under guidance the guided teacher's estimate (the data cannot say what guidance does)
        clean = x0 if self.config.guidance == 1.0 else self.teacher_denoise(x_t, t, labels)
        denoised = self.g(self.student, x_t, t, t, labels)
        weight = t.to(x0.dtype).pow(-2).clamp_min(1.0)
        return consistency, (weight * (denoised - clean).pow(2).flatten(1).mean(1)).mean()

    def loss(self, x0: Tensor, noise: Tensor, i: Tensor, j: Tensor, m: Tensor, labels: Tensor | None) -> Tensor:
        """``consistency + dsm_weight * lambda * dsm``, ``lambda`` the adaptive balance (1 when it is off)."""
        consistency, dsm = self.loss_terms(x0, noise, i, j, m, labels)
        if dsm is None:
            return consistency
        balance = self.adaptive_balance(consistency, dsm) if self.options.adaptive_dsm else 1.0
        return consistency + self.options.dsm_weight * balance * dsm

    def adaptive_balance(self, consistency: Tensor, dsm: Tensor) -> float:
        """``||grad consistency|| / (||grad dsm|| + 1e-4)`` at the student's output layer, clamped to [0, 1e4]: the
        DSM term's gradient scaled to the consistency term's (sony/ctm ``calculate_adaptive_weight``)."""
        layer = output_layer(self.student)
        grads = [
            torch.autograd.grad(term, layer, retain_graph=True, allow_unused=True)[0] for term in (consistency, dsm)
        ]
        norms = [0.0 if g is None else float(g.norm()) for g in grads]
        return min(max(norms[0] / (norms[1] + 1e-4), 0.0), 1e4)

    def draw(self, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """Grid indices ``i < j <= m``: ``t`` per row, ``u`` ``k`` teacher steps below (``k`` per batch), ``s``
        uniform between ``u`` and the end."""
        n = self.grid_steps
        i = torch.randint(0, n, (b,), generator=self.gen, device=self.device)
        k = int(torch.randint(1, self.options.max_teacher_steps + 1, (1,), generator=self.gen, device=self.device))
        j = (i + k).clamp_max(n)
        m = j + (torch.rand(b, generator=self.gen, device=self.device) * (n - j + 1)).long().clamp_max(n - j)
        return i, j, m

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        i, j, m = self.draw(x0.shape[0])
        noise = self.randn_like(x0)
        return self.update(self.loss(x0, noise, i, j, m, labels), index)

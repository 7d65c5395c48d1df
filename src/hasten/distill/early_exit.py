"""The joint early-exit fine-tune: a DiT trained together with its exit heads (``--method early_exit``).

Exit heads trained on a frozen network (:func:`hasten.accel.train_exit_heads`) stay ~10% off even where they
replace one block: a block's hidden tokens were never meant to be read out. DeeDiff trains the backbone with
the heads, so the intermediate blocks become exit-ready. Here the student is a copy of the teacher's network
plus exit heads and uncertainty estimators (:class:`hasten.accel.early_exit.ExitHeads`), trained through the
distillation driver (the one training loop: exact resume, EMA, a model folder with a card) on MNIST training
images noised at a uniformly drawn time of the teacher's schedule. With ``y`` the frozen teacher's network
output there, the loss is

* ``output_weight * mean |f_student - y|^2``: the full-depth student stays the teacher's function;
* ``data_weight * mean |f_student - y_data|^2``: the ordinary diffusion loss, ``y_data`` the network's training
  target of the very image and noise (:func:`hasten.train.objective_target`), as the pruning fine-tune's
  ``data_weight``; it lets the backbone move (to make room for the exits) towards the data rather than away
  from the teacher;
* ``exit_weight *`` :func:`hasten.accel.early_exit.exit_loss` of the student's heads on the student's hidden
  tokens (DeeDiff's estimator regression and uncertainty-aware layer loss, plus the plain layer loss), its
  gradient flowing into the backbone. The heads learn towards the full-depth output's optimum, the blend
  ``(output_weight * y + data_weight * y_data) / (output_weight + data_weight)`` (the teacher's ``y`` when
  ``data_weight`` is 0); the estimators always learn their error to the *teacher's* ``y``, since at sampling
  time they decide whether an exit is close to the network's output. ``exit_weighting="depth_squared"`` weighs exit
  ``i`` by ``(i + 1)^2`` (the late exits, which skip less, are the ones a quality budget can use);
  ``noisy_weight`` weighs a sample at time fraction ``s`` (1 = pure noise) by ``1 + noisy_weight * s``, since
  exits pay in the noisy steps, whose errors the later steps correct.

Both errors are in the network's own output space (as the frozen heads'), so any objective works. The folder
written is a plain model folder of the student network (EMA weights) with ``exit-heads.safetensors`` beside it
(the EMA heads), fingerprinted to exactly those weights: ``EarlyExitConfig(heads=f"{folder}/exit-heads.safetensors")``
on ``hasten.load(folder)`` installs them, and they are refused on any other weights.

Reference: Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion Model
Generation", 2023 (AdaDiff, ECCV 2024), Sec. 3.4 (joint training of backbone and exits, Eq. 8); the per-exit
loss of the independent reproduction razvanmatisan/early-exiting-diffusion.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from ..accel.early_exit import (
    DiTLayout,
    ExitHeads,
    exit_loss,
    forward_with_blocks,
    load_exit_heads,
    network_input,
    network_target,
    save_exit_heads,
)
from ..config import Config, check_choice
from ._base import DistillConfig, DistillMethod, check_schedule, register_method
from .guidance import ONE_CALL_SOLVERS

__all__ = ["EXIT_HEADS_FILE", "EarlyExitOptions", "EarlyExitStudent", "JointExitMethod", "joint_exit_loss"]

EXIT_HEADS_FILE = "exit-heads.safetensors"  # in the student's folder, beside its network
EXIT_WEIGHTINGS = ("depth", "depth_squared", "uniform")


@dataclasses.dataclass(frozen=True)
class EarlyExitOptions(Config):
    """Options of ``--method early_exit`` (module docstring).

    Args:
        output_weight: Weight of the full-depth output's error to the teacher (20: pilots on mnist-dit at weight
            1 and 4 let the full-depth network drift to +16% and +11% FD in 200 updates; see the guide).
        data_weight: Weight of the full-depth output's error to the data's own target (0: distillation only).
        exit_weight: Weight of the exits' loss.
        exit_weighting: ``depth`` (exit ``i`` weighted ``i + 1``), ``depth_squared`` (``(i + 1)^2``: the last
            exits, the only ones a tight budget uses, get most of it) or ``uniform``.
        noisy_weight: A sample at time fraction ``s`` (1 = noise) weighs ``1 + noisy_weight * s`` in the exits'
            loss (0: all times alike).
        heads_lr_scale: The heads' and estimators' learning rate as a multiple of the run's (they start far
            from their optimum; the backbone starts at it and must move little: use a small ``lr``, e.g. 3e-5,
            so the heads run near 1e-3).
        init_heads: A heads file of the teacher's network (``hasten accelerate train-exits``) to start from
            (None: every head a copy of the final layer, estimators at 0.5).
        solver, schedule: The student's default sampler, at ``nfe`` steps.
    """

    output_weight: float = 20.0
    data_weight: float = 0.0
    exit_weight: float = 1.0
    exit_weighting: str = "depth_squared"
    noisy_weight: float = 5.0
    heads_lr_scale: float = 30.0
    init_heads: str | None = None
    solver: str = "dpmpp_2m"
    schedule: str = "auto"

    def __post_init__(self) -> None:
        for name in ("output_weight", "data_weight", "exit_weight", "noisy_weight"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.exit_weight == 0:
            raise ValueError("exit_weight 0 trains no exits: use --method prune or plain training instead")
        if self.output_weight == 0:
            raise ValueError(
                "output_weight 0 lets the full-depth network drift from the teacher (its last blocks would only serve "
                "the exits); give it a weight > 0"
            )
        value = self.heads_lr_scale
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"heads_lr_scale must be a finite number > 0, got {value!r}")
        check_choice("exit_weighting", self.exit_weighting, EXIT_WEIGHTINGS)
        if self.init_heads is not None and (not isinstance(self.init_heads, str) or not self.init_heads):
            raise ValueError(f"init_heads must be a heads file's path or None, got {self.init_heads!r}")
        check_choice("solver (one network call per step)", self.solver, ONE_CALL_SOLVERS)
        check_schedule(self.schedule)

    def heads_target(self, teacher_output: Tensor, data_target: Tensor | None) -> Tensor:
        """What the exits learn towards: the full-depth output loss's optimum (module docstring)."""
        if not self.data_weight:
            return teacher_output
        total = self.output_weight + self.data_weight
        return (self.output_weight * teacher_output + self.data_weight * data_target) / total

    def layer_weights(self, num_exits: int) -> Tensor:
        """The weight of each exit in the exits' loss (normalised by :func:`exit_loss`)."""
        depth = torch.arange(1, num_exits + 1, dtype=torch.float32)
        if self.exit_weighting == "depth":
            return depth
        if self.exit_weighting == "depth_squared":
            return depth**2
        return torch.ones(num_exits)


class EarlyExitStudent(nn.Module):
    """The trained pair: ``network`` (a DiT) and its ``heads``; one module so the EMA and checkpoints hold both."""

    def __init__(self, network: nn.Module, heads: ExitHeads) -> None:
        super().__init__()
        self.network, self.heads = network, heads


def joint_exit_loss(
    student: EarlyExitStudent,
    teacher_output: Tensor,
    x: Tensor,
    timestep: Tensor,
    class_labels: Tensor | None,
    noise_fraction: Tensor,
    options: EarlyExitOptions,
    data_target: Tensor | None = None,
) -> dict[str, Tensor]:
    """The joint loss (module docstring) of one batch: ``total``, ``output``, ``data`` and the exits' parts
    (``exits`` and :func:`exit_loss`'s ``uncertainty`` / ``ual`` / ``layer``). ``x`` and ``timestep``: the
    network's own input; ``noise_fraction`` [B]: each sample's time as a fraction of the schedule's range (1 =
    pure noise); ``data_target``: the data's own target at ``x`` (needed when ``options.data_weight`` > 0)."""
    if options.data_weight and data_target is None:
        raise ValueError("data_weight > 0 needs the data's target (data_target)")
    output, hidden, conditioning = forward_with_blocks(student.network, x, timestep, class_labels)
    target = teacher_output.detach().float()
    data = None if data_target is None else data_target.detach().float()
    parts = exit_loss(
        student.heads, hidden, conditioning, options.heads_target(target, data),
        layer_weights=options.layer_weights(student.heads.num_exits).to(x.device),
        sample_weights=1.0 + options.noisy_weight * noise_fraction.float(),
        estimator_target=target,
    )  # fmt: skip
    out = {"output": (output.float() - target).pow(2).mean(), "exits": parts.pop("total"), **parts}
    out["data"] = (output.float() - data).pow(2).mean() if data is not None else torch.zeros_like(out["output"])
    out["total"] = (
        options.output_weight * out["output"] + options.data_weight * out["data"] + options.exit_weight * out["exits"]
    )
    return out


@register_method("early_exit")
class JointExitMethod(DistillMethod):
    """A DiT fine-tuned together with its exit heads, against the frozen original (module docstring)."""

    Options = EarlyExitOptions

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: EarlyExitOptions) -> None:
        try:
            DiTLayout.of(teacher.network)
        except TypeError as err:
            raise ValueError(f"--method early_exit: {err}") from None
        if teacher.info.target_level:
            raise ValueError(f"{teacher.info.name} is a two-time CTM student; exits need a one-time DiT")
        if config.guidance != 1.0:
            raise ValueError(
                f"--method early_exit keeps the teacher's network function and takes no guidance (got "
                f"{config.guidance:g}); sample the student with guidance as you would the teacher"
            )
        if options.init_heads is not None:
            load_exit_heads(options.init_heads, teacher.network)  # heads of other weights are refused, by name

    def sampler(self) -> dict[str, Any]:
        guidance = float(self.teacher.default_sampler.get("guidance", 1.0))
        return {"solver": self.options.solver, "options": {}, "schedule": self.options.schedule,
                "steps": self.config.nfe, "guidance": guidance}  # fmt: skip

    def build(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        network = self.copy_network(self.teacher.network, trainable=True)
        if self.options.init_heads is not None:
            heads = load_exit_heads(self.options.init_heads, self.teacher.network)
        else:
            heads = ExitHeads.from_network(self.teacher.network)
        heads = heads.to(self.device).float().train().requires_grad_(True)
        self.student = EarlyExitStudent(network, heads)
        self.ema = self.copy_network(self.student, trainable=False)
        self.opt = torch.optim.AdamW(
            [{"params": list(network.parameters())},
             {"params": list(heads.parameters()), "lr_scale": self.options.heads_lr_scale}],
            lr=self.config.lr, weight_decay=0.0,
        )  # fmt: skip
        return {"student": self.student, "ema": self.ema}, {"opt": self.opt}

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        fraction = torch.rand(x0.shape[0], generator=self.gen, device=self.device, dtype=torch.float64)
        noise = self.randn_like(x0)
        x, timestep = network_input(self.teacher, x0, fraction, noise, torch.float32)
        data_target = network_target(self.teacher, x0, fraction, noise) if self.options.data_weight else None
        with torch.no_grad():
            target = self.teacher.network(x, timestep, **self.cond(labels)).sample
        parts = joint_exit_loss(self.student, target, x, timestep, labels, fraction, self.options, data_target)
        return self.update(parts["total"], index)

    def export(self) -> nn.Module:
        return self.ema.network

    def write_extras(self, folder: pathlib.Path) -> list[str]:
        heads = self.ema.heads
        record = {"model": folder.name, "method": "early_exit", "teacher": self.teacher.info.name,
                  "teacher_fingerprint": self.teacher.fingerprint, "weights": "EMA"}  # fmt: skip
        save_exit_heads(heads, folder / EXIT_HEADS_FILE, self.export(), record)
        return [
            f"**Exit heads:** `{EXIT_HEADS_FILE}` ({heads.num_exits} exits, trained with the network; refused on other "
            f'weights): `EarlyExitConfig(heads="{folder.name}/{EXIT_HEADS_FILE}", threshold=...)`, or '
            f"`hasten accelerate calibrate --model {folder.name} --technique early-exit --exit-heads "
            f"{folder.name}/{EXIT_HEADS_FILE}`."
        ]

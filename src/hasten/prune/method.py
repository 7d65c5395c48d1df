"""The fine-tune after pruning: a distillation method (``prune``) whose student is the pruned teacher.

The student starts as the teacher's network pruned once (:mod:`hasten.prune.surgery`: channels through
Torch-Pruning, or whole transformer blocks) and is then trained through the distillation driver
(:func:`hasten.distill.distill`: the one training loop, exact resume, a model folder with a card) to match the
unpruned network, as A-SDM's model assembly and "Diffusion Probabilistic Model Made Slim" recover a slimmed
model by distillation rather than by training on data alone:

* ``output_weight``: the student's x0 estimate against the teacher's, on noised training images at levels with
  the schedule's time uniform (the teacher's own function, everywhere the sampler goes);
* ``data_weight``: the ordinary diffusion loss to the clean image (Diff-Pruning's fine-tune);
* ``feature_weight``: every kept transformer block's output against the teacher's same block (widths of the
  residual stream are unchanged by hasten's transformer pruning); for a UNet, every down, mid and up block's
  output against the teacher's same channels (the student's channels are a subset of the teacher's: the pruning
  records which, :func:`hasten.prune.surgery.unet_features`), so no projection has to be learned;
* ``spectral_alpha`` > 0: the output error weighted per spatial frequency by ``|F(teacher)|^-alpha``
  (normalised to mean 1), which "Made Slim" uses so the slim model keeps the high frequencies it loses first;
  0 is the plain squared error (Parseval).

All errors are x0 errors weighted per noise level (``weighting``, :func:`hasten.distill.guidance.level_weight`);
``auto`` is Min-SNR-gamma for a noise-predicting teacher and the truncated SNR otherwise (see
:data:`FINETUNE_WEIGHTING`). The pruned
structure and its starting weights are kept under ``<out>/method/`` before training, so a run killed before its
first checkpoint resumes without pruning again, and the folder's ``hasten.json`` carries the ``pruning`` record
(structure, importance, measured speed-up, MACs and parameters before and after).

Reference: Fang, Ma & Wang, Diff-Pruning, NeurIPS 2023 (prune, then fine-tune); Zhu et al., A-SDM, 2024 (model
assembly with distillation from the original); Yang et al., "Diffusion Probabilistic Model Made Slim", CVPR 2023
(spectrum-aware distillation; its wavelet gating is not implemented).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import torch
from torch import Tensor, nn

from .._io import write_text_atomic
from ..config import Config, check_choice
from ..distill._base import METHOD_WORK, DistillConfig, DistillMethod, check_schedule, register_method
from ..distill.guidance import ONE_CALL_SOLVERS, WEIGHTINGS, level_weight
from ..hooks import add_hook, remove_hooks
from ..models.structure import apply_structure, structure_of
from .importance import channel_importance, taylor_gradients
from .surgery import (
    STRUCTURES,
    example_inputs,
    flops_and_params,
    network_kind,
    prune_channels,
    remove_blocks,
    unet_features,
)

__all__ = ["IMPORTANCES", "PruneMethod", "PruneOptions", "spectral_error"]

IMPORTANCES = ("taylor", "magnitude", "output_change")
LR_DECAYS = ("none", "linear")
FEATURE_HOOK = "hasten.prune/features"
FEATURE_CHANNELS = "feature_channels.json"  # a pruned UNet's kept teacher channels per block output, beside the weights
# ``weighting="auto"``, by the teacher's objective. The truncated SNR (at least 1) suits x0/v/flow networks, whose
# x0 estimate is precise at every level. A noise-predicting network's x0 error grows with sigma (x0 = x - sigma eps):
# under the truncated SNR most of a time-uniform batch's loss sat at sigma > 10 and the pruned mnist-unet kept x0
# errors of 0.10-0.14 at sigma 1-10 (FD +113%); Min-SNR-gamma cut them 2-4x (FD +24%). The plain noise loss (SNR)
# let the top level's x0 error grow to ~10 (FD 9,350, with a broken GroupNorm pruning at the time).
FINETUNE_WEIGHTING = {"eps": "min_snr"}


@dataclasses.dataclass(frozen=True)
class PruneOptions(Config):
    """Options of ``--method prune`` (``hasten prune`` fills ``ratio`` / ``blocks`` from its target speed-up).

    Args:
        structure: ``channels`` (Torch-Pruning, see :mod:`hasten.prune.surgery`) or ``blocks`` (transformers).
        ratio: Share of every prunable channel group removed (``channels``), in (0, 1).
        blocks: Indices of the transformer blocks removed (``blocks``).
        importance: ``taylor`` (Diff-Pruning) or ``magnitude`` for channels; ``output_change`` (LD-Pruner) for
            blocks, where it only records how ``blocks`` was chosen.
        round_to: Keep every pruned width a multiple of this (None: any width). On a CPU, widths that are
            multiples of 16 run fastest (oneDNN's blocked layouts): the bundled UNet at 24 channels is slower
            per MAC than at 16 or 32.
        levels: UNets only: the resolution levels (0 = the full-resolution one, as in ``block_out_channels``)
            whose channels are pruned; the others keep their widths. Empty: every level.
        mlp_ratio: Transformers only: the share of each MLP's hidden width removed (None: ``ratio``, which then
            applies to the attention head dimension alone when this is set).
        taylor_levels, taylor_threshold, importance_batch: The Taylor importance's grid, early stop and batch.
        output_weight, data_weight, feature_weight, spectral_alpha: The fine-tune's loss (module docstring);
            by default the teacher's output, its block features and a quarter share of the data loss.
        weighting: How the x0 errors are weighted across noise levels (:func:`hasten.distill.guidance.level_weight`):
            ``auto`` (``min_snr`` for a noise-predicting teacher, else ``snr_trunc``), ``snr_trunc``, ``min_snr``
            (less weight on the noisiest levels, where a noise predictor's x0 error is large and matters little),
            ``snr``, ``snr_plus_one``, ``uniform``.
        lr_decay: ``linear``: the learning rate falls linearly to a tenth over the fine-tune's time budget
            (``minutes``, the training loop's clock across resumes); ``none``: constant after the warm-up.
        solver, schedule: The pruned model's default sampler, at ``nfe`` steps (the teacher's own, by default).
    """

    structure: str = "channels"
    ratio: float = 0.0
    blocks: tuple[int, ...] = ()
    importance: str = "taylor"
    round_to: int | None = None
    levels: tuple[int, ...] = ()
    mlp_ratio: float | None = None
    taylor_levels: int = 32
    taylor_threshold: float = 0.05
    importance_batch: int = 64
    output_weight: float = 1.0
    # the bundled pruned models' recipe (session 17): distillation alone left the DiT at +5.2% FD, these +1.2%
    data_weight: float = 0.25
    feature_weight: float = 1.0
    spectral_alpha: float = 0.0
    weighting: str = "auto"
    lr_decay: str = "none"
    solver: str = "dpmpp_2m"
    schedule: str = "auto"

    def __post_init__(self) -> None:
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("lr_decay", self.lr_decay, LR_DECAYS)
        check_choice("importance", self.importance, IMPORTANCES)
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        levels = self.levels
        if isinstance(levels, str):  # "1,2" from the CLI (one level arrives as a number: --option levels=1)
            levels = levels.split(",")
        elif isinstance(levels, int) and not isinstance(levels, bool):
            levels = (levels,)
        try:
            object.__setattr__(self, "levels", tuple(sorted({int(v) for v in levels})))
        except (TypeError, ValueError):
            raise ValueError(f"levels must be UNet level numbers such as 1,2; got {self.levels!r}") from None
        if self.levels and (self.structure != "channels" or min(self.levels) < 0):
            raise ValueError(f"levels {list(self.levels)} must be UNet resolution levels >= 0 (structure 'channels')")
        if self.structure == "channels":
            if not 0.0 < self.ratio < 1.0:
                raise ValueError(f"ratio must be in (0, 1) for structure 'channels', got {self.ratio}")
            if self.blocks:
                raise ValueError("blocks is for structure 'blocks'; structure 'channels' takes ratio")
            if self.importance == "output_change":
                raise ValueError("importance 'output_change' ranks whole blocks; channels take 'taylor' or 'magnitude'")
        else:
            if not self.blocks:
                raise ValueError("structure 'blocks' needs the indices of the blocks to remove (blocks=[...])")
            if self.ratio:
                raise ValueError("ratio is for structure 'channels'; structure 'blocks' takes blocks")
            if self.importance != "output_change":
                raise ValueError(f"blocks are ranked by importance 'output_change', got {self.importance!r}")
        if self.mlp_ratio is not None and (self.structure != "channels" or not 0.0 <= self.mlp_ratio < 1.0):
            raise ValueError(f"mlp_ratio must be in [0, 1) with structure 'channels', got {self.mlp_ratio}")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to must be None or >= 1, got {self.round_to}")
        if self.taylor_levels < 1 or self.importance_batch < 1:
            raise ValueError("taylor_levels and importance_batch must be >= 1")
        if not 0.0 <= self.taylor_threshold <= 1.0:
            raise ValueError(f"taylor_threshold must be in [0, 1], got {self.taylor_threshold}")
        for name in ("output_weight", "data_weight", "feature_weight", "spectral_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.output_weight == 0 and self.data_weight == 0:
            raise ValueError("output_weight and data_weight are both 0: the fine-tune would learn nothing")
        check_choice("solver (one network call per step)", self.solver, ONE_CALL_SOLVERS)
        check_schedule(self.schedule)


def spectral_error(pred: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Per-row mean squared error, each spatial frequency weighted by ``|F(target)|^-alpha`` normalised to mean 1
    per row and channel (orthonormal 2-D FFT, so ``alpha = 0`` is the plain squared error by Parseval).

    Reference: Yang et al., "Diffusion Probabilistic Model Made Slim", CVPR 2023 (spectrum-aware distillation)."""
    diff = torch.fft.fft2(pred - target, norm="ortho").abs().pow(2)
    if alpha == 0:
        return diff.flatten(1).mean(1)
    magnitude = torch.fft.fft2(target, norm="ortho").abs().detach().clamp_min(1e-6)
    weight = magnitude.pow(-alpha)
    weight = weight / weight.mean(dim=(-2, -1), keepdim=True)
    return (weight * diff).flatten(1).mean(1)


@register_method("prune")
class PruneMethod(DistillMethod):
    """A pruned teacher, fine-tuned by distillation from the unpruned one (module docstring)."""

    Options = PruneOptions
    # a pruned UNet's block outputs: the teacher channels each keeps (None: widths unchanged, a transformer)
    feature_channels: list[list[int]] | None = None

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: PruneOptions) -> None:
        if teacher.info.target_level:
            raise ValueError(f"{teacher.info.name} is a two-time CTM student; prune the model it was distilled from")
        kind = network_kind(teacher.network)
        if options.structure == "blocks":
            if kind != "transformer":
                raise ValueError(
                    f"structure 'blocks' removes transformer blocks; {teacher.info.name} is a UNet: use 'channels'"
                )
            count = len(teacher.network.transformer_blocks)
            bad = [b for b in options.blocks if not 0 <= b < count]
            if bad or len(set(options.blocks)) >= count:
                raise ValueError(f"blocks {list(options.blocks)} must be distinct indices below {count}, leaving one")
        if options.levels and kind != "unet":
            raise ValueError(f"levels are a UNet's resolution levels; {teacher.info.name} is a transformer")
        depth = len(teacher.network.down_blocks) if kind == "unet" else 0
        if options.levels and max(options.levels) >= depth:
            raise ValueError(f"levels {list(options.levels)}: {teacher.info.name} has levels 0..{depth - 1}")
        if options.mlp_ratio is not None and kind != "transformer":
            raise ValueError(f"mlp_ratio is for a transformer's MLPs; {teacher.info.name} is a UNet (see levels)")

    @property
    def student_info(self):
        # the pruned widths travel in hasten.json: every folder format's loader rebuilds the network from them
        return dataclasses.replace(super().student_info, pruning=getattr(self, "record", {}))

    def sampler(self) -> dict[str, Any]:
        own = self.teacher.default_sampler
        guidance = float(own.get("guidance", 1.0))
        return {"solver": self.options.solver, "options": {}, "schedule": self.options.schedule,
                "steps": self.config.nfe, "guidance": guidance}  # fmt: skip

    # -- the pruned network ----------------------------------------------------------------------------------
    def importance_batch(self) -> tuple[Tensor, Tensor | None]:
        """The fixed batch the Taylor importance is measured on (its own generator: the same on every resume)."""
        from ..data import load_dataset, to_model_space

        if not self.teacher.info.data:
            raise ValueError(f"the Taylor importance needs {self.teacher.info.name}'s training data; it names none")
        data = load_dataset(self.teacher.info.data)
        gen = torch.Generator().manual_seed(self.config.seed + 7919)
        idx = torch.randint(0, data.images.shape[0], (self.options.importance_batch,), generator=gen)
        x0 = to_model_space(data.images[idx]).to(self.device)
        labels = None if data.labels is None else data.labels[idx].to(self.device)
        return x0, labels

    def prune(self, network: nn.Module) -> dict[str, Any]:
        """Prune ``network`` (a copy of the teacher's) in place as the options say; returns what was measured."""
        if self.options.structure == "blocks":
            remove_blocks(network, self.options.blocks)
            return {}
        record = self.score_channels(network)
        self.prune_scored(network)
        network.zero_grad(set_to_none=True)
        return record

    def score_channels(self, network: nn.Module) -> dict[str, Any]:
        """Accumulate the Taylor importance's gradients in ``network`` (nothing to do for ``magnitude``)."""
        options = self.options
        if options.importance != "taylor":
            return {}
        x0, labels = self.importance_batch()
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + 104729)
        taylor = taylor_gradients(
            network, self.teacher, x0, labels, levels=options.taylor_levels, threshold=options.taylor_threshold,
            generator=gen,
        )  # fmt: skip
        return {"taylor": taylor}

    def prune_scored(self, network: nn.Module) -> None:
        """Prune the channels of ``network`` (its gradients accumulated by :meth:`score_channels`) at the ratio;
        a UNet's block outputs keep a record of which teacher channels they hold (:attr:`feature_channels`)."""
        options = self.options
        inputs = example_inputs(network, self.teacher.info.image_shape, 2, self.example_cond(2))
        # Torch-Pruning resizes layers in place, so the layers named before pruning are the pruned ones
        layers = [layer for _, layer in unet_features(network)] if network_kind(network) == "unet" else []
        kept = {layer: list(range(layer.out_channels)) for layer in layers}
        prune_channels(
            network, inputs, options.ratio, channel_importance(options.importance), round_to=options.round_to,
            levels=options.levels or None, mlp_ratio=options.mlp_ratio, kept=kept,
        )  # fmt: skip
        if layers:
            self.feature_channels = [kept[layer] for layer in layers]

    def example_cond(self, n: int) -> dict[str, Tensor]:
        if not self.teacher.info.num_classes:
            return {}
        return {"class_labels": torch.arange(n, device=self.device) % self.teacher.info.num_classes}

    def build(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        from safetensors.torch import load_file, save_file

        work = self.folder / METHOD_WORK if self.folder is not None else None
        base = copy.deepcopy(self.teacher.network).to(self.device).float()
        if work is not None and (work / "pruning.json").is_file():  # pruned before a kill: rebuild, never re-prune
            self.record = json.loads((work / "pruning.json").read_text())
            if self.options.structure == "blocks":
                remove_blocks(base, self.options.blocks)
            apply_structure(base, self.record["structure"])
            base.load_state_dict(load_file(work / "pruned.safetensors"))
            if (work / FEATURE_CHANNELS).is_file():
                self.feature_channels = json.loads((work / FEATURE_CHANNELS).read_text())
            network = base
        else:
            network = base
            measured = self.prune(network)
            self.record = self.describe(network, measured)
            if work is not None:
                work.mkdir(parents=True, exist_ok=True)
                from .._io import atomic_path

                with atomic_path(work / "pruned.safetensors") as tmp:
                    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp))
                if self.feature_channels is not None:  # before pruning.json: its presence means "pruned"
                    write_text_atomic(work / FEATURE_CHANNELS, json.dumps(self.feature_channels) + "\n")
                write_text_atomic(work / "pruning.json", json.dumps(self.record, indent=2) + "\n")
        self.student = self.copy_network(network, trainable=True)
        self.ema = self.copy_network(self.student, trainable=False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=0.0)
        return {"student": self.student, "ema": self.ema}, {"opt": self.opt}

    def describe(self, network: nn.Module, measured: dict[str, Any]) -> dict[str, Any]:
        """The ``pruning`` record: options, the structure against the config-built network, MACs and parameters."""
        fresh = type(network).from_config(dict(network.config)).to(self.device)
        inputs = example_inputs(network, self.teacher.info.image_shape, 2, self.example_cond(2))
        macs_before, params_before = flops_and_params(self.teacher.network.float(), inputs)
        macs_after, params_after = flops_and_params(network, inputs)
        return {
            "structure_kind": self.options.structure,
            "importance": self.options.importance,
            "ratio": self.options.ratio,
            "blocks_removed": list(self.options.blocks),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "parameters_before": params_before,
            "parameters_after": params_after,
            **measured,
            "structure": structure_of(network, fresh),
        }

    # -- the fine-tune ---------------------------------------------------------------------------------------
    def feature_blocks(self, network: nn.Module, teacher: bool) -> list[nn.Module]:
        """The blocks whose outputs the feature loss compares, in the same order for teacher and student: a
        transformer's blocks (the teacher's without the removed ones), a UNet's down, mid and up blocks."""
        if network_kind(network) == "unet":
            return [block for block, _ in unet_features(network)]
        blocks = list(network.transformer_blocks)
        return [b for i, b in enumerate(blocks) if i not in self.options.blocks] if teacher else blocks

    def _features(self, blocks: list[nn.Module]) -> tuple[list[Tensor], list[Any]]:
        """Hooks that record the outputs of ``blocks`` (a down block's hidden states, not its skip tuple)."""
        outputs: list[Tensor] = []
        handles = []
        for block in blocks:

            def record(forward, *args, **kwargs):
                out = forward(*args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
                return out

            handles.append(add_hook(block, FEATURE_HOOK, record))
        return outputs, handles

    def feature_loss(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """Mean over blocks of the squared error of each student block output to the teacher's same channels."""
        channels = self.feature_channels or [None] * len(teacher_feats)
        total = torch.zeros((), device=self.device)
        for s, t, kept in zip(student_feats, teacher_feats, channels, strict=True):
            t = t.detach() if kept is None else t.detach()[:, kept]
            if s.shape != t.shape:
                raise RuntimeError(f"student feature {tuple(s.shape)} against the teacher's {tuple(t.shape)}")
            total = total + (s - t).pow(2).mean()
        return total / len(student_feats)

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        options = self.options
        sigma = self.training_sigmas(x0.shape[0])
        x = x0 + sigma.view(-1, *([1] * (x0.ndim - 1))) * self.randn_like(x0)
        weighting = options.weighting
        if weighting == "auto":
            weighting = FINETUNE_WEIGHTING.get(self.teacher.info.objective, "snr_trunc")
        weight = level_weight(sigma, weighting)
        handles: list[Any] = []
        try:
            if options.feature_weight:
                teacher_feats, h1 = self._features(self.feature_blocks(self.teacher.network, teacher=True))
                student_feats, h2 = self._features(self.feature_blocks(self.student, teacher=False))
                handles = h1 + h2
            target = self.teacher_denoise(x, sigma, labels) if options.output_weight or options.feature_weight else None
            pred = self.student_denoiser(self.student)(x, sigma, **self.cond(labels))
        finally:
            remove_hooks(handles)
        loss = torch.zeros((), device=self.device)
        if options.output_weight:
            loss = loss + options.output_weight * (weight * spectral_error(pred, target, options.spectral_alpha)).mean()
        if options.data_weight:
            loss = loss + options.data_weight * (weight * (pred - x0).pow(2).flatten(1).mean(1)).mean()
        if options.feature_weight:
            loss = loss + options.feature_weight * self.feature_loss(student_feats, teacher_feats)
        decayed = self.budget_spent if options.lr_decay == "linear" else 0.0
        return self.update(loss, index, lr=self.scheduled_lr(index, decayed))

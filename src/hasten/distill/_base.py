"""The distillation spine: settings, the method contract and registry, and the driver behind ``hasten distill``.

A student is a hasten model folder like any other (diffusers weights + ``hasten.json``) whose ``hasten.json``
also carries ``sampler`` (its default recipe: solver, options, grid, steps, guidance) and ``distillation``
(method, teacher and its fingerprint, training cost, machine). ``hasten sample --model STUDENT`` with no
sampler flag therefore runs at the student's NFE, and recipes, bench rows and ``hasten optimize`` treat it as
one more model.

Every method trains through :class:`hasten.train.TrainingLoop`, the loop ``hasten train`` uses: a time budget
across resumes, atomic safetensors checkpoints of every network, EMA copy, optimizer and the random
generator, and a rerun that continues bit-identically after ``kill -9``. A method is one file that registers a
:class:`DistillMethod` subclass in :data:`METHODS`; it supplies the student's networks, one update, and the
student's sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..config import Config, RunConfig
from ..models.zoo import LoadedModel, ModelInfo, load, make_denoiser, save_model, without_label_dropout
from ..registry import Registry
from ..schedules.grids import get_sigmas

__all__ = ["METHODS", "DistillConfig", "DistillMethod", "DistillResult", "NoOptions", "distill", "register_method"]


@dataclasses.dataclass(frozen=True)
class NoOptions(Config):
    """A method without options of its own."""


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunConfig):
    """Settings of one distillation run (all but ``minutes`` and ``checkpoint_minutes`` must match to resume).

    Args:
        teacher: Bundled model name or model folder.
        method: A name in :data:`METHODS`.
        nfe: Network calls per image of the student's own sampler.
        minutes: Training time in all, across resumes (CPU or GPU minutes, the device is recorded).
        batch_size, lr, ema_decay, grad_clip, seed: As for ``hasten train``; the exported weights are the EMA's.
        guidance: The teacher's classifier-free guidance scale whose samples the student learns (1 = none).
        cfg_dropout: Share of training labels replaced by the null class, so the student keeps an
            unconditional branch (0 for unconditional teachers).
        options: The method's own options (see each method's ``Options``), as a mapping.
    """

    teacher: str = "mnist-dit"
    method: str = "progressive"
    nfe: int = 2
    minutes: float = 30.0
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.999
    guidance: float = 1.0
    cfg_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_minutes: float = 5.0
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {self.nfe}")
        for name in ("minutes", "checkpoint_minutes", "lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0 <= self.guidance < math.inf:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a mapping of the method's options, got {type(self.options).__name__}")


class DistillMethod(ABC):
    """One way to train a few-step student; subclasses are registered with :func:`register_method`.

    The driver builds the method from a loaded teacher, asks :meth:`check` whether it applies (before any
    work), calls :meth:`build` for the networks and optimizers to checkpoint, then :meth:`step` once per update
    with a batch of training data, and finally exports :meth:`export` with :meth:`sampler` as the student's
    default recipe. Everything random goes through ``self.gen`` (checkpointed), so resumes are exact.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Config]] = NoOptions
    needs_data: ClassVar[bool] = True  # draws training images (False: noise and teacher samples only)

    def __init__(self, teacher: LoadedModel, config: DistillConfig, options: Config, device: torch.device) -> None:
        self.teacher, self.config, self.options, self.device = teacher, config, options, device
        self.gen = torch.Generator(device=device).manual_seed(config.seed)
        # this process's rows of each global batch and their share of it (all of it outside torchrun): what a
        # method that draws its own batch draws, and the weight of its gradient in the all-reduce
        self.batch_rows, self.batch_share = config.batch_size, 1.0
        self.state: dict[str, Any] = {}  # JSON-able method state, checkpointed as counters "method.*"
        # the run folder (set by the driver before build); a method keeps work it must not redo after a kill
        # before its first checkpoint (teacher samples) in ``folder / METHOD_WORK``
        self.folder: pathlib.Path | None = None
        # share of the run's time budget spent before the current update (the training loop's clock, across
        # resumes; set by the driver before each step): what a budget-driven schedule reads
        self.budget_spent = 0.0

    # -- what a method says about itself -------------------------------------------------------------------
    @classmethod
    def check(cls, teacher: LoadedModel, config: DistillConfig, options: Config) -> None:
        """Raise ``ValueError`` (naming the reason) if the method cannot make this student."""
        return None  # by default a method applies to any teacher the driver accepts

    def student_objective(self) -> str:
        """What the student network predicts (``eps``, ``v``, ``x0`` or ``flow``): the teacher's, or for a method
        with a ``parameterisation`` option its value, where ``auto`` is a head that can jump from pure noise (a
        noise-predicting teacher's student gets a v-head: ``x0 = x - sigma eps`` multiplies an eps head's error
        by sigma; flow, v and x0 heads are kept)."""
        objective = self.teacher.info.objective
        choice = getattr(self.options, "parameterisation", None)
        if choice is None:
            return objective
        return ("v" if objective == "eps" else objective) if choice == "auto" else choice

    @abstractmethod
    def sampler(self) -> dict[str, Any]:
        """The student's default sampler: ``solver``, ``options``, ``schedule``, ``steps``, ``guidance``."""

    # -- training --------------------------------------------------------------------------------------------
    def build(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        """The networks and optimizers to checkpoint. Default: the student starts as a copy of the teacher's
        network, with an EMA copy (exported) and AdamW."""
        self.student = self.copy_network(self.teacher.network, trainable=True)
        self.ema = self.copy_network(self.student, trainable=False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=0.0)
        return {"student": self.student, "ema": self.ema}, {"opt": self.opt}

    @abstractmethod
    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        """One update; ``x0`` is a batch of training images in model space (None if not ``needs_data``)."""

    def export(self) -> nn.Module:
        """The network written as the student (the EMA weights by default)."""
        return self.ema

    def write_extras(self, folder: pathlib.Path) -> list[str]:
        """Write files that belong in the student's folder beside its network (called once it is saved); returns
        lines for the model card naming them. Default: none."""
        return []

    # -- tools every method uses -----------------------------------------------------------------------------
    def copy_network(self, network: nn.Module, *, trainable: bool) -> nn.Module:
        net = copy.deepcopy(network).to(self.device).float()
        without_label_dropout(net)  # a network built from a config (a smaller student) has it on
        net.train(trainable).requires_grad_(trainable)
        return net

    @property
    def student_info(self) -> ModelInfo:
        # a consistency boundary is a wrapper, not part of the copied network: a method that wants one sets it;
        # a two-time network's target-level record stays (the copied network carries the embedding)
        info = self.teacher.info
        return dataclasses.replace(info, objective=self.student_objective(), quantization={}, sampler={},
                                   distillation={}, training={}, consistency={})  # fmt: skip

    def student_denoiser(self, network: nn.Module):
        """The VE denoiser ``D(x, sigma, **cond)`` of a student-objective network (gradients flow)."""
        return make_denoiser(network, self.student_info)

    def cond(self, labels: Tensor | None) -> dict[str, Tensor]:
        return {} if labels is None else {"class_labels": labels}

    @torch.no_grad()
    def teacher_denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """The teacher's x0 estimate at VE level ``sigma`` [B], with the run's guidance scale (rows whose label is
        the null class stay unguided)."""
        denoiser = self.teacher.denoiser
        w = self.config.guidance
        if w == 1.0 or labels is None:
            return denoiser(x, sigma, **self.cond(labels)).float()
        null = torch.full_like(labels, self.teacher.info.null_class)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([labels, null])).float()
        cond, uncond = both.chunk(2)
        guided = uncond + w * (cond - uncond)
        keep = (labels == self.teacher.info.null_class).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(keep, uncond, guided)

    def sigmas(self, steps: int, schedule: str = "auto") -> Tensor:
        """The descending VE grid of ``steps`` steps the student samples on (ends at 0)."""
        return get_sigmas(schedule, steps, self.teacher.schedule)

    def time_between(self, sigma_a: Tensor, sigma_b: Tensor, fraction: float) -> Tensor:
        """The VE level ``fraction`` of the way from ``sigma_a`` to ``sigma_b`` in the schedule's time (``sigma_b``
        may be 0: time 0)."""
        schedule = self.teacher.schedule
        t_a = schedule.t_from_ve_sigma(sigma_a)
        t_b = torch.where(sigma_b > 0, schedule.t_from_ve_sigma(sigma_b.clamp_min(1e-12)), torch.zeros_like(t_a))
        return schedule.ve_sigma(t_a + (t_b - t_a) * fraction)

    def training_sigmas(self, n: int) -> Tensor:
        """VE levels with the schedule's time uniform over ``[t_min, t_max]`` (the paper's ``t ~ U[0, 1]``)."""
        schedule = self.teacher.schedule
        u = torch.rand(n, generator=self.gen, device=self.device, dtype=torch.float64)
        return schedule.ve_sigma(schedule.t_min + (schedule.t_max - schedule.t_min) * u).float()

    def randn_like(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=self.gen, device=x.device, dtype=x.dtype)

    def initial_noise(self, n: int) -> Tensor:
        """Noise at the student grid's first level, scaled as ``hasten.generate`` scales it."""
        sigma_max = float(self.sigmas(self.config.nfe)[0])
        scale = self.teacher.schedule.initial_noise_scale(sigma_max)
        return torch.randn((n, *self.teacher.info.image_shape), generator=self.gen, device=self.device) * scale

    def random_labels(self, n: int) -> Tensor | None:
        info = self.teacher.info
        if not info.num_classes:
            return None
        labels = torch.randint(0, info.num_classes, (n,), generator=self.gen, device=self.device)
        drop = torch.rand(n, generator=self.gen, device=self.device) < self.config.cfg_dropout
        return torch.where(drop, torch.full_like(labels, info.num_classes), labels)

    def scheduled_lr(self, index: int, decayed: float = 0.0) -> float:
        """The run's learning rate at update ``index``: a 100-update linear warm-up, then, ``decayed`` (0 to 1) of the
        way through a budget, linearly down to a tenth (a short run ends better annealed than at a constant
        rate; progressive distillation anneals within each round)."""
        return self.config.lr * min(1.0, (index + 1) / 100) * (1.0 - 0.9 * min(1.0, max(0.0, decayed)))

    def update(self, loss: Tensor, index: int, *, opt=None, network=None, ema=None, lr: float | None = None) -> float:
        """Backward, clip, optimizer step (learning rate ``lr``, default the run's with a 100-step warm-up) and
        the EMA update; returns the loss value."""
        from ..train import ema_update

        opt = self.opt if opt is None else opt
        network = self.student if network is None else network
        ema = self.ema if ema is None and network is self.student else ema
        lr = self.scheduled_lr(index) if lr is None else lr
        for group in opt.param_groups:  # a group may run at a multiple of the run's rate (its "lr_scale")
            group["lr"] = lr * group.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # under torchrun: the global batch's gradient (each process's loss is the mean over its rows)
        distributed.average_gradients(
            [p for group in opt.param_groups for p in group["params"]], weight=self.batch_share
        )
        nn.utils.clip_grad_norm_(list(network.parameters()), self.config.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, network, index, self.config.ema_decay)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the {self.name} loss became {value} at step {index}; try a smaller --lr")
        return value


METHOD_WORK = "method"  # the run-folder entry where a method keeps resumable work made before its first checkpoint


def has_run(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a distillation run to resume: a checkpoint, or a method's work from before one."""
    from ..train import find_checkpoint

    return find_checkpoint(folder) is not None or (folder / METHOD_WORK).is_dir()


def check_schedule(name: str) -> None:
    """Refuse a grid name no discretisation is registered under (a student's ``schedule`` option)."""
    from ..schedules.grids import DISCRETISATIONS

    if name not in DISCRETISATIONS:
        raise ValueError(f"schedule {name!r} is not a grid; known: {', '.join(DISCRETISATIONS.names())}")


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def register_method(name: str):
    """Class decorator: register a :class:`DistillMethod` under ``name``."""

    def decorator(cls: type[DistillMethod]) -> type[DistillMethod]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return decorator


@dataclasses.dataclass
class DistillResult:
    folder: pathlib.Path
    steps: int
    seconds: float
    final_loss: float
    resumed_from_step: int


def lineage(teacher: LoadedModel, guidance: float) -> dict[str, Any]:
    """Who a student stands in for: ``teacher`` / ``teacher_fingerprint`` are the first model of the chain that
    is not itself a student (a student of a student, e.g. MMD fine-tuning of a progressive student, is judged
    against the original model's converged sampler), ``guidance`` the scale of that model's guided sampler it
    learned, ``parent_seconds`` what the students before it cost, and ``lineage`` the chain (method, student,
    fingerprint, NFE), oldest first. Raises ``ValueError`` for a guidance scale on a teacher that already has one
    (the scales would compound)."""
    parent = teacher.info.distillation
    if not parent:
        return {"teacher": teacher.info.name, "teacher_fingerprint": teacher.fingerprint, "guidance": guidance,
                "parent_seconds": 0.0, "lineage": []}  # fmt: skip
    inherited = teacher.info.learned_guidance
    if guidance != 1.0 and inherited != 1.0:
        raise ValueError(
            f"teacher {teacher.info.name!r} already learned guidance {inherited:g} from {parent['teacher']!r}; a "
            f"further guidance {guidance:g} would compound: distil it at guidance 1"
        )
    step = {"method": parent["method"], "student": teacher.info.name, "fingerprint": teacher.fingerprint,
            "nfe": parent["nfe"]}  # fmt: skip
    spent = float(parent.get("parent_seconds", 0.0)) + float(parent["seconds"]) + float(parent.get("extra_seconds", 0))
    return {
        "teacher": parent["teacher"], "teacher_fingerprint": parent["teacher_fingerprint"],
        "guidance": guidance if guidance != 1.0 else inherited, "parent_seconds": round(spent, 1),
        "lineage": [*parent.get("lineage", []), step],
    }  # fmt: skip


def prepare(config: DistillConfig, *, device: str | torch.device = "cpu") -> DistillMethod:
    """Load the teacher and build the method, checking everything that can be checked before training."""
    method_cls = METHODS.get(config.method)
    options = method_cls.Options.create(**config.options)
    device = torch.device(device)
    teacher = load(config.teacher, device=device)
    info = teacher.info
    if info.quantization:
        raise ValueError(f"teacher {config.teacher!r} is a quantised folder; distil from the float model it came from")
    if config.guidance != 1.0 and info.null_class is None:
        raise ValueError(f"guidance {config.guidance:g} needs a class-conditional teacher; {info.name} has no classes")
    if config.cfg_dropout and not info.num_classes:
        config = dataclasses.replace(config, cfg_dropout=0.0)
    lineage(teacher, config.guidance)  # a guidance scale that would compound with the teacher's is refused now
    method_cls.check(teacher, config, options)
    return method_cls(teacher, config, options, device)


def distill(
    config: DistillConfig | None = None,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
    name: str | None = None,
    **settings: Any,
) -> DistillResult:
    """Train a few-step student of ``config.teacher`` into the model folder ``out``.

    ``hasten.distill(teacher="mnist-dit", method="progressive", nfe=2, minutes=30, out="student")`` is the same
    as passing ``DistillConfig(teacher=..., method=..., nfe=..., minutes=...)``: settings are the fields of
    :class:`DistillConfig` (unknown ones are refused by name).

    ``out`` must not hold files unless ``resume`` (then the run there continues, refused if its settings
    differ, naming the setting). Returns what was done; the student loads with :func:`hasten.load`.

    Raises:
        FileExistsError: ``out`` holds files and ``resume`` is False.
        ValueError / KeyError: a setting the method cannot use (named), or a checkpoint of another run.
    """
    from ..data import load_dataset, to_model_space
    from ..train import TrainingLoop, machine_description

    if config is None:
        config = DistillConfig.create(**settings)
    elif settings:
        raise TypeError(f"pass either a DistillConfig or its settings, not both (got {', '.join(sorted(settings))})")
    if out is None:
        raise TypeError("distill() needs out: the folder to write the student into")
    folder = pathlib.Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder for the student")
    if folder.is_dir() and any(folder.iterdir()) and not resume:
        raise FileExistsError(f"{folder} already holds files; resume its run (--resume) or choose another folder")
    if resume and folder.is_dir() and any(folder.iterdir()) and not has_run(folder):
        raise FileExistsError(f"{folder} holds files but no distillation checkpoint to resume; choose another folder")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None: the time budget alone), got {max_steps}")
    method = prepare(config, device=device)
    config = method.config
    device = method.device
    images = labels = None
    if method.needs_data:
        if not method.teacher.info.data:
            raise ValueError(f"{config.method} needs the teacher's training data; {config.teacher} names no data set")
        dataset = load_dataset(method.teacher.info.data)
        images = to_model_space(dataset.images).to(device)
        labels = dataset.labels.to(device) if dataset.labels is not None else None
    torch.manual_seed(config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    method.folder = folder
    modules, optimizers = method.build()
    loop = TrainingLoop(
        folder, config, modules, optimizers, method.gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label=f"distilling ({config.method})", progress=progress,
    )  # fmt: skip
    loop.counters["method.teacher_fingerprint"] = method.teacher.fingerprint
    loop.counters["method.state"] = method.state
    resumed_from = loop.resume(device)
    if resumed_from and loop.counters["method.teacher_fingerprint"] != method.teacher.fingerprint:
        raise ValueError(
            f"{folder} holds a run distilled from other teacher weights (fingerprint "
            f"{loop.counters['method.teacher_fingerprint']}, now {method.teacher.fingerprint}); use another --out"
        )
    method.state = loop.counters["method.state"]
    if resumed_from and hasattr(method, "on_resume"):
        method.on_resume()

    # Under torchrun each process runs the method on its rows of the global batch, drawn whole from the one
    # (checkpointed) generator; the method's own draws then come from a generator seeded per step and process
    # from that one, so processes draw different noise and a resume needs no per-process state.
    shared_gen, rows = method.gen, distributed.row_slice(config.batch_size)
    method.batch_rows = rows.stop - rows.start
    method.batch_share = method.batch_rows / config.batch_size
    rank_gen = torch.Generator(device=device)

    def step(index: int) -> float:
        x0 = y = None
        if images is not None:
            idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=shared_gen, device=device)
            x0 = images[idx]
            if labels is not None:
                y = labels[idx].clone()
                drop = torch.rand(config.batch_size, generator=shared_gen, device=device) < config.cfg_dropout
                y[drop] = method.teacher.info.num_classes  # the null class
        if distributed.sharding():
            x0, y = (None if x0 is None else x0[rows]), (None if y is None else y[rows])
            step_seed = int(torch.randint(0, 2**62, (1,), generator=shared_gen, device=device))
            method.gen = rank_gen.manual_seed(step_seed + distributed.rank())
        method.budget_spent = loop.counters["seconds"] / loop.budget
        try:
            value = method.step(index, x0, y)
        finally:
            method.gen = shared_gen
        # rank 0's state for all: a method's clock-driven decisions (a round's end) are then taken alike
        method.state = distributed.broadcast_json(method.state)
        loop.counters["method.state"] = method.state
        return value * method.batch_share  # the loop sums the processes' shares into the batch's loss

    counters = loop.run(step, batch_size=config.batch_size, max_steps=max_steps)
    teacher = method.teacher
    sampler = method.sampler()
    record = {
        "method": config.method,
        **lineage(teacher, config.guidance),
        "nfe": config.nfe,
        "config": config.to_dict(),
        "steps": counters["step"],
        "images_seen": counters["images"],
        "seconds": round(counters["seconds"], 1),
        "extra_seconds": round(float(method.state.get("extra_seconds", 0.0)), 1),
        "final_loss_ema": counters["loss_ema"],
        "device": str(device),
        "machine": machine_description(device),
        "parameters": sum(p.numel() for p in method.export().parameters()),
        "weights": "EMA",
    }
    info = dataclasses.replace(method.student_info, name=name or folder.name, sampler=sampler, distillation=record)
    if distributed.is_main():  # every process holds the same student; rank 0 writes it
        save_model(method.export(), info, folder)
        _write_card(folder, info, method.write_extras(folder))
    distributed.barrier()
    loss = counters["loss_ema"]  # a running average of exactly 0 is a loss, not a missing one
    return DistillResult(
        folder, counters["step"], counters["seconds"], math.nan if loss is None else loss, resumed_from
    )


def _write_card(folder: pathlib.Path, info: ModelInfo, extras: list[str] | None = None) -> None:
    """A short model card: what the student is, how it was made and what it cost (quality is measured apart)."""
    from .._io import atomic_path

    d, s = info.distillation, info.sampler
    minutes = (d["seconds"] + d["extra_seconds"] + d.get("parent_seconds", 0.0)) / 60.0
    chain = "".join(f" via `{step['student']}` ({step['method']})" for step in d.get("lineage", []))
    opts = json.dumps(d["config"]["options"]) if d["config"]["options"] else "defaults"
    text = f"""# {info.name}

A {d["nfe"]}-step student of `{d["teacher"]}` (weights fingerprint `{d["teacher_fingerprint"]}`){chain}, made by
`hasten distill --method {d["method"]}` (method options: {opts}).

* **Sampler (its default recipe):** `{s["solver"]}` {s.get("options") or ""} on the `{s["schedule"]}` grid, {s["steps"]}
  steps, guidance {s.get("guidance", 1.0)}: `hasten sample --model {folder.name}` runs it with no flags.
* **Network:** {info.arch}, {d["parameters"]:,} parameters, predicts `{info.objective}`.
* **Training:** {d["steps"]:,} updates of batch {d["config"]["batch_size"]} ({d["images_seen"]:,} images), EMA
  {d["config"]["ema_decay"]}, lr {d["config"]["lr"]}; {minutes:.1f} minutes on {d["machine"]} ({d["device"]}),
  teacher samples and earlier students included; final loss (running average) {d["final_loss_ema"]:.4g}.
* **Quality:** not measured by `hasten distill`; run `hasten evaluate --model {folder.name}` or `hasten bench`.
"""
    text += "".join(f"* {line}\n" for line in extras or [])
    with atomic_path(folder / "MODEL_CARD.md") as tmp:
        pathlib.Path(tmp).write_text(text)

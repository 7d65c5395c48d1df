"""Reflow: straighten a flow by regressing on the teacher's own ODE couplings; SlimFlow's small-student variant.

Reference: Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow",
ICLR 2023, Alg. 1 (reflow on the pairs ``(z, ODE(z))``); Zhu, Liu & Liu, "SlimFlow: Training Smaller One-Step
Diffusion Models with Rectified Flow", ECCV 2024, Sec. 4 (annealing reflow, flow-guided distillation) and
yuanzhi-zhu/SlimFlow ``reflow/reflow.py`` (the annealing schedule ``beta: 1 -> 0`` over a warm-up, the 2-step
guide trajectory with a random intermediate time).

Couplings: ``z`` is the unit noise the network sees at the first level of a sampling grid (``hasten.generate``
draws ``noise * initial_noise_scale(sigma_max)`` in VE form, i.e. ``alpha x = noise`` at the network's input) and
``x`` the teacher's deterministic ODE solution from it (``teacher_solver`` with ``teacher_steps`` steps, the run's
guidance). They are made once, in chunks written atomically to ``<out>/method/couplings``, so a killed run
continues with the missing chunks; their cost is the student card's "teacher samples" time (``extra_seconds``).
Rows whose label is the null class are unguided, unconditional samples, so the student keeps its null branch.

Reflow loss, in the flow's own time (``t = 1`` noise, as ``hasten train``'s flow models): ``x_t = (1 - t) x + t z``
with ``t ~ U[t_min, t_max]``, target velocity ``z - x``, squared error. The squared error is what makes the learned
field the conditional mean of the pairs' velocities, whose ODE keeps the teacher's marginals; on straight,
non-crossing couplings one Euler step from ``z`` lands on ``x``. The student samples with Euler (= DDIM) at ``nfe``
steps on the flow's ``auto`` grid.

Teachers: a flow teacher's student starts as a copy of the teacher (plain reflow, "2-rectified flow"). A
noise-predicting VP teacher is converted: its student is a flow-matching model (objective ``flow``, FlowMatching
schedule, time fed as ``1000 t`` like ``hasten train --objective flow``) trained on the VP teacher's couplings. The
student network starts from the teacher's weights anyway (``init="auto"``): the architecture and the range of the
time label (0..1000) are the same, and the denoising features carry over, while the meaning of the time and output
are relearned; InstaFlow did the same, initialising its 2-rectified flow from noise-predicting Stable Diffusion.
``init="scratch"`` starts from fresh weights instead.

SlimFlow (``width < 1`` or ``layers``): a smaller network of the teacher's family, trained from scratch because a
small student cannot start from the large teacher's weights. Annealing reflow replaces the noise end by
``z' = sqrt(1 - beta^2) z + beta eps`` with ``beta`` going from 1 (flow matching on independent pairs, which needs no
teacher initialisation) to 0 (exact reflow) over the first ``anneal_share`` of the reflow stage. The optional
flow-guided distillation stage (``distill_share`` > 0, one-step students only) then trains the student's single
step at ``t_max`` towards the pair's ``x`` and towards a 2-step Euler trajectory of a frozen copy of the reflowed
student through a random intermediate time (the "guide"), with an ``l2`` or ``pseudo_huber`` distance. SlimFlow
uses LPIPS there; hasten does not, since LPIPS is a feature network close to the metrics' (no training against
anything the quality metrics measure).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..config import Config, check_choice
from ..models.adapters import _unwrap, as_sigma
from ..models.zoo import ModelInfo, without_label_dropout
from ..schedules.grids import DISCRETISATIONS, get_sigmas
from ..schedules.noise import FlowMatching
from ._base import METHOD_WORK, DistillConfig, DistillMethod, register_method

__all__ = [
    "CouplingStore",
    "Reflow",
    "ReflowOptions",
    "SlimFlow",
    "SlimFlowOptions",
    "anneal_beta",
    "annealed_noise",
    "pseudo_huber",
    "reflow_loss",
]

ARCHITECTURES = ("unet", "dit")  # what a student folder can be (hasten.load builds these from config.json)


@dataclasses.dataclass(frozen=True)
class ReflowOptions(Config):
    """Options of ``--method reflow`` (``--method slimflow`` has the same with SlimFlow's defaults).

    Args:
        couplings: Teacher ODE pairs ``(z, x)`` to make and train on.
        chunk_size: Pairs per stored chunk (what a kill can cost to redo).
        teacher_solver, teacher_steps, teacher_schedule, teacher_options: The deterministic solve that makes the
            pairs (a solver name, its steps, grid and options). The default, DPM-Solver++(2M) at 32 steps on the
            model's ``auto`` grid, lands within 0.01 (max) of the exact map on the analytic mixture as a flow; the
            ``karras`` grid is far worse on flows at this step count (0.26).
        width: Channel multiplier of the student relative to the teacher's network (1: the teacher's size).
        layers: The student's depth (DiT: transformer blocks; UNet: layers per block); 0: the teacher's.
        init: ``auto`` (the teacher's weights when the student has the teacher's size, else fresh), ``teacher``
            or ``scratch``.
        anneal_share: Share of the reflow stage over which ``beta`` goes from 1 to 0 (annealing reflow); None:
            0 for a student that starts from the teacher, 0.3 for one that starts from scratch.
        beta_schedule: ``linear`` or ``cosine`` (``(1 + cos(pi u)) / 2``).
        distill_share: Share of the training spent on flow-guided one-step distillation at the end (``nfe`` 1);
            None: 0.2 for a one-step student, else 0.
        distill_loss: ``l2`` or ``pseudo_huber`` (the distance of the distillation stage).
        guide_weight: Weight of the guide's 2-step target beside the pair's ``x`` in that stage.
        total_steps: If > 0, the shares count updates of this many; 0: they count training seconds of the budget
            (measured time: a resumed run then crosses a share's end at a slightly different update than an
            uninterrupted one would, as progressive's time-split rounds do; with no annealing and no distillation
            stage, reflow's default, nothing depends on time).
    """

    couplings: int = 4096
    chunk_size: int = 256
    teacher_solver: str = "dpmpp_2m"
    teacher_steps: int = 32
    teacher_schedule: str = "auto"
    teacher_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    width: float = 1.0
    layers: int = 0
    init: str = "auto"
    anneal_share: float | None = None
    beta_schedule: str = "linear"
    distill_share: float | None = 0.0
    distill_loss: str = "l2"
    guide_weight: float = 1.0
    total_steps: int = 0


@dataclasses.dataclass(frozen=True)
class SlimFlowOptions(ReflowOptions):
    """``--method slimflow``: reflow's options with SlimFlow's defaults (a half-width student from scratch with
    annealing reflow, and, for a one-step student, the last 20% of training on flow-guided distillation)."""

    width: float = 0.5
    distill_share: float | None = None


# -- the maths, as plain functions ------------------------------------------------------------------------------
def anneal_beta(progress: float, schedule: str = "linear") -> float:
    """SlimFlow's noise-mixing weight: 1 at ``progress`` 0, falling monotonically to 0 at ``progress`` >= 1."""
    u = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - u
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {schedule!r}")


def annealed_noise(z: Tensor, eps: Tensor, beta: float) -> Tensor:
    """``sqrt(1 - beta^2) z + beta eps``: unit variance for any ``beta``; ``beta = 1`` forgets the coupling."""
    return math.sqrt(max(0.0, 1.0 - beta * beta)) * z + beta * eps


def reflow_loss(velocity, z: Tensor, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
    """The reflow regression: mean squared error of ``velocity(x_t, t, **cond)`` to ``z - x`` on the straight line
    ``x_t = (1 - t) x + t z`` (flow time ``t`` [B], 1 = noise)."""
    tb = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    x_t = (1 - tb) * x + tb * z
    return (velocity(x_t, t, **(cond or {})).float() - (z - x)).pow(2).mean()


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """``sqrt(|a - b|^2 + c^2) - c`` per sample, ``c = 0.00054 sqrt(d)`` (Song & Dhariwal, iCT, Sec. 3.3), averaged."""
    diff = (a - b).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.pow(2).sum(1) + c * c).sqrt().sub(c).mean()


class CouplingStore:
    """Teacher couplings on disk: ``chunk_NNNNN.safetensors`` (``z``, ``x``, ``labels``; the seconds it took in the
    metadata), each written atomically, and ``couplings.json``, the settings that made them (a store made with
    other settings is refused, naming them)."""

    def __init__(self, folder: pathlib.Path, spec: dict[str, Any], count: int, chunk_size: int) -> None:
        self.folder, self.spec, self.count, self.chunk_size = folder, spec, count, chunk_size
        self.chunks = math.ceil(count / chunk_size)

    def open(self) -> CouplingStore:
        from .._io import write_text_atomic

        manifest = self.folder / "couplings.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            changed = sorted(k for k in {*old, *self.spec} if old.get(k) != self.spec.get(k))
            if changed:
                diff = ", ".join(f"{k} {old.get(k)!r} -> {self.spec.get(k)!r}" for k in changed)
                raise ValueError(f"{self.folder} holds teacher couplings made with other settings ({diff}); use "
                                 "another --out or the same settings")  # fmt: skip
        else:
            write_text_atomic(manifest, json.dumps(self.spec, indent=2, sort_keys=True) + "\n")
        return self

    def size(self, k: int) -> int:
        return min(self.chunk_size, self.count - k * self.chunk_size)

    def path(self, k: int) -> pathlib.Path:
        return self.folder / f"chunk_{k:05d}.safetensors"

    def missing(self) -> list[int]:
        return [k for k in range(self.chunks) if not self.path(k).exists()]

    def write(self, k: int, tensors: dict[str, Tensor], seconds: float) -> None:
        from safetensors.torch import save_file

        from .._io import atomic_path

        with atomic_path(self.path(k)) as tmp:
            tensors = {name: v.detach().contiguous().cpu() for name, v in tensors.items()}
            save_file(tensors, str(tmp), metadata={"seconds": repr(float(seconds))})

    def seconds(self) -> float:
        """Time spent making the chunks there are (across runs)."""
        from safetensors import safe_open

        total = 0.0
        for k in range(self.chunks):
            if self.path(k).exists():
                with safe_open(str(self.path(k)), framework="pt") as fh:
                    total += float(fh.metadata()["seconds"])
        return total

    def load(self, device: torch.device) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        parts = [load_file(str(self.path(k)), device=str(device)) for k in range(self.chunks)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def distill_share(options: ReflowOptions, nfe: int) -> float:
    """The share of training on flow-guided distillation: the option, or (None) 0.2 for one-step students."""
    if options.distill_share is None:
        return 0.2 if nfe == 1 else 0.0
    return float(options.distill_share)


def student_network(teacher_network: nn.Module, arch: str, width: float, layers: int) -> tuple[nn.Module, bool]:
    """A fresh network of the teacher's family, ``width`` times as wide and ``layers`` deep (0: the teacher's
    depth); also whether it is the teacher's own size. Built from the teacher's diffusers config, so the student
    folder's ``config.json`` loads with ``from_pretrained``."""
    config = dict(teacher_network.config)
    if arch == "dit":
        head_dim = config["attention_head_dim"]
        # the 2-D sin-cos position embedding needs the width (heads * head_dim) divisible by 4
        changes = {"attention_head_dim": max(4, 4 * round(head_dim * width / 4)),
                   "num_layers": layers or config["num_layers"]}  # fmt: skip
    elif arch == "unet":
        groups = config["norm_num_groups"]
        channels = [max(groups, groups * round(c * width / groups)) for c in config["block_out_channels"]]
        changes = {"block_out_channels": tuple(channels), "layers_per_block": layers or config["layers_per_block"],
                   "attention_head_dim": min(config["attention_head_dim"] or channels[-1], min(channels))}  # fmt: skip
    else:
        raise ValueError(f"reflow students are hasten's {' or '.join(ARCHITECTURES)} networks; the teacher is {arch!r}")
    same = all(_plain(config.get(k)) == _plain(v) for k, v in changes.items())
    net = type(teacher_network).from_config({k: v for k, v in config.items() if not k.startswith("_")} | changes)
    return without_label_dropout(net), same


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


@register_method("reflow")
class Reflow(DistillMethod):
    """Reflow (and SlimFlow with ``width`` < 1): see the module docstring."""

    Options = ReflowOptions
    needs_data = False

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: ReflowOptions) -> None:
        from ..solvers import SOLVERS, get_solver

        info = teacher.info
        if info.arch not in ARCHITECTURES:
            raise ValueError(
                f"{config.method} writes a hasten {' or '.join(ARCHITECTURES)} student; teacher {info.name!r} is a "
                f"{info.arch!r} network, which a student folder cannot hold"
            )
        for name in ("couplings", "chunk_size", "teacher_steps"):
            if getattr(options, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
        if options.couplings < config.batch_size:
            raise ValueError(f"couplings ({options.couplings}) must be at least batch_size ({config.batch_size})")
        if options.teacher_solver not in SOLVERS:
            raise ValueError(f"teacher_solver {options.teacher_solver!r} is not a solver; known: "
                             f"{', '.join(SOLVERS.names())}")  # fmt: skip
        if not isinstance(options.teacher_options, dict):
            raise TypeError(f"teacher_options must be a mapping of solver options, got {options.teacher_options!r}")
        solver = get_solver(options.teacher_solver, **options.teacher_options)
        if solver.stochastic:
            raise ValueError(f"teacher_solver {options.teacher_solver!r} is stochastic; reflow needs the teacher's "
                             "deterministic ODE map (e.g. dpmpp_3m, heun, euler)")  # fmt: skip
        if options.teacher_steps <= config.nfe:
            raise ValueError(
                f"teacher_steps ({options.teacher_steps}) must exceed nfe ({config.nfe}): couplings no finer than "
                "the student's own steps teach it nothing its sampler does not already do"
            )
        if options.teacher_schedule not in DISCRETISATIONS:
            raise ValueError(f"teacher_schedule {options.teacher_schedule!r} is not a grid; known: "
                             f"{', '.join(DISCRETISATIONS.names())}")  # fmt: skip
        if not 0 < options.width <= 4:
            raise ValueError(f"width must be in (0, 4] (a multiple of the teacher's channels), got {options.width}")
        if options.layers < 0:
            raise ValueError(f"layers must be >= 0 (0: the teacher's depth), got {options.layers}")
        check_choice("init", options.init, ("auto", "teacher", "scratch"))
        check_choice("beta_schedule", options.beta_schedule, ("linear", "cosine"))
        check_choice("distill_loss", options.distill_loss, ("l2", "pseudo_huber"))
        _, same = student_network(teacher.network, info.arch, options.width, options.layers)
        if options.init == "teacher" and not same:
            raise ValueError(f"init 'teacher' needs the teacher's size; width {options.width:g} / layers "
                             f"{options.layers} make another network (use init 'scratch' or 'auto')")  # fmt: skip
        if options.anneal_share is not None and not 0 <= options.anneal_share <= 1:
            raise ValueError(f"anneal_share must be in [0, 1], got {options.anneal_share}")
        share = distill_share(options, config.nfe)
        if not 0 <= share < 1:
            raise ValueError(f"distill_share must be in [0, 1), got {share}")
        if share and config.nfe != 1:
            raise ValueError(
                f"flow-guided distillation (distill_share {share:g}) makes a one-step student; "
                f"nfe must be 1, got {config.nfe} (or set distill_share=0)"
            )
        if not options.guide_weight >= 0:
            raise ValueError(f"guide_weight must be >= 0, got {options.guide_weight}")
        if options.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0 (0: shares of the time budget), got {options.total_steps}")

    # -- what the student is ------------------------------------------------------------------------------------
    def student_objective(self) -> str:
        return "flow"

    @property
    def student_info(self) -> ModelInfo:
        info = super().student_info
        # a converted VP teacher's student is fed 1000 t, as hasten train's flow models are
        scale = self.teacher.info.time_scale if self.teacher.info.objective == "flow" else 1000.0
        return dataclasses.replace(info, time_scale=scale)

    @property
    def student_schedule(self) -> FlowMatching:
        return self.student_info.schedule()  # type: ignore[return-value]

    def sampler(self) -> dict[str, Any]:
        return {"solver": "euler", "options": {}, "schedule": "auto", "steps": self.config.nfe, "guidance": 1.0}

    @property
    def from_teacher(self) -> bool:
        init = self.options.init
        return self._same_size if init == "auto" else init == "teacher"

    @property
    def anneal_share(self) -> float:
        share = self.options.anneal_share
        return (0.0 if self.from_teacher else 0.3) if share is None else share

    @property
    def distill_share(self) -> float:
        return distill_share(self.options, self.config.nfe)

    # -- couplings ------------------------------------------------------------------------------------------------
    def coupling_spec(self) -> dict[str, Any]:
        o, c = self.options, self.config
        return {"teacher_fingerprint": self.teacher.fingerprint, "solver": o.teacher_solver, "steps": o.teacher_steps,
                "schedule": o.teacher_schedule, "options": o.teacher_options, "guidance": c.guidance,
                "cfg_dropout": c.cfg_dropout, "seed": c.seed, "couplings": o.couplings, "chunk_size": o.chunk_size,
                "image_shape": list(self.teacher.info.image_shape)}  # fmt: skip

    def chunk_inputs(self, k: int, n: int) -> tuple[Tensor, Tensor | None]:
        """Chunk ``k``'s noise and labels, from a generator of its own (drawn on the CPU, like ``generate``), so a
        rerun makes exactly the chunks a kill left out."""
        digest = hashlib.sha256(f"reflow-couplings/{self.config.seed}/{k}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        z = torch.randn((n, *self.teacher.info.image_shape), generator=gen)
        info = self.teacher.info
        if not info.num_classes:
            return z, None
        labels = torch.randint(0, info.num_classes, (n,), generator=gen)
        drop = torch.rand(n, generator=gen) < self.config.cfg_dropout
        return z, torch.where(drop, torch.full_like(labels, info.num_classes), labels)

    @torch.no_grad()
    def teacher_couplings(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """The teacher's ODE solution from unit noise ``z`` (network-input units at the grid's first level)."""
        from ..generate import options_for_schedule
        from ..solvers import sample

        o = self.options
        sigmas = get_sigmas(o.teacher_schedule, o.teacher_steps, self.teacher.schedule)
        scale = self.teacher.schedule.initial_noise_scale(float(sigmas[0]))  # as hasten.generate starts

        def denoiser(x: Tensor, sigma: Any, **cond: Tensor) -> Tensor:
            return self.teacher_denoise(x, as_sigma(sigma, x), cond.get("class_labels"))

        options = options_for_schedule(o.teacher_solver, self.teacher.schedule, o.teacher_options)
        cond = {} if labels is None else {"class_labels": labels.to(self.device)}
        x = (z.to(self.device) * scale).float()
        return sample(denoiser, x, sigmas, o.teacher_solver, cond=cond, **options).float()

    def make_couplings(self) -> CouplingStore:
        """Make the chunks the store lacks; the store."""
        folder = (self.folder or pathlib.Path(".")) / METHOD_WORK / "couplings"
        store = CouplingStore(folder, self.coupling_spec(), self.options.couplings, self.options.chunk_size).open()
        # Under torchrun: one missing chunk per process per round, each made alone (a chunk is the one-process
        # chunk: its inputs come from its index), gathered, written by rank 0; every rank then reads the files.
        missing = distributed.broadcast_json(store.missing())
        per_round = distributed.world_size() if distributed.sharding() else 1
        for first in range(0, len(missing), per_round):
            for (k, seconds), tensors in distributed.map_tasks(
                lambda k: self._chunk(store, k), missing[first : first + per_round], tensors=True
            ):
                store.write(k, tensors, seconds)
        distributed.barrier()  # rank 0's files are all there before any rank reads them
        return store

    def _chunk(self, store: CouplingStore, k: int) -> tuple[list, dict[str, Tensor]]:
        """Chunk ``k``'s couplings, as ``([k, seconds it took], tensors)``."""
        start = time.perf_counter()
        z, labels = self.chunk_inputs(k, store.size(k))
        x = self.teacher_couplings(z, labels)
        tensors = {"z": z, "x": x} | ({} if labels is None else {"labels": labels})
        return [k, time.perf_counter() - start], tensors

    # -- training -------------------------------------------------------------------------------------------------
    def build(self):
        if self.folder is None:
            raise ValueError("reflow keeps its teacher couplings in the run folder; set method.folder first")
        self._store = self.make_couplings()
        data = self._store.load(self.device)
        self.z, self.x, self.labels = data["z"].float(), data["x"].float(), data.get("labels")
        net, self._same_size = student_network(
            self.teacher.network, self.teacher.info.arch, self.options.width, self.options.layers
        )
        if self.from_teacher:
            net.load_state_dict(self.teacher.network.state_dict())
        self.student = self.copy_network(net, trainable=True)
        self.ema = self.copy_network(self.student, trainable=False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=0.0)
        modules: dict[str, nn.Module] = {"student": self.student, "ema": self.ema}
        if self.distill_share:
            self.guide = self.copy_network(self.student, trainable=False)  # the reflowed student, frozen at the switch
            modules["guide"] = self.guide
        self.state.setdefault("stage", "reflow")
        self.state.setdefault("train_seconds", 0.0)
        self.state["extra_seconds"] = self._store.seconds()
        return modules, {"opt": self.opt}

    def on_resume(self) -> None:
        self.state["extra_seconds"] = self._store.seconds()  # includes chunks made after the last checkpoint

    def progress(self, index: int) -> float:
        """How far the training is, 0..1: updates of ``total_steps`` or seconds of the time budget."""
        if self.options.total_steps:
            return index / self.options.total_steps
        return self.state["train_seconds"] / (self.config.minutes * 60.0)

    def velocity(self, network: nn.Module):
        """The flow velocity ``v(x_t, t)`` of a student network (flow time ``t`` [B], input ``x_t``)."""
        scale = self.student_info.time_scale

        def v(x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            return _unwrap(network(x_t, t.float() * scale, **cond))

        return v

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        start = time.perf_counter()
        progress = self.progress(index)
        share = self.distill_share
        if share and self.state["stage"] == "reflow" and progress >= 1 - share:
            # SlimFlow's second stage starts from the reflowed (EMA) student, which also becomes the frozen guide
            self.guide.load_state_dict(self.ema.state_dict())
            self.student.load_state_dict(self.ema.state_dict())
            self.opt.state.clear()
            self.state["stage"] = "distill"
        idx = torch.randint(0, self.z.shape[0], (self.batch_rows,), generator=self.gen, device=self.device)
        z, x = self.z[idx], self.x[idx]
        cond = self.cond(None if self.labels is None else self.labels[idx])
        if self.state["stage"] == "distill":
            loss = self.distill_loss(z, x, cond)
        else:
            reflow_part = 1.0 - self.distill_share
            share = self.anneal_share * reflow_part
            beta = anneal_beta(progress / share, self.options.beta_schedule) if share > 0 else 0.0
            if beta > 0:
                z = annealed_noise(z, self.randn_like(z), beta)
            schedule = self.student_schedule
            t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(
                z.shape[0], generator=self.gen, device=self.device
            )
            loss = reflow_loss(self.velocity(self.student), z, x, t, cond)
        value = self.update(loss, index)
        self.state["train_seconds"] += time.perf_counter() - start
        return value

    def distill_loss(self, z: Tensor, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Flow-guided distillation: the one-step prediction from ``z`` against the pair's ``x`` and against the
        guide's 2-step Euler trajectory through a random intermediate level."""
        schedule = self.student_schedule
        sigma_max = float(get_sigmas("auto", 1, schedule)[0])
        x_start = z * schedule.initial_noise_scale(sigma_max)  # VE form, as generate starts the student
        sigma = torch.full((z.shape[0],), sigma_max, device=self.device)
        distance = pseudo_huber if self.options.distill_loss == "pseudo_huber" else _l2
        pred = self.student_denoiser(self.student)(x_start, sigma, **cond)
        loss = distance(pred, x)
        if self.options.guide_weight:
            with torch.no_grad():
                guide = self.student_denoiser(self.guide)
                first = guide(x_start, sigma, **cond)
                t_mid = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(
                    z.shape[0], generator=self.gen, device=self.device
                )
                sigma_mid = schedule.ve_sigma(t_mid).float()
                ratio = (sigma_mid / sigma).view(-1, *([1] * (z.ndim - 1)))
                x_mid = first + ratio * (x_start - first)  # Euler (DDIM) to the intermediate level
                target = guide(x_mid, sigma_mid, **cond).float()
            loss = loss + self.options.guide_weight * distance(pred, target)
        return loss


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).mean()


@register_method("slimflow")
class SlimFlow(Reflow):
    """SlimFlow: reflow into a smaller student with annealing reflow and flow-guided distillation (module docstring)."""

    Options = SlimFlowOptions

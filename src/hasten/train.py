"""``hasten train``: train hasten's small diffusion models, resumably, with EMA weights.

One run writes into one folder: ``checkpoint/`` (model, EMA, optimizer and RNG state in safetensors,
counters in JSON; replaced atomically every ``checkpoint_minutes``) and, at the end, the model itself
(diffusers format + ``hasten.json``) with EMA weights. Rerunning the same command continues from the
checkpoint: a kill loses at most one checkpoint interval. ``minutes`` is the total training time across
resumes.

Objectives: ``eps`` and ``v`` on the 1000-step linear-beta DDPM schedule; ``flow`` is rectified flow /
flow matching (``x_t = (1 - t) x0 + t eps``, velocity ``eps - x0``, t from a logit-normal, fed as 1000 t).

Reference: Ho et al., DDPM, Alg. 1; Salimans & Ho, 2022 (v); Lipman et al. 2023 / Liu et al. 2023 (flow
matching); Esser et al., SD3, Sec. 3.1 (logit-normal t); Ho & Salimans, 2022 (label dropout for CFG).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .config import Config, RunConfig
from .data import load_dataset, to_model_space
from .models.zoo import ModelInfo, build_network, save_model
from .progress import BudgetProgress
from .schedules.noise import VPDiscrete

__all__ = ["TrainConfig", "TrainResult", "TrainingLoop", "ema_update", "find_checkpoint", "train"]

OBJECTIVES = ("eps", "v", "flow")


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Settings of one training run (everything but the time budget must match to resume)."""

    arch: str = "unet"
    data: str = "mnist"
    objective: str = "eps"
    minutes: float = 10.0
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("unet", "dit"):
            raise ValueError(f"arch must be 'unet' or 'dit', got {self.arch!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.minutes > 0 or not self.checkpoint_minutes > 0:
            raise ValueError("minutes and checkpoint_minutes must be > 0")
        if self.batch_size < 1 or not 0 <= self.cfg_dropout < 1 or not 0 < self.ema_decay < 1:
            raise ValueError("need batch_size >= 1, 0 <= cfg_dropout < 1, 0 < ema_decay < 1")


@dataclasses.dataclass
class TrainResult:
    folder: pathlib.Path
    steps: int
    images: int
    seconds: float
    final_loss: float
    resumed_from_step: int


def objective_target(objective: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network trained on ``objective`` regresses at ``x_t = alpha * x0 + sigma * noise``: the noise
    (``eps``), the velocity ``alpha * noise - sigma * x0`` (``v``) or the flow ``noise - x0`` (``flow``, where
    ``alpha = 1 - t`` and ``sigma = t``). One place for the training target of every objective."""
    if objective == "eps":
        return noise
    if objective == "v":
        return alpha * noise - sigma * x0
    if objective == "flow":
        return noise - x0
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _loss(
    net: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    objective: str,
    ab: torch.Tensor,
    gen,
    rows: slice = slice(None),
) -> torch.Tensor:
    """One minibatch of the denoising objective (mean squared error on the network's target).

    The noise and times of the whole batch are drawn; the network sees ``rows`` of it (a process's share)."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    cond = {} if labels is None else {"class_labels": labels}
    view = (-1, *([1] * (x0.ndim - 1)))
    if objective == "flow":
        t = torch.sigmoid(torch.randn(b, generator=gen, device=x0.device))  # logit-normal(0, 1)
        a, s = (1 - t).view(view), t.view(view)
        timestep = t * 1000.0
    else:
        idx = torch.randint(0, ab.numel(), (b,), generator=gen, device=x0.device)
        a = ab[idx].sqrt().view(view)
        s = (1 - ab[idx]).sqrt().view(view)
        timestep = idx
    x_t = a * x0 + s * noise
    target = objective_target(objective, x0, noise, a, s)
    cond = {key: value[rows] for key, value in cond.items()}
    out = net(x_t[rows], timestep[rows], **cond).sample
    return torch.mean((out.float() - target[rows]) ** 2)


def _flat_optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            flat[f"{prefix}.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def _restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head == prefix:
            i, key = rest.split(".", 1)
            state.setdefault(int(i), {})[key] = value
    state_dict["state"] = state
    opt.load_state_dict(state_dict)


def _save_checkpoint(
    folder: pathlib.Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    gen: torch.Generator,
    counters: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        tensors |= {f"{name}.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    for name, opt in optimizers.items():
        tensors |= {k: v.contiguous().cpu() for k, v in _flat_optimizer_state(name, opt).items()}
    tensors["rng.generator"] = gen.get_state().cpu()
    tmp = folder / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(counters, indent=2) + "\n")
    final, old = folder / "checkpoint", folder / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint a rerun continues from, if any (``checkpoint/``, else ``checkpoint.old/``)."""
    found = _checkpoints(folder)
    return found[0] if found else None


def _checkpoints(folder: pathlib.Path) -> list[pathlib.Path]:
    return [folder / name for name in ("checkpoint", "checkpoint.old")  # .old survives a kill between renames
            if (folder / name / "state.json").exists() and (folder / name / "state.safetensors").exists()]  # fmt: skip


def _read_checkpoint(folder: pathlib.Path, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The counters and tensors of the newest readable checkpoint; a damaged one is skipped for the previous
    (with a warning naming it), and when none is readable the error names every file tried."""
    import warnings

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problems = []
    for checkpoint in _checkpoints(folder):
        path = checkpoint / "state.json"
        try:
            saved = json.loads(path.read_text())
            path = checkpoint / "state.safetensors"
            tensors = load_file(str(path), device=str(device))
        except (OSError, ValueError, SafetensorError) as err:
            problems.append(f"{path}: {str(err).splitlines()[0]}")
            continue
        if problems:
            warnings.warn(f"skipped a damaged checkpoint ({problems[0]}); resuming from {checkpoint}", stacklevel=3)
        return saved, tensors
    raise ValueError(
        f"cannot resume: the training checkpoint is damaged ({'; '.join(problems)}); delete {folder / 'checkpoint'} "
        "to train from the start, or use another --out"
    )


def optimizer_step(
    opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    params: list[nn.Parameter],
    grad_clip: float,
    *,
    lr: float | None = None,
    warmup_steps: int = 1,
    index: int = 0,
) -> None:
    """One update as every hasten trainer makes it: with ``lr``, the learning rate warmed up linearly over
    ``warmup_steps`` (step ``index``); then backward, gradients clipped to norm ``grad_clip``, the optimiser step."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (index + 1) / warmup_steps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def ema_update(ema: nn.Module, net: nn.Module, step: int, decay: float) -> None:
    """One EMA step with a warm-up, so early averages are not dominated by the random initialisation."""
    rate = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - rate)


class TrainingLoop:
    """The one training loop of hasten (``hasten train``, every ``hasten distill`` method).

    It owns what every run needs and nothing method-specific: a time budget across resumes, a rich progress
    bar, atomic safetensors checkpoints of every module, optimizer and the random generator (so a rerun after
    ``kill -9`` continues bit-identically from the last checkpoint), and the check that a resumed run has the
    same settings. The caller's ``step(index) -> loss`` does one update (forward, backward, optimizer, EMA).

    Under ``torchrun`` every process runs the loop on the same state: ``step`` returns its process's loss weighted
    by its share of the batch (the loop sums them), rank 0's clock decides when to stop and checkpoint (broadcast,
    so all stop at the same step), and rank 0 writes the checkpoint, which holds no per-process state: a run
    resumes on any number of processes.

    Args:
        folder: The run's folder (``checkpoint/`` is written there).
        config: The run's settings; ``config.resume_key()`` must match a checkpoint's to resume it.
        modules: Everything with state to checkpoint (networks, EMA copies), by name.
        optimizers: Optimizers by name (their state is checkpointed too).
        gen: The run's one random generator.
        budget_seconds: Training time in all, across resumes.
    """

    def __init__(
        self,
        folder: pathlib.Path,
        config: Config,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        gen: torch.Generator,
        *,
        budget_seconds: float,
        checkpoint_minutes: float,
        label: str = "training",
        progress: bool = True,
    ) -> None:
        names = [*modules, *optimizers]
        if len(set(names)) != len(names) or "rng" in names:
            raise ValueError(f"module and optimizer names must differ and not be 'rng': {names}")
        self.folder, self.config, self.modules, self.optimizers, self.gen = folder, config, modules, optimizers, gen
        self.budget, self.checkpoint_minutes = budget_seconds, checkpoint_minutes
        self.label, self.progress = label, progress
        self.counters: dict[str, Any] = {
            "config": config.to_dict(), "step": 0, "images": 0, "seconds": 0.0, "loss_ema": None,
        }  # fmt: skip
        self.resumed_from = 0

    def resume(self, device: torch.device) -> int:
        """Load the folder's checkpoint if there is one (refused if its settings differ); the step reached."""
        if find_checkpoint(self.folder) is None:
            return 0
        saved, tensors = _read_checkpoint(self.folder, device)
        old_key = type(self.config).from_dict(saved["config"]).resume_key()
        new_key = self.config.resume_key()
        if old_key != new_key:
            changed = ", ".join(f"{k} {old_key.get(k)!r} -> {new_key.get(k)!r}" for k in new_key
                                if old_key.get(k) != new_key.get(k))  # fmt: skip
            raise ValueError(
                f"{self.folder} holds a checkpoint of a run with other settings ({changed}); use another --out "
                "folder or the same settings"
            )
        for name, module in self.modules.items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, opt in self.optimizers.items():
            _restore_optimizer(name, opt, tensors)
        state = tensors["rng.generator"]
        self.gen.set_state(state.cpu() if self.gen.device.type == "cpu" else state)
        self.counters.update({k: saved[k] for k in ("step", "images", "seconds", "loss_ema")})
        self.counters.update({k: v for k, v in saved.items() if k.startswith("method.")})
        self.resumed_from = self.counters["step"]
        return self.resumed_from

    def run(self, step: Callable[[int], float], *, batch_size: int, max_steps: int | None = None) -> dict[str, Any]:
        """Call ``step`` until the budget (or ``max_steps``) is spent, checkpointing as it goes; the counters."""
        counters = self.counters
        bar = BudgetProgress(self.progress, self.label, self.budget, counters["seconds"])
        last_checkpoint = time.perf_counter()
        start_wall, start_seconds, start_images = time.perf_counter(), counters["seconds"], counters["images"]
        try:
            while self._go_on(max_steps):
                # a step returns its process's loss weighted by its share of the batch: the sum is the batch's loss
                value = distributed.all_sum(float(step(counters["step"])))
                ema = counters["loss_ema"]
                counters["loss_ema"] = value if ema is None else 0.98 * ema + 0.02 * value
                counters["step"] += 1
                counters["images"] += batch_size
                counters["seconds"] = start_seconds + (time.perf_counter() - start_wall)
                due = time.perf_counter() - last_checkpoint > self.checkpoint_minutes * 60.0
                # under torchrun rank 0's clock decides, so every rank stops and checkpoints at the same step
                counters["seconds"], due = distributed.broadcast_json([counters["seconds"], due])
                rate = (counters["images"] - start_images) / max(time.perf_counter() - start_wall, 1e-9)
                bar.update(
                    counters["seconds"], f"step {counters['step']}  loss {counters['loss_ema']:.4f}  {rate:.0f} img/s"
                )
                if due:
                    self.checkpoint()
                    last_checkpoint = time.perf_counter()
        finally:
            bar.close()
        self.checkpoint()
        return counters

    def record(self, trained: nn.Module, device: torch.device) -> dict[str, Any]:
        """The training record every run writes beside its result (callers add their own fields): the settings,
        steps, images, time, final loss, the step it resumed from, the machine and ``trained``'s parameter count."""
        counters = self.counters
        return {
            "config": self.config.to_dict(), "steps": counters["step"], "images_seen": counters["images"],
            "seconds": round(counters["seconds"], 1), "final_loss_ema": counters["loss_ema"],
            "resumed_from": self.resumed_from, "machine": machine_description(device),
            "parameters": sum(p.numel() for p in trained.parameters()),
        }  # fmt: skip

    def _go_on(self, max_steps: int | None) -> bool:
        return self.counters["seconds"] < self.budget and (max_steps is None or self.counters["step"] < max_steps)

    def checkpoint(self) -> None:
        """Write the checkpoint (rank 0 only under torchrun: every rank holds the same state)."""
        if distributed.is_main():
            _save_checkpoint(self.folder, self.modules, self.optimizers, self.gen, self.counters)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def train(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
    name: str | None = None,
) -> TrainResult:
    """Train (or continue training) a model into ``out``; returns what was done.

    Raises:
        ValueError: ``out`` holds a checkpoint of a run with different settings.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None: the time budget alone), got {max_steps}")
    device = torch.device(device)
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config.data)
    images = to_model_space(dataset.images).to(device)
    labels = dataset.labels.to(device) if dataset.labels is not None else None
    num_classes = dataset.num_classes
    torch.manual_seed(config.seed)
    net = build_network(config.arch, dataset.shape, num_classes).to(device).train()
    ema = build_network(config.arch, dataset.shape, num_classes).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    # The DDPM table the eps / v objectives train on is the schedule the model folder declares (one place).
    ab = VPDiscrete.from_betas("linear", 1000).alphas_cumprod.to(device=device, dtype=torch.float32)

    loop = TrainingLoop(
        folder, config, {"model": net, "ema": ema}, {"opt": opt}, gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, progress=progress,
    )  # fmt: skip
    resumed_from = loop.resume(device)
    net_params = list(net.parameters())
    # Under torchrun: DistributedDataParallel averages the gradients; every rank draws the whole global batch from
    # the one generator (so its state, and a resume, do not depend on the number of processes) and trains on its
    # rows of it, its loss weighted by its share so the average is the global batch's mean.
    rows = distributed.row_slice(config.batch_size)
    share = (rows.stop - rows.start) * distributed.world_size() / config.batch_size
    model = net
    if distributed.sharding():
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def step(index: int) -> float:
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen, device=device)
        x0 = images[idx]
        y = None
        if labels is not None:
            y = labels[idx].clone()
            drop = torch.rand(config.batch_size, generator=gen, device=device) < config.cfg_dropout
            y[drop] = num_classes  # the null class
        loss = _loss(model, x0, y, config.objective, ab, gen, rows=rows) * share
        optimizer_step(opt, loss, net_params, config.grad_clip, lr=config.lr, warmup_steps=config.warmup_steps,
                       index=index)  # fmt: skip
        ema_update(ema, net, index, config.ema_decay)
        # DDP averages the gradients over the processes; the loop sums the values: each returns its weighted share
        return loss.item() / distributed.world_size()

    counters = loop.run(step, batch_size=config.batch_size, max_steps=max_steps)

    info = ModelInfo(
        name=name or folder.name,
        arch=config.arch,
        objective=config.objective,
        image_shape=dataset.shape,
        num_classes=num_classes,
        data=config.data,
        time_scale=1000.0 if config.objective == "flow" else 1.0,
        training={
            "config": config.to_dict(),  # the last invocation's settings; "seconds" is the time trained
            "steps": counters["step"],
            "images_seen": counters["images"],
            "epochs": round(counters["images"] / len(dataset), 1),
            "seconds": round(counters["seconds"], 1),
            "final_loss_ema": counters["loss_ema"],
            "machine": machine_description(device),
            "parameters": sum(p.numel() for p in net.parameters()),
            "weights": "EMA",
        },
    )
    if distributed.is_main():
        save_model(ema, info, folder)
    distributed.barrier()
    return TrainResult(
        folder,
        counters["step"],
        counters["images"],
        counters["seconds"],
        counters["loss_ema"] or math.nan,
        resumed_from,
    )

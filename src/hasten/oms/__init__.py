"""One More Step: a small module's prediction at SNR 0 starts the base sampler.

A model trained on a schedule whose last level keeps some signal (the bundled UNet's linear betas end at
``alphas_cumprod[-1] ~ 4.0e-5``, VE level ``sigma_max ~ 157``) is sampled from pure noise, and its own
prediction there is poor: an eps-prediction network's ``x0_hat = (x - sqrt(1 - abar) eps_hat) / sqrt(abar)``
multiplies its eps error by ``1 / sqrt(abar) ~ 157`` (measured on mnist-unet: RMSE 4.8 to the class mean at the
first level, against 0.84 between the class mean and zero). At SNR ~ 0 the best prediction does not depend
on the noise at all: it is the conditional mean ``E[x0 | label]``, which a tiny module learns from the training
images once, without the base network.

:class:`OneMoreStep` applies that prediction ``x0_hat`` at the first level ``sigma_0`` of the base sampler's
grid, in two ways (:meth:`OneMoreStep.begin`):

* the start: ``x = x0_hat + sigma_0 z`` in VE form, i.e. ``sqrt(abar_0) x0_hat + sqrt(1 - abar_0) z`` at the
  network's input (OMS's step from SNR 0 to the base's first timestep, with the standard deviation as the
  noise scale; the published code uses the variance, which matters only where ``abar_0`` is not tiny);
* the first prediction: the base denoiser's output at ``sigma_0`` is replaced by ``x0_hat``, so the base
  sampler's first step is the DDIM jump from SNR 0 and a multistep solver's history starts from it. This is
  where the gain on mnist-unet comes from (docs/guide/one-more-step.md: FD 449 -> 315 at dpmpp_2m 10 steps with
  the exact class mean; the start alone changes FD by less than its noise).

With classifier-free guidance ``w`` the prediction is guided like the base denoiser's,
``x0_u + w (x0_c - x0_u)``, from the module's null-class output (it is trained with label dropout).

The module is tied to a data set (image shape, classes), not to a network's weights: one module serves every
model of that data set. It is refused where the first level is not near SNR 0 (``sigma_0 < MIN_SIGMA``): there
the data still shows through the noise and a prediction that ignores ``x`` would throw it away.

Reference: Hu et al., "One More Step: A Versatile Plug-and-Play Module for Rectifying Diffusion Schedule Flaws
and Enhancing Low-Frequency Controls", CVPR 2024 (the module at SNR 0, v = -x0 there, the base model frozen);
Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024 (the non-zero terminal
SNR flaw; :func:`hasten.schedules.rescale_zero_terminal_snr` is their Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import RunConfig

__all__ = [
    "MIN_SIGMA",
    "OMS_FORMAT",
    "FirstLevelDenoiser",
    "OMSNet",
    "OMSTrainConfig",
    "OneMoreStep",
    "bundled_oms",
    "load_oms",
    "oms_file",
    "oms_fingerprint",
    "save_oms",
    "train_oms",
]

OMS_FORMAT = "hasten-oms-1"
# The lowest first level OMS replaces a prediction at. At VE level s the ideal denoiser moves from the data mean
# by about var(x0) / s per unit of noise: 0.6 / 50 ~ 0.012 of the [-1, 1] range for MNIST at s = 50, 0.004 at
# mnist-unet's sigma_max 157. Below it the start carries data that a noise-blind prediction would discard.
MIN_SIGMA = 50.0
WEIGHTS = pathlib.Path(__file__).parent / "weights"


class OMSNet(nn.Module):
    """The module: a learned per-label feature map beside the noise, three 3x3 convolutions, ``x0`` out.

    It sees the noise ``z`` as the published module does, although at SNR 0 the optimum ignores it; the label
    (``num_classes`` is the null class, 0 for an unconditional data set) enters as a learned image-sized map.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int = 16, label_channels: int = 4):
        super().__init__()
        c, h, w = image_shape
        self.image_shape, self.num_classes = (c, h, w), num_classes
        self.width, self.label_channels = width, label_channels
        self.label = nn.Embedding(num_classes + 1, label_channels * h * w)
        self.body = nn.Sequential(
            nn.Conv2d(c + label_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, c, 3, padding=1),
        )  # fmt: skip

    def layout(self) -> dict[str, Any]:
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes, "width": self.width,
                "label_channels": self.label_channels}  # fmt: skip

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        _, h, w = self.image_shape
        maps = self.label(labels).view(-1, self.label_channels, h, w)
        return self.body(torch.cat([z, maps.to(z.dtype)], dim=1))


def check_first_level(sigma_0: float) -> float:
    """``sigma_0`` as a float, refused below :data:`MIN_SIGMA` (a ValueError naming it)."""
    sigma_0 = float(sigma_0)
    if not sigma_0 >= MIN_SIGMA:
        raise ValueError(
            f"OMS starts a sampler at SNR ~ 0: the grid's first level must be >= {MIN_SIGMA:g} (VE sigma), got "
            f"{sigma_0:.4g}; sample from the model's sigma_max, or without OMS"
        )
    return sigma_0


class FirstLevelDenoiser:
    """The base denoiser, except at the grid's first level ``sigma_0``, where its output is ``x0`` (per row).

    Calls at ``sigma_0`` do not reach the base network (the sampler still counts them as evaluations).
    """

    def __init__(self, denoiser: Callable[..., Tensor], sigma_0: float, x0: Tensor):
        self.denoiser, self.sigma_0, self.x0 = denoiser, float(sigma_0), x0

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        # sigma arrives as a [B] tensor in the sampler's dtype (float32 rounds sigma_0)
        if math.isclose(float(sigma.reshape(-1)[0]), self.sigma_0, rel_tol=1e-6):
            if self.x0.shape != x.shape:
                raise ValueError(f"OMS holds x0 of shape {tuple(self.x0.shape)} for a call with x {tuple(x.shape)}")
            return self.x0.to(device=x.device, dtype=x.dtype)
        return self.denoiser(x, sigma, **cond)


class OneMoreStep:
    """A trained OMS module and what it was trained on; :meth:`begin` applies it to one batch of a sampling run."""

    def __init__(self, net: OMSNet, data: str, record: dict[str, Any] | None = None, path: str | None = None):
        self.net = net.eval().requires_grad_(False)
        self.data, self.record, self.path = data, dict(record or {}), path

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.net.image_shape

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def __repr__(self) -> str:
        return f"OneMoreStep(data={self.data!r}, classes={self.num_classes}, path={self.path!r})"

    def check_model(self, model: Any, sigma_0: float | None = None) -> None:
        """Refuse a model of another data set, image shape or label set (a ValueError naming both), and a grid
        whose first level ``sigma_0`` is below :data:`MIN_SIGMA`."""
        if sigma_0 is not None:
            check_first_level(sigma_0)
        info = model.info
        mine = (self.data, tuple(self.image_shape), self.num_classes)
        theirs = (getattr(info, "data", None), tuple(info.image_shape), int(info.num_classes))
        if mine != theirs:
            raise ValueError(
                f"this OMS module was trained for data {mine[0]!r}, images {mine[1]}, {mine[2]} classes; model "
                f"{info.name!r} has data {theirs[0]!r}, images {theirs[1]}, {theirs[2]} classes"
            )

    @torch.no_grad()
    def predict_x0(self, z: Tensor, labels: Tensor | None, guidance: float = 1.0) -> Tensor:
        """The module's ``x0`` at SNR 0 for noise ``z`` ``[B, C, H, W]`` and ``labels`` (None: unconditional),
        guided as ``x0_u + w (x0_c - x0_u)`` when ``guidance != 1``."""
        if tuple(z.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"OMS noise must be [B, {', '.join(map(str, self.image_shape))}], got {tuple(z.shape)}")
        null = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
        if labels is None:
            if self.num_classes and guidance != 1.0:
                raise ValueError("OMS guidance needs labels")
            labels = null
        labels = labels.to(device=z.device, dtype=torch.long).reshape(-1)
        if labels.shape[0] != z.shape[0] or bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(
                f"OMS labels must be {z.shape[0]} values in 0..{self.num_classes} ({self.num_classes}: the null "
                f"class), got {labels.tolist()[:8]}{'...' if labels.numel() > 8 else ''}"
            )
        tensor = next(itertools.chain(self.net.parameters(), self.net.buffers()), None)
        dtype = z.dtype if tensor is None else tensor.dtype
        net = self.net.to(z.device)
        conditional = net(z.to(dtype), labels).to(z.dtype)
        if guidance == 1.0:
            return conditional
        unconditional = net(z.to(dtype), null).to(z.dtype)
        return unconditional + guidance * (conditional - unconditional)

    def begin(
        self, denoiser: Callable[..., Tensor], z: Tensor, labels: Tensor | None, sigma_0: float, guidance: float = 1.0
    ) -> tuple[Tensor, FirstLevelDenoiser]:
        """One batch's start and denoiser: ``(x0_hat + sigma_0 z, denoiser with x0_hat at sigma_0)``.

        ``z`` is the batch's standard normal initial noise, ``sigma_0`` the first VE level of the grid (at least
        :data:`MIN_SIGMA`), ``guidance`` the scale the base denoiser is guided with.
        """
        sigma_0 = check_first_level(sigma_0)
        x0 = self.predict_x0(z, labels, guidance)
        return x0 + sigma_0 * z, FirstLevelDenoiser(denoiser, sigma_0, x0)


# ----------------------------------------------------------------------------------------------- storage


def save_oms(net: OMSNet, path: str | os.PathLike, data: str, record: dict[str, Any]) -> pathlib.Path:
    """Write the module atomically as safetensors; the metadata holds its layout, data set and training record."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    meta = {"format": OMS_FORMAT, "data": data, "layout": json.dumps(net.layout()), "record": json.dumps(record)}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def oms_file(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The file of an OMS module: a bundled name (``"mnist"``) or a path; FileNotFoundError naming both kinds."""
    path = WEIGHTS / f"{name_or_path}.safetensors" if str(name_or_path) in bundled_oms() else pathlib.Path(name_or_path)
    if not path.is_file():
        bundled = ", ".join(bundled_oms()) or "none"
        raise FileNotFoundError(f"no OMS module at {str(path)!r} (a .safetensors file, or a bundled name: {bundled})")
    return path


def oms_fingerprint(name_or_path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of an OMS module's file: what a recipe records of it."""
    import hashlib

    return hashlib.sha256(oms_file(name_or_path).read_bytes()).hexdigest()[:16]


def load_oms(path: str | os.PathLike, model: Any = None) -> OneMoreStep:
    """Load an OMS module file (checked against ``model`` when given); ``"mnist"`` loads the bundled one."""
    from safetensors import SafetensorError, safe_open

    path = oms_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from None
    if meta.get("format") != OMS_FORMAT:
        raise ValueError(f"{str(path)!r} is not an OMS module (format {meta.get('format')!r}, want {OMS_FORMAT!r})")
    layout = json.loads(meta["layout"])
    net = OMSNet(tuple(layout["image_shape"]), int(layout["num_classes"]), int(layout["width"]),
                 int(layout["label_channels"]))  # fmt: skip
    net.load_state_dict(tensors)
    oms = OneMoreStep(net, meta["data"], json.loads(meta.get("record", "{}")), str(path))
    if model is not None:
        oms.check_model(model)
    return oms


def bundled_oms() -> list[str]:
    """Names of the OMS modules shipped with hasten (``load_oms(name)``)."""
    return sorted(p.stem for p in WEIGHTS.glob("*.safetensors")) if WEIGHTS.is_dir() else []


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class OMSTrainConfig(RunConfig):
    """Settings of one OMS training run (all but the time budget must match to resume)."""

    type_tag: ClassVar[str] = "oms_training"
    data: str = "mnist"
    minutes: float = 5.0
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    width: int = 16
    label_channels: int = 4
    checkpoint_minutes: float = 1.0
    seed: int = 0

    BUDGET: ClassVar[tuple[str, ...]] = ("minutes", "max_steps", "checkpoint_minutes")


def checkpoint_folder(out: str | os.PathLike) -> pathlib.Path:
    """Where an OMS training run keeps its checkpoint: ``<out>.train/`` beside the module file."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".train")


def train_oms(
    out: str | os.PathLike, config: OMSTrainConfig | None = None, *, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train an OMS module on a bundled data set and write it to ``out``; resumable.

    The loss is the x0 (= -v at SNR 0) loss at SNR 0: ``|| OMS(z, y) - x0 ||^2`` with ``z ~ N(0, I)`` independent of
    the training image ``x0`` of label ``y`` (replaced by the null class with probability ``label_dropout``), so
    the optimum is ``E[x0 | y]``. Adam on the module, an EMA of its weights is what is saved. A rerun with the same
    ``out`` continues from ``<out>.train/`` (``minutes`` and ``max_steps`` are totals across resumes); the
    module is written at the end and the checkpoint folder removed.

    Returns the training record stored in the file, with ``rmse_to_class_mean``: the saved module's RMSE to the
    exact per-label mean of the training images (the optimum), averaged over 64 noise draws per label.
    """
    from ..data import load_dataset, to_model_space
    from ..train import TrainingLoop, ema_update

    config = OMSTrainConfig() if config is None else config
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{str(out)!r} already exists; choose another output or pass force=True")
    checks = (
        ("minutes", config.minutes, config.minutes > 0, "> 0"),
        ("max_steps", config.max_steps, config.max_steps >= 1, ">= 1"),
        ("batch_size", config.batch_size, config.batch_size >= 1, ">= 1"),
        ("lr", config.lr, config.lr > 0, "> 0"),
        ("ema_decay", config.ema_decay, 0 <= config.ema_decay < 1, "in [0, 1)"),
        ("label_dropout", config.label_dropout, 0 <= config.label_dropout < 1, "in [0, 1)"),
        ("width", config.width, config.width >= 1, ">= 1"),
        ("label_channels", config.label_channels, config.label_channels >= 1, ">= 1"),
    )
    for option, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{option} must be {allowed}, got {value!r}")
    dataset = load_dataset(config.data)
    images = to_model_space(dataset.images)
    num_classes = 0 if dataset.labels is None else int(dataset.labels.max()) + 1
    labels = torch.zeros(len(images), dtype=torch.long) if dataset.labels is None else dataset.labels.long()
    folder = checkpoint_folder(out)
    if force and out.exists():  # starting over: an earlier run's checkpoint is not resumed
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    shape = tuple(images.shape[1:])
    net = OMSNet(shape, num_classes, config.width, config.label_channels).train()
    ema = OMSNet(shape, num_classes, config.width, config.label_channels).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    loop = TrainingLoop(
        folder, config, {"net": net, "ema": ema}, {"opt": opt}, gen, budget_seconds=config.minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="oms", progress=progress,
    )  # fmt: skip
    loop.resume(torch.device("cpu"))

    def step(index: int) -> float:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        if num_classes:
            y[torch.rand(config.batch_size, generator=gen) < config.label_dropout] = num_classes
        else:
            y.fill_(num_classes)
        z = torch.randn(x0.shape, generator=gen)
        loss = (net(z, y) - x0).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, index, config.ema_decay)
        return float(loss.detach())

    loop.run(step, batch_size=config.batch_size, max_steps=config.max_steps)
    record = loop.record(ema, torch.device("cpu")) | {
        "rmse_to_class_mean": rmse_to_class_mean(OneMoreStep(ema, config.data), images, labels, num_classes),
    }
    save_oms(ema, out, config.data, record)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def class_means(images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[num_classes + 1, C, H, W]``: each label's mean image, then the mean of all (the null class's optimum)."""
    return torch.stack([*(images[labels == c].mean(0) for c in range(num_classes)), images.mean(0)])


def rmse_to_class_mean(oms: OneMoreStep, images: Tensor, labels: Tensor, num_classes: int, draws: int = 64) -> float:
    """RMSE between the module's prediction and the exact per-label mean, over every label and the null class."""
    means = class_means(images, labels, num_classes)
    gen = torch.Generator().manual_seed(12345)
    errors = []
    for label in range(num_classes + 1):
        z = torch.randn((draws, *oms.image_shape), generator=gen)
        errors.append((oms.predict_x0(z, torch.full((draws,), label)) - means[label]).pow(2).mean())
    return float(torch.stack(errors).mean().sqrt())

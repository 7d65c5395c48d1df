"""MMD fine-tuning (MMD-DDM): train the model through its own K-step sampler to match real data in a feature space.

Reference: Aiello, Valsesia & Magli, "Fast Inference in Denoising Diffusion Models via MMD Finetuning", IEEE Access
2024 (arXiv 2301.07969), Sec. III; diegovalsesia/MMD-DDM ``functions/losses.py`` (the unbiased MMD² with the KID
polynomial kernel ``(a.b / d + 1)^3`` and an RBF variant) and ``runners/diffusion.py`` (gradients through every
sampler step). Random-weight embeddings as a feature space: Naeem et al., "Reliable Fidelity and Diversity Metrics
for Generative Models", ICML 2020, Sec. 5 (a randomly initialised CNN embeds images usefully for such statistics).

Each update draws noise, runs the student's own sampler (``euler`` = deterministic DDIM on the model's ``auto``
grid, ``nfe`` steps: the sampler the exported student declares) with gradients through all ``nfe`` network calls
(each call gradient-checkpointed, so memory holds one call's activations), embeds the samples and a batch of real
training images with a fixed feature map, and minimises the unbiased MMD² between the two embeddings. The student
keeps the teacher's parameterisation; there is no teacher in the loss (it is only the starting point).

The feature map is never the network hasten's quality metrics use (:mod:`hasten.metrics.features`: FD and
precision/recall are computed in its 128-d features): training against it would lower FD without making the
samples better. ``feature="random_conv"`` (the default) is a fixed random-weight CNN (three 3x3 conv + ReLU
layers, 32/64/128 channels, He-normal weights from ``feature_seed``, 128 x 4 x 4 = 2,048 features): it sees
strokes and their layout at several scales, is deterministic, costs nothing to train and shares nothing with the
metric's trained classifier. ``feature="pixels"`` is the image at full, half and quarter resolution (moment
matching in pixel space, as generative moment-matching networks do). Either is centred per feature on the teacher's
training images (up to ``stats_images`` of them) and divided by one deviation, the root mean variance over all
features, computed once and checkpointed. (Not a deviation per feature: features that are constant on the data,
MNIST's empty border, would blow up the smallest deviation of a sample there to 1e6 and the cubic kernel with it.)
For a class-conditional teacher, the generated rows get labels drawn as the real rows' are
(uniform classes, the null class at ``cfg_dropout``; drawn apart from the real batch, which keeps the estimate
unbiased) and both embeddings get the one-hot label appended (scaled by ``class_weight``), so the kernel compares
(image, label) pairs and the student keeps drawing the digit it is asked for; the null class is a class of its
own here.

``guidance`` other than 1 is refused: the loss matches real data, not the teacher's (guided) samples, and the
student samples with one network call per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import Config, check_choice
from ..solvers import sample
from ._base import DistillConfig, DistillMethod, check_schedule, register_method

__all__ = ["FEATURE_MAPS", "KERNELS", "MMD", "MMDFeatures", "MMDOptions", "PixelFeatures", "RandomConvFeatures",
           "kernel_matrix", "unbiased_mmd2"]  # fmt: skip

FEATURE_MAPS = ("random_conv", "pixels")
KERNELS = ("poly", "rbf")
# names that would mean the quality metric's own feature network: refused, with the reason
_METRIC_FEATURE_NAMES = ("metric", "classifier", "mnist", "emoji", "fd", "inception")


@dataclasses.dataclass(frozen=True)
class MMDOptions(Config):
    """Options of ``--method mmd``.

    Args:
        feature: The feature map the MMD compares samples in: ``random_conv`` (a fixed random-weight CNN, the
            default) or ``pixels`` (full, half and quarter resolution). Never the quality metric's network.
        kernel: ``poly`` (KID's ``(a.b / d + 1)^3``, the paper's default) or ``rbf`` (``exp(-|a - b|^2 / d)``).
        feature_seed: Seed of the random CNN's weights (fixed apart from the run's seed, so runs with different
            seeds compare samples in one feature space).
        stats_images: How many training images (the first of the data set) give the per-feature mean and the
            overall deviation the features are standardised with.
        class_weight: For class-conditional teachers, the weight of the label in the kernel (a matching label adds
            about ``class_weight`` to ``a.b / d``); 0 compares images alone.
        denoise_weight: Weight of a denoising regulariser, the mean squared x0 error of the student at its own grid
            levels on real images (0, the paper's, leaves it out: the student is only sampled by its own sampler,
            and pulling its x0 estimates back to the posterior mean would pull back the blur MMD removes).
        clamp: Compare samples clipped to the data range [-1, 1], as they are saved and measured (a few-step
            noise-predicting teacher puts pixels at +-30, which the cubic kernel would make the whole loss);
            ``False`` for models whose samples are not images in [-1, 1].
        checkpoint_calls: Recompute each network call in the backward pass instead of storing its activations
            (memory of one call rather than ``nfe``, at about a third more compute).
        schedule: The grid family the student samples on (``auto``: the model's default grid).
    """

    feature: str = "random_conv"
    kernel: str = "poly"
    feature_seed: int = 0
    stats_images: int = 2048
    class_weight: float = 1.0
    denoise_weight: float = 0.0
    clamp: bool = True
    checkpoint_calls: bool = True
    schedule: str = "auto"


# -- the statistic -------------------------------------------------------------------------------------------------


def kernel_matrix(a: Tensor, b: Tensor, kernel: str = "poly") -> Tensor:
    """The Gram matrix ``k(a_i, b_j)`` of features ``a`` [M, d] and ``b`` [N, d].

    ``poly``: ``(a.b / d + 1)^3`` (KID's kernel); ``rbf``: ``exp(-|a - b|^2 / d)`` (MMD-DDM's ``KID_rbf``).
    """
    d = a.shape[1]
    if kernel == "poly":
        return (a @ b.T / d + 1.0) ** 3
    if kernel == "rbf":
        return torch.exp(-torch.cdist(a, b).pow(2) / d)
    raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}; got {kernel!r}")


def unbiased_mmd2(x: Tensor, y: Tensor, kernel: str = "poly") -> Tensor:
    """The unbiased estimate of MMD² between the distributions of rows of ``x`` [M, d] and ``y`` [N, d].

    ``sum_{i!=j} k(x_i, x_j) / (M(M-1)) + sum_{i!=j} k(y_i, y_j) / (N(N-1)) - 2 mean k(x_i, y_j)``: the Gram
    diagonals are left out, so its mean is exactly MMD² (0 for one distribution) and a single value can be
    negative. Computed in float64.
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 rows on each side, got {m} and {n}")
    x, y = x.double(), y.double()
    k_xx, k_yy, k_xy = kernel_matrix(x, x, kernel), kernel_matrix(y, y, kernel), kernel_matrix(x, y, kernel)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * k_xy.mean()


# -- feature maps (never the metric's network) ----------------------------------------------------------------------


class RandomConvFeatures(nn.Module):
    """A fixed random-weight CNN: three 3x3 conv + ReLU layers (``widths`` channels) with 2x average pooling between
    them, then the last map average-pooled to ``pooled x pooled``. Weights are He-normal from ``seed`` and stored
    as buffers: nothing here is trained."""

    def __init__(self, channels: int, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128), pooled: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.pooled, self.depth = pooled, len(widths)
        for i, (c_in, c_out) in enumerate(zip((channels, *widths[:-1]), widths, strict=True)):
            fan_in = c_in * 9
            self.register_buffer(f"weight{i}", torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / fan_in))
            self.register_buffer(f"bias{i}", torch.randn(c_out, generator=gen) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(self.depth):
            if i:
                h = F.avg_pool2d(h, 2, ceil_mode=True)
            h = F.relu(F.conv2d(h, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), padding=1))
        return F.adaptive_avg_pool2d(h, self.pooled).flatten(1)


class PixelFeatures(nn.Module):
    """The image at full, half and quarter resolution (2x2 / 4x4 averages; the coarser ones where the size allows),
    flattened and concatenated."""

    def forward(self, x: Tensor) -> Tensor:
        parts = [x.flatten(1)]
        for factor in (2, 4):
            if min(x.shape[-2:]) >= factor:
                parts.append(F.avg_pool2d(x, factor).flatten(1))
        return torch.cat(parts, dim=1)


class MMDFeatures(nn.Module):
    """A feature map centred per feature and scaled by one deviation (``(f - mean) / std``, ``std`` the root mean
    variance over the features; statistics from real images, checkpointed)."""

    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, images: Tensor, batch: int = 256) -> None:
        """Set the mean and deviation from ``images`` (model space), accumulated in float64."""
        feats = torch.cat([self.body(images[i : i + batch].float()).double() for i in range(0, len(images), batch)])
        self.mean.copy_(feats.mean(0).float())
        self.std.fill_(float(feats.var(0).mean().sqrt().clamp_min(1e-6)))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x.float()) - self.mean) / self.std


def make_features(name: str, image_shape: tuple[int, ...], seed: int) -> MMDFeatures:
    """The named feature map for images of ``image_shape`` (C, H, W), before standardisation is fitted."""
    if name.lower() in _METRIC_FEATURE_NAMES:
        raise ValueError(
            f"feature {name!r}: the MMD is never computed in the quality metric's feature network (FD and "
            f"precision/recall use it, so training against it would game them); use one of {', '.join(FEATURE_MAPS)}"
        )
    check_choice("feature", name, FEATURE_MAPS)
    body: nn.Module = RandomConvFeatures(image_shape[0], seed) if name == "random_conv" else PixelFeatures()
    with torch.no_grad():
        dim = body(torch.zeros(1, *image_shape)).shape[1]
    return MMDFeatures(body, dim)


# -- the method ---------------------------------------------------------------------------------------------------


@register_method("mmd")
class MMD(DistillMethod):
    """MMD-DDM fine-tuning through the student's own ``nfe``-step sampler: see the module docstring."""

    Options = MMDOptions

    @classmethod
    def check(cls, teacher, config: DistillConfig, options: MMDOptions) -> None:
        make_features(options.feature, teacher.info.image_shape, options.feature_seed)  # refuses the metric's net
        check_choice("kernel", options.kernel, KERNELS)
        check_schedule(options.schedule)
        if options.stats_images < 2:
            raise ValueError(f"stats_images must be >= 2, got {options.stats_images}")
        for name in ("class_weight", "denoise_weight"):
            value = getattr(options, name)
            if not (0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if config.guidance != 1.0:
            raise ValueError(
                f"guidance {config.guidance:g}: mmd matches real data, not the teacher's guided samples, and its "
                f"student samples with one call per step; use guidance 1"
            )

    def sampler(self) -> dict[str, Any]:
        return {"solver": "euler", "options": {}, "schedule": self.options.schedule, "steps": self.config.nfe,
                "guidance": 1.0}  # fmt: skip

    def build(self):
        modules, optimizers = super().build()
        # The student is trained through exactly the function its sampler will run: eval mode. (A loaded diffusers
        # DiT keeps its per-block label dropout in train mode, drawn from the global generator: it would corrupt
        # the labels and make a resumed run differ.)
        self.student.eval()
        info = self.teacher.info
        self.features = make_features(self.options.feature, info.image_shape, self.options.feature_seed)
        self.features.to(self.device).requires_grad_(False)
        reference = self.reference_images()
        if reference is not None:
            self.features.fit(reference.to(self.device))
        return {**modules, "features": self.features}, optimizers

    def reference_images(self) -> Tensor | None:
        """The training images (model space) the features are standardised on; None for a teacher without data."""
        from ..data import load_dataset, to_model_space

        if not self.teacher.info.data:
            return None
        return to_model_space(load_dataset(self.teacher.info.data).images[: self.options.stats_images])

    def grid(self) -> Tensor:
        return self.sigmas(self.config.nfe, self.options.schedule)

    def generate(self, noise: Tensor, labels: Tensor | None, network: nn.Module | None = None) -> Tensor:
        """The student's own sampler from ``noise`` (already scaled to the grid's first level), differentiable
        through every network call."""
        denoiser = self.student_denoiser(self.student if network is None else network)
        if self.teacher.x0_processing is not None:  # the student's sampler applies the model's x0 processing too
            from ..models.guidance import ThresholdedDenoiser

            denoiser = ThresholdedDenoiser(denoiser, self.teacher.x0_processing)
        if self.options.checkpoint_calls:
            inner = denoiser

            def denoiser(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
                return checkpoint(inner, x, sigma, use_reentrant=False, **cond)

        return sample(denoiser, noise, self.grid(), "euler", cond=self.cond(labels), check_finite=False)

    def embed(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Standardised features of ``x`` (clipped to [-1, 1] if ``clamp``), with the scaled one-hot label appended
        for a conditional teacher."""
        feats = self.features(x.clamp(-1.0, 1.0) if self.options.clamp else x)
        classes = self.teacher.info.num_classes
        if labels is None or not classes or self.options.class_weight == 0:
            return feats
        scale = math.sqrt(self.options.class_weight * feats.shape[1])
        return torch.cat([feats, F.one_hot(labels, classes + 1).to(feats.dtype) * scale], dim=1)

    def loss(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Unbiased MMD² between the student's samples (freshly drawn labels) and the real batch ``x0``, plus
        the optional denoising term. Draws from ``self.gen``."""
        noise = self.initial_noise(x0.shape[0])
        # the generated rows' labels are drawn afresh (classes uniform, the null class at cfg_dropout), not copied
        # from the real rows: pairs of one label across the two samples would bias the unbiased estimate
        fake_labels = None if labels is None else self.random_labels(x0.shape[0])
        fake = self.generate(noise, fake_labels)
        with torch.no_grad():
            real = self.embed(x0, labels)
        loss = unbiased_mmd2(self.embed(fake, fake_labels), real, self.options.kernel).float()
        if self.options.denoise_weight:
            levels = self.grid()[:-1].to(self.device)
            sigma = levels[torch.randint(0, len(levels), (x0.shape[0],), generator=self.gen, device=self.device)]
            x_t = x0 + sigma.float().view(-1, *([1] * (x0.ndim - 1))) * self.randn_like(x0)
            pred = self.student_denoiser(self.student)(x_t, sigma, **self.cond(labels))
            loss = loss + self.options.denoise_weight * (pred.float() - x0).pow(2).mean()
        return loss

    def step(self, index: int, x0: Tensor | None, labels: Tensor | None) -> float:
        return self.update(self.loss(x0, labels), index)

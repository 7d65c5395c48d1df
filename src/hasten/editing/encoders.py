"""The encoders (image -> a sampler's noise space) and the replay that edits; see :mod:`hasten.editing`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..generate import Generation, guided_denoiser
from ..models.zoo import LoadedModel
from ..registry import Registry
from ..schedules.grids import get_sigmas
from ..seeds import row_seed
from ..solvers import sample
from ..solvers.euler import EulerAncestral, ancestral_levels

__all__ = ["ENCODERS", "Encoder", "Inversion", "edit", "invert"]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """How an inversion method draws the states it makes the sampler pass through.

    ``states(x0, grid, eta, draws)`` returns the target state at every level ``grid[:-1]`` (``[N, B, ...]``) from
    the images ``x0`` (model space) and standard normal ``draws`` (``[N, B, ...]``); ``None`` for a deterministic
    encoder, which walks the ODE itself (:func:`_ddim_states`). ``default_eta`` is the sampler's noise fraction.
    """

    name: str
    states: Callable[[Tensor, tuple[float, ...], float, Tensor], Tensor] | None
    default_eta: float
    reference: str

    @property
    def stochastic(self) -> bool:
        return self.states is not None


ENCODERS: Registry[Encoder] = Registry("inversion method")


def _independent_states(x0: Tensor, grid: tuple[float, ...], eta: float, draws: Tensor) -> Tensor:
    """Edit-friendly DDPM inversion: ``x_i = x0 + sigma_i n_i`` with independent ``n_i`` (VE form of
    ``q(x_t | x0)``), so the step noise that links them absorbs the image's structure."""
    sigmas = torch.tensor(grid[:-1], dtype=x0.dtype).view(-1, *([1] * x0.ndim))
    return x0.unsqueeze(0) + sigmas * draws


def _posterior_chain(x0: Tensor, grid: tuple[float, ...], eta: float, draws: Tensor) -> Tensor:
    """The DPM-Encoder: ``x_0 ~ q(x_T | x0)``, then each next state from the sampler's own posterior
    ``q(x_{i+1} | x_i, x0)``: the ancestral step of the sampler with the true ``x0`` in place of the model's estimate
    (DDIM's ``q_sigma`` with noise fraction ``eta``)."""
    states = [x0 + grid[0] * draws[0]]
    for i in range(len(grid) - 2):
        sigma_down, sigma_up = ancestral_levels(grid[i], grid[i + 1], eta)
        mean = x0 + (sigma_down / grid[i]) * (states[-1] - x0)  # ddim_step with the true x0
        states.append(mean + sigma_up * draws[i + 1])
    return torch.stack(states)


ENCODERS.add(
    "ddpm-inversion",
    Encoder(
        "ddpm-inversion", _independent_states, 1.0,
        "Huberman-Spiegelglas, Kulikov, Michaeli, An Edit Friendly DDPM Noise Space, CVPR 2024, Sec. 3",
    ),
)  # fmt: skip
ENCODERS.add(
    "cyclediffusion",
    Encoder(
        "cyclediffusion", _posterior_chain, 0.1,
        "Wu & De la Torre, A Latent Space of Stochastic Diffusion Models for Zero-Shot Image Editing and Guidance "
        "(CycleDiffusion), ICCV 2023, Sec. 3 (DPM-Encoder)",
    ),
)  # fmt: skip
ENCODERS.add(
    "ddim-inversion",
    Encoder("ddim-inversion", None, 0.0, "Song et al., DDIM, ICLR 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F"),
)


@dataclasses.dataclass
class Inversion:
    """Images placed in a model's noise space by :func:`invert`.

    ``states[i]`` is the sampler's state at ``sigmas[i]`` before step ``i`` (model space, VE form ``x0 + sigma n``);
    the stochastic methods also hold ``step_noise[i]`` (the standard normal noise step ``i`` adds) and
    ``final_correction`` (added after the last step, onto sigma = 0, which adds no noise). ``source`` are the images
    in model space, ``labels`` their classes (None for an unconditional model or a pipeline).
    """

    method: str
    sigmas: Tensor  # [N + 1] float64, descending, ends at 0
    states: Tensor  # [N, B, ...]
    step_noise: Tensor | None  # [N, B, ...]
    final_correction: Tensor | None  # [B, ...]
    eta: float
    source: Tensor  # [B, ...]
    labels: Tensor | None
    guidance: float
    model: str
    fingerprint: str
    nfe: int
    seconds: float

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def _check_images(model: LoadedModel, images: Tensor) -> None:
    expected = tuple(model.pixel_shape)
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got {type(images).__name__}"
                        f"{'' if not isinstance(images, Tensor) else ' of ' + str(images.dtype)}")  # fmt: skip
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{model.info.name} takes images of shape [N, {', '.join(map(str, expected))}]; got {tuple(images.shape)}"
        )
    if images.shape[0] < 1:
        raise ValueError("images is empty")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinity")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images must lie in [0, 1]; got values in [{low:g}, {high:g}] (scale uint8 images by 1/255)")


def _check_labels(model: LoadedModel, labels: Any, n: int, what: str) -> Tensor | None:
    classes = model.info.num_classes
    if not classes:
        if labels is not None:
            raise ValueError(f"{model.info.name} is not class-conditional; drop {what}")
        return None
    if labels is None:
        raise ValueError(f"{model.info.name} is class-conditional ({classes} classes): {what} are needed")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"{what}: {labels.numel()} labels for {n} images")
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        raise ValueError(f"{what}: label {int(bad[0])} is outside {model.info.name}'s classes 0..{classes - 1}")
    return labels


def _batches(n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _draws(seed: int, rows: range, steps: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``[steps, len(rows), ...]`` standard normal draws, each image's from its own seeded generator (hasten.seeds)."""
    generators = [torch.Generator().manual_seed(row_seed(seed, j, "inversion")) for j in rows]
    per_image = [torch.randn((steps, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.stack(per_image, dim=1)


def _cond(model: LoadedModel, labels: Tensor | None, rows: range, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in model.conditioning(labels, rows).items()}


@torch.no_grad()
def invert(
    model: LoadedModel,
    images: Tensor,
    *,
    labels: Any = None,
    method: str = "ddpm-inversion",
    steps: int = 50,
    schedule: str = "auto",
    eta: float | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Inversion:
    """Place ``images`` (``[N, C, H, W]`` in [0, 1]) in ``model``'s noise space; see :mod:`hasten.editing`.

    Args:
        labels: The images' classes (one per image, or one for all); needed by a class-conditional model.
        method: A name in :data:`ENCODERS`: ``ddpm-inversion`` (default), ``cyclediffusion``, ``ddim-inversion``.
        steps, schedule: The sampler's grid (``get_sigmas(schedule, steps, model.schedule)``; it ends at 0).
        eta: The ancestral sampler's noise fraction, > 0 for the stochastic methods (default 1 for DDPM
            inversion, 0.1 for CycleDiffusion, the papers' settings); not taken by ``ddim-inversion``.
        guidance: Classifier-free guidance while encoding (default: the model's own default).
        seed: Seeds each image's draws from its index (the same image index gets the same draws in any batch).

    The stochastic methods cost one network call per step and replay exactly; ``ddim-inversion`` costs one call
    per step and replays only approximately.
    """
    encoder = ENCODERS.get(method)
    _check_images(model, images)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if encoder.stochastic:
        eta = encoder.default_eta if eta is None else float(eta)
        if not eta > 0 or not math.isfinite(eta):
            raise ValueError(f"{method} needs eta > 0 (its noise carries the image; at eta = 0 there is none), "
                             f"got {eta}")  # fmt: skip
    elif eta not in (None, 0, 0.0):
        raise ValueError(f"ddim-inversion is deterministic and takes no eta (got {eta}); use ddpm-inversion or "
                         "cyclediffusion for a stochastic sampler")  # fmt: skip
    else:
        eta = 0.0
    n = images.shape[0]
    labels = _check_labels(model, labels, n, "labels")
    guidance = model.default_guidance if guidance is None else float(guidance)
    sigmas = get_sigmas(schedule, steps, model.schedule)
    grid = tuple(sigmas.tolist())
    if grid[-1] != 0.0:
        raise ValueError(f"an inversion needs a grid that ends at sigma = 0 (the image); {schedule!r} ends at "
                         f"{grid[-1]:g}")  # fmt: skip
    denoiser = guided_denoiser(model, guidance)
    device = model.device
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    parts: dict[str, list[Tensor]] = {"source": [], "states": [], "noise": [], "final": []}
    nfe = 0
    start = time.perf_counter()
    for rows in _batches(n, batch_size):
        # one memory layout for recording and replay: a convolution's rounding depends on it (a VAE's latents may
        # come channels-last), and the replay must repeat the recording bit for bit
        x0 = model.from_images(images[rows.start : rows.stop]).to(device=device, dtype=dtype).contiguous()
        cond = _cond(model, None if labels is None else labels[rows.start : rows.stop], rows, device)
        if encoder.stochastic:
            draws = _draws(seed, rows, steps, tuple(x0.shape[1:]), dtype).to(device)
            targets = encoder.states(x0, grid, eta, draws)
            states, noise, final, calls = _record_noise(denoiser, x0, grid, eta, targets, cond)
            parts["noise"].append(noise.cpu())
            parts["final"].append(final.cpu())
        else:
            states, calls = _ddim_states(denoiser, x0, grid, cond)
        parts["source"].append(x0.cpu())
        parts["states"].append(states.cpu())
        nfe = max(nfe, calls)
    seconds = time.perf_counter() - start
    return Inversion(
        method=encoder.name, sigmas=sigmas, states=torch.cat(parts["states"], dim=1),
        step_noise=torch.cat(parts["noise"], dim=1) if encoder.stochastic else None,
        final_correction=torch.cat(parts["final"]) if encoder.stochastic else None, eta=eta,
        source=torch.cat(parts["source"]), labels=labels, guidance=guidance, model=model.info.name,
        fingerprint=model.fingerprint, nfe=nfe, seconds=seconds,
    )  # fmt: skip


def _record_noise(
    denoiser: Callable[..., Tensor], x0: Tensor, grid: tuple[float, ...], eta: float, targets: Tensor,
    cond: dict[str, Tensor],
) -> tuple[Tensor, Tensor, Tensor, int]:  # fmt: skip
    """Run the ancestral sampler through ``targets`` and record the noise that lands each step on the next one.

    The sampler runs with zero noise, so after step ``i`` it holds its mean ``mu_i``; the callback sets
    ``z_i = (target - mu_i) / sigma_up`` and continues from ``mu_i + z_i sigma_up``, the very expression the
    sampler evaluates when it replays ``z_i``: the replay under the same condition repeats the run bit for bit. The
    last step (onto 0, no noise) records the correction ``x0 - mu``. Returns ``(states, noise, correction, NFE)``.
    """
    steps = len(grid) - 1
    states, noise = [targets[0]], []
    final: list[Tensor] = []

    def land(i: int, sigma_next: float, mu: Tensor) -> Tensor:
        target = targets[i + 1] if i + 1 < steps else x0
        _, sigma_up = ancestral_levels(grid[i], grid[i + 1], eta)
        if sigma_up > 0:
            z = (target - mu) / sigma_up
            noise.append(z)
            landed = mu + z * sigma_up
        else:  # the step onto sigma = 0
            noise.append(torch.zeros_like(mu))
            final.append(target - mu)
            landed = mu + final[-1]
        if i + 1 < steps:
            states.append(landed)
        return landed

    zeros = torch.zeros((steps, *targets.shape[1:]), dtype=targets.dtype, device=targets.device)
    out = sample(denoiser, targets[0], grid, EulerAncestral(eta=eta), cond=cond, step_noise=zeros, callback=land,
                 return_info=True)  # fmt: skip
    return torch.stack(states), torch.stack(noise), final[0], out.nfe


def _ddim_states(
    denoiser: Callable[..., Tensor], x0: Tensor, grid: tuple[float, ...], cond: dict[str, Tensor]
) -> tuple[Tensor, int]:
    """DDIM inversion: the DDIM (Euler) ODE step run upwards, from the image at sigma = 0 to ``grid[0]``.

    Each step is explicit Euler from the state it starts at, ``y_i = y_{i+1} + (sigma_i - sigma_{i+1})
    eps(y_{i+1}, sigma_{i+1})``, the exact reverse of a DDIM step in the limit; the image itself has no level above
    0, so the first step takes its noise estimate at the grid's lowest level. (diffusers' DDIMInverseScheduler and
    null-text inversion take it at the level the step moves to, from the state below: on a flow model, whose top
    level is ~1e4, that feeds the network a state 50x off its level and the inversion does not converge.) It walks
    the grid upwards, which no solver of :func:`hasten.sample` does, hence its own loop. Returns ``(states, NFE)``.
    """
    y = x0
    states = []
    for i in range(len(grid) - 2, -1, -1):
        sigma, below = grid[i], grid[i + 1]
        at = below if below > 0 else grid[-2]
        level = torch.full((y.shape[0],), at, dtype=y.dtype, device=y.device)
        denoised = denoiser(y, level, **cond).to(y.dtype)
        y = y + (sigma - below) * ((y - denoised) / at)
        states.append(y)
    return torch.stack(states[::-1]), len(grid) - 1


@torch.no_grad()
def edit(
    model: LoadedModel,
    source: Inversion | Tensor,
    *,
    to_label: Any = None,
    skip: int = 0,
    guidance: float | None = None,
    batch_size: int = 256,
    **invert_options: Any,
) -> Generation:
    """Sample ``source``'s noise (an :class:`Inversion`, or images to invert first) under ``model``'s condition.

    Args:
        model: The model the inversion was made with (its network: refused otherwise), carrying the target
            condition: for a class-conditional model ``to_label``; for a pipeline model, the target prompt it was
            made with (``hasten.from_pipeline(pipe, prompt=...)`` on the same pipeline).
        source: An :class:`Inversion`, or images ``[N, C, H, W]`` in [0, 1]: they are inverted first, with ``model``
            and ``invert_options`` (``labels``, ``method``, ``steps``, ``schedule``, ``eta``, ``seed``, and
            ``source_guidance`` for the encoding's guidance), and the edit replays that inversion. A pipeline
            model's condition is its prompt, so a prompt-to-prompt edit inverts with the source prompt's model first
            (``hasten.invert(source_model, images)``) and passes that inversion with the target prompt's model.
        to_label: The target class (one for all, or one per image); default: the source labels (reconstruction).
        skip: Start ``skip`` steps into the grid, from the inversion's state there (the edit-friendly paper's
            ``T_skip``, CycleDiffusion's early start): larger keeps more of the source.
        guidance: Classifier-free guidance while editing (default: the model's own default).

    Returns a :class:`hasten.Generation` (``images01``, ``labels`` = the target labels, ``nfe``, ``seconds``).
    """
    if isinstance(source, Inversion):
        if invert_options:
            raise TypeError(f"{', '.join(sorted(invert_options))} belong to the inversion; pass images to invert "
                            "with them, or an Inversion without them")  # fmt: skip
        inversion = source
    else:
        known = {"labels", "method", "steps", "schedule", "eta", "seed", "source_guidance"}
        unknown = sorted(set(invert_options) - known)
        if unknown:
            raise TypeError(f"edit() got unexpected options {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        options = dict(invert_options)
        source_guidance = options.pop("source_guidance", None)
        inversion = invert(model, source, guidance=source_guidance, batch_size=batch_size, **options)
    if model.fingerprint != inversion.fingerprint:
        raise ValueError(
            f"this inversion was made with other weights ({inversion.model}, {inversion.fingerprint}); "
            f"{model.info.name} ({model.fingerprint}) cannot replay it: edit with the same network"
        )
    if not isinstance(skip, int) or not 0 <= skip < inversion.steps:
        raise ValueError(f"skip must be an integer in [0, {inversion.steps - 1}] (the inversion has {inversion.steps} "
                         f"steps), got {skip!r}")  # fmt: skip
    n = len(inversion)
    if to_label is None and inversion.labels is not None:
        labels = inversion.labels
    else:
        labels = _check_labels(model, to_label, n, "to_label")
    guidance = model.default_guidance if guidance is None else float(guidance)
    denoiser = guided_denoiser(model, guidance)
    device = model.device
    grid = tuple(inversion.sigmas.tolist())[skip:]
    outputs, nfe = [], 0
    start = time.perf_counter()
    for rows in _batches(n, batch_size):
        x = inversion.states[skip, rows.start : rows.stop].to(device).contiguous()
        cond = _cond(model, None if labels is None else labels[rows.start : rows.stop], rows, device)
        if inversion.step_noise is None:
            out = sample(denoiser, x, grid, EulerAncestral(eta=0.0), cond=cond, return_info=True)
        else:
            correction = inversion.final_correction[rows.start : rows.stop].to(device)

            def correct(i: int, sigma_next: float, x: Tensor, correction: Tensor = correction) -> Tensor | None:
                return x + correction if i == len(grid) - 2 else None  # after the step onto sigma = 0

            noise = inversion.step_noise[skip:, rows.start : rows.stop].to(device)
            out = sample(denoiser, x, grid, EulerAncestral(eta=inversion.eta), cond=cond, step_noise=noise,
                         callback=correct, return_info=True)  # fmt: skip
        outputs.append(out.x)
        nfe = max(nfe, out.nfe)
    seconds = time.perf_counter() - start
    samples = torch.cat(outputs).cpu()
    return Generation(model.to_images(samples).cpu(), labels, nfe, seconds, list(grid), None, samples)

"""The arithmetic of post-training quantisation: ranges found by error search, rounding, 4-bit packing.

Weights are quantised per output channel and symmetric (zero point 0, as the int8 kernels want):
``w_q = clamp(round(w / s), qmin, qmax)``, ``s = c * max|w| / qmax`` with the clip ratio ``c`` chosen per
channel to minimise the Lp error (p = 2.4, Q-Diffusion's setting; clipping a few outliers usually lowers
the error of all the other weights). Activations are quantised per tensor and asymmetric to unsigned 8
bits, ``x_q = clamp(round(x / s) + z, 0, 255)``, with both ends of the range searched the same way on a
sample of the layer's calibration inputs. AdaRound learns, per weight, whether to round up or down.

Reference: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020
(AdaRound); Li et al., "Q-Diffusion: Quantizing Diffusion Models", ICCV 2023 (Lp range search, p = 2.4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LP_NORM",
    "act_qparams",
    "act_range_search",
    "adaround",
    "fake_quant_act",
    "pack_int4",
    "quantize_weight",
    "sqnr_db",
    "unpack_int4",
    "weight_qrange",
]

LP_NORM = 2.4
CLIP_RATIOS = torch.linspace(0.3, 1.0, 36)  # candidate fractions of the observed range


def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit weight: (-2^(b-1), 2^(b-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _per_channel_error(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    qmin, qmax = weight_qrange(bits)
    deq = torch.clamp(torch.round(w / scale[:, None]), qmin, qmax) * scale[:, None]
    return (deq - w).abs().pow(LP_NORM).sum(dim=1)


def quantize_weight(w: Tensor, bits: int, *, search: bool = True) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric quantisation of ``w`` (any shape, channel dim 0).

    Returns ``(w_int, scale)``: int8 values in the signed ``bits``-bit range, and float32 scales of shape
    ``[out_channels]``; ``w ~ w_int * scale``. ``search=False`` uses the full range (min-max).
    """
    flat = w.detach().float().reshape(w.shape[0], -1)
    _, qmax = weight_qrange(bits)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-8)
    best_scale = absmax / qmax
    if search:
        best_err = _per_channel_error(flat, best_scale, bits)
        for ratio in CLIP_RATIOS.tolist():
            scale = absmax * ratio / qmax
            err = _per_channel_error(flat, scale, bits)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    qmin, qmax = weight_qrange(bits)
    w_int = torch.clamp(torch.round(flat / best_scale[:, None]), qmin, qmax).to(torch.int8)
    return w_int.reshape(w.shape), best_scale.float()


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an unsigned 8-bit grid covering ``[lo, hi]`` (widened to contain 0, so that
    zero padding and ReLU zeros are exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zero_point = int(min(max(round(-lo / scale), 0), 255))
    return float(scale), zero_point


def fake_quant_act(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """Quantise and dequantise ``x`` on the uint8 grid (the same rounding as ``torch.quantize_per_tensor``)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


# per end of the activation range, 1% to 100% (denser near 100%, where 8-bit optima lie): 400 candidates
ACT_CLIP_RATIOS = torch.cat([torch.logspace(-2, math.log10(0.5), 8), torch.linspace(0.55, 1.0, 12)])
ACT_SAMPLE, ACT_TAIL = 8192, 512  # values the range search evaluates: a random sample plus every tail value


def _weighted_sample(x: Tensor) -> tuple[Tensor, Tensor]:
    """Values and weights standing in for all of ``x``: the ``ACT_TAIL`` largest and smallest values exactly
    (outliers decide the clipping) and a uniform sample of the rest, weighted to its share."""
    n = x.numel()
    if n <= ACT_SAMPLE + 2 * ACT_TAIL:
        return x, torch.ones_like(x)
    top, bottom = torch.topk(x, ACT_TAIL).values, -torch.topk(-x, ACT_TAIL).values
    middle = x[(x < top[-1]) & (x > bottom[-1])]
    gen = torch.Generator().manual_seed(0)
    picked = middle[torch.randint(0, middle.numel(), (ACT_SAMPLE,), generator=gen)] if middle.numel() else middle
    share = middle.numel() / max(picked.numel(), 1)
    weights = torch.cat([torch.ones(2 * ACT_TAIL), torch.full((picked.numel(),), share)])
    return torch.cat([top, bottom, picked]), weights


def act_range_search(sample: Tensor, *, search: bool = True) -> tuple[float, int]:
    """Per-tensor uint8 parameters for activations like ``sample`` (values of a layer's inputs).

    Searches clip ratios (1% to 100%) of both ends of the observed range independently for the least Lp
    error, all candidates at once, on a weighted sample that keeps every tail value; ``search=False`` is
    plain min-max.
    """
    sample = sample.detach().float().flatten().cpu()  # a few thousand values: the search runs on the CPU
    lo, hi = min(float(sample.min()), 0.0), max(float(sample.max()), 0.0)
    if not search or hi - lo < 1e-8:
        return act_qparams(lo, hi)
    values, weights = _weighted_sample(sample)
    ratios = ACT_CLIP_RATIOS
    los = (lo * ratios[:, None]).expand(len(ratios), len(ratios)).flatten()
    his = (hi * ratios[None, :]).expand(len(ratios), len(ratios)).flatten()
    scales = ((his - los) / 255.0).clamp_min(1e-8)
    zeros = torch.clamp(torch.round(-los / scales), 0, 255)
    q = torch.clamp(torch.round(values[None, :] / scales[:, None]) + zeros[:, None], 0, 255)
    err = (((q - zeros[:, None]) * scales[:, None] - values[None, :]).abs().pow(LP_NORM) * weights[None, :]).sum(1)
    best = int(torch.argmin(err))
    return act_qparams(float(los[best]), float(his[best]))


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(signal / noise))


def pack_int4(values: Tensor) -> Tensor:
    """Signed 4-bit values (int8 tensor in [-8, 7]) -> uint8, two per byte (low nibble first), flattened."""
    flat = values.flatten().to(torch.int16) + 8
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 tensor of ``shape``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (count + 1) // 2:
        raise ValueError(
            f"packed 4-bit data for shape {tuple(shape)} must be {(count + 1) // 2} uint8 bytes, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    p = packed.to(torch.int16)
    both = torch.stack([p & 0x0F, p >> 4], dim=1).flatten()[:count]
    return (both - 8).to(torch.int8).reshape(shape)


# AdaRound's rectified sigmoid stretch (zeta, gamma) and regulariser (lambda, beta from 20 to 2).
ZETA, GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround(
    w: Tensor,
    scale: Tensor,
    bits: int,
    forward,
    inputs: Tensor,
    targets: Tensor,
    *,
    iters: int = 300,
    batch_size: int = 32,
    reg: float = 0.01,
    warmup: float = 0.2,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Learn up/down rounding of ``w`` (channel dim 0, fixed per-channel ``scale``) so that
    ``forward(x, w_q)`` matches ``targets`` on ``inputs``; returns the int8 values.

    ``h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1)`` starts at the fractional part of ``w / s``;
    the loss is the output squared error (summed per sample, averaged over the batch) plus
    ``reg * sum(1 - |2h - 1|^beta)`` (after a warm-up without it, beta
    annealed 20 -> 2) which pushes every h to 0 or 1; the result rounds at ``h >= 0.5``.

    Reference: Nagel et al., ICML 2020, eqs. 21-24.
    """
    qmin, qmax = weight_qrange(bits)
    shape = [-1] + [1] * (w.dim() - 1)
    s = scale.reshape(shape)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)  # h(v) = rest
    optimiser = torch.optim.Adam([v], lr=lr)
    count = inputs.shape[0]
    for it in range(iters):
        idx = torch.randint(0, count, (min(batch_size, count),), generator=generator)
        h = _rectified_sigmoid(v)
        w_q = torch.clamp(w_floor + h, qmin, qmax) * s
        loss = (forward(inputs[idx], w_q) - targets[idx]).pow(2).flatten(1).sum(1).mean()
        progress = it / max(iters - 1, 1)
        if progress >= warmup:
            beta = 20 + (2 - 20) * (progress - warmup) / (1 - warmup)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        hard = (_rectified_sigmoid(v) >= 0.5).float()
        return torch.clamp(w_floor + hard, qmin, qmax).to(torch.int8)

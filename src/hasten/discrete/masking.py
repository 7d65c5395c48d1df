"""The masking process and the MDLM objective.

Forward process: every token independently becomes MASK with probability ``move_t``; with the log-linear noise
``sigma(t) = -log(1 - (1 - eps) t)`` that probability is ``move_t = 1 - exp(-sigma(t)) = (1 - eps) t``, so
``alpha_t = 1 - (1 - eps) t`` is the chance a token is still itself (``alpha_0 = 1``, ``alpha_1 = eps``).

Objective (continuous time, SUBS parameterisation: the MASK logit is never predicted and unmasked positions are
carried over, so they cost nothing)::

    L = E_t [ dsigma/dt / expm1(sigma(t)) * sum_{l masked in x_t} -log p_theta(x0^l | x_t) ]

and for the log-linear noise ``dsigma/dt / expm1(sigma) = (1 - eps) / ((1 - eps) t) = 1 / t``: a masked-LM loss
weighted by ``1 / t``.

Reference: Sahoo et al., "Simple and Effective Masked Diffusion Language Models" (MDLM), NeurIPS 2024, Sec. 3
(Eq. 10-11); kuleshov-group/mdlm ``diffusion.py`` (``_subs_parameterization``, log-linear noise).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config

__all__ = ["LogLinearMask", "mdlm_loss"]


@dataclasses.dataclass(frozen=True)
class LogLinearMask(Config):
    """``alpha_t = 1 - (1 - eps) t``: the probability that a token is unmasked at time ``t`` in [0, 1]."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")

    def alpha(self, t: float | Tensor) -> float | Tensor:
        return 1 - (1 - self.eps) * t

    def sigma(self, t: float | Tensor) -> float | Tensor:
        """The log-linear noise ``-log(1 - (1 - eps) t)``."""
        if isinstance(t, Tensor):
            return -torch.log1p(-(1 - self.eps) * t)
        return -math.log1p(-(1 - self.eps) * t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """``dsigma/dt / expm1(sigma(t))``, which is ``1 / t`` for this noise."""
        return (1 - self.eps) / (1 - (1 - self.eps) * t) / torch.expm1(self.sigma(t))

    def mask(self, x0: Tensor, t: Tensor, mask_id: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_t``: each token of ``x0`` (``[B, L]``) replaced by ``mask_id`` with probability ``1 - alpha_t``
        (``t`` is ``[B]``)."""
        move = (1 - self.alpha(t)).to(torch.float64).view(-1, *([1] * (x0.ndim - 1)))
        draw = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
        return torch.where(draw < move, torch.full_like(x0, mask_id), x0)


def mdlm_loss(logits: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, mask_id: int, schedule: LogLinearMask) -> Tensor:
    """The MDLM loss per sequence (``[B]``): ``weight(t) * sum over masked positions of -log p(x0 | x_t)``.

    ``logits`` ``[B, L, V]`` over the clean values (no MASK class); unmasked positions are carried over by the SUBS
    parameterisation, so they add nothing."""
    if logits.shape[:2] != x0.shape or logits.shape[-1] != mask_id:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit tokens {tuple(x0.shape)} with MASK = {mask_id} "
                         f"(logits need [B, L, V] with V = the MASK id)")  # fmt: skip
    nll = F.cross_entropy(logits.transpose(1, 2).float(), x0, reduction="none")  # [B, L]
    masked = (x_t == mask_id).to(nll.dtype)
    return schedule.loss_weight(t.to(nll.dtype)) * (nll * masked).sum(dim=1)

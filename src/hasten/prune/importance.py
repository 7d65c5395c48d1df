"""What to prune: importance measured on the diffusion objective (channels) or on the model's own samples (blocks).

* :func:`taylor_gradients` (Diff-Pruning): one batch of training images and one fixed noise; the diffusion loss
  at each level of the model's grid, from the cleanest up, is back-propagated and the gradients accumulate,
  until a level's loss falls below ``threshold`` times the largest so far (the noisy levels, whose loss is
  small, say little about the details pruning damages). Torch-Pruning's Taylor importance then scores a
  channel by ``sum |w * g|`` over its weights (``multivariable=False``, Diff-Pruning's choice).
* :func:`block_scores` (LD-Pruner, task-agnostic): each block in turn is replaced by the identity and the model
  samples a fixed batch from fixed noise; the block's score is how far the samples' per-pixel mean and standard
  deviation move, ``|mean(Z) - mean(Z_o)| + |std(Z) - std(Z_o)|``. No feature network or metric is involved.

The Taylor loss is hasten's VE-form x0 error with the per-level weight of the network's own training loss
(``1 / sigma^2``, the noise loss, for noise-predicting networks; ``max(1, 1 / sigma^2)`` otherwise), so one
implementation serves eps, v and flow networks.

Reference: Fang, Ma & Wang, "Structural Pruning for Diffusion Models", NeurIPS 2023 (Sec. 3.2; the loop in
VainF/Diff-Pruning ``ddpm_prune.py``); Castells et al., "LD-Pruner: Efficient Pruning of Latent Diffusion Models
using Task-Agnostic Insights", CVPR-W 2024 (Sec. 3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..distill.guidance import weighted_x0_loss
from ..hooks import add_hook, remove_hooks
from ..models.zoo import LoadedModel, make_denoiser
from ..schedules.grids import get_sigmas

__all__ = ["block_scores", "channel_importance", "objective_weighting", "taylor_gradients"]

SKIP_HOOK = "hasten.prune/identity"


def objective_weighting(objective: str) -> str:
    """The x0-error weighting of the Taylor importance: the network's own training loss (the noise loss for eps
    networks, Diff-Pruning's; truncated SNR otherwise)."""
    return "snr" if objective == "eps" else "snr_trunc"


def channel_importance(name: str) -> Any:
    """The Torch-Pruning importance of a channel group: ``taylor``, ``sum |w * g|`` over the weights of every layer
    the channel touches (the gradients from :func:`taylor_gradients`), or ``magnitude``, the weights' L2 norm.
    Summed over layers and not normalised, so a score is the hand-computable sum; a uniform ratio ranks channels
    within each group, where a normaliser would not change the order."""
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance(multivariable=False, group_reduction="sum", normalizer=None)
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    raise ValueError(f"channel importance must be 'taylor' or 'magnitude', got {name!r}")


def taylor_gradients(
    network: nn.Module,
    model: LoadedModel,
    x0: Tensor,
    labels: Tensor | None,
    *,
    levels: int = 32,
    threshold: float = 0.05,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Accumulate the diffusion loss's gradients in ``network``'s parameters (``.grad``), levels ascending from
    the cleanest; returns the levels used and their losses. ``threshold`` 0 uses every level, 1 the first only."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the Taylor threshold must be in [0, 1], got {threshold}")
    sigmas = get_sigmas("auto", levels, model.schedule).flip(0)
    sigmas = sigmas[sigmas > 0].tolist()
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    denoiser = make_denoiser(network, model.info)
    weighting = objective_weighting(model.info.objective)
    cond = {} if labels is None else {"class_labels": labels}
    was_training = network.training
    network.eval().requires_grad_(True)
    network.zero_grad(set_to_none=True)
    used, losses, largest = [], [], 0.0
    try:
        for sigma in sigmas:
            level = torch.full((x0.shape[0],), float(sigma), device=x0.device)
            loss = weighted_x0_loss(denoiser(x0 + sigma * noise, level, **cond), x0, level, weighting)
            loss.backward()
            value = float(loss.detach())
            used.append(sigma)
            losses.append(value)
            largest = max(largest, value)
            if value <= threshold * largest:  # 1: the cleanest level only; 0: every level
                break
    finally:
        network.train(was_training)
    return {"levels": used, "losses": losses}


def _identity(forward: Any, *args: Any, **kwargs: Any) -> Any:
    """A block's stand-in: its hidden-state input, unchanged."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def block_scores(model: LoadedModel, *, n: int = 32, steps: int = 10, seed: int = 0) -> list[float]:
    """LD-Pruner's score of each transformer block of ``model``'s network: how much the samples' statistics move
    when that block alone is skipped (same noise, same sampler); lower means safer to remove."""
    from ..generate import generate

    blocks = getattr(model.network, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"block scores need a transformer_blocks list; {type(model.network).__name__} has none")

    def samples() -> Tensor:
        out = generate(model, n, steps=steps, seed=seed, guidance=1.0)
        return out.samples if out.samples is not None else out.images01

    reference = samples().flatten(1).double()
    mean, std = reference.mean(0), reference.std(0)
    scores = []
    for block in blocks:
        handle = add_hook(block, SKIP_HOOK, _identity)
        try:
            z = samples().flatten(1).double()
        finally:
            remove_hooks([handle])
        scores.append(float((z.mean(0) - mean).norm() + (z.std(0) - std).norm()))
    return scores

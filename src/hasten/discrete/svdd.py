"""Discrete SVDD: derivative-free reward steering of a masked diffusion sampler by soft value-based decoding.

At every event of a base sampler (an ``ancestral`` step, a ``first_hitting`` call) the sampler's own transition is
drawn ``K`` times from the same state, giving ``K`` candidate next states; each is valued by the reward of a one-shot
completion of it, and one is kept per sequence: the best (``alpha = 0``) or one drawn with weights
``softmax(v / alpha)`` (``alpha > 0``; ``alpha = inf`` draws uniformly, so the law is the base sampler's)::

    x^(k) ~ q(. | x),  k = 1..K                         (the base sampler's move, K draws from one network call)
    v^(k) = r(images(complete(x^(k))))                  complete: every MASK of x^(k) filled from p_theta(. | x^(k))
    keep  x^(k*),  k* = argmax_k v^(k)  or  k* ~ softmax(v / alpha)

``completion="argmax"`` fills each MASK with its most likely value, which is what the official discrete code does
(``_ddpm_update_finetune_controlled_twedie``: the argmax of ``p_theta(x0 | x_{t-1})``, unmasked tokens kept; the
posterior-mean value SVDD-PM of the paper); ``"sample"`` draws them instead (one Monte-Carlo draw of ``x0``).

Cost, counted per sequence: valuing a candidate is one network call on it, unless it is finished (nothing to fill)
or unchanged (the network is time-agnostic: its logits are the ones already in hand). The kept candidate's logits
are exactly what the next event starts from, so they are reused, and no event re-evaluates: with every candidate
changed, a run of ``E`` events makes ``1 + K (E - 1)`` calls (the last event's candidates are finished). ``K = 1``
values nothing and is the base sampler bit for bit (same draws from the same generators, same calls).

Randomness: candidate ``k`` is the base move drawn ``k``-th from the sequence's generator (candidate 1 is the base
sampler's own draw); the soft choice's Gumbel variables are drawn at the event's start (only for ``alpha > 0``).

Reference: Li et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft Value-Based
Decoding", 2024, Alg. 1 (SVDD-PM) and Sec. 6 (masked diffusion for DNA/RNA); the official code
(masa-ue/SVDD) selects by argmax (alpha = 0). The continuous twin is :mod:`hasten.solvers.svdd`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .sampling import (
    DISCRETE_SAMPLERS,
    AncestralSampler,
    DiscreteSample,
    DiscreteSampler,
    FirstHittingSampler,
    MaskedModel,
    Randomness,
    _evaluate,
    categorical,
    get_discrete_sampler,
    uniform,
)

__all__ = ["COMPLETIONS", "DiscreteSVDD"]

COMPLETIONS = ("argmax", "sample")


def _base_sampler(base: Any) -> DiscreteSampler:
    """A configured base sampler from a name, a configured sampler, ``{"name": ..., **options}`` or ``to_dict()``."""
    if isinstance(base, DiscreteSampler):
        return base
    if isinstance(base, str):
        return get_discrete_sampler(base)
    if isinstance(base, Mapping):
        options = dict(base)
        if "_type" in options:
            return DiscreteSampler.from_dict(options)
        if "name" in options:
            return get_discrete_sampler(options.pop("name"), **options)
    raise ValueError(f"base must be a discrete sampler name ({', '.join(DISCRETE_SAMPLERS.names())}), a configured "
                     f"sampler or {{'name': ..., **options}}; got {base!r}")  # fmt: skip


@DISCRETE_SAMPLERS.register("svdd")
@dataclasses.dataclass(frozen=True)
class DiscreteSVDD(DiscreteSampler):
    """Soft value-based decoding around a masked-diffusion sampler: ``particles`` candidate moves per event.

    Args:
        base: The sampler whose transition is drawn (``"first_hitting"``, ``"ancestral"``, a configured one, or
            ``{"name": "first_hitting", "calls": 32}``).
        reward: A reward on images (``"class:3"``, ``"symmetry"``, any callable ``images01 -> [N]``:
            :func:`hasten.rewards.get_reward`); every value is checked (NaN refused).
        particles: Candidates per event, ``K >= 1``; 1 is the base sampler.
        alpha: 0 keeps the best candidate; ``alpha > 0`` draws one with weights ``softmax(v / alpha)``.
        completion: How a candidate's remaining MASKs are filled to value it: ``"argmax"`` (the official code's
            choice) or ``"sample"`` (one draw from ``p_theta``, in ``categorical_dtype``; the base sampler's moves
            use its own).
        images: ``tokens [N, L] -> images [N, C, H, W]`` in [0, 1]; :func:`~hasten.discrete.generate_masked` binds
            the loaded model's (``bind``). Not plain data, nor is a callable reward: such a sampler is built per
            run, not written into recipes.

    Reference: Li et al., SVDD, 2024, Alg. 1 (SVDD-PM); masa-ue/SVDD (argmax selection).
    """

    base: Any = "first_hitting"
    reward: Any = None
    particles: int = 4
    alpha: float = 0.0
    completion: str = "argmax"
    images: Callable[[Tensor], Tensor] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        base = _base_sampler(self.base)
        if not isinstance(base, AncestralSampler | FirstHittingSampler):
            raise ValueError(f"discrete SVDD draws candidates from an ancestral or first_hitting sampler's move; "
                             f"got {type(base).__name__}")  # fmt: skip
        object.__setattr__(self, "base", base)
        if self.reward is None:
            raise ValueError("discrete SVDD needs a reward (a registered name such as 'class:3', or a callable)")
        if not (isinstance(self.reward, str) or callable(self.reward)):
            raise TypeError(f"reward must be a registered name or a callable, got {type(self.reward).__name__}")
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"particles must be an integer >= 1, got {self.particles!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, int | float) and self.alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0 (0: keep the best candidate), got {self.alpha!r}")
        if self.completion not in COMPLETIONS:
            raise ValueError(f"completion must be one of {', '.join(COMPLETIONS)}, got {self.completion!r}")

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.reward, str):
            raise TypeError("this SVDD sampler holds a reward function, which is not plain data; record its name")
        data = super().to_dict()
        data.pop("images")
        return data

    def bind(self, model: Any) -> DiscreteSVDD:
        return dataclasses.replace(self, images=model.to_images)

    def check_length(self, length: int) -> None:
        self.base.check_length(length)

    def run(self, model: MaskedModel, x: Tensor, mask_id: int, generator: Randomness) -> DiscreteSample:
        from ..rewards import get_reward

        if self.images is None:
            raise ValueError(
                "discrete SVDD values candidates by the reward of their images and has no tokens-to-images map: run "
                "it through generate_masked (which binds the model's) or give images="
            )
        self.check_length(x.shape[1])
        reward = get_reward(self.reward)
        base: Any = self.base
        calls = torch.zeros(x.shape[0], dtype=torch.long)
        logits = torch.zeros((*x.shape, mask_id), dtype=torch.float64, device=x.device)
        stale = torch.ones(x.shape[0], dtype=torch.bool)
        event = 0
        # the events of the base sampler: which rows move, and the move; the loop is the base's own
        while bool((x == mask_id).any()) and (not isinstance(base, AncestralSampler) or event < base.steps):
            if isinstance(base, AncestralSampler):
                rows = torch.arange(x.shape[0])  # every row draws at every step, as the plain sampler does

                def move(cur: Tensor, lg: Tensor, rows: Tensor, i: int = event) -> Tensor:
                    return base.move(lg, cur, i, generator)
            else:
                rows = (x == mask_id).any(dim=1).nonzero().flatten()
                per_call = base.per_call(x.shape[1])

                def move(cur: Tensor, lg: Tensor, rows: Tensor, per_call: int = per_call) -> Tensor:
                    return base.move(lg, cur, per_call, generator, rows)

            need = rows[stale[rows] & (x[rows] == mask_id).any(dim=1)]
            if len(need):
                fresh = _evaluate(model, x[need], need, mask_id)
                logits = logits.to(fresh.dtype).index_copy(0, need, fresh)
                calls[need] += 1
            chosen, chosen_logits, spent = self._choose(model, move, x[rows], logits[rows], rows, mask_id, reward,
                                                        generator)  # fmt: skip
            calls[rows] += spent
            if chosen_logits is None:  # K = 1: the plain sampler's bookkeeping
                stale[rows] = (chosen != x[rows]).any(dim=1) & (chosen == mask_id).any(dim=1)
            else:  # the kept candidate's logits are in hand (evaluated, or unchanged): nothing is stale
                logits = logits.to(chosen_logits.dtype).index_copy(0, rows, chosen_logits)
                stale[rows] = False
            x = x.clone()
            x[rows] = chosen
            event += 1
        return DiscreteSample(x, calls)

    def _choose(
        self,
        model: MaskedModel,
        move: Callable[[Tensor, Tensor, Tensor], Tensor],
        x: Tensor,
        logits: Tensor,
        rows: Tensor,
        mask_id: int,
        reward: Callable[[Tensor], Tensor],
        generator: Randomness,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """The kept candidate of rows ``rows`` (``x``, ``logits`` theirs), its logits (None for ``K = 1``) and the
        network calls spent valuing candidates, per row."""
        spent = torch.zeros(len(rows), dtype=torch.long)
        if self.particles == 1:
            return move(x, logits, rows), None, spent
        gumbel = None
        if self.alpha > 0:
            u = uniform((len(rows), self.particles), generator, rows).clamp_min(torch.finfo(torch.float64).tiny)
            gumbel = -torch.log(-torch.log(u))
        best_x = best_logits = best_key = None
        for k in range(self.particles):  # streamed: one candidate batch in memory, not K
            candidate = move(x, logits, rows)
            masked = candidate == mask_id
            need = ((candidate != x).any(dim=1) & masked.any(dim=1)).nonzero().flatten()
            cand_logits = logits
            if len(need):
                fresh = _evaluate(model, candidate[need], rows[need], mask_id)
                cand_logits = logits.to(fresh.dtype).index_copy(0, need, fresh)
                spent[need] += 1
            if self.completion == "argmax":
                fill = cand_logits.argmax(dim=-1)
            else:
                fill = categorical(cand_logits, generator, self.categorical_dtype, rows)
            complete = torch.where(masked, fill, candidate)
            v = reward(self.images(complete)).to(torch.float64).cpu()
            if gumbel is None:
                key = v
            else:
                key = gumbel[:, k] if math.isinf(self.alpha) else v / self.alpha + gumbel[:, k]
            if best_key is None:
                best_x, best_logits, best_key = candidate, cand_logits, key
                continue
            take = key > best_key  # strict: ties keep the earlier candidate (candidate 1 is the plain move)
            best_x = torch.where(take[:, None].to(candidate.device), candidate, best_x)
            best_logits = torch.where(take[:, None, None].to(cand_logits.device), cand_logits,
                                      best_logits.to(cand_logits.dtype))  # fmt: skip
            best_key = torch.where(take, key, best_key)
        return best_x, best_logits, spent

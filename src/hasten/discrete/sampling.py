"""Samplers of masked diffusion models, the exact categorical draw, and an exact toy model.

A masked model is ``model(x, rows) -> logits [B, L, V]``: the distribution of each position's clean value given
the sequence ``x`` (``[B, L]`` integers in ``0..V``, ``V`` = MASK); ``rows`` (``[B]``) says which sequences of the
batch ``x`` holds, so per-sequence conditioning (class labels) follows a call on a subset of them. It is
time-agnostic (MDLM's SUBS network), which is what lets a sampler skip calls while nothing changes and lets the
first-hitting sampler ignore time altogether. Every sampler counts network evaluations per sequence (a call on a
subset of rows counts for those rows only).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import Config
from ..registry import Registry
from .masking import LogLinearMask

__all__ = [
    "DISCRETE_SAMPLERS",
    "AncestralSampler",
    "DiscreteSample",
    "DiscreteSampler",
    "FirstHittingSampler",
    "JointTable",
    "RowGenerators",
    "categorical",
    "get_discrete_sampler",
    "parse_discrete_sampler",
    "sample_discrete",
]

MaskedModel = Callable[[Tensor, Tensor], Tensor]  # (tokens [B, L], batch rows [B]) -> logits [B, L, V]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ORDERS = ("random", "left_to_right", "confidence")


class RowGenerators:
    """One generator per sequence of a batch, so a sequence's draws do not depend on which others share its batch
    or on the batch size (the discrete half of hasten's noise convention, :mod:`hasten.seeds`). Samplers take it
    wherever they take a generator; a draw for a subset of the batch passes the rows it is for."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)


Randomness = torch.Generator | RowGenerators | None


def uniform(shape: tuple[int, ...], generator: Randomness, rows: Tensor | None = None, dtype=torch.float64) -> Tensor:
    """``U[0, 1)`` draws of ``shape`` (``[B, ...]``): from one generator, or row by row from :class:`RowGenerators`
    (``rows`` the batch rows the ``B`` draws are for; all of them by default)."""
    if not isinstance(generator, RowGenerators):
        return torch.rand(shape, generator=generator, dtype=dtype)
    indices = range(shape[0]) if rows is None else rows.tolist()
    if len(indices) != shape[0]:
        raise ValueError(f"{shape[0]} rows of draws asked for, {len(indices)} row indices given")
    if not len(indices):
        return torch.empty(shape, dtype=dtype)
    return torch.stack([torch.rand(shape[1:], generator=generator.generators[r], dtype=dtype) for r in indices])


def categorical(
    logits: Tensor, generator: Randomness = None, dtype: str = "float64", rows: Tensor | None = None
) -> Tensor:
    """One draw per row of ``logits`` (``[..., V]``) by Gumbel-max: ``argmax(logits + G)``, ``G = -log(-log U)``.

    ``dtype="float64"`` (default) draws ``U`` and adds in float64. ``"float32"`` is the common implementation the
    paper below examines: a float32 uniform is at most ``1 - 2^-24``, so ``G <= 16.6`` and the Gumbel tail is cut,
    which lowers the effective temperature (rare values are drawn less often than their probability) — small
    per draw, visible over the hundreds of draws a many-step sampler makes.

    Reference: Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
    Inaccurate Categorical Sampling", ICLR 2025, Sec. 4.
    """
    if dtype not in DTYPES:
        raise ValueError(f"categorical dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    work = DTYPES[dtype]
    u = uniform(tuple(logits.shape), generator, rows, work).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(work).tiny)))
    return torch.argmax(logits.to(work) + gumbel, dim=-1)


@dataclasses.dataclass
class DiscreteSample:
    tokens: Tensor  # [B, L]
    calls: Tensor  # [B]: network evaluations of each sequence

    @property
    def nfe(self) -> int:
        return int(self.calls.max()) if self.calls.numel() else 0


@dataclasses.dataclass(frozen=True)
class DiscreteSampler(Config):
    """Base of the masked-diffusion samplers: ``run(model, x, mask_id, generator)`` from an all-MASK ``x``."""

    categorical_dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.categorical_dtype not in DTYPES:
            raise ValueError(f"categorical_dtype must be one of {', '.join(DTYPES)}, got {self.categorical_dtype!r}")

    def run(
        self, model: MaskedModel, x: Tensor, mask_id: int, generator: Randomness
    ) -> DiscreteSample:  # pragma: no cover - interface
        """Unmask ``x`` (``[B, L]``, all ``mask_id``) into a sample; returns the tokens and each row's calls."""
        raise TypeError(f"{type(self).__name__} does not implement run()")

    def describe(self) -> str:
        """The registered name with the options that differ from their defaults: ``first_hitting(calls=64)``."""
        name = next(
            (n for n in DISCRETE_SAMPLERS.names() if DISCRETE_SAMPLERS.get(n) is type(self)), type(self).__name__
        )

        def shown(value: Any) -> str:
            return value.describe() if isinstance(value, DiscreteSampler) else repr(value)

        changed = [f"{f.name}={shown(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if f.compare and getattr(self, f.name) != f.default]  # fmt: skip
        return f"{name}({', '.join(changed)})" if changed else name

    def check_length(self, length: int) -> None:
        """Refuse, before any work, settings this sampler cannot meet on sequences of ``length`` tokens."""
        if length < 1:
            raise ValueError(f"sequences must have at least one token, got length {length}")

    def bind(self, model: Any) -> DiscreteSampler:
        """This sampler for a loaded model (:func:`~hasten.discrete.generate.generate_masked` calls it): itself,
        unless the sampler needs more of the model than its logits (discrete SVDD needs its tokens-to-images map)."""
        return self


DISCRETE_SAMPLERS: Registry[type[DiscreteSampler]] = Registry("discrete sampler")


def _evaluate(model: MaskedModel, x: Tensor, rows: Tensor, mask_id: int) -> Tensor:
    logits = model(x, rows)
    if logits.shape[:2] != x.shape or logits.shape[-1] != mask_id:
        raise ValueError(f"the masked model returned logits {tuple(logits.shape)} for tokens {tuple(x.shape)}; "
                         f"expected [B, L, {mask_id}] (one logit per clean value, MASK = {mask_id})")  # fmt: skip
    return logits


@DISCRETE_SAMPLERS.register("ancestral")
@dataclasses.dataclass(frozen=True)
class AncestralSampler(DiscreteSampler):
    """The reverse process on ``steps`` uniform times (MDLM's ``ddpm_cache``; "tau-leaping" for masked models).

    From ``t`` to ``s < t`` every masked position is unmasked with probability ``(alpha_s - alpha_t) / (1 -
    alpha_t)``, to a value drawn from ``p_theta(. | x_t)``; the last step (``s = 0``) unmasks the rest. A
    sequence is re-evaluated only when one of its tokens changed since its last evaluation (the network is
    time-agnostic), so its calls are at most the number of steps at which something was unmasked. Exact in law
    only as ``steps`` grows: within a step, positions are unmasked independently given ``x_t``. Each position's
    step is one categorical draw over the ``V`` values and "still masked" (MDLM's ``_ddpm_caching_update``), which
    is where ``categorical_dtype="float32"`` loses the rare outcomes at many steps.

    Reference: Sahoo et al., MDLM, NeurIPS 2024, Sec. 3.4 (``ddpm_cache``); Austin et al., D3PM, NeurIPS 2021.
    """

    BUDGET: ClassVar[str] = "steps"  # the option a call budget (`--steps`) sets
    steps: int = 128
    eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")

    def run(self, model: MaskedModel, x: Tensor, mask_id: int, generator: Randomness) -> DiscreteSample:
        calls = torch.zeros(x.shape[0], dtype=torch.long)
        logits: Tensor | None = None
        stale = torch.ones(x.shape[0], dtype=torch.bool)
        for i in range(self.steps):
            masked = x == mask_id
            if not bool(masked.any()):
                break
            if bool(stale.any()):
                rows = stale.nonzero().flatten()
                fresh = _evaluate(model, x[rows], rows, mask_id)
                logits = fresh if logits is None else logits.to(fresh.dtype).index_copy(0, rows, fresh)
                calls[rows] += 1
            moved = self.move(logits, x, i, generator)
            change = moved != x
            x = moved
            stale = change.any(dim=1) & (x == mask_id).any(dim=1)  # a finished sequence needs no more calls
        return DiscreteSample(x, calls)

    def unmask_probability(self, i: int) -> float:
        """The chance that a position masked at step ``i``'s start (time ``1 - i / steps``) is unmasked by it."""
        schedule = LogLinearMask(self.eps)
        t, s = 1 - i / self.steps, 1 - (i + 1) / self.steps
        return 1.0 if s == 0 else (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))

    def move(self, logits: Tensor, x: Tensor, i: int, generator: Randomness) -> Tensor:
        """Step ``i``'s transition of every row of ``x`` given the network's ``logits`` at ``x`` (MASK = ``V``)."""
        unmask = self.unmask_probability(i)
        # one draw over V + 1 outcomes, as MDLM draws it: value v with unmask * p(v), still MASK with 1 - unmask
        # (the float32 path's truncated Gumbel tail shows at many steps, where unmask * p(v) is tiny)
        stay = torch.full((*logits.shape[:2], 1), math.log1p(-unmask) if unmask < 1 else -math.inf,
                          dtype=torch.float64, device=logits.device)  # fmt: skip
        joint = torch.cat([logits.to(torch.float64).log_softmax(-1) + math.log(unmask), stay], dim=-1)
        values = categorical(joint, generator, self.categorical_dtype)
        mask_id = logits.shape[-1]
        return torch.where((x == mask_id) & (values != mask_id), values, x)


@DISCRETE_SAMPLERS.register("first_hitting")
@dataclasses.dataclass(frozen=True)
class FirstHittingSampler(DiscreteSampler):
    """The first-hitting sampler: one event per call, each unmasking ``tokens_per_call`` positions.

    With ``n`` positions masked at time ``t`` the next unmask time is ``tau = t * u^(1/n)`` (log-linear ``alpha``);
    a time-agnostic network does not need it, so the sampler only picks a masked position uniformly and draws its
    value from ``p_theta(. | x)``: exactly the reverse process's law, in exactly ``L`` calls for ``L`` positions
    (``tokens_per_call = 1``). ``tokens_per_call = k`` unmasks ``k`` positions per call, each from its own marginal
    given the same ``x`` (the paper's parallel variant: ``ceil(L / k)`` calls, no longer exact).

    ``order`` picks which masked positions an event unmasks: ``"random"`` (uniform: the reverse process),
    ``"left_to_right"`` (the lowest indices first: autoregressive generation; semi-autoregressive with ``k`` per
    call) or ``"confidence"`` (the positions whose most likely value is most likely first). With exact
    conditionals and one token per call every order is exact, adaptive ones included, since the next position
    depends only on the tokens already drawn (the chain rule; tested on the joint table); with a learned model the
    orders differ in how its errors compound (confidence-first made repetitive text in MDLM's experience,
    kuleshov-group/mdlm#35), which only a measurement on the model can tell.

    Reference: Zheng et al., ICLR 2025, Sec. 3 (Algorithm 1, first-hitting sampler) and Sec. 3.2 (parallel and
    semi-autoregressive variants).
    """

    BUDGET: ClassVar[str] = "calls"
    tokens_per_call: int = 1
    order: str = "random"
    calls: int | None = None  # a call budget instead of tokens_per_call: ceil(L / calls) tokens per call

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tokens_per_call, int) or self.tokens_per_call < 1:
            raise ValueError(f"tokens_per_call must be an integer >= 1, got {self.tokens_per_call!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.calls is not None:
            if isinstance(self.calls, bool) or not isinstance(self.calls, int) or self.calls < 1:
                raise ValueError(f"calls must be an integer >= 1, got {self.calls!r}")
            if self.tokens_per_call != 1:
                raise ValueError("give calls or tokens_per_call, not both (calls sets the tokens per call)")

    def check_length(self, length: int) -> None:
        super().check_length(length)
        if self.calls is not None and self.calls > length:
            raise ValueError(
                f"a call budget of {self.calls} cannot be met on {length} tokens: the first-hitting sampler "
                f"unmasks at least one token per call, so it makes at most {length} calls"
            )
        if self.tokens_per_call > length:
            raise ValueError(f"tokens_per_call {self.tokens_per_call} exceeds the {length} tokens of a sequence")

    def per_call(self, length: int) -> int:
        """Tokens unmasked per call on sequences of ``length`` tokens."""
        return self.tokens_per_call if self.calls is None else -(-length // self.calls)

    def run(self, model: MaskedModel, x: Tensor, mask_id: int, generator: Randomness) -> DiscreteSample:
        return self.unmask(model, x, mask_id, generator)

    def unmask(
        self, model: MaskedModel, x: Tensor, mask_id: int, generator: Randomness,
        draw: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> DiscreteSample:  # fmt: skip
        """The sampler's loop. ``draw(logits, x_rows, rows) -> values [b, L]`` replaces the factorised draw of the
        values an event may unmask (the hook of the energy-corrected sampler, :mod:`hasten.discrete.energy`)."""
        self.check_length(x.shape[1])
        per_call = self.per_call(x.shape[1])
        calls = torch.zeros(x.shape[0], dtype=torch.long)
        while True:
            masked = x == mask_id
            left = masked.sum(dim=1)
            if not bool((left > 0).any()):
                break
            rows = (left > 0).nonzero().flatten()
            logits = _evaluate(model, x[rows], rows, mask_id)
            calls[rows] += 1
            x = x.clone()
            x[rows] = self.move(logits, x[rows], per_call, generator, rows, draw)
        return DiscreteSample(x, calls)

    def move(
        self, logits: Tensor, x: Tensor, per_call: int, generator: Randomness, rows: Tensor,
        draw: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """One event on the batch rows ``rows`` (``x`` holds them, each with a masked token): ``per_call`` of
        each row's masked positions unmasked to values drawn from the network's ``logits`` at ``x`` (or by
        ``draw(logits, x, rows)``, the energy-corrected sampler's hook)."""
        masked = x == logits.shape[-1]
        # k masked positions per row: the k largest scores among the masked ones
        scores = self._scores(logits, masked, generator, rows).masked_fill(~masked, -math.inf)
        k = min(per_call, int(masked.sum(dim=1).max()))
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
        chosen &= masked
        if draw is None:
            values = categorical(logits, generator, self.categorical_dtype, rows)
        else:
            values = draw(logits, x, rows)
        return torch.where(chosen, values, x)

    def _scores(self, logits: Tensor, masked: Tensor, generator: Randomness, rows: Tensor) -> Tensor:
        if self.order == "random":  # uniform among the masked positions
            return uniform(tuple(masked.shape), generator, rows).to(masked.device)
        if self.order == "left_to_right":
            return -torch.arange(masked.shape[1], dtype=torch.float64).expand(masked.shape)
        return torch.log_softmax(logits.to(torch.float64), dim=-1).amax(dim=-1)  # confidence


def parse_discrete_sampler(spec: str | None = None, steps: int | None = None) -> DiscreteSampler:
    """A sampler from a CLI spec (``"first_hitting:order=confidence"``; default ``first_hitting``) and a network-call
    budget ``steps``: the ancestral sampler's steps, or the first-hitting sampler's ``calls`` (refused where the spec
    sets them already, or for a sampler that takes no budget)."""
    from ..solvers._base import split_spec

    name, options = split_spec(spec or "first_hitting")
    if steps is not None:
        kind = DISCRETE_SAMPLERS.get(name)
        budget = getattr(kind, "BUDGET", None)
        if budget is None:
            raise ValueError(f"the {name} sampler takes no call budget; drop --steps")
        if budget in options or (budget == "calls" and options.get("tokens_per_call", 1) != 1):
            raise ValueError(f"--steps {steps} and the spec's {budget}/tokens_per_call both set the budget; give one")
        options[budget] = steps
    return get_discrete_sampler(name, **options)


def get_discrete_sampler(name: str | DiscreteSampler, **options: Any) -> DiscreteSampler:
    if isinstance(name, DiscreteSampler):
        if options:
            raise TypeError("options go with a sampler name, not with a configured sampler")
        return name
    return DISCRETE_SAMPLERS.get(name).create(**options)


def sample_discrete(
    model: MaskedModel,
    n: int,
    length: int,
    vocab: int,
    sampler: str | DiscreteSampler = "first_hitting",
    *,
    generator: Randomness = None,
    **options: Any,
) -> DiscreteSample:
    """``n`` sequences of ``length`` tokens with values in ``0..vocab-1``, from all-MASK (MASK = ``vocab``)."""
    if n < 1 or length < 1 or vocab < 1:
        raise ValueError(f"n, length and vocab must be >= 1, got {n}, {length}, {vocab}")
    chosen = get_discrete_sampler(sampler, **options)
    x = torch.full((n, length), vocab, dtype=torch.long)
    return chosen.run(model, x, vocab, generator)


class JointTable:
    """An exact masked model of a joint distribution over ``V^L`` (a table): the test fixture with a known answer.

    ``model(x, rows)`` returns, for every position, the log of ``p(x^l = v | the unmasked tokens of x)``, computed by
    summing the table over every sequence consistent with ``x``."""

    def __init__(self, table: Tensor) -> None:
        table = torch.as_tensor(table, dtype=torch.float64)
        if table.ndim < 1 or torch.any(table < 0) or not math.isclose(float(table.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("table must be a non-negative [V, V, ..., V] tensor summing to 1")
        self.vocab, self.length = table.shape[0], table.ndim
        if any(d != self.vocab for d in table.shape):
            raise ValueError(f"every axis of the table must have the vocabulary size, got {tuple(table.shape)}")
        self.table = table
        grid = list(itertools.product(range(self.vocab), repeat=self.length))
        self.sequences = torch.tensor(grid, dtype=torch.long)  # [V^L, L], in the table's flat order
        self.calls = 0

    def __call__(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.length:
            raise ValueError(f"this table is over sequences of length {self.length}; got tokens {tuple(x.shape)}")
        self.calls += 1
        observed = x != self.vocab  # [B, L]
        agree = (self.sequences[None] == x[:, None]) | ~observed[:, None]  # [B, V^L, L]
        weights = self.table.flatten()[None] * agree.all(dim=2)  # [B, V^L]
        onehot = torch.nn.functional.one_hot(self.sequences, self.vocab).to(torch.float64)  # [V^L, L, V]
        marginal = torch.einsum("bc,clv->blv", weights, onehot)
        marginal = marginal / marginal.sum(dim=2, keepdim=True)
        return torch.log(marginal.clamp_min(1e-300))

    def probability(self, tokens: Tensor) -> Tensor:
        """The table's probability of each row of ``tokens`` (``[B, L]``)."""
        return self.table[tuple(tokens.T)]

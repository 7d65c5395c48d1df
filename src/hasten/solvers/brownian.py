"""Noise for stochastic solvers: one seeded Brownian path queried by interval, or independent draws.

A stochastic solver asks for the standard normal noise of a move from ``sigma`` to ``sigma_next``.
:class:`BrownianNoise` answers with the normalised increment ``(B(tau') - B(tau)) / sqrt(tau' - tau)`` of a
single Brownian motion ``B`` in ``tau = 1 / sigma^2``, built on demand from a seed (a virtual Brownian
tree), so the same seed gives the same path whatever grid queries it: samples at 10 and at 20 steps
follow one path, and a stochastic solver converges strongly as its steps shrink. In ``tau = 1 / sigma^2``
the noise of an exact DDPM posterior step (ancestral eta = 1) and of the DPM-Solver++ SDE step (eta = 1)
is ``sigma'^2 (B(tau') - B(tau))`` exactly, so those updates are the SDE's own noise, not an approximation
of it. :class:`IndependentNoise` draws fresh noise per call (diffusers' and k-diffusion's ancestral
samplers).

Every source also answers ``noise(sigma, sigma_next, draw=k)`` for ``k >= 1``: further standard normal tensors
for the same move, independent of the move's own noise (``draw=0``) and of each other, and per row reproducible
like it. A sampler that weighs several candidate moves (SVDD, :mod:`hasten.solvers.svdd`) takes them from here,
so its candidate 0 is exactly the plain sampler's move.

The tree: dyadic nodes in ``u = log sigma`` over ``[log SIGMA_RANGE[0], log SIGMA_RANGE[1]]``, ``DEPTH``
levels; a node's value is the Brownian-bridge sample between its two parents (in ``tau``) with noise from
a generator seeded by ``(seed, level, index)``, so values never depend on the order of queries. A point
between two leaves is a bridge sample between them seeded by the point itself. Recently used nodes and
points are kept, so a run's consecutive queries share their path from the root.

Reference: k-diffusion ``BrownianTreeNoiseSampler`` (Crowson), after torchsde's ``BrownianTree`` (Li et al.,
"Scalable Gradients for Stochastic Differential Equations", AISTATS 2020, Sec. 4: the virtual Brownian
tree); Brownian bridge: Glasserman, "Monte Carlo Methods in Financial Engineering", 2003, Sec. 3.1.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DEPTH", "SIGMA_RANGE", "BrownianNoise", "IndependentNoise", "RecordedNoise"]

SIGMA_RANGE = (1e-5, 1e5)  # noise levels a Brownian path covers (VE sigma; flow models' t_max is ~1e4)
DEPTH = 20  # leaves 2.2e-5 apart in log sigma: far finer than any grid's steps
_CACHE = 4 * DEPTH  # nodes kept: a few root-to-leaf paths


def _tau(sigma: float) -> float:
    return 1.0 / (sigma * sigma)


def _seeded_normal(seed: int, key: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(shape, generator=generator, dtype=dtype)


class IndependentNoise:
    """Fresh standard normal noise on every call, from ``generator`` (the interval is ignored).

    ``generator`` may be a list with one CPU generator per row (``shape[0]`` of them): each row then draws from
    its own, so a row's noise does not depend on the rows beside it (:mod:`hasten.seeds`).
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator=None):
        self.shape, self.dtype, self.device, self.generator = tuple(shape), dtype, device, generator
        if isinstance(generator, list | tuple) and len(generator) != self.shape[0]:
            raise ValueError(f"{len(generator)} row generators for {self.shape[0]} rows")

    def __call__(self, sigma: float, sigma_next: float, draw: int = 0) -> Tensor:
        """Fresh noise; an extra ``draw`` is one more fresh draw (from the same generators, after the move's own)."""
        if isinstance(self.generator, list | tuple):
            rows = [torch.randn(self.shape[1:], generator=g, dtype=self.dtype) for g in self.generator]
            return torch.stack(rows).to(self.device)
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype, device=self.device)


class RecordedNoise:
    """Given noise, one tensor per step of a grid: what an inversion recorded (:mod:`hasten.edit`).

    A stochastic step from ``grid[i]`` to ``grid[i + 1]`` gets ``maps[i]``, so replaying a recorded run reproduces
    it exactly; a move that is not one of the grid's steps (a solver that draws noise inside a step) is refused,
    since no noise was recorded for it.
    """

    def __init__(self, maps: Tensor | Sequence[Tensor], grid: Sequence[float], shape: Sequence[int],
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        steps = len(grid) - 1
        if len(maps) != steps:
            raise ValueError(f"step_noise has {len(maps)} entries for a grid of {steps} steps (one per step)")
        self.maps = []
        for i, m in enumerate(maps):
            if tuple(m.shape) != tuple(shape):
                raise ValueError(f"step_noise[{i}] has shape {tuple(m.shape)}; x has {tuple(shape)}")
            self.maps.append(m.to(device=device, dtype=dtype))
        self.index = {(float(grid[i]), float(grid[i + 1])): i for i in range(steps)}

    def __call__(self, sigma: float, sigma_next: float, draw: int = 0) -> Tensor:
        if draw:
            raise ValueError(f"recorded noise holds one draw per step; a sampler asked for extra draw {draw}")
        i = self.index.get((float(sigma), float(sigma_next)))
        if i is None:
            raise ValueError(
                f"recorded noise covers the grid's steps only; the solver asked for the move {sigma:g} -> "
                f"{sigma_next:g} inside a step: replay it with a one-evaluation-per-step solver (ddpm, ddim)"
            )
        return self.maps[i]


class BrownianNoise:
    """Normalised increments of one Brownian motion in ``tau = 1 / sigma^2``, fixed by ``seed``.

    Args:
        seed: Fixes the path (any integer), or a list of seeds, one per row (``shape[0]`` of them): each row then
            follows its own path, whatever rows share its batch (:mod:`hasten.seeds`).
        shape, dtype, device: Of the noise returned. Values are drawn on the CPU (so a seed gives the same
            path on every device) and moved.
    """

    def __init__(self, seed: int | Sequence[int], shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.seed: int | tuple[int, ...] = tuple(map(int, seed)) if isinstance(seed, Sequence) else int(seed)
        if isinstance(self.seed, tuple) and len(self.seed) != self.shape[0]:
            raise ValueError(f"{len(self.seed)} row seeds for {self.shape[0]} rows")
        self._u0, self._u1 = math.log(SIGMA_RANGE[0]), math.log(SIGMA_RANGE[1])
        self._nodes: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._points: OrderedDict[float, Tensor] = OrderedDict()

    def __call__(self, sigma: float, sigma_next: float, draw: int = 0) -> Tensor:
        """Standard normal noise of the move ``sigma -> sigma_next`` (both in ``SIGMA_RANGE``, distinct).

        ``draw >= 1`` is an extra draw for the same move, off the path: seeded by ``(seed, draw, sigma, sigma_next)``
        (per row with row seeds), so it never depends on the order of queries or on the rows beside it.
        """
        if draw:
            key = ("draw", int(draw), struct.pack("<dd", sigma, sigma_next))
            return self._normal(*key).to(self.device)
        if sigma == sigma_next:
            raise ValueError(f"a Brownian increment needs two distinct noise levels, got {sigma} twice")
        increment = self.value(sigma_next) - self.value(sigma)
        return increment.div_(math.sqrt(abs(_tau(sigma_next) - _tau(sigma)))).to(self.device)

    def value(self, sigma: float) -> Tensor:
        """``B(1 / sigma^2)`` on the CPU (``B = 0`` at the top of ``SIGMA_RANGE``)."""
        if not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
            raise ValueError(
                f"Brownian noise covers sigma in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], got {sigma:g}; "
                "use brownian=False for this grid"
            )
        if sigma in self._points:
            self._points.move_to_end(sigma)
            return self._points[sigma]
        position = (math.log(sigma) - self._u0) / (self._u1 - self._u0) * 2**DEPTH
        left = min(int(position), 2**DEPTH - 1)
        if position == left:
            out = self._node(DEPTH, left)
        else:  # between two leaves: a bridge sample seeded by the point itself
            out = self._bridge(DEPTH, left, left + 1, _tau(sigma), ("point", struct.pack("<d", sigma)))
        self._points[sigma] = out
        if len(self._points) > 8:
            self._points.popitem(last=False)
        return out

    # -- the tree -------------------------------------------------------------------------------------
    def _sigma_at(self, level: int, index: int) -> float:
        return math.exp(self._u0 + (self._u1 - self._u0) * index / 2**level)

    def _normal(self, *key: object) -> Tensor:
        if isinstance(self.seed, tuple):
            return torch.stack([_seeded_normal(seed, key, self.shape[1:], self.dtype) for seed in self.seed])
        return _seeded_normal(self.seed, key, self.shape, self.dtype)

    def _node(self, level: int, index: int) -> Tensor:
        while level > 0 and index % 2 == 0:  # a node is named by its coarsest level
            level, index = level - 1, index // 2
        key = (level, index)
        if key in self._nodes:
            self._nodes.move_to_end(key)
            return self._nodes[key]
        if level == 0:  # the ends: B = 0 at sigma_max, B(tau(sigma_min)) ~ N(0, tau(sigma_min) - tau(sigma_max))
            if index == 1:
                out = torch.zeros(self.shape, dtype=self.dtype)
            else:
                spread = _tau(SIGMA_RANGE[0]) - _tau(SIGMA_RANGE[1])
                out = self._normal(0, 0).mul_(math.sqrt(spread))
        else:
            out = self._bridge(level, index - 1, index + 1, _tau(self._sigma_at(level, index)), (level, index))
        self._nodes[key] = out
        if len(self._nodes) > _CACHE:
            self._nodes.popitem(last=False)
        return out

    def _bridge(self, level: int, left: int, right: int, tau: float, key: tuple) -> Tensor:
        """Sample ``B(tau)`` given ``B`` at nodes ``(level, left)`` and ``(level, right)`` around it."""
        tau_a, tau_b = _tau(self._sigma_at(level, left)), _tau(self._sigma_at(level, right))
        b_a, b_b = self._node(level, left), self._node(level, right)
        weight = (tau - tau_a) / (tau_b - tau_a)
        std = math.sqrt(abs((tau - tau_a) * (tau_b - tau) / (tau_b - tau_a)))  # tau falls as the index grows
        return torch.lerp(b_a, b_b, weight).add_(self._normal(*key), alpha=std)

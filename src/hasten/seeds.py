"""The one noise convention: how a seed becomes the noise of every sample, from the sample's own index.

Under ``hasten-index-v2`` (the default) sample ``j`` of a run seeded ``seed`` starts from
``torch.randn(image_shape)`` drawn on the CPU from a generator seeded by ``row_seed(seed, j, "initial")``, and a
stochastic solver draws sample ``j``'s step noise from its own source seeded ``row_seed(seed, j, "steps")`` (one
Brownian path per sample, or fresh draws per sample with ``brownian=False``). Nothing depends on which other
samples share its batch, on the batch size, on the device, or on which process of a ``torchrun`` job computes
it; so a run sharded by sample index over any number of processes makes the images of one process (bit for bit
on CPUs, where the network also sees the same batches: :func:`hasten.distributed.shard_batches` keeps them).

``hasten-cpu-randn-v1`` (recipes written before the index convention) drew the whole set as one
``torch.randn([n, *image_shape])`` stream from ``manual_seed(seed)`` and seeded batch ``i``'s step noise
``seed + 1 + i``; it is still honoured in one process so old recipes reproduce, and refused in a sharded run
(sample ``j``'s noise there depends on every sample before it).

The seeds are 63-bit BLAKE2b digests of ``(convention, seed, index, stream)``: different streams, seeds and
indices give unrelated generators, with no arithmetic pattern between neighbours (``seed + j`` would make run
``s``'s sample 1 run ``s + 1``'s sample 0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CONVENTIONS", "LEGACY_CONVENTION", "NOISE_CONVENTION", "initial_noise", "row_seed", "step_seeds"]

NOISE_CONVENTION = "hasten-index-v2"
LEGACY_CONVENTION = "hasten-cpu-randn-v1"
CONVENTIONS = (NOISE_CONVENTION, LEGACY_CONVENTION)


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"noise convention {convention!r} is unknown; known: {', '.join(CONVENTIONS)}")


def row_seed(seed: int, index: int, stream: str) -> int:
    """The generator seed of sample ``index``'s ``stream`` (``"initial"`` or ``"steps"``) in a run seeded ``seed``."""
    key = repr((NOISE_CONVENTION, int(seed), int(index), stream)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def initial_noise(
    seed: int,
    indices: Sequence[int] | range,
    shape: Sequence[int],
    *,
    convention: str = NOISE_CONVENTION,
    total: int | None = None,
) -> Tensor:
    """Standard normal initial noise ``[len(indices), *shape]`` of the samples ``indices`` (float32, CPU).

    ``convention=LEGACY_CONVENTION`` draws the ``total`` samples' single stream and returns the rows asked for.
    """
    check_convention(convention)
    shape = tuple(shape)
    if convention == LEGACY_CONVENTION:
        if total is None:
            raise ValueError("the legacy noise convention needs the run's total sample count")
        return torch.randn((total, *shape), generator=torch.Generator().manual_seed(seed))[list(indices)]
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(row_seed(seed, index, "initial")))
    return out


def step_seeds(seed: int, indices: Sequence[int] | range) -> list[int]:
    """The seeds of the samples' step noise (``hasten.sample(..., noise_seeds=...)``)."""
    return [row_seed(seed, index, "steps") for index in indices]

"""Frechet distance between Gaussian fits of two feature sets, and k-NN precision/recall.

The matrix square root uses a symmetric eigendecomposition: ``tr sqrt(C1 C2)`` equals
``sum sqrt(eig(S C2 S))`` with ``S = C1^{1/2}``, and ``S C2 S`` is symmetric positive semi-definite, so
``eigvalsh`` is stable where a general ``sqrtm`` of the non-symmetric ``C1 C2`` is not (scipy's ``sqrtm``
was seen returning garbage on these near-singular covariances).

Reference: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule...", NeurIPS 2017 (FID);
Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed

__all__ = ["frechet_distance", "frechet_distance_from_features", "gaussian_stats", "precision_recall"]


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, float64."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T)


def _psd_sqrt(c: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr sqrt(C1 C2)`` for Gaussians N(mu1, C1), N(mu2, C2)."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    s1 = _psd_sqrt(0.5 * (cov1 + cov1.T))
    middle = s1 @ (0.5 * (cov2 + cov2.T)) @ s1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return float(value.clamp(min=0))


def frechet_distance_from_features(a: Tensor, b: Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


KNN_CHUNK = 256  # rows of each distance block: memory chunk x N, not N x N (and the unit of work under torchrun)


def _kth_neighbour_radius(f: Tensor, k: int) -> Tensor:
    # +1: the point itself is at distance 0
    return distributed.map_rows(lambda rows: torch.cdist(rows, f).kthvalue(k + 1, dim=1).values, f, KNN_CHUNK)


def _inside(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Whether each point lies in some ball (centre, radius), one block of points at a time."""
    return distributed.map_rows(
        lambda rows: (torch.cdist(rows, centres) <= radii[None, :]).any(dim=1).double(), points, KNN_CHUNK
    )


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (share of fakes inside the real manifold) and recall (reals inside the fake one).

    Each manifold is the union of balls around its points with radius the distance to the k-th neighbour.
    Distances are computed in blocks of :data:`KNN_CHUNK` rows (split over the processes under torchrun), so
    memory grows as N, not N^2, and every process returns the one-process numbers.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} real and fake points, got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    precision = _inside(fake, real, r_real).mean()
    recall = _inside(real, fake, r_fake).mean()
    return float(precision), float(recall)

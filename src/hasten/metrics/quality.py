"""Sample quality on the bundled data sets: FD, precision/recall, classifier statistics, memorisation.

``evaluate_mnist(samples)`` compares generated digits with the 5,000 held-out MNIST digits (never seen
in training) in the bundled feature network's space, and checks for copies of training digits.
"""

from __future__ import annotations

import functools
import os
import pathlib

import torch
from torch import Tensor

from ..data import load_mnist
from .fd import frechet_distance, gaussian_stats, precision_recall
from .features import feature_net_fingerprint, mnist_features

__all__ = ["cache_dir", "evaluate_mnist", "memorisation_share", "real_vs_real_fd"]


def cache_dir() -> pathlib.Path:
    """Where hasten caches derived data (``$HASTEN_CACHE``, default ``~/.cache/hasten``)."""
    path = pathlib.Path(os.environ.get("HASTEN_CACHE", pathlib.Path.home() / ".cache" / "hasten"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def _reference_features() -> tuple[Tensor, Tensor, Tensor]:
    """Held-out MNIST features, mean and covariance, cached on disk per feature network (and in memory)."""
    from safetensors.torch import load_file, save_file

    key = f"mnist-heldout-{feature_net_fingerprint()}"
    path = cache_dir() / "reference-stats" / f"{key}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return data["features"], data["mu"], data["cov"]
    feats, _ = mnist_features(load_mnist("heldout").images.float() / 255.0)
    mu, cov = gaussian_stats(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats.contiguous(), "mu": mu.contiguous(), "cov": cov.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return feats, mu, cov


@functools.lru_cache(maxsize=1)
def _train_pixels() -> Tensor:
    return load_mnist("train").images.flatten(1).double() / 255.0


@functools.lru_cache(maxsize=4)
def _memorisation_threshold(quantile: float) -> float:
    """The ``quantile`` of held-out digits' distances to their nearest training digit (computed once)."""
    heldout = load_mnist("heldout").images.flatten(1).double() / 255.0
    return float(torch.quantile(torch.cdist(heldout, _train_pixels()).min(dim=1).values, quantile))


def memorisation_share(samples01: Tensor, quantile: float = 0.01) -> tuple[float, float]:
    """Share of samples closer (pixel L2) to a training digit than all but ``quantile`` of held-out digits are.

    A model that generalises scores about ``quantile``; one that copies its 5,000 training digits scores
    far more. Returns ``(share, threshold)``.
    """
    threshold = _memorisation_threshold(quantile)
    nearest = torch.cdist(samples01.flatten(1).double().cpu(), _train_pixels()).min(dim=1).values
    return float((nearest < threshold).double().mean()), threshold


def evaluate_mnist(samples01: Tensor, labels: Tensor | None = None, *, k: int = 3) -> dict:
    """All quality metrics for ``[N, 1, 28, 28]`` samples in [0, 1] against the held-out digits.

    Returns a JSON-able dict: ``fd``, ``fd_real_vs_real`` (two halves of the held-out set at the same
    sample size, the floor to compare against), ``precision``, ``recall``, ``confidence`` (mean max
    softmax), ``class_histogram``, ``label_accuracy`` (share classified as the requested label, when
    ``labels`` is given), ``memorised_share`` and ``n``.
    """
    feats, logits = mnist_features(samples01)
    ref_feats, mu_ref, cov_ref = _reference_features()
    probs = torch.softmax(logits, dim=1)
    n = len(samples01)
    # Equal-size real set (a seeded subset of the held-out digits): k-NN radii depend on the set size.
    subset = torch.randperm(len(ref_feats), generator=torch.Generator().manual_seed(0))[: max(n, k + 1)]
    precision, recall = precision_recall(ref_feats[subset], feats, k=k)
    memorised, _ = memorisation_share(samples01)
    result = {
        "n": n,
        "fd": frechet_distance(*gaussian_stats(feats), mu_ref, cov_ref),
        "fd_real_vs_real": real_vs_real_fd(n),
        "precision": precision,
        "recall": recall,
        "confidence": float(probs.max(dim=1).values.mean()),
        "class_histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
        "memorised_share": memorised,
    }
    if labels is not None:
        result["label_accuracy"] = float((probs.argmax(1).cpu() == labels.cpu()).double().mean())
    return result


@functools.lru_cache(maxsize=8)
def real_vs_real_fd(n: int, seed: int = 0) -> float:
    """FD between ``n`` training digits and the held-out statistics: the value a perfect model reaches at n."""
    _, mu_ref, cov_ref = _reference_features()
    train = load_mnist("train").images
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    f, _ = mnist_features(train[idx].float() / 255.0)
    return frechet_distance(*gaussian_stats(f), mu_ref, cov_ref)

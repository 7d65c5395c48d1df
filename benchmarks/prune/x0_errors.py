"""How far a pruned student's x0 estimate is from its teacher's at each noise level (RMSE over held-out digits
noised at VE sigma, same noise for both), beside the teacher's own x0 error to the data. Prints JSON.

Usage: python benchmarks/prune/x0_errors.py PRUNED_FOLDER [TEACHER]   (teacher: mnist-unet by default)
"""

from __future__ import annotations

import json
import sys

import torch

import hasten
from hasten.data import load_mnist

SIGMAS = (0.05, 0.3, 1.0, 3.0, 10.0, 40.0, 157.0)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = hasten.load(sys.argv[1])
    teacher = hasten.load(sys.argv[2] if len(sys.argv) > 2 else "mnist-unet")
    digits = load_mnist("heldout")
    x0 = digits.images[:128].float()
    if x0.max() > 1.5:  # uint8 -> the models' [-1, 1]
        x0 = x0 / 127.5 - 1
    if x0.ndim == 3:
        x0 = x0[:, None]
    labels = digits.labels[:128].long()
    out = {}
    with torch.no_grad():
        for level in SIGMAS:
            sigma = torch.full((x0.shape[0],), level)
            x = x0 + level * torch.randn_like(x0)
            theirs = teacher.denoiser(x, sigma, class_labels=labels)
            ours = student.denoiser(x, sigma, class_labels=labels)
            out[level] = {
                "x0_rmse": round((theirs - ours).pow(2).mean().sqrt().item(), 4),
                "teacher_to_data": round((theirs - x0).pow(2).mean().sqrt().item(), 4),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

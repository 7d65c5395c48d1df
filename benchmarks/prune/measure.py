"""Pruned models against their unpruned teachers: one network call's wall time (paired, interleaved, median of
repeats, at the timing batch and 1 and 2 threads), MACs and parameters, and FD at the same sampler on the same
held-out noise. Writes JSON.

Usage: python benchmarks/prune/measure.py TEACHER PRUNED_FOLDER OUT.json [--n 2000] [--steps 10 20]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

import hasten
from hasten.evaluate import evaluate_model
from hasten.prune import surgery


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("pruned")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--timing-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    teacher, pruned = hasten.load(args.teacher), hasten.load(args.pruned)
    labels = {"class_labels": torch.arange(args.timing_batch) % 10} if teacher.info.num_classes else {}
    inputs = surgery.example_inputs(teacher.network, teacher.info.image_shape, args.timing_batch, labels)
    small = tuple(v[:2] if isinstance(v, torch.Tensor) else v for v in inputs)
    macs_t, params_t = surgery.flops_and_params(teacher.network, small)
    macs_p, params_p = surgery.flops_and_params(pruned.network, small)
    timing = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        timing[str(threads)] = surgery.network_speedup(teacher.network, pruned.network, inputs, repeats=9)
    torch.set_num_threads(max(args.threads))
    quality = []
    for steps in args.steps:
        for name, model in (("teacher", teacher), ("pruned", pruned)):
            row = evaluate_model(model, n=args.n, solver="dpmpp_2m", steps=steps, seed=0, reference=False)
            row.pop("images01", None)
            quality.append(
                {
                    "model": name,
                    "steps": steps,
                    "fd": row["fd"],
                    "seconds": row["seconds"],
                    "precision": row.get("precision"),
                    "recall": row.get("recall"),
                }
            )
        t, p = quality[-2], quality[-1]
        p["fd_change"] = p["fd"] / t["fd"] - 1
        p["sampling_speedup"] = t["seconds"] / p["seconds"]
    data = {
        "teacher": args.teacher,
        "pruned": args.pruned,
        "pruning": {k: v for k, v in pruned.info.pruning.items() if k not in ("structure", "taylor")},
        "finetune": {k: pruned.info.distillation.get(k) for k in ("steps", "seconds", "machine", "device")},
        "macs": {"teacher": macs_t, "pruned": macs_p, "ratio": macs_t / macs_p},
        "parameters": {"teacher": params_t, "pruned": params_p},
        "network_timing": {"batch": args.timing_batch, "by_threads": timing},
        "quality": quality,
        "n": args.n,
        "seed": 0,
        "solver": "dpmpp_2m",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({"macs": data["macs"], "timing": timing, "quality": quality}, indent=1))


if __name__ == "__main__":
    main()

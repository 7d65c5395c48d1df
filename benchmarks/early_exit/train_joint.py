"""Run the joint early-exit fine-tune on one thread and record the CPU time it took (resource.getrusage).

Usage: python benchmarks/early_exit/train_joint.py OUT_FOLDER OUT.json [--minutes 28] [--option key=value ...]
(rerun the same command to resume an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time

import torch

import hasten


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--teacher", default="mnist-dit")
    parser.add_argument("--minutes", type=float, default=28.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--option", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)}
    folder = pathlib.Path(args.folder)
    resume = folder.is_dir() and any(folder.iterdir())
    wall = time.perf_counter()
    result = hasten.distill(
        teacher=args.teacher,
        method="early_exit",
        nfe=args.nfe,
        out=folder,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        options=options,
        resume=resume,
        progress=False,
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "folder": str(folder),
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "training_seconds": result.seconds,
        "final_loss": result.final_loss,
        "process_cpu_minutes": (usage.ru_utime + usage.ru_stime) / 60,
        "process_wall_minutes": (time.perf_counter() - wall) / 60,
        "settings": vars(args),
        "threads": torch.get_num_threads(),
    }
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

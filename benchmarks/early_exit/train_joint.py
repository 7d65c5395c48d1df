"""Run the joint early-exit fine-tune on one thread within a CPU-time budget and record what it took.

The training loop's budget is wall-clock time; on a shared machine one thread gets less than a core. So the
run goes in chunks of at most --chunk wall minutes (each a resume of the same run: exact), and before each
chunk the process's CPU time so far (resource.getrusage) decides how much more it may take: it stops when
--cpu-minutes are spent or --wall-minutes have passed. The folder is a finished student after every chunk.

Usage: python benchmarks/early_exit/train_joint.py OUT_FOLDER OUT.json [--cpu-minutes 29] [--option key=value ...]
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
    parser.add_argument("--cpu-minutes", type=float, default=29.0)
    parser.add_argument("--wall-minutes", type=float, default=36.0)
    parser.add_argument("--chunk", type=float, default=6.0, help="wall minutes per chunk")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--option", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)}
    folder = pathlib.Path(args.folder)
    wall = time.perf_counter()

    def cpu_minutes() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (usage.ru_utime + usage.ru_stime) / 60

    trained, chunks, result = 0.0, [], None
    while True:
        cpu_left = args.cpu_minutes - cpu_minutes()
        wall_left = args.wall_minutes - (time.perf_counter() - wall) / 60
        step = min(args.chunk, cpu_left, wall_left)
        if step < 0.25:
            break
        resume = folder.is_dir() and any(folder.iterdir())
        if (folder / "hasten.json").is_file():  # the run's training time so far (also after a kill and rerun)
            trained = json.loads((folder / "hasten.json").read_text())["distillation"]["seconds"] / 60
        result = hasten.distill(
            teacher=args.teacher,
            method="early_exit",
            nfe=args.nfe,
            out=folder,
            minutes=trained + step,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            options=options,
            resume=resume,
            progress=False,
        )
        trained = result.seconds / 60
        chunks.append({"steps": result.steps, "training_minutes": trained, "cpu_minutes": cpu_minutes()})
        print(json.dumps(chunks[-1]), flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "folder": str(folder),
        "chunks": chunks,
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

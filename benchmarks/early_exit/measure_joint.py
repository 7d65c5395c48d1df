"""A jointly trained early-exit student (``hasten distill --method early_exit``) against the unmodified teacher.

For each step count: FD of the teacher and of the student at full depth on held-out noise (seed 0, n images);
exit settings climbed on calibration noise (seed 1000, --calib-n images) in ladders of growing threshold until
the first that moves FD more than --budget from the *teacher's* FD on the same noise; the setting that skips
the most work (FLOP-weighted, ``accel_stats.saved_fraction``) among those that passed is then measured on the
held-out noise, with the paired CPU-time speed-up against the teacher (same noise, runs alternating, median of
--repeats; one thread). Every row is cached in OUT.rows.json, so a rerun continues where a kill left it.

Usage: python benchmarks/early_exit/measure_joint.py TEACHER STUDENT_FOLDER OUT.json [--steps 20 10] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import statistics
import time

import torch

import hasten
from hasten.accel import EarlyExitConfig
from hasten.distill.early_exit import EXIT_HEADS_FILE
from hasten.distributed import even_batch_size
from hasten.metrics.quality import evaluate_images

SOLVER = "dpmpp_2m"
CALIBRATION_SEED, HELDOUT_SEED = 1000, 0
THRESHOLDS = (0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.25, 0.3, 0.4)


def ladders(heads: str) -> list[list[EarlyExitConfig]]:
    """Constant thresholds; thresholds ramping down to 0 at the last step; exits in the first half only."""
    return [
        [EarlyExitConfig(heads=heads, threshold=t) for t in THRESHOLDS],
        [EarlyExitConfig(heads=heads, threshold=t, final_threshold=0.0) for t in THRESHOLDS],
        [EarlyExitConfig(heads=heads, threshold=t, stop=0.5) for t in THRESHOLDS],
    ]


def label(config: EarlyExitConfig | None) -> str:
    if config is None:
        return "full"
    return f"threshold={config.threshold:g},final={config.final_threshold},start={config.start:g},stop={config.stop:g}"


class Rows:
    """Measured rows, cached on disk by key."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.rows = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, make):
        if key not in self.rows:
            self.rows[key] = make()
            self.path.write_text(json.dumps(self.rows, indent=1) + "\n")
        return self.rows[key]


def quality(model, steps: int, seed: int, n: int, config: EarlyExitConfig | None) -> dict:
    gen = hasten.generate(
        model,
        n,
        solver=SOLVER,
        steps=steps,
        schedule="auto",
        seed=seed,
        guidance=1.0,
        batch_size=even_batch_size(n),
        accel=config,
    )
    metrics = evaluate_images(gen.images01, gen.labels, data="mnist", chunk=even_batch_size(n))
    stats = gen.accel_stats or {}
    return {
        "fd": metrics["fd"],
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "saved_fraction": stats.get("saved_fraction", 0.0),
        "exited_calls": stats.get("reused", 0),
        "calls": stats.get("calls"),
        "seconds": gen.seconds,
    }


@torch.no_grad()
def head_errors(model, heads_path: str, teacher, fractions=(0.9, 0.5, 0.1), n: int = 256) -> dict:
    """Per exit and time (fraction of the schedule's range, 1 = noise): the head's relative RMS error to the
    *teacher's* output on held-out digits, its estimate u and the true mean tanh error it estimates; and the
    full-depth network's relative error to the teacher."""
    from hasten.accel.early_exit import capture_blocks, load_exit_heads, patch_means
    from hasten.data import load_dataset, to_model_space

    data = load_dataset("mnist-heldout")
    x0, labels = to_model_space(data.images[:n]).float(), data.labels[:n].long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    heads = load_exit_heads(heads_path, model.network)
    schedule = teacher.schedule
    out = {}
    for frac in fractions:
        t = torch.full((n,), schedule.t_min + (schedule.t_max - schedule.t_min) * frac, dtype=torch.float64)
        x = (schedule.alpha(t).view(-1, 1, 1, 1) * x0 + schedule.sigma(t).view(-1, 1, 1, 1) * noise).float()
        timestep = teacher.denoiser.model_time(schedule.ve_sigma(t)).float()
        y = teacher.network(x, timestep, class_labels=labels).sample
        own, hidden, cond = capture_blocks(model.network, x, timestep, labels)
        row = {"full_depth_rel_error": float((own - y).norm() / y.norm()), "exits": []}
        for i in range(heads.num_exits):
            g = heads.output(i, hidden[i], cond)
            true = float(patch_means(torch.tanh((g - y).abs()), heads.patch_size).mean())
            u = float(heads.uncertainty(i, hidden[i], cond).mean())
            row["exits"].append({"rel_error": float((g - y).norm() / y.norm()), "u": u, "true_tanh_error": true})
        out[str(frac)] = row
    return out


def paired_speed(teacher, student, steps: int, config: EarlyExitConfig, n: int, repeats: int) -> dict:
    """CPU time and wall clock of the teacher's and the exiting student's sampling, same noise, alternating."""
    times: dict[str, list[tuple[float, float]]] = {"teacher": [], "exit": []}
    for _ in range(repeats):
        for name, model, accel in (("teacher", teacher, None), ("exit", student, config)):
            cpu, wall = time.process_time(), time.perf_counter()
            hasten.generate(
                model,
                n,
                solver=SOLVER,
                steps=steps,
                seed=HELDOUT_SEED,
                guidance=1.0,
                batch_size=even_batch_size(n),
                accel=accel,
            )
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    med = {name: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for name, v in times.items()}
    return {
        "n": n,
        "repeats": repeats,
        "cpu_seconds": {k: v[0] for k, v in med.items()},
        "wall_seconds": {k: v[1] for k, v in med.items()},
        "cpu_speedup": med["teacher"][0] / med["exit"][0],
        "wall_speedup": med["teacher"][1] / med["exit"][1],
        "runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 10])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--calib-n", type=int, default=500)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--timing-n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frozen-heads", help="heads of the teacher trained frozen, for the head-error table")
    parser.add_argument("--baselines-only", action="store_true", help="only the teacher's rows (while training)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = Rows(out.with_name(out.name + ".rows.json"))
    teacher = hasten.load(args.teacher)
    result = {
        "teacher": args.teacher,
        "student": args.student,
        "solver": SOLVER,
        "n": args.n,
        "seed": HELDOUT_SEED,
        "calibration": {"seed": CALIBRATION_SEED, "n": args.calib_n},
        "budget": args.budget,
        "by_steps": {},
    }
    for steps in args.steps:
        for seed, n in ((HELDOUT_SEED, args.n), (CALIBRATION_SEED, args.calib_n)):
            rows.get(f"teacher/{steps}/{seed}/{n}", lambda s=steps, e=seed, k=n: quality(teacher, s, e, k, None))
    if args.baselines_only:
        return
    student = hasten.load(args.student)
    heads = str(pathlib.Path(args.student) / EXIT_HEADS_FILE)
    result["head_errors"] = {"joint": rows.get("heads/joint", lambda: head_errors(student, heads, teacher))}
    if args.frozen_heads:
        result["head_errors"]["frozen"] = rows.get(
            "heads/frozen", lambda: head_errors(teacher, args.frozen_heads, teacher)
        )
    for steps in args.steps:
        base_cal = rows.rows[f"teacher/{steps}/{CALIBRATION_SEED}/{args.calib_n}"]["fd"]
        base = rows.rows[f"teacher/{steps}/{HELDOUT_SEED}/{args.n}"]["fd"]
        full = rows.get(
            f"student/{steps}/{HELDOUT_SEED}/{args.n}/full",
            lambda s=steps: quality(student, s, HELDOUT_SEED, args.n, None),
        )
        tried = []
        for ladder in ladders(heads):
            for config in ladder:
                row = rows.get(
                    f"student/{steps}/{CALIBRATION_SEED}/{args.calib_n}/{label(config)}",
                    lambda s=steps, c=config: quality(student, s, CALIBRATION_SEED, args.calib_n, c),
                )
                change = row["fd"] / base_cal - 1
                tried.append({"config": config.to_dict(), "fd_change_vs_teacher": change, **row})
                print(
                    f"{steps} steps {label(config)}: FD {change:+.1%} vs teacher, {row['saved_fraction']:.1%} skipped"
                )
                if change > args.budget:
                    break
        passed = [r for r in tried if r["fd_change_vs_teacher"] <= args.budget and r["saved_fraction"] > 0]
        chosen = max(passed, key=lambda r: r["saved_fraction"]) if passed else None
        entry = {
            "teacher_fd": base,
            "student_full": {**full, "fd_change_vs_teacher": full["fd"] / base - 1},
            "calibration_teacher_fd": base_cal,
            "calibration_rows": tried,
            "chosen": None,
        }
        if chosen is not None:
            config = EarlyExitConfig.from_dict(chosen["config"])
            held = rows.get(
                f"student/{steps}/{HELDOUT_SEED}/{args.n}/{label(config)}",
                lambda s=steps, c=config: quality(student, s, HELDOUT_SEED, args.n, c),
            )
            speed = rows.get(
                f"speed/{steps}/{label(config)}",
                lambda s=steps, c=config: paired_speed(teacher, student, s, c, args.timing_n, args.repeats),
            )
            entry["chosen"] = {
                "config": chosen["config"],
                "heldout": {**held, "fd_change_vs_teacher": held["fd"] / base - 1},
                "speed": speed,
            }
        result["by_steps"][str(steps)] = entry
    training = student.info.distillation
    result["training"] = {k: training.get(k) for k in ("steps", "seconds", "machine", "config")}
    result["machine"] = platform.processor() or platform.machine()
    result["torch"] = torch.__version__
    result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["cpu_seconds_of_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                s: {
                    "teacher_fd": e["teacher_fd"],
                    "student_full": e["student_full"]["fd"],
                    "chosen": e["chosen"] and {k: e["chosen"][k] for k in ("config", "heldout")},
                    "speed": e["chosen"] and e["chosen"]["speed"]["cpu_speedup"],
                }
                for s, e in result["by_steps"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

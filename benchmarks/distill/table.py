"""Print the markdown table of a `hasten bench --preset distill --student ...` run: every row's NFE, FD and its change
against the converged sampler (the reference row), precision/recall, RMSE to the teacher's reference, speed and,
for students, the training cost. Usage: python benchmarks/distill/table.py BENCH_FOLDER"""

from __future__ import annotations

import json
import pathlib
import sys


def main(folder: str) -> None:
    rows = [json.loads(line) for line in (pathlib.Path(folder) / "results.jsonl").read_text().splitlines() if line]
    reference = next(r for r in rows if r.get("kind") == "reference")
    ref_fd = reference["fd"]
    print(f"Converged sampler (reference, {reference['label']}): FD {ref_fd:.1f}\n")
    print("| configuration | NFE | FD | FD vs converged | precision | recall | RMSE to reference | images/s "
          "| training |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    order = {"student": 0, "plan": 1, "stock": 2}
    others = sorted((r for r in rows if r["kind"] != "reference"), key=lambda r: (r["nfe"], order.get(r["kind"], 9)))
    for r in others:
        training = r.get("training")
        cost = "" if not training else f"{training['method']}, {training['training_seconds'] / 60:.1f} min"
        guided = (r["recipe"]["provenance"].get("student") or {}).get("teacher_guidance", 1.0)
        # a guidance student learned the guided sampler: FD against the unguided converged sampler says nothing
        change = f"{100.0 * (r['fd'] - ref_fd) / ref_fd:+.1f}%" if guided == 1.0 else f"n/a (learned w={guided:g})"
        label = r["label"] if r["kind"] != "student" else f"**{r['label']}**"
        print(
            f"| {label} | {r['nfe']} | {r['fd']:.1f} | {change} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['rmse_ref']:.4f} | {r['images_per_second']:.0f} | {cost} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])

"""Ship a distilled student as a bundled model: its weights and hasten.json, a sample grid, and a model card whose
quality comes from a `hasten bench --student` run (the student's row beside the teacher's rows of that run).

Usage: python scripts/ship_student.py STUDENT_FOLDER NAME --bench BENCH_FOLDER [--dest src/hasten/models/weights]

Nothing is filled in by hand: the method, teacher, training cost and machine come from the student's hasten.json,
the quality numbers from the bench's results.jsonl (same noise, same feature network, the teacher's reference).
The run's checkpoint and any method work (teacher couplings) are left behind.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from hasten.generate import generate
from hasten.models.zoo import load
from hasten.viz import save_grid

KEEP = ("config.json", "diffusion_pytorch_model.safetensors", "hasten.json")


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("student", type=pathlib.Path)
    parser.add_argument("name")
    parser.add_argument("--bench", type=pathlib.Path, required=True, help="a `hasten bench --student` output folder")
    parser.add_argument("--dest", type=pathlib.Path, default=pathlib.Path("src/hasten/models/weights"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.bench / "results.jsonl").read_text().splitlines() if line.strip()]
    source = args.student.resolve()
    mine = [r for r in rows if r.get("kind") == "student" and pathlib.Path(r["recipe"]["model"]).name == source.name]
    if len(mine) != 1:
        raise SystemExit(f"{args.bench} has {len(mine)} rows of student {source.name}; bench it with --student")
    row = mine[0]
    info = json.loads((source / "hasten.json").read_text())
    d = info["distillation"]
    out = args.dest / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(source / name, out / name)
    info["name"] = args.name
    keys = ("label", "nfe", "fd", "fd_real_vs_real", "precision", "recall", "confidence", "label_accuracy",
            "rmse_ref", "images_per_second", "seconds")  # fmt: skip
    same_nfe = [r for r in rows if r.get("kind") == "stock" and r.get("nfe") == row["nfe"]]
    reference = next((r for r in rows if r.get("kind") == "reference"), None)
    info["quality"] = {
        "bench": str(args.bench),
        "n": rows[0].get("n"),
        "student": {k: row.get(k) for k in keys},
        "reference": None if reference is None else {k: reference.get(k) for k in keys},
        "stock_same_nfe": [{k: r.get(k) for k in keys} for r in same_nfe],
    }
    (out / "hasten.json").write_text(json.dumps(info, indent=2) + "\n")
    student = load(out)
    grid = generate(student, 100, seed=0).images01
    save_grid(grid, out / "samples.png", nrow=10)
    s = info["sampler"]
    minutes = (d["seconds"] + d.get("extra_seconds", 0.0) + d.get("parent_seconds", 0.0)) / 60
    chain = [f"`{step['method']}` ({step['nfe']} NFE, student `{step['student']}`)" for step in d.get("lineage", [])]
    made = " then ".join([*chain, f"`{d['method']}`"])
    table = ["| sampler | NFE | FD | precision | recall | confidence | label accuracy | RMSE to teacher's reference |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in [row] + same_nfe + ([reference] if reference else []):
        table.append(f"| {r['label']} | {r['nfe']} | {fmt(r.get('fd'), 1)} | {fmt(r.get('precision'))} | "
                     f"{fmt(r.get('recall'))} | {fmt(r.get('confidence'))} | {fmt(r.get('label_accuracy'))} | "
                     f"{fmt(r.get('rmse_ref'), 4)} |")  # fmt: skip
    card = f"""# {args.name}

The bundled few-step student of `{d["teacher"]}` (weights fingerprint `{d["teacher_fingerprint"]}`): it samples
with its own sampler, `{s["solver"]}` on the `{s["schedule"]}` grid at {s["steps"]} steps ({row["nfe"]} network
calls per image), with no flags: `hasten sample --model {args.name}`, `hasten.generate(hasten.load("{args.name}"), n)`.

* **Method:** `hasten distill` {made} (the last run's settings: options
  `{json.dumps(d["config"]["options"])}`, batch {d["config"]["batch_size"]}, lr {d["config"]["lr"]}, EMA
  {d["config"]["ema_decay"]}, guidance {d["config"]["guidance"]}; commands in benchmarks/results/distill/README.md;
  methods in docs/guide/distillation.md).
* **Network:** {info["arch"]}, {d["parameters"]:,} parameters, predicts `{info["objective"]}`.
* **Training cost:** {minutes:.1f} minutes in all on {d["machine"]} ({d["device"]}): the last run
  {d["steps"]:,} updates ({d["images_seen"]:,} images) in {d["seconds"] / 60:.1f} minutes, the students before
  it {d.get("parent_seconds", 0.0) / 60:.1f} minutes, teacher samples {d.get("extra_seconds", 0.0):.0f} s.

## Measured quality

From one `hasten bench` run (`{args.bench}`): {rows[0].get("n") or "the same"} images of the bench's held-out
noise (seed 0), FD and precision/recall in hasten's bundled MNIST feature network against the 5,000 held-out
digits, RMSE to the *teacher's* converged sampler (its 100-step third-order reference solve of the same noise).
The student's row first, then the teacher's stock samplers at the same NFE and the teacher's reference.

{chr(10).join(table)}

Sample grid: `samples.png` (100 samples, column c shows digit c).

## Limits

A student of a 28x28 MNIST model distilled on 2 CPU cores in minutes: it shows what each method does on the
same scale as the training-free samplers, not what the methods reach with GPU-days of training.
"""
    (out / "MODEL_CARD.md").write_text(card)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 2**20:.1f} MiB, student FD {row.get('fd')}, NFE {row['nfe']}")


if __name__ == "__main__":
    main()

"""Ship a pruned model (a `hasten prune` folder) as a bundled model: its weights, hasten.json and a model card whose
quality and speed come from `benchmarks/prune/measure.py` (the pruned network beside its teacher: paired network
timing, MACs, FD at the same sampler on the same held-out noise).

Usage: python scripts/ship_pruned.py PRUNED_FOLDER NAME --measure MEASURE.json [--note TEXT] [--dest DIR]

Nothing is filled in by hand: structure, fine-tune cost and machine come from the folder's hasten.json, the numbers
from the measurement. The run's checkpoint and method work are left behind.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

KEEP = ("config.json", "diffusion_pytorch_model.safetensors", "hasten.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pruned", type=pathlib.Path)
    parser.add_argument("name")
    parser.add_argument("--measure", type=pathlib.Path, required=True)
    parser.add_argument("--note", default="", help="how the fine-tune ran, e.g. what else shared the machine")
    parser.add_argument("--dest", type=pathlib.Path, default=pathlib.Path("src/hasten/models/weights"))
    args = parser.parse_args()
    measured = json.loads(args.measure.read_text())
    if pathlib.Path(measured["pruned"]).resolve() != args.pruned.resolve():
        raise SystemExit(f"{args.measure} measured {measured['pruned']}, not {args.pruned}")
    out = args.dest / args.name
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    out.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(args.pruned / name, out / name)
    info = json.loads((out / "hasten.json").read_text())
    info["name"] = args.name
    info["quality"] = {"pruned": measured}
    (out / "hasten.json").write_text(json.dumps(info, indent=2) + "\n")
    p, d = info["pruning"], info["distillation"]
    timing = measured["network_timing"]
    rows = "\n".join(
        f"| {q['steps']} | {q['model']} | {q['fd']:.1f} | "
        + (f"{q['fd_change']:+.1%} | {q['sampling_speedup']:.2f}x |" if "fd_change" in q else "| |")
        for q in measured["quality"]
    )
    amount = f"ratio {p['ratio']}" if p["structure_kind"] == "channels" else f"blocks {p['blocks_removed']} removed"
    speed = ", ".join(
        f"{t['speedup']:.2f}x at {threads} thread{'s' if threads != '1' else ''}"
        for threads, t in timing["by_threads"].items()
    )
    sampler = info["sampler"]
    c = d["config"]
    reproduce = (
        f"hasten prune --model {d['teacher']} {command_options(c['options'])} --lr {c['lr']:g} --batch-size "
        f"{c['batch_size']} --ema-decay {c['ema_decay']:g} --finetune-minutes {c['minutes']:g} --out DIR"
    )
    note = f"; {args.note}" if args.note else ""
    card = f"""# {args.name}

`{d["teacher"]}` pruned by `hasten prune` ({p["structure_kind"]}, importance `{p["importance"]}`, {amount}) and
fine-tuned by distillation from it; loads with `hasten.load("{args.name}")` (its `config.json` is the unpruned
architecture's; `hasten.json`'s `pruning` record narrows it).

* **Network:** {p["parameters_before"]:,} -> {p["parameters_after"]:,} parameters; MACs per image
  {p["macs_before"] / 1e6:.1f}M -> {p["macs_after"] / 1e6:.1f}M ({p["macs_before"] / p["macs_after"]:.2f}x fewer).
* **Measured network speed-up** (one call at batch {timing["batch"]}, paired with the teacher, median of 9):
  {speed}; {measured["machine"]}, torch {measured["torch"]}, {measured["measured"]}.
* **Fine-tune cost:** {d["steps"]:,} updates of batch {d["config"]["batch_size"]} in {d["seconds"] / 60:.1f} minutes
  ({d["machine"]}, {d["device"]}){note}.
* **Fine-tune recipe:** reproduce with `{reproduce}`.
* **Sampler (its default recipe):** `{sampler["solver"]}`, {sampler["steps"]} steps, `{sampler["schedule"]}` grid.

## Quality (FD against 5,000 held-out MNIST digits, bundled feature network, n = {measured["n"]}, seed 0, same noise)

| steps | network | FD | FD change vs teacher | sampling speed-up |
|---|---|---|---|---|
{rows}
"""
    (out / "MODEL_CARD.md").write_text(card)
    print(f"wrote {out}")


def command_options(options: dict) -> str:
    """``hasten prune`` flags for the run's options: structure, importance, ratio and blocks have flags of their own."""
    own = ("structure", "importance", "ratio", "blocks")
    flags = [f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items() if k in own]
    return " ".join(flags + [f"--option {k}={v}" for k, v in options.items() if k not in own])


if __name__ == "__main__":
    main()

"""The reward benchmark's JSON (``measure.py``) as a markdown table, rows in order of evaluations per sample.

python benchmarks/reward/table.py benchmarks/results/reward/mnist-unet-symmetry*.json
"""

from __future__ import annotations

import json
import pathlib
import sys


def main(paths: list[str]) -> None:
    rows, settings = {}, None
    for path in paths:
        record = json.loads(pathlib.Path(path).read_text())
        settings = settings or record["settings"]
        rows.update(record["rows"])
    s = settings
    print(f"{s['model']}, reward `{s['reward']}`, {s['solver']} {s['steps']} steps, n = {s['n']}, seed {s['seed']}\n")
    print("| method | evaluations / sample | reward mean | reward p10 | FD | FD real vs real | label accuracy | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in sorted(rows.items(), key=lambda item: (item[1]["evaluations_per_sample"], item[0])):
        extra = f" ({r['steps']} steps)" if "steps" in r else ""
        print(
            f"| {name}{extra} | {r['evaluations_per_sample']} | {r['reward_mean']:.4f} | {r['reward_p10']:.4f} | "
            f"{r['fd']:.1f} | {r['fd_real_vs_real']:.1f} | {r.get('label_accuracy', float('nan')):.3f} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Summarise a `hasten bench --preset tuning --plan ...` run: each plan against the best stock rows at its NFE.

Usage: python scripts/tuning_table.py BENCH_DIR   (prints a Markdown table)

For each NFE that has a plan row: the plan, the best stock configuration by RMSE to the reference (any
library), the best hasten and the best diffusers configuration, with FD and the FD gap to the reference
row (FD of the reference solve on the same noise), and the plan's ratios to the best stock row.
"""

from __future__ import annotations

import sys

from hasten.bench.runner import read_results


def main() -> None:
    rows = read_results(sys.argv[1])
    ref = next(r for r in rows if r["library"] == "reference")
    plans = sorted((r for r in rows if r["solver"] == "plan"), key=lambda r: r["nfe"])
    print(f"Reference solve FD: {ref['fd']:.1f} (same noise, n = {ref['n']}).\n")
    print("| NFE | configuration | RMSE to reference | FD | FD gap to reference | plan / this (RMSE, FD gap) |")
    print("|---|---|---|---|---|---|")
    for plan in plans:
        stock = [r for r in rows if r["nfe"] == plan["nfe"] and r["library"] != "reference" and r["solver"] != "plan"]
        best = min(stock, key=lambda r: r["rmse_ref"])
        best_h = min((r for r in stock if r["library"] == "hasten"), key=lambda r: r["rmse_ref"])
        best_d = min((r for r in stock if r["library"] == "diffusers"), key=lambda r: r["rmse_ref"])
        best_fd = min(stock, key=lambda r: r["fd"])
        seen = []
        for tag, r in (("tuned plan", plan), ("best stock (RMSE)", best), ("best hasten", best_h),
                       ("best diffusers", best_d), ("best stock (FD)", best_fd)):  # fmt: skip
            if r is not plan and any(r is s for s in seen):
                continue
            seen.append(r)
            gap = r["fd"] - ref["fd"]
            plan_gap = plan["fd"] - ref["fd"]
            if r is plan:
                ratio = ""
            elif plan_gap <= 0:
                ratio = f"{plan['rmse_ref'] / r['rmse_ref']:.2f}x, plan at or below the reference FD"
            elif gap <= 0:
                ratio = f"{plan['rmse_ref'] / r['rmse_ref']:.2f}x, n/a (gap <= 0)"
            else:
                ratio = f"{plan['rmse_ref'] / r['rmse_ref']:.2f}x, {plan_gap / gap:.2f}x"
            label = r["label"].split(" (")[0] + (
                f" ({r['schedule']})" if r.get("schedule") not in (None, "plan") else ""
            )
            print(f"| {r['nfe']} | {tag}: `{label}` | {r['rmse_ref']:.4f} | {r['fd']:.1f} | {gap:+.1f} | {ratio} |")


if __name__ == "__main__":
    main()

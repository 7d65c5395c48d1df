"""The bench report: Pareto plots (PNG) and one self-contained HTML page (everything embedded, offline).

``render(DIR)`` reads ``DIR/results.jsonl`` and writes ``DIR/pareto_nfe.png``, ``DIR/pareto_seconds.png``,
``DIR/error_nfe.png`` and ``DIR/report.html``; ``hasten report DIR`` calls it. A row's kind and its series
name come from what the row recorded (``kind``, ``recipe``); rows written before bench rows were recipes are
read by :func:`row_kind`'s fallback.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import pathlib
import re
from collections import defaultdict
from typing import Any

from .._io import atomic_path, write_text_atomic
from ..recipe import describe_recipe, training_cost
from .runner import read_results

__all__ = ["cache_comparison", "pareto_front", "quant_comparison", "render", "row_kind"]

COLOURS = {
    "hasten": "#d9480f",
    "diffusers": "#1c7ed6",
    "reference": "#2b8a3e",
    "DeepCache": "#7048e8",
    "cache-dit": "#0ca678",
}
OTHER_COLOUR = "#868e96"
STUDENT_COLOUR = "#ae3ec9"  # distilled students: their own marker, a point each
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.hasten td:first-child { color: #d9480f; }
tr.diffusers td:first-child { color: #1c7ed6; }
tr.front { font-weight: 600; background: #fff4e6; }
figure { display: inline-block; margin: 6px; width: 300px; font-size: 11px; vertical-align: top; }
figure img { width: 100%; image-rendering: pixelated; }
.plots img { max-width: 32%; }
"""


def pareto_front(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """Rows not dominated in (x, y), both lower-is-better; sorted by x."""
    usable = sorted((r for r in rows if r.get(x) is not None and r.get(y) is not None), key=lambda r: (r[x], r[y]))
    front, best = [], math.inf
    for r in usable:
        if r[y] < best:
            front.append(r)
            best = r[y]
    return front


def row_kind(row: dict[str, Any]) -> str:
    """What a row measures: reference, stock, plan, cache, quant or peer (``Recipe.kind``), as the row records it.

    Rows of bench matrix version 1 (before rows were recipes; committed result folders) have no ``kind``: they
    are read by that format, where the library, the solver "plan" and the option that named the technique
    ("accel"/"cache_peer", "quant"/"quant_peer") said it."""
    if "kind" in row:
        return row["kind"]
    legacy = set(row.get("options") or {})
    if row["library"] == "reference":
        return "reference"
    if row["solver"] == "plan":
        return "plan"
    if legacy & {"accel", "cache_peer"}:
        return "cache"
    if legacy & {"quant", "quant_peer"}:
        return "quant"
    return "stock" if row["library"] == "hasten" else "peer"


def _series_name(row: dict[str, Any]) -> str:
    """A line across step counts: the recipe's description without its step count (a plan is its own point); a
    masked model's row names its series (the sampler without its call budget)."""
    if "series" in row:
        return row["series"]
    if "recipe" in row:
        return describe_recipe(row["recipe"], steps=False)
    return re.sub(r"\b\d+ steps, ", "", row["label"])  # a version-1 row: its label without the step count


def _plot(rows: list[dict[str, Any]], x: str, y: str, path: pathlib.Path, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if row_kind(r) != "reference" and r.get(x) is not None and r.get(y) is not None:
            series[_series_name(r)].append(r)
    # With many series a legend hides the data: then only tuned plans and the best series of each library
    # (lowest mean y) are labelled; the rest are drawn faintly under "other configurations".
    crowded = len(series) > 12
    named: set[str] = set()
    if crowded:
        for lib in {pts[0]["library"] for pts in series.values()}:
            mine = {n: p for n, p in series.items() if p[0]["library"] == lib and row_kind(p[0]) != "plan"}
            if mine:
                named.add(min(mine, key=lambda n: sum(r[y] for r in mine[n]) / len(mine[n])))
    other_labelled = False
    for name, pts in sorted(series.items()):
        pts.sort(key=lambda r: r[x])
        lib = pts[0]["library"]
        xs, ys = [p[x] for p in pts], [p[y] for p in pts]
        if row_kind(pts[0]) == "plan":
            ax.plot(xs, ys, "*", color="crimson", ms=11, label=name, zorder=5)
        elif row_kind(pts[0]) == "student":
            ax.plot(xs, ys, "D", color=STUDENT_COLOUR, ms=7, label=name, zorder=5)
        elif row_kind(pts[0]) == "discrete":  # a masked model's samplers: one colour per sampler
            colour = plt.get_cmap("tab10")(sorted(series).index(name) % 10)
            ax.plot(xs, ys, "o-", color=colour, lw=1.4, ms=4, label=name, zorder=4)
        elif not crowded or name in named:
            colour = COLOURS.get(lib, OTHER_COLOUR)
            ax.plot(xs, ys, "o-" if lib == "hasten" else "s--", color=colour, alpha=0.8 if crowded else 0.55,
                    lw=1.6 if crowded else 1.2, ms=4, label=name, zorder=4)  # fmt: skip
        else:
            label = None if other_labelled else "other configurations"
            other_labelled = True
            colour = COLOURS.get(lib, OTHER_COLOUR)
            ax.plot(xs, ys, "o-" if lib == "hasten" else "s--", color=colour, alpha=0.18, lw=0.8, ms=2.5,
                    label=label)  # fmt: skip
    front = pareto_front([r for r in rows if row_kind(r) != "reference"], x, y)
    if front:
        ax.step([r[x] for r in front], [r[y] for r in front], where="post", color="black", lw=1.5, label="Pareto front")
    floor = [r.get("fd_real_vs_real") for r in rows if r.get("fd_real_vs_real") is not None]
    if y == "fd" and floor:
        ax.axhline(floor[0], color="grey", ls=":", label="real vs real (same n)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a plot with no measured series (e.g. a one-row run) has none
        ax.legend(fontsize=6 if not crowded else 7, ncol=2 if not crowded else 1, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _against_plain(rows: list[dict[str, Any]], kind: str):
    """Each row of ``kind`` (a cache, a quantised model...) with the plain hasten row at its setting (same
    solver, grid, steps and guidance, no options, no technique: same run, same noise)."""

    def setting(r: dict[str, Any]) -> tuple:
        return (r["solver"], r.get("schedule"), r["steps"], r["guidance"])

    def options(r: dict[str, Any]) -> dict[str, Any]:  # as asked (a version-1 row has only those as run)
        return (r["recipe"] if "recipe" in r else r).get("options") or {}

    plain = {setting(r): r for r in rows if row_kind(r) == "stock" and not options(r) and r.get("seconds")}
    for r in rows:
        if row_kind(r) == kind and setting(r) in plain:
            yield r, plain[setting(r)]


def cache_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cached row (hasten cache config or peer cache) against the uncached row at its setting.

    ``speedup`` is the uncached row's median seconds over the cached row's (same run, same noise);
    ``fd_change`` the relative FD change; ``rmse_to_uncached`` is not stored, so the error to the reference
    solve of both is given instead.
    """
    out = []
    for r, base in _against_plain(rows, "cache"):
        stats = r.get("accel_stats") or {}
        out.append({
            "label": r["label"], "library": r["library"], "solver": r["solver"], "steps": r["steps"],
            "guidance": r["guidance"], "seconds": r["seconds"], "seconds_uncached": base["seconds"],
            "speedup": base["seconds"] / r["seconds"], "fd": r["fd"], "fd_uncached": base["fd"],
            "fd_change": r["fd"] / base["fd"] - 1.0, "rmse_ref": r["rmse_ref"], "rmse_ref_uncached": base["rmse_ref"],
            "saved_fraction": stats.get("saved_fraction"), "cache_bytes": stats.get("cache_bytes"),
            "peak_memory_bytes": r.get("peak_memory_bytes"),
            "peak_memory_bytes_uncached": base.get("peak_memory_bytes"),
        })  # fmt: skip
    return out


def quant_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each quantised row (hasten folder or torchao peer) against the float row at its setting: speed-up
    (same run, same noise), relative FD change, size on disk as a fraction of the float checkpoint."""
    out = []
    for r, base in _against_plain(rows, "quant"):
        size, base_size = r.get("bytes_on_disk"), base.get("bytes_on_disk")
        out.append({
            "label": r["label"], "library": r["library"], "solver": r["solver"], "steps": r["steps"],
            "guidance": r["guidance"], "seconds": r["seconds"], "seconds_float": base["seconds"],
            "speedup": base["seconds"] / r["seconds"], "fd": r["fd"], "fd_float": base["fd"],
            "fd_change": r["fd"] / base["fd"] - 1.0, "rmse_ref": r["rmse_ref"], "rmse_ref_float": base["rmse_ref"],
            "bytes_on_disk": size, "size_ratio": None if not (size and base_size) else size / base_size,
            "execution": r.get("execution"), "peak_memory_bytes": r.get("peak_memory_bytes"),
        })  # fmt: skip
    return out


def _quant_section(rows: list[dict[str, Any]]) -> str:
    table = quant_comparison(rows)
    if not table:
        return ""
    head = ("configuration", "FD", "float FD", "FD change", "RMSE ref", "size MB", "size vs float", "seconds",
            "float s", "speed-up", "execution")  # fmt: skip
    body = []
    for c in table:
        ratio = "–" if c["size_ratio"] is None else f"{c['size_ratio']:.2f}x"
        size = "–" if c["bytes_on_disk"] is None else f"{c['bytes_on_disk'] / 1e6:.2f}"
        cells = [html.escape(c["label"]), _fmt(c["fd"], 4), _fmt(c["fd_float"], 4), f"{c['fd_change']:+.1%}",
                 _fmt(c["rmse_ref"]), size, ratio, _fmt(c["seconds"]), _fmt(c["seconds_float"]),
                 f"{c['speedup']:.2f}x", html.escape(str(c["execution"] or "–"))]  # fmt: skip
        body.append(f'<tr class="{html.escape(c["library"])}">' + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return f"""<h2>Quantisation: against the float model at the same setting</h2>
<p>FD change: relative to the float row's FD (same noise). Size: the weights file on disk (hasten: integers and
scales in safetensors; torchao: its serialised state dict) over the float32 checkpoint. Speed-up: median sampling
seconds of the float row over the quantised row, measured in this run on this machine; the execution column says
what ran: a simulated (fake-quantised) model is never a speed claim.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{"".join(body)}
</table>
"""


def _cache_section(rows: list[dict[str, Any]]) -> str:
    table = cache_comparison(rows)
    if not table:
        return ""
    head = ("configuration", "speed-up", "seconds", "uncached s", "FD", "uncached FD", "FD change", "RMSE ref",
            "uncached RMSE ref", "work skipped", "cache MB", "peak MB", "uncached peak MB")  # fmt: skip

    def mb(v: Any) -> str:
        return "–" if v is None else f"{v / 1e6:.1f}"

    body = []
    for c in table:
        skipped = "–" if c["saved_fraction"] is None else f"{c['saved_fraction']:.0%}"
        cells = [html.escape(c["label"]), f"{c['speedup']:.2f}x", _fmt(c["seconds"]), _fmt(c["seconds_uncached"]),
                 _fmt(c["fd"], 4), _fmt(c["fd_uncached"], 4), f"{c['fd_change']:+.1%}", _fmt(c["rmse_ref"]),
                 _fmt(c["rmse_ref_uncached"]), skipped, mb(c["cache_bytes"]), mb(c["peak_memory_bytes"]),
                 mb(c["peak_memory_bytes_uncached"])]  # fmt: skip
        body.append(f'<tr class="{html.escape(c["library"])}">' + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return f"""<h2>Caching: against the uncached run at the same setting</h2>
<p>Speed-up: median sampling seconds of the uncached row over the cached row, both measured in this run from the
same noise on the same machine. FD change: relative to the uncached row's FD. Peak MB: the process's peak resident
memory during the configuration's timed runs (CPU), or peak allocated GPU memory. Peers run with their documented
default settings; hasten's caches with the setting `hasten accelerate calibrate` chose.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{"".join(body)}
</table>
"""


def _img(path: pathlib.Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _quality_note(first: dict[str, Any], has_fd: bool) -> str:
    if has_fd:
        return ("FD and precision/recall: bundled MNIST features against 5,000 held-out digits; real-vs-real FD at "
                f"this n: {_fmt(first.get('fd_real_vs_real'))}.")  # fmt: skip
    return ("No FD: hasten has no feature network for this model's data, so quality is the error to the reference "
            "solve (decoded images).")  # fmt: skip


def _student_note(students: list[dict[str, Any]]) -> str:
    if not students:
        return ""
    return (
        f" {len(students)} distilled student row(s) (<code>student[...]</code>): the student's own network at its "
        "own sampler, from the same noise, scored against this model's reference solve; the training column is "
        "its distillation time (teacher samples included) and device, not part of its sampling seconds."
    )


def render(folder: str | os.PathLike) -> pathlib.Path:
    """Render plots and ``report.html`` from ``folder/results.jsonl``; returns the HTML path."""
    folder = pathlib.Path(folder)
    rows = read_results(folder)
    if not rows:
        raise FileNotFoundError(f"no results in {folder / 'results.jsonl'}; run `hasten bench --out {folder}` first")
    # FD where the data has a feature network (MNIST); otherwise (pipelines) the error to the reference solve
    has_fd = any(r.get("fd") is not None for r in rows)
    quality, quality_label = ("fd", "FD to held-out digits") if has_fd else ("rmse_ref", "RMSE to reference")
    plots = {
        "pareto_nfe.png": ("nfe", quality, "NFE (denoiser calls)", quality_label, "Quality against NFE"),
        "pareto_seconds.png": ("seconds", quality, "sampling seconds", quality_label, "Quality against time"),
        "error_nfe.png": (
            "nfe",
            "rmse_ref",
            "NFE",
            "RMSE to reference (exact for gmm)",
            "Error to the reference solve",
        ),
    }
    for name, (x, y, xl, yl, title) in plots.items():
        _plot(rows, x, y, folder / name, xl, yl, title)
    env = next((r.get("environment") for r in rows if r.get("environment")), {})
    cols = [("label", "configuration"), ("nfe", "NFE"), ("seconds", "seconds"), ("images_per_second", "images/s"),
            ("fd", "FD"), ("precision", "precision"), ("recall", "recall"), ("rmse_ref", "RMSE ref"),
            ("psnr_ref", "PSNR ref"), ("label_accuracy", "label acc."), ("memorised_share", "memorised")]  # fmt: skip
    students = [r for r in rows if r.get("training")]
    if students:  # a student's NFE and seconds leave out what it cost to train: say it beside them
        cols.insert(1, ("training", "training"))
    front = {r["key"] for r in pareto_front([r for r in rows if row_kind(r) != "reference"], "nfe", quality)}
    body = []
    for r in sorted(
        rows, key=lambda r: (r["library"] != "reference", r["guidance"], r["library"], r["solver"], r["steps"])
    ):
        cls = f' class="{r["library"]}{" front" if r["key"] in front else ""}"'
        cells = [training_cost(r[k]) if k == "training" and r.get(k) else r.get(k) for k, _ in cols]
        body.append(f"<tr{cls}>" + "".join(f"<td>{_fmt(v)}</td>" for v in cells) + "</tr>")
    grids = []
    for r in rows:
        path = folder / r.get("grid", "")
        if r.get("grid") and path.exists():
            caption = f"{html.escape(r['label'])}<br>FD {_fmt(r.get('fd'))}, RMSE {_fmt(r.get('rmse_ref'))}"
            grids.append(f'<figure><img src="{_img(path)}" alt="{html.escape(r["label"])}">'
                         f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    first = rows[0]
    runs_path = folder / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    wall = ""
    if runs:
        total = sum(r["wall_seconds"] for r in runs)
        last = runs[-1]
        wall = (f" Bench wall time: {total:.0f} s in {len(runs)} run(s) (loading, reference solves, sampling and "
                f"metrics; last run {last['wall_seconds']:.0f} s for {last['rows_measured']} new rows).")  # fmt: skip
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hasten bench: {html.escape(first.get("model", ""))}</title>
<style>{CSS}</style></head><body>
<h1>hasten bench — {html.escape(first.get("model", ""))}</h1>
<p>{len(rows)} configurations, {first.get("n")} samples each from the same noise (seed {first.get("seed")}).
Machine: {html.escape(str(env.get("machine", "?")))}; torch {html.escape(str(env.get("torch", "?")))},
diffusers {html.escape(str(env.get("diffusers", "?")))}, hasten {html.escape(str(env.get("hasten", "?")))}.{wall}
{_quality_note(first, has_fd)} RMSE/PSNR: against the reference row (a many-step third-order solve from
the same noise; pixels in [0, 1]), or the exact solution for the analytic mixture. Bold rows are on the
{"FD" if has_fd else "RMSE"}-NFE Pareto front.{_student_note(students)}</p>
<div class="plots">{"".join(f'<img src="{_img(folder / name)}" alt="{name}">' for name in plots)}</div>
{_cache_section(rows)}
{_quant_section(rows)}
<h2>Results</h2>
<table><tr>{"".join(f"<th>{h}</th>" for _, h in cols)}</tr>
{"".join(body)}
</table>
<h2>Samples (first 50 of each configuration)</h2>
{"".join(grids)}
</body></html>
"""
    return write_text_atomic(folder / "report.html", page)

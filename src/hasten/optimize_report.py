"""The self-contained HTML page of ``hasten optimize``: the time-quality Pareto front, what each technique
contributed, and how the budget was spent."""

from __future__ import annotations

import html
import io
import pathlib
from typing import Any

from ._io import write_text_atomic

__all__ = ["render_optimize"]

STAGE_COLOURS = {"stock": "#888888", "peers": "#9467bd", "students": "#ae3ec9", "plans": "#1f77b4", "caches": "#2ca02c",
                 "quant": "#d62728"}  # fmt: skip


def _plot(result: Any, quality: str, budget: float | None) -> str:
    """A PNG (data URI) of seconds per image against quality loss: timed candidates by stage, the front, the pick."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    timed = [r for r in result.evaluations if r.get("seconds_per_image") is not None]
    for stage, colour in STAGE_COLOURS.items():
        rows = [r for r in timed if r["stage"] == stage]
        if rows:
            ax.scatter([r["seconds_per_image"] * 1e3 for r in rows], [r[quality] for r in rows], c=colour,
                       label=stage, s=30, alpha=0.8)  # fmt: skip
    front = sorted(result.front, key=lambda r: r["seconds_per_image"])
    if front:
        ax.plot([r["seconds_per_image"] * 1e3 for r in front], [r[quality] for r in front], "k--", lw=1,
                label="Pareto front")  # fmt: skip
    if result.chosen is not None:
        ax.scatter([result.chosen["seconds_per_image"] * 1e3], [result.chosen[quality]], marker="*", s=260,
                   c="gold", edgecolors="k", label="chosen", zorder=5)  # fmt: skip
    if budget is not None:
        ax.axhline(budget, color="r", lw=0.8, ls=":", label="budget")
        if quality == "quality_loss":  # the FD budget holds either way
            ax.axhline(-budget, color="r", lw=0.8, ls=":")
    ax.set_xlabel("milliseconds per image (paired timing, this machine)")
    ax.set_ylabel("FD change from the converged sampler" if quality == "quality_loss" else "RMSE to reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _num(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_optimize(result: Any, path: pathlib.Path, *, model_name: str, config: Any) -> pathlib.Path:
    """Write the page for ``result`` (an :class:`hasten.optimize.OptimizeResult`) to ``path``."""
    from .bench.report import CSS

    has_fd = any(r.get("fd") is not None for r in result.evaluations)
    quality = "quality_loss" if has_fd else "rmse_ref"
    budget = config.max_quality_loss if has_fd else config.max_rmse
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>hasten optimize: {esc(model_name)}</title>",
             f"<style>{CSS}</style><h1>hasten optimize: {esc(model_name)}</h1>"]  # fmt: skip
    if result.chosen is not None:
        c = result.chosen
        parts.append(
            f"<p><b>Chosen:</b> {esc(c['label'])}: {_num(c.get('speedup'), '.2f')}x the stock baseline's speed, "
            f"quality loss {_num(c.get('quality_loss'), '+.1%')} (budget {config.max_quality_loss:.0%}), RMSE to "
            f"reference {c['rmse_ref']:.4f}; confirmed on noise seed {c['confirmation']['seed']}: "
            f"{_num(c['confirmation'].get('quality_loss'), '+.1%')}.</p>"
        )
    else:
        parts.append("<p><b>Nothing met the budget.</b></p>")
    parts.append(f"<img src='{_plot(result, quality, budget)}' alt='Pareto front'>")
    parts.append("<h2>What each technique contributed</h2><table><tr><th>step</th><th>recipe</th><th>NFE</th>"
                 "<th>speed-up</th><th>ms / image</th><th>quality loss</th><th>RMSE</th></tr>")  # fmt: skip
    for row in result.path:
        parts.append(
            f"<tr><td>{esc(row['step'])}</td><td>{esc(row['label'])}</td><td>{row['nfe']}</td>"
            f"<td>{_num(row.get('speedup'), '.2f')}x</td><td>{_num(row['seconds_per_image'] * 1e3, '.2f')}</td>"
            f"<td>{_num(row.get('quality_loss'), '+.1%')}</td><td>{row['rmse_ref']:.4f}</td></tr>"
        )
    parts.append("</table><h2>Timed candidates</h2><table><tr><th>stage</th><th>recipe</th><th>NFE eq.</th>"
                 "<th>speed-up</th><th>quality loss</th><th>RMSE</th></tr>")  # fmt: skip
    for row in sorted((r for r in result.evaluations if r.get("speedup")), key=lambda r: -r["speedup"]):
        parts.append(
            f"<tr><td>{esc(row['stage'])}</td><td>{esc(row['label'])}</td><td>{row['nfe_equivalent']:.1f}</td>"
            f"<td>{row['speedup']:.2f}x</td><td>{_num(row.get('quality_loss'), '+.1%')}</td>"
            f"<td>{row['rmse_ref']:.4f}</td></tr>"
        )
    b = result.budget
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in b["seconds_by_stage"].items())
    counts = ", ".join(f"{k} {v}" for k, v in b["evaluations_by_stage"].items())
    parts.append(
        f"</table><h2>Budget</h2><p>{b['seconds_used']:.0f} s of {b['minutes'] * 60:.0f} s: {esc(spent)}. "
        f"Evaluations: {esc(counts)} ({b['cached_evaluations']} from the cache of earlier runs). "
        f"{len(result.evaluations)} candidates scored on {config.n} images of noise seed "
        f"{result.reference['seeds']['score']} against the {result.reference['steps']}-step reference solve.</p>"
    )
    if b["notes"]:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in b["notes"]) + "</ul>")
    return write_text_atomic(path, "\n".join(parts) + "\n")

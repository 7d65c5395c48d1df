"""Does ensembling pay on the bundled MNIST models? FD against held-out digits, members vs ensembles.

Every row samples ``n`` images with one sampler (``--solver``, ``--steps``, ``--seed``, labels spread evenly over
the ten digits, guidance 1) from one model and scores them with :func:`hasten.metrics.quality.evaluate_images`
(FD and precision/recall in the bundled classifier's features against the 5,000 held-out digits). The noise is
hasten's per-index convention, so every row starts from the same initial noise and, for the stochastic DDPM
sampler, draws the same step noise: the rows are paired.

An ensemble of ``N`` members makes ``N`` member network evaluations per sampler step (``nfe`` counts denoiser
calls; ``member_evaluations`` is what it costs): the script also samples each single model with ``N`` times the
steps, the comparison at equal network work.

A row is a label and a spec ``MODEL@STEPS`` (``MODEL``: a bundled name or a model folder). Rows already in the
output JSON (same label, model fingerprint and setting) are kept, so the script can be rerun or run as several
processes on disjoint ``--row`` sets writing their own files (``--out``), merged with ``--merge``.

Usage:
    python benchmarks/ensemble/measure.py --row unet=mnist-unet@25 --row afa=runs/afa@25 \
        [--n 1000] [--solver ddpm] [--seed 0] [--out benchmarks/results/ensemble/fd.json]
    python benchmarks/ensemble/measure.py --merge A.json B.json --out benchmarks/results/ensemble/fd.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import torch

import hasten
from hasten.metrics.quality import evaluate_images
from hasten.train import machine_description

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "ensemble"


def _row(label: str, spec: str, args: argparse.Namespace) -> dict:
    model_name, _, steps = spec.rpartition("@")
    if not model_name or not steps.isdigit():
        raise SystemExit(f"--row {label}={spec}: give MODEL@STEPS, e.g. mnist-unet@25")
    model = hasten.load(model_name)
    members = len(getattr(model, "members", [])) or 1
    start = time.perf_counter()
    out = hasten.generate(model, args.n, solver=args.solver, steps=int(steps), seed=args.seed, batch_size=args.batch)
    wall = time.perf_counter() - start
    quality = evaluate_images(out.images01, out.labels)
    return {
        "label": label,
        "model": model_name,
        "fingerprint": model.fingerprint,
        "method": model.info.ensemble.get("method", "single"),
        "members": members,
        "solver": args.solver,
        "steps": int(steps),
        "seed": args.seed,
        "n": args.n,
        "nfe": out.nfe,
        "member_evaluations": out.nfe * members,
        "seconds": round(out.seconds, 1),
        "wall_seconds": round(wall, 1),
        "fd": quality["fd"],
        "fd_real_vs_real": quality["fd_real_vs_real"],
        "precision": quality["precision"],
        "recall": quality["recall"],
        "label_accuracy": quality.get("label_accuracy"),
        "confidence": quality["confidence"],
    }


def _attention(spec: str, sigmas=(0.3, 3.0, 30.0), n: int = 64) -> dict:
    """Where an AFA ensemble looks: the mean attention weight of each member on each fused tensor, on ``n``
    held-out digits noised to each VE level of ``sigmas`` (same noise for every level, seed 0)."""
    from hasten.data import load_mnist, to_model_space
    from hasten.hooks import add_hook, remove_hooks

    model = hasten.load(spec)
    heads = model.network.aggregator.heads
    shares: dict[str, list[torch.Tensor]] = {}

    def recorder(key):
        def hook(forward, *args, **kwargs):
            logits = forward(*args, **kwargs)
            shares.setdefault(key, []).append(torch.softmax(logits, dim=0).mean(dim=(1, 2, 3, 4)))
            return logits

        return hook

    handles = [add_hook(head, "benchmark.attention", recorder(key)) for key, head in heads.items()]
    data = load_mnist("heldout")
    x0, labels = to_model_space(data.images[:n]), data.labels[:n]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    result = {}
    try:
        for sigma in sigmas:
            shares.clear()
            with torch.no_grad():
                model.denoiser(x0 + sigma * noise, torch.full((n,), sigma), class_labels=labels)
            result[f"sigma={sigma:g}"] = {k: [round(float(v), 4) for v in vs[0]] for k, vs in shares.items()}
    finally:
        remove_hooks(handles)
    return {"model": spec, "members": [m["model"] for m in model.info.ensemble["members"]], "n": n, "shares": result}


def _timing(spec: str, batch: int = 64, repeats: int = 7) -> dict:
    """Seconds of one ensemble denoiser call against one call of each member, interleaved, median of ``repeats``
    (a shared machine's load drifts; interleaving keeps the ratio fair)."""
    model = hasten.load(spec)
    x = torch.randn(batch, *model.info.image_shape, generator=torch.Generator().manual_seed(0)) * 3.0
    sigma, labels = torch.full((batch,), 3.0), torch.arange(batch) % max(model.info.num_classes, 1)
    calls = {"ensemble": model.denoiser} | {f"member {i + 1}": m.denoiser for i, m in enumerate(model.members)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(repeats):
            for name, denoiser in calls.items():
                start = time.perf_counter()
                denoiser(x, sigma, class_labels=labels)
                times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    members = sum(v for k, v in medians.items() if k != "ensemble")
    return {"model": spec, "batch": batch, "seconds": medians, "ensemble_over_members": medians["ensemble"] / members}


def _write(
    path: pathlib.Path, rows: list[dict], args: argparse.Namespace, attention: list | None = None, timing=None
) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    attention = old.get("attention") if attention is None else attention
    timing = old.get("timing") if timing is None else timing
    data = {
        "what": "FD against held-out MNIST digits: ensemble members vs their output average and AFA ensemble",
        "measured": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "rows": rows,
        **({"attention": attention} if attention else {}),
        **({"timing": timing} if timing else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", default=[], help="LABEL=MODEL@STEPS (repeatable)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--solver", default="ddpm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention", action="append", default=[], help="an AFA folder: record its attention")
    parser.add_argument("--timing", action="append", default=[], help="an ensemble folder: time one call")
    parser.add_argument("--merge", nargs="+", type=pathlib.Path, help="merge these result files into --out")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "fd.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.out.exists():
        rows = json.loads(args.out.read_text())["rows"]
    if args.attention or args.timing:
        data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
        found = {a["model"]: a for a in data.get("attention", [])}
        for spec in args.attention:
            found[spec] = _attention(spec)
            print(json.dumps(found[spec]["shares"]), flush=True)
        timed = {t["model"]: t for t in data.get("timing", [])}
        for spec in args.timing:
            timed[spec] = _timing(spec)
            print(json.dumps(timed[spec]), flush=True)
        _write(args.out, data["rows"], args, attention=list(found.values()), timing=list(timed.values()))
        return
    if args.merge:
        for path in args.merge:
            other = json.loads(path.read_text())
            for row in other["rows"]:
                rows = [r for r in rows if r["label"] != row["label"]] + [row]
            _write(args.out, rows, args, attention=other.get("attention"), timing=other.get("timing"))
        return
    for item in args.row:
        label, sep, spec = item.partition("=")
        if not sep:
            raise SystemExit(f"--row {item!r}: give LABEL=MODEL@STEPS")
        done = [r for r in rows if r["label"] == label and r["n"] == args.n and r["solver"] == args.solver
                and r["seed"] == args.seed and f"{r['model']}@{r['steps']}" == spec]  # fmt: skip
        if done:
            print(f"{label}: kept (FD {done[0]['fd']:.1f})")
            continue
        row = _row(label, spec, args)
        rows = [r for r in rows if r["label"] != label] + [row]
        _write(args.out, rows, args)
        cost = f"{row['member_evaluations']} member evaluations/sample, {row['seconds']:.0f} s"
        print(f"{label}: FD {row['fd']:.1f} (n={row['n']}, {row['solver']} {row['steps']} steps, {cost})", flush=True)


if __name__ == "__main__":
    main()

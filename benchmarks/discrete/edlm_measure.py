"""Does EDLM's importance-sampling correction pay on a masked MNIST model? Plain first-hitting vs ``edlm``.

Every run draws the same ``n`` sequences (same seed: sample ``j``'s randomness depends only on ``(seed, j)``,
classes in turn) at a few-call budget, where parallel decoding's factorisation error is large, and is scored by FD,
precision and recall against the held-out digits binarised at 0.5 (the right reference for binary samples), in the
bundled MNIST classifier's feature space, with the real-vs-real floor (``n`` binarised training digits) beside.
Cost is counted twice: network calls + energy evaluations per sequence, and seconds (this machine, shared).

    PYTHONPATH=src python benchmarks/discrete/edlm_measure.py --model /work/runs/mnist-mdm-peek \\
        --energy runs/ar-mnist --out benchmarks/results/discrete/edlm.json

Results are written after every run and a rerun skips the runs the file already holds (same settings).
``--ar-samples`` scores the energy model's own samples (784 AR passes each; the law the AR correction tends to as
``k`` grows) into the same file. Settings also record the masked model's held-out negative ELBO beside the energy
model's held-out NLL: which of the two is the better model of the data decides whether the correction can help.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

from hasten.discrete import get_discrete_sampler, load_masked
from hasten.discrete.energy import load_autoregressive
from hasten.discrete.generate import row_generators
from hasten.metrics.fd import frechet_distance, gaussian_stats, precision_recall
from hasten.metrics.features import features
from hasten.metrics.quality import _split


def binary_reference(n: int) -> dict:
    """Held-out features of the digits binarised at 0.5, and the real-vs-real floor at ``n``."""
    held = (_split("mnist", "heldout").images >= 128).float()
    ref, _ = features(held, "mnist")
    train = _split("mnist", "train").images
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    floor_feats, _ = features((train[idx] >= 128).float(), "mnist")
    mu, cov = gaussian_stats(ref)
    return {"features": ref, "mu": mu, "cov": cov, "floor": frechet_distance(*gaussian_stats(floor_feats), mu, cov)}


def score(images01: torch.Tensor, labels: torch.Tensor, ref: dict) -> dict:
    feats, logits = features(images01, "mnist")
    subset = torch.randperm(len(ref["features"]), generator=torch.Generator().manual_seed(0))[: len(feats)]
    precision, recall = precision_recall(ref["features"][subset], feats, k=3)
    return {
        "fd": round(frechet_distance(*gaussian_stats(feats), ref["mu"], ref["cov"]), 3),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "label_accuracy": round(float((logits.argmax(1) == labels).double().mean()), 4),
    }


def sample(model, sampler, n: int, seed: int, batch_size: int) -> dict:
    labels = model.labels(n)
    tokens, calls, energy_calls = [], [], []
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        rows = range(first, min(n, first + batch_size))
        x = torch.full((len(rows), model.length), model.mask_id, dtype=torch.long)
        out = sampler.run(model.model(labels[rows.start : rows.stop]), x, model.mask_id, row_generators(seed, rows))
        tokens.append(out.tokens)
        calls.append(out.calls)
        counted = getattr(out, "energy_calls", None)  # the plain sampler evaluates no energy
        energy_calls.append(torch.zeros_like(out.calls) if counted is None else counted)
    seconds = time.perf_counter() - start
    calls, energy_calls = torch.cat(calls).double(), torch.cat(energy_calls).double()
    return {
        "images01": model.to_images(torch.cat(tokens)), "labels": labels, "seconds": round(seconds, 1),
        "network_calls": float(calls.mean()), "energy_evaluations": float(energy_calls.mean()),
    }  # fmt: skip


def autoregressive_samples(energy_folder: str, labels: torch.Tensor, seed: int, batch_size: int) -> dict:
    """The energy model's own samples (one AR pass per token): the law EDLM's AR correction tends to as k grows."""
    ar = load_autoregressive(energy_folder)
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    start = time.perf_counter()
    for first in range(0, len(labels), batch_size):
        y = labels[first : first + batch_size]
        x = torch.zeros(len(y), ar.grid[0] * ar.grid[1], dtype=torch.long)
        for pos in range(x.shape[1]):
            probs = ar(x, y)[:, pos].double().softmax(-1)
            x[:, pos] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tokens.append(x)
    seconds = time.perf_counter() - start
    images01 = torch.cat(tokens).float().reshape(-1, 1, *ar.grid)
    return {"images01": images01, "seconds": round(seconds, 1), "ar_passes": ar.grid[0] * ar.grid[1]}


def held_out_nll(energy_folder: str, count: int = 1000) -> float:
    """The energy model's held-out NLL (nats per digit) on binarised held-out digits with their labels."""
    ar = load_autoregressive(energy_folder)
    held = _split("mnist", "heldout")
    tokens = (held.images[:count] >= 128).long().flatten(1)
    with torch.no_grad():
        return round(-float(ar.log_prob(tokens, held.labels[:count]).mean()), 2)


def masked_nelbo(model, count: int = 256, draws: int = 8, seed: int = 0) -> float:
    """The masked model's negative ELBO (an upper bound on its NLL, nats per digit) on binarised held-out digits:
    the MDLM loss averaged over ``draws`` antithetic time draws. Beside the AR's exact NLL it says which of the
    two models is the better model of the data: the AR correction can only help if the AR is."""
    from hasten.discrete import LogLinearMask, mdlm_loss

    held = _split("mnist", "heldout")
    x0, y = (held.images[:count] >= 128).long().flatten(1), held.labels[:count]
    schedule, gen, losses = LogLinearMask(1e-3), torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(draws):
            u = (torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(count) / count) % 1
            t = (1 - 1e-3) * u + 1e-3
            x_t = schedule.mask(x0, t, model.mask_id, gen)
            losses.append(mdlm_loss(model.network(x_t, y), x0, x_t, t, model.mask_id, schedule))
    return round(float(torch.stack(losses).double().mean()), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="masked model: bundled name or folder")
    parser.add_argument("--energy", required=True, help="folder of the autoregressive energy")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--plain-calls", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--calls", type=int, nargs="+", default=[16, 32, 64], help="budgets of the edlm runs")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--window", type=float, nargs=2, default=[0.4, 1.0])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/discrete/edlm.json")
    parser.add_argument("--ar-samples", action="store_true", help="score the energy model's own samples instead")
    args = parser.parse_args()
    if args.ar_samples:
        torch.set_grad_enabled(False)
        labels = load_masked(args.model).labels(args.n)
        drawn = autoregressive_samples(args.energy, labels, args.seed, args.batch_size)
        result = {"energy": str(args.energy), "n": args.n, "seconds": drawn["seconds"], "ar_passes": drawn["ar_passes"],
                  **score(drawn["images01"], labels, binary_reference(args.n))}  # fmt: skip
        print(json.dumps(result), flush=True)
        out = pathlib.Path(args.out)  # beside the runs, under "autoregressive_samples"
        results = json.loads(out.read_text()) if out.is_file() else {}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results | {"autoregressive_samples": result}, indent=2, default=str))
        return

    torch.set_grad_enabled(False)
    out = pathlib.Path(args.out)
    model = load_masked(args.model)
    settings = {
        "model": str(args.model), "model_fingerprint": model.fingerprint, "energy": str(args.energy),
        "n": args.n, "seed": args.seed, "window": list(args.window), "temperature": args.temperature,
        "reference": "5,000 held-out MNIST digits binarised at 0.5; classifier features (hasten.metrics.features)",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s), shared CPU",
    }  # fmt: skip
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings", {}).get("model_fingerprint") != model.fingerprint or any(
        results.get("settings", {}).get(key) != settings[key] for key in ("n", "seed", "window", "temperature")
    ):
        results = {"settings": settings, "runs": []}
    ref = binary_reference(args.n)
    results["settings"]["fd_real_vs_real_binarised"] = round(ref["floor"], 3)
    results["settings"]["energy_heldout_nll_nats"] = held_out_nll(args.energy)
    trained = json.loads((pathlib.Path(args.energy) / "autoregressive.json").read_text())
    results["settings"]["energy_network"] = trained["network"] | {
        key: trained["training"][key] for key in ("steps", "images_seen", "seconds", "parameters", "machine")
    }
    if "model_heldout_nelbo_nats" not in results["settings"]:
        results["settings"]["model_heldout_nelbo_nats"] = masked_nelbo(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    plan = [("first_hitting", {"calls": c}) for c in args.plain_calls] + [
        ("edlm", {"calls": c, "k": k, "energy": str(args.energy), "window": tuple(args.window),
                  "temperature": args.temperature})
        for c in args.calls for k in args.k
    ]  # fmt: skip
    plan.sort(key=lambda item: item[1]["calls"] * (1 + item[1].get("k", 0)))  # cheapest first: partial runs help
    for name, options in plan:
        sampler = get_discrete_sampler(name, **options)
        key = sampler.to_dict()
        if any(run["sampler"] == key for run in results["runs"]):
            continue
        drawn = sample(model, sampler, args.n, args.seed, args.batch_size)
        run = {
            "sampler": key, "network_calls": drawn["network_calls"], "energy_evaluations": drawn["energy_evaluations"],
            "cost": drawn["network_calls"] + drawn["energy_evaluations"], "seconds": drawn["seconds"],
            **score(drawn["images01"], drawn["labels"], ref),
        }  # fmt: skip
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "sampler"} | {"name": name, **options}), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

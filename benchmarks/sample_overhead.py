"""How much ``hasten.sample`` adds over the network's own time, on the bundled architectures.

For each architecture (the bundled presets; compute cost does not depend on the weights, so the
bundled checkpoint is used when present and a random initialisation otherwise) it times

* ``network``: the same number of raw network calls as the sampler makes, on precomputed inputs;
* ``hasten``: ``hasten.sample`` through the model's adapter (sigma -> timestep, input scaling, output
  conversion, solver arithmetic, finite check),

interleaved, median of repeats, and reports ``overhead = hasten / network - 1``. Target (issue 2): < 2%.

Usage: python benchmarks/sample_overhead.py [--batch 16] [--steps 10] [--repeats 7] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

import hasten
from hasten.models.zoo import ModelInfo, build_network, bundled_models, load
from hasten.train import machine_description


def _model(arch: str):
    name = f"mnist-{arch}"
    if name in bundled_models():
        loaded = load(name)
        return loaded.network, loaded.denoiser, loaded.info, "bundled weights"
    objective = "eps" if arch == "unet" else "flow"
    info = ModelInfo(name, arch, objective, (1, 28, 28), 10, "mnist", 1000.0 if objective == "flow" else 1.0)
    net = build_network(arch, info.image_shape, 10).eval().requires_grad_(False)
    schedule = info.schedule()
    den = (
        hasten.EpsDenoiser(net, schedule)
        if objective == "eps"
        else hasten.FlowDenoiser(net, schedule, time_scale=1000.0)
    )
    return net, den, info, "random initialisation (same cost)"


def measure(arch: str, batch: int, steps: int, repeats: int) -> dict:
    net, den, info, weights = _model(arch)
    sigmas = hasten.get_sigmas("karras", steps, den.schedule)
    x = torch.randn((batch, *info.image_shape), generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    labels = torch.arange(batch) % 10
    # The raw network calls the sampler will make: inputs precomputed outside the timed region.
    inputs = []
    for s in sigmas[:-1].tolist():
        s_b = torch.full((batch,), s, dtype=torch.float64)
        alpha = den.schedule.alpha_from_ve_sigma(s_b).float().view(-1, 1, 1, 1)
        inputs.append((x * alpha, den.model_time(s_b).float()))

    def run_network():
        with torch.no_grad():
            for x_t, t in inputs:
                net(x_t, t, class_labels=labels)

    def run_hasten():
        with torch.no_grad():
            return hasten.sample(den, x, sigmas, "dpmpp_2m", cond={"class_labels": labels}, return_info=True)

    nfe = run_hasten().nfe
    if nfe != len(inputs):
        raise SystemExit(f"NFE {nfe} != {len(inputs)} network calls")
    run_network()
    t_net, t_hasten = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        start = time.perf_counter()
        run_network()
        t_net.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_hasten()
        t_hasten.append(time.perf_counter() - start)
    net_s, hasten_s = statistics.median(t_net), statistics.median(t_hasten)
    return {
        "arch": arch,
        "model": info.name,
        "weights": weights,
        "batch": batch,
        "steps": steps,
        "nfe": nfe,
        "network_s": net_s,
        "hasten_s": hasten_s,
        "overhead_percent": 100.0 * (hasten_s / net_s - 1.0),
        "network_s_all": t_net,
        "hasten_s_all": t_hasten,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/sample_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for arch in ("unet", "dit"):
        row = measure(arch, args.batch, args.steps, args.repeats)
        rows.append(row)
        print(
            f"{arch}: network {row['network_s'] * 1e3:.1f} ms, hasten.sample {row['hasten_s'] * 1e3:.1f} ms, "
            f"overhead {row['overhead_percent']:+.2f}%"
        )
    result = {
        "benchmark": "sample_overhead",
        "machine": {
            "description": machine_description(torch.device("cpu")),
            "platform": platform.platform(),
            "loadavg": os.getloadavg(),
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "hasten": hasten.__version__},
        "settings": vars(args),
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

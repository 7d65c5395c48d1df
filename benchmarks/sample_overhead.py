"""How much ``hasten.sample`` adds over the network's own time, on the bundled architectures.

For each architecture (the bundled presets; compute cost does not depend on the weights, so the
bundled checkpoint is used when present and a random initialisation otherwise) it times

* ``network``: the same number of raw network calls as the sampler makes, on precomputed inputs;
* ``hasten``: ``hasten.sample`` through the model's adapter (sigma -> timestep, input scaling, output
  conversion, solver arithmetic, finite check),

* ``generate``: ``hasten.generate``, the call ``hasten bench`` and ``hasten sample`` time (labels, initial
  noise, classifier-free guidance as one batched call, conversion to [0, 1]), with its own ``seconds``
  as the bench reports it; with guidance 1 and 2 (the network reference for guidance 2 runs the doubled
  batch the guided model needs),

interleaved, and reports ``overhead = measured / network - 1`` from the medians and from the minima of the
repeats. On a shared machine those comparisons of separate runs are only good to a few percent, so the
script also times the network's forward calls *inside* each ``generate`` run (forward hooks) and reports
``inside = (generate seconds - time inside the network) / time inside the network``: a paired
measurement that load drift between runs cannot fake. Targets: < 2% for
``sample`` (issue 2) and for the bench harness (issue 4).

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
from hasten.models.zoo import LoadedModel, ModelInfo, build_network, bundled_models, load
from hasten.train import machine_description


def _model(arch: str) -> tuple[LoadedModel, str]:
    name = f"mnist-{arch}"
    if name in bundled_models():
        return load(name), "bundled weights"
    objective = "eps" if arch == "unet" else "flow"
    info = ModelInfo(name, arch, objective, (1, 28, 28), 10, "mnist", 1000.0 if objective == "flow" else 1.0)
    net = build_network(arch, info.image_shape, 10).eval().requires_grad_(False)
    schedule = info.schedule()
    den = (
        hasten.EpsDenoiser(net, schedule)
        if objective == "eps"
        else hasten.FlowDenoiser(net, schedule, time_scale=1000.0)
    )
    return LoadedModel(den, net, info, pathlib.Path("."), "random"), "random initialisation (same cost)"


def _network_inputs(den, x: torch.Tensor, sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The raw network inputs the sampler will make, precomputed outside the timed region."""
    inputs = []
    for s in sigmas[:-1].tolist():
        s_b = torch.full((x.shape[0],), s, dtype=torch.float64)
        alpha = den.schedule.alpha_from_ve_sigma(s_b).float().view(-1, 1, 1, 1)
        inputs.append((x * alpha, den.model_time(s_b).float()))
    return inputs


def measure(arch: str, batch: int, steps: int, repeats: int) -> dict:
    model, weights = _model(arch)
    net, den, info = model.network, model.denoiser, model.info
    sigmas = hasten.get_sigmas("karras", steps, den.schedule)
    x = torch.randn((batch, *info.image_shape), generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    labels = torch.arange(batch) % 10
    inputs = _network_inputs(den, x, sigmas)
    inputs_guided = _network_inputs(den, torch.cat([x, x]), sigmas)
    labels_guided = torch.cat([labels, torch.full_like(labels, info.null_class)])

    def run_network(guided: bool = False):
        with torch.no_grad():
            for x_t, t in inputs_guided if guided else inputs:
                net(x_t, t, class_labels=labels_guided if guided else labels)

    def run_hasten():
        with torch.no_grad():
            return hasten.sample(den, x, sigmas, "dpmpp_2m", cond={"class_labels": labels}, return_info=True)

    inside = {"seconds": 0.0, "start": 0.0}

    def _enter(module, args):
        inside["start"] = time.perf_counter()

    def _leave(module, args, output):
        inside["seconds"] += time.perf_counter() - inside["start"]

    outside: dict[float, list[float]] = {1.0: [], 2.0: []}

    def run_generate(guidance: float) -> float:
        """The bench's own number: ``Generation.seconds`` of the call ``hasten bench`` makes."""
        inside["seconds"] = 0.0
        hooks = [net.register_forward_pre_hook(_enter), net.register_forward_hook(_leave)]
        try:
            with torch.no_grad():
                gen = hasten.generate(
                    model, batch, solver="dpmpp_2m", sigmas=sigmas, guidance=guidance, batch_size=batch
                )
        finally:
            for hook in hooks:
                hook.remove()
        if gen.nfe != len(inputs):
            raise SystemExit(f"generate: NFE {gen.nfe} != {len(inputs)} network calls")
        outside[guidance].append(gen.seconds / inside["seconds"] - 1.0)
        return gen.seconds

    nfe = run_hasten().nfe
    if nfe != len(inputs):
        raise SystemExit(f"NFE {nfe} != {len(inputs)} network calls")
    run_network(), run_network(guided=True), run_generate(1.0), run_generate(2.0)  # warm-up
    outside[1.0].clear(), outside[2.0].clear()
    t_net, t_hasten, t_net_g, t_gen, t_gen_g = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit all alike
        start = time.perf_counter()
        run_network()
        t_net.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_hasten()
        t_hasten.append(time.perf_counter() - start)
        t_gen.append(run_generate(1.0))
        start = time.perf_counter()
        run_network(guided=True)
        t_net_g.append(time.perf_counter() - start)
        t_gen_g.append(run_generate(2.0))
    net_s, hasten_s = statistics.median(t_net), statistics.median(t_hasten)
    net_g_s, gen_s, gen_g_s = statistics.median(t_net_g), statistics.median(t_gen), statistics.median(t_gen_g)
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
        "generate_s": gen_s,
        "generate_overhead_percent": 100.0 * (gen_s / net_s - 1.0),
        "network_guided_s": net_g_s,
        "generate_guided_s": gen_g_s,
        "generate_guided_overhead_percent": 100.0 * (gen_g_s / net_g_s - 1.0),
        "overhead_min_percent": 100.0 * (min(t_hasten) / min(t_net) - 1.0),
        "generate_overhead_min_percent": 100.0 * (min(t_gen) / min(t_net) - 1.0),
        "generate_guided_overhead_min_percent": 100.0 * (min(t_gen_g) / min(t_net_g) - 1.0),
        "generate_inside_percent": 100.0 * statistics.median(outside[1.0]),
        "generate_guided_inside_percent": 100.0 * statistics.median(outside[2.0]),
        "network_s_all": t_net,
        "hasten_s_all": t_hasten,
        "generate_s_all": t_gen,
        "network_guided_s_all": t_net_g,
        "generate_guided_s_all": t_gen_g,
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
            f"{arch}: network {row['network_s'] * 1e3:.1f} ms, hasten.sample {row['hasten_s'] * 1e3:.1f} ms "
            f"({row['overhead_percent']:+.2f}%), generate {row['generate_s'] * 1e3:.1f} ms "
            f"({row['generate_overhead_percent']:+.2f}%); guidance 2: network {row['network_guided_s'] * 1e3:.1f} ms, "
            f"generate {row['generate_guided_s'] * 1e3:.1f} ms ({row['generate_guided_overhead_percent']:+.2f}%)\n"
            f"  from the minima: sample {row['overhead_min_percent']:+.2f}%, generate "
            f"{row['generate_overhead_min_percent']:+.2f}%, "
            f"generate guided {row['generate_guided_overhead_min_percent']:+.2f}%\n"
            f"  paired, outside the network within each generate run: {row['generate_inside_percent']:+.2f}% "
            f"(guidance 2: {row['generate_guided_inside_percent']:+.2f}%)"
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

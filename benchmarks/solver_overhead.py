"""Per-step overhead of hasten's solvers against the diffusers schedulers that implement the same algorithm.

The denoiser costs nothing: for hasten it returns a preallocated x0-like tensor, for diffusers the "UNet"
returns a preallocated eps-like tensor. What is timed is therefore only the sampling machinery: hasten's
``sample()`` loop (counted model, finite check, solver step arithmetic, per-call setup) against a pipeline's
diffusers loop (``scale_model_input`` + ``step`` per model call). ``set_timesteps`` is excluded from the
per-step number and reported separately (``diffusers_set_timesteps_us``), as is building hasten's grid
with ``from_timesteps`` (``hasten_grid_us``); hasten's sigmas are built once, outside the timed loop.

Every configuration is timed ``--repeats`` times after ``--warmup`` untimed runs, the variants of one
(solver, batch) interleaved (rotating order) so that drift on a busy machine hits all of them alike, with
the garbage collector off inside each timed region and glibc's malloc told to keep freed memory (see
``tune_malloc``; ``--no-malloc-tuning`` turns that off). Reported: median and IQR of the whole loop divided by
the number of steps, in microseconds per step, and the ratio hasten / diffusers measured in the same run,
on the same machine, from the same starting noise. Target (issue): ratio <= 0.5.

Columns (JSON rows also hold IQRs, minima, NFE of both, and for stochastic solvers ``noise_draw_us``,
the cost of one Gaussian draw of the latent, which both libraries pay once per step):
* ``hasten``: ``hasten.sample(...)`` with its default ``check_finite=True``.
* ``hasten_nocheck``: the same with ``check_finite=False``.
* ``hasten_eps``: for reference, the default loop driven through ``hasten.EpsDenoiser`` around a free
  eps-"network": adds the eps -> x0 conversion and the time-label lookup that diffusers' ``step`` does
  internally, i.e. what a pipeline user of hasten pays. Not part of the target ratio.

Usage::

    python benchmarks/solver_overhead.py                      # full run -> benchmarks/results/solver_overhead.json
    python benchmarks/solver_overhead.py --quick --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import os
import platform
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import hasten
from hasten.schedules import VPDiscrete, from_timesteps

TARGET_RATIO = 0.5
CHANNELS, HEIGHT, WIDTH = 4, 64, 64
# diffusers' linear DDPM table, written out so that every scheduler (Heun's defaults differ) uses it.
BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@dataclasses.dataclass(frozen=True)
class Pair:
    """A hasten solver and the diffusers scheduler implementing the same algorithm."""

    solver: str
    options: dict[str, Any]
    scheduler: str
    scheduler_config: dict[str, Any]
    ve_state: bool = False  # the scheduler integrates in VE form (k-diffusion family): use its own sigmas


PAIRS = [
    Pair("euler", {}, "EulerDiscreteScheduler", {}, ve_state=True),
    Pair("heun", {}, "HeunDiscreteScheduler", {}, ve_state=True),
    # DDIM / DDPM: diffusers clips x0 to [-1, 1] by default; hasten's solvers do not (same algorithm: off).
    Pair("ddim", {}, "DDIMScheduler", {"clip_sample": False}),
    Pair("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"solver_order": 2}),
    # diffusers' 3M uses the reference D2 weight; hasten's default is the Taylor weight (same cost).
    Pair("dpmpp_3m", {"third_order_term": "reference"}, "DPMSolverMultistepScheduler", {"solver_order": 3}),
    Pair("dpmpp_2s", {"intermediate": "grid"}, "DPMSolverSinglestepScheduler", {"solver_order": 2}),
    Pair("unipc", {"order": 2, "variant": "bh2"}, "UniPCMultistepScheduler", {"solver_order": 2}),
    Pair("plms", {"warmup": "heun"}, "PNDMScheduler", {"skip_prk_steps": True}),
    Pair("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {}, ve_state=True),
    Pair(
        "dpmpp_2m_sde",
        {},
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    Pair("ddpm", {}, "DDPMScheduler", {"clip_sample": False}),
]


# -- the free models --------------------------------------------------------------------------------------
class FreeX0:
    """hasten denoiser ``D(x, sigma) -> x0_hat`` that returns a preallocated tensor."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.out


class FreeEpsNet(torch.nn.Module):
    """A "UNet" ``net(x_t, t) -> eps`` that returns a preallocated tensor (used by both libraries)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        return self.out


# -- timing -----------------------------------------------------------------------------------------------
FAULTS: list[int] = []  # minor page faults of each timed call, in order (diagnostic)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for one call of ``fn`` with the garbage collector off (collected just before)."""
    gc.collect()  # cheap: main() freezes the imported modules' objects first
    gc.disable()
    try:
        faults = _minflt()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        FAULTS.append(_minflt() - faults)
        return elapsed
    finally:
        gc.enable()


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    With glibc's defaults a loop that allocates and frees ~1 MiB tensors falls, depending on heap
    state, into a mode where each step re-faults fresh pages (~900 minor faults per step at batch 16,
    measured): both libraries then run 3-5x slower at random. Fixing the trim and mmap thresholds
    removes that bimodality. Returns whether the settings took effect (glibc only).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 512 << 20)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def summarize(seconds: list[float], steps: int) -> dict[str, float]:
    us = np.asarray(seconds) * 1e6 / steps
    q1, med, q3 = np.percentile(us, [25, 50, 75])
    return {"median": float(med), "iqr": float(q3 - q1), "min": float(us.min())}


Variant = tuple[Callable[[], Any], Callable[[], Any]]  # (untimed reset, timed run)


def run_variants(variants: dict[str, Variant], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every variant up, then time them interleaved in rotating order (only ``run`` is timed)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            reset, run = variants[name]
            reset()
            run()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            reset, run = variants[name]
            reset()
            times[name].append(timed(run))
            faults[name].append(FAULTS[-1])
    return times, faults


# -- one (solver, batch) configuration --------------------------------------------------------------------
def make_scheduler(pair: Pair):
    import diffusers

    cls = getattr(diffusers, pair.scheduler)
    return cls(**BETAS, prediction_type="epsilon", **pair.scheduler_config)


def hasten_grid(pair: Pair, sched, vp: VPDiscrete) -> tuple[torch.Tensor, str]:
    """hasten sigmas for the scheduler's steps (duplicates from Heun / PLMS' repeated timesteps removed)."""
    if pair.ve_state:  # Euler family: diffusers integrates on its own (linearly interpolated) sigma grid
        return torch.unique_consecutive(sched.sigmas.to(torch.float64)), "scheduler.sigmas"
    ts = torch.unique_consecutive(torch.as_tensor(sched.timesteps))
    return from_timesteps(vp, ts), "from_timesteps(scheduler.timesteps)"


def bench_pair(pair: Pair, batch: int, args: argparse.Namespace, vp: VPDiscrete) -> dict[str, Any]:
    steps = args.steps
    g = torch.Generator().manual_seed(0)
    shape = (batch, CHANNELS, HEIGHT, WIDTH)
    noise = torch.randn(shape, generator=g)
    x0_out = torch.randn(shape, generator=g).clamp_(-1, 1)  # x0-like for hasten
    eps_out = torch.randn(shape, generator=g)  # eps-like for diffusers (and the eps adapter)

    # diffusers: the scheduler, its starting latent and a pipeline-style loop.
    sched = make_scheduler(pair)
    sched.set_timesteps(steps)
    net = FreeEpsNet(eps_out)
    step_params = inspect.signature(sched.step).parameters
    d_gen = torch.Generator()
    step_kw: dict[str, Any] = {"return_dict": False}
    if "generator" in step_params:
        step_kw["generator"] = d_gen
    d_latents = noise * sched.init_noise_sigma

    def diffusers_reset() -> None:
        d_gen.manual_seed(1)
        sched.set_timesteps(steps)  # also resets the scheduler's state; not part of the per-step time

    def diffusers_loop(count: list[int] | None = None) -> torch.Tensor:
        latents = d_latents
        for t in sched.timesteps:
            inp = sched.scale_model_input(latents, t)
            eps = net(inp, t)
            if count is not None:
                count[0] += 1
            latents = sched.step(eps, t, latents, **step_kw)[0]
        return latents

    # hasten: sigmas for the same timesteps, built once; the same starting noise.
    sigmas, grid_source = hasten_grid(pair, sched, vp)
    if len(sigmas) != steps + 1:
        raise RuntimeError(f"{pair.solver}: hasten grid has {len(sigmas)} levels for {steps} steps")
    h_latents = noise * float(sigmas[0])
    h_gen = torch.Generator()
    free_x0 = FreeX0(x0_out)
    eps_den = hasten.EpsDenoiser(FreeEpsNet(eps_out), vp)

    def hasten_reset() -> None:
        h_gen.manual_seed(1)

    def hasten_run(denoiser, check_finite: bool, **extra: Any):
        def run():
            return hasten.sample(
                denoiser,
                h_latents,
                sigmas,
                pair.solver,
                check_finite=check_finite,
                generator=h_gen,
                **pair.options,
                **extra,
            )

        return run

    # Untimed: NFE of both, and that the outputs are finite.
    hasten_reset()
    info = hasten_run(free_x0, True, return_info=True)()
    count = [0]
    diffusers_reset()
    d_out = diffusers_loop(count)
    if not (torch.isfinite(info.x).all() and torch.isfinite(d_out).all()):
        raise RuntimeError(f"{pair.solver}: non-finite output")

    variants = {
        "hasten": (hasten_reset, hasten_run(free_x0, True)),
        "hasten_nocheck": (hasten_reset, hasten_run(free_x0, False)),
        "hasten_eps": (hasten_reset, hasten_run(eps_den, True)),
        "diffusers": (diffusers_reset, diffusers_loop),
    }
    times, faults = run_variants(variants, args.warmup, args.repeats)
    stats = {name: summarize(ts, steps) for name, ts in times.items()}

    stochastic = hasten.get_solver(pair.solver, **pair.options).stochastic
    # Stochastic solvers: one Gaussian draw of the latent's shape per step in both libraries, a common floor.
    draw = [timed(lambda: torch.randn(shape, generator=h_gen)) * 1e6 for _ in range(args.repeats)]
    set_ts = [timed(lambda: sched.set_timesteps(steps)) * 1e6 for _ in range(args.repeats)]
    raw_ts = torch.unique_consecutive(torch.as_tensor(sched.timesteps))
    grid = [timed(lambda: from_timesteps(vp, raw_ts)) * 1e6 for _ in range(args.repeats)]

    h, hn, he, d = (stats[k]["median"] for k in ("hasten", "hasten_nocheck", "hasten_eps", "diffusers"))
    return {
        "solver": pair.solver,
        "solver_options": pair.options,
        "diffusers_scheduler": pair.scheduler,
        "diffusers_config": pair.scheduler_config,
        "batch": batch,
        "steps": steps,
        "stochastic": stochastic,
        "hasten_us_per_step": h,
        "hasten_us_per_step_iqr": stats["hasten"]["iqr"],
        "hasten_nocheck_us_per_step": hn,
        "hasten_nocheck_us_per_step_iqr": stats["hasten_nocheck"]["iqr"],
        "hasten_eps_us_per_step": he,
        "hasten_eps_us_per_step_iqr": stats["hasten_eps"]["iqr"],
        "diffusers_us_per_step": d,
        "diffusers_us_per_step_iqr": stats["diffusers"]["iqr"],
        "ratio": h / d,
        "ratio_nocheck": hn / d,
        "ratio_eps": he / d,
        "meets_target": h / d <= TARGET_RATIO,
        "nfe_hasten": info.nfe,
        "nfe_diffusers": count[0],
        "diffusers_set_timesteps_us": float(np.median(set_ts)),
        "hasten_grid_us": float(np.median(grid)),
        "noise_draw_us": float(np.median(draw)) if stochastic else None,
        "hasten_grid_source": grid_source,
        "min_us_per_step": {k: v["min"] for k, v in stats.items()},
        "ratio_of_minima": stats["hasten"]["min"] / stats["diffusers"]["min"],
        "page_faults_per_run_median": {k: int(np.median(v)) for k, v in faults.items()},
    }


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which (solver, batch) rows meet the target, and which solvers meet it at every batch."""

    def tag(r: dict[str, Any]) -> str:
        return f"{r['solver']}@{r['batch']}"

    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    return {
        "target_ratio": TARGET_RATIO,
        "rows_meeting_target": [tag(r) for r in rows if r["ratio"] <= TARGET_RATIO],
        "rows_meeting_target_nocheck": [tag(r) for r in rows if r["ratio_nocheck"] <= TARGET_RATIO],
        "solvers_meeting_target_at_all_batches": [
            s for s in solvers if all(r["ratio"] <= TARGET_RATIO for r in rows if r["solver"] == s)
        ],
    }


# -- environment and output -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str]:
    import diffusers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "hasten": hasten.__version__,
        "numpy": np.__version__,
    }


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".solver_overhead.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def print_table(rows: list[dict[str, Any]], out=sys.stdout) -> None:
    head = (
        f"{'solver':<16}{'batch':>6}{'hasten':>10}{'nocheck':>10}{'eps-adpt':>10}{'diffusers':>11}"
        f"{'ratio':>8}{'r_nochk':>8}{'r_eps':>7}{'NFE h/d':>9}  target"
    )
    print("us per step (median over repeats); ratio = hasten / diffusers, target <= 0.5", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(
            f"{r['solver']:<16}{r['batch']:>6}{r['hasten_us_per_step']:>10.1f}{r['hasten_nocheck_us_per_step']:>10.1f}"
            f"{r['hasten_eps_us_per_step']:>10.1f}{r['diffusers_us_per_step']:>11.1f}{r['ratio']:>8.2f}"
            f"{r['ratio_nocheck']:>8.2f}{r['ratio_eps']:>7.2f}{r['nfe_hasten']:>5}/{r['nfe_diffusers']:<3}"
            f"  {'ok' if r['meets_target'] else 'MISS'}",
            file=out,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/solver_overhead.json", help="JSON output path")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (num_inference_steps)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 25, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first (default 3, --quick 1)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes of 4x64x64 latents")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)")
    p.add_argument("--solvers", default=None, help="comma-separated subset of: " + ", ".join(q.solver for q in PAIRS))
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 warm-up")
    p.add_argument(
        "--no-malloc-tuning", action="store_true", help="keep glibc's malloc trim/mmap defaults (noisier at batch 16)"
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 25
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0 or args.steps < 2:
        p.error("need --repeats >= 1, --warmup >= 0, --steps >= 2")
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    known = {q.solver: q for q in PAIRS}
    names = [s.strip() for s in args.solvers.split(",")] if args.solvers else list(known)
    unknown = [s for s in names if s not in known]
    if unknown:
        p.error(f"unknown solver(s) {unknown}; known: {list(known)}")
    args.pairs = [known[s] for s in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    torch.manual_seed(0)
    vp = VPDiscrete.from_betas("linear")
    import diffusers  # noqa: F401  (import before freezing, so its objects are not rescanned)

    gc.collect()
    gc.freeze()  # a full collection of torch + diffusers takes ~0.2 s; only new objects are scanned now
    machine = machine_info()
    busy = machine["loadavg_start"] and machine["loadavg_start"][0] > (machine["cpu_affinity"] or 1)
    if busy and torch.get_num_threads() > 1:
        print(
            f"warning: load average {machine['loadavg_start'][0]:.1f} exceeds the {machine['cpu_affinity']} "
            f"usable cores and torch uses {torch.get_num_threads()} threads: intra-op parallel "
            "regions stall when a thread is descheduled; expect very noisy timings (try --threads 1)",
            file=sys.stderr,
        )
    started = time.perf_counter()
    rows = []
    for pair in args.pairs:
        for batch in args.batch_list:
            row = bench_pair(pair, batch, args, vp)
            rows.append(row)
            print(
                f"  {pair.solver:<16} batch {batch:>3}: hasten {row['hasten_us_per_step']:8.1f} us/step, "
                f"diffusers {row['diffusers_us_per_step']:8.1f} us/step, ratio {row['ratio']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "solver_overhead",
        "description": (
            "Per-step overhead (microseconds per sampling step, whole loop / steps) of hasten.sample against "
            "a diffusers scheduler loop (scale_model_input + step per model call) with a free model, CPU."
        ),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine,
        "versions": versions(),
        "settings": {
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "batches": args.batch_list,
            "latent_shape": [CHANNELS, HEIGHT, WIDTH],
            "dtype": "float32",
            "threads_requested": args.threads,
            "malloc_tuning": (
                "glibc mallopt M_TRIM_THRESHOLD=512 MiB, M_MMAP_THRESHOLD=32 MiB" if malloc_tuned else "none (defaults)"
            ),
            "quick": args.quick,
            "betas": BETAS,
            "statistic": "median over repeats of (loop seconds / steps); IQR alongside",
            "timer": "time.perf_counter, gc disabled inside each timed run, variants interleaved",
            "excluded_from_per_step": ["diffusers set_timesteps", "hasten grid construction (from_timesteps)"],
            "target_ratio": TARGET_RATIO,
            "wall_seconds": None,
        },
        "rows": rows,
        "summary": summarize_rows(rows),
    }
    result["settings"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, result)
    print_table(rows)
    print(f"wrote {args.out} ({result['settings']['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

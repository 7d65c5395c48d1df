"""Peers in the same run: diffusers' schedulers driving the same network through diffusers' own loop.

``diffusers_generate`` reproduces what a diffusers pipeline does (``set_timesteps``, ``scale_model_input``,
the model call, ``scheduler.step``) on a hasten :class:`~hasten.models.zoo.LoadedModel`, from the same
noise, labels and guidance as :func:`hasten.generate`, so a hasten row and a diffusers row differ only in
the sampler.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..generate import Generation, collect, default_labels
from ..models.adapters import _unwrap
from ..models.guidance import CFGDenoiser
from ..models.zoo import LoadedModel
from ..seeds import initial_noise

__all__ = ["PEERS", "PeerSpec", "diffusers_generate", "peers_for"]


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """A diffusers scheduler with the settings people use, and the objectives it supports."""

    scheduler: str
    config: dict[str, Any]
    objectives: tuple[str, ...]
    hasten_equivalent: str  # the hasten solver (and options) implementing the same algorithm, for the report


_DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}

PEERS: dict[str, PeerSpec] = {
    "ddim": PeerSpec(
        "DDIMScheduler", {**_DDPM, "clip_sample": False, "timestep_spacing": "trailing"}, ("eps", "v"), "ddim"
    ),
    "pndm": PeerSpec(
        "PNDMScheduler", {**_DDPM, "skip_prk_steps": True, "timestep_spacing": "trailing"}, ("eps",), "plms warmup=heun"
    ),
    "dpmpp_2m": PeerSpec("DPMSolverMultistepScheduler", {**_DDPM, "solver_order": 2}, ("eps", "v"), "dpmpp_2m"),
    "dpmpp_3m": PeerSpec(
        "DPMSolverMultistepScheduler", {**_DDPM, "solver_order": 3}, ("eps", "v"), "dpmpp_3m third_order_term=reference"
    ),
    "dpmpp_2s": PeerSpec(
        "DPMSolverSinglestepScheduler", {**_DDPM, "solver_order": 2}, ("eps", "v"), "dpmpp_2s intermediate=grid"
    ),
    "unipc": PeerSpec("UniPCMultistepScheduler", {**_DDPM, "solver_order": 2}, ("eps", "v"), "unipc"),
    "euler": PeerSpec("EulerDiscreteScheduler", {**_DDPM, "timestep_spacing": "trailing"}, ("eps", "v"), "euler"),
    "heun": PeerSpec("HeunDiscreteScheduler", {**_DDPM, "timestep_spacing": "trailing"}, ("eps", "v"), "heun"),
    "deis": PeerSpec(
        "DEISMultistepScheduler", {**_DDPM, "solver_order": 2}, ("eps", "v"), "(no hasten equivalent yet)"
    ),
    "flow_euler": PeerSpec(
        "FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0}, ("flow",), "euler"
    ),
    "flow_heun": PeerSpec(
        "FlowMatchHeunDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0}, ("flow",), "heun"
    ),
    "flow_dpmpp_2m": PeerSpec(
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 1.0},
        ("flow",),
        "dpmpp_2m",
    ),
    "flow_unipc": PeerSpec(
        "UniPCMultistepScheduler",
        {"solver_order": 2, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 1.0},
        ("flow",),
        "unipc",
    ),
}


def peers_for(objective: str) -> list[str]:
    """Names of the diffusers peers that support a model objective ("eps", "v" or "flow")."""
    return [name for name, spec in PEERS.items() if objective in spec.objectives]


_TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def _scheduler(spec: PeerSpec, objective: str, training: dict[str, Any] | None = None):
    """The peer's scheduler; ``training`` (a pipeline's own scheduler config) replaces the bundled models'
    training schedule and flow shift."""
    import diffusers

    config = dict(spec.config)
    if training:
        if objective != "flow":
            config.update({key: training[key] for key in _TRAINING_KEYS if training.get(key) is not None})
        for key in ("shift", "flow_shift"):
            if key in config and "shift" in training:
                config[key] = training["shift"]
    if objective == "v":
        config["prediction_type"] = "v_prediction"
    return getattr(diffusers, spec.scheduler)(**config)


def _set_timesteps_as_pipeline(scheduler: Any, steps: int, model: Any, device: torch.device) -> None:
    """``set_timesteps`` as the pipeline calls it: Flux passes its own sigmas and the resolution shift ``mu``."""
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = math.log(model.denoiser.schedule.shift)
    if model.family == "FluxTransformer2DModel" and not scheduler.config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(None if "sigmas" in kwargs else steps, device=device, **kwargs)


@torch.no_grad()
def diffusers_generate(
    model: LoadedModel,
    n: int,
    peer: str,
    *,
    steps: int = 10,
    seed: int = 0,
    guidance: float = 1.0,
    label: int | None = None,
    batch_size: int = 256,
    gather: bool = True,
) -> Generation:
    """Sample with a diffusers scheduler on ``model.network``; same noise and labels as :func:`hasten.generate`
    (and, under torchrun, the same split over processes; ``gather=False`` keeps each process's own rows).

    Returns a :class:`~hasten.generate.Generation` whose ``nfe`` counts network calls per image batch (a
    guided call runs both branches in one batch, as in hasten) and ``seconds`` the sampling time alone.
    """
    objective = model.info.objective
    own = getattr(model, "pipeline", None)
    if peer == "pipeline":
        if own is None:
            raise ValueError("peer 'pipeline' (the pipeline's own scheduler) needs a model from hasten.from_pipeline")
    elif peer not in PEERS:
        raise KeyError(f"unknown diffusers peer {peer!r}; available: {', '.join(PEERS)}")
    elif objective not in PEERS[peer].objectives:
        raise ValueError(
            f"peer {peer!r} ({PEERS[peer].scheduler}) does not support {objective!r} models; use one of "
            f"{peers_for(objective)}"
        )
    labels = default_labels(model, n, label)
    net = model.denoiser.model  # called in the network's own time units, as a pipeline calls it
    device = next(model.network.parameters()).device
    uncond = model.unconditional() if guidance != 1.0 else None
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"guidance {guidance:g} needs a model with an unconditional branch")
    batches = distributed.shard_batches(n, batch_size)  # this process's block of the batches under torchrun
    noise = initial_noise(seed, [i for rows in batches for i in rows], model.info.image_shape)
    outputs, nfe, offset = [], 0, 0
    distributed.barrier()
    start = time.perf_counter()
    for rows in batches:
        if peer == "pipeline":
            scheduler = type(own.scheduler).from_config(own.scheduler.config)
            _set_timesteps_as_pipeline(scheduler, steps, model, device)
        else:
            scheduler = _scheduler(PEERS[peer], objective, getattr(model, "scheduler_config", None))
            scheduler.set_timesteps(steps, device=device)
        # Flow-matching schedulers have neither (their start is unit noise, their input unscaled).
        x = noise[offset : offset + len(rows)].to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
        offset += len(rows)
        scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
        y = None if labels is None else labels[rows.start : rows.stop]
        cond = {k: v.to(device) for k, v in model.conditioning(y, rows).items()}
        both_cond = {}
        if uncond is not None:
            both_cond = CFGDenoiser(model.denoiser, guidance, uncond).both_branches(cond, len(rows))
        # Only stochastic schedulers take a generator: diffusers draws a batch's noise from one, seeded by the
        # batch's first index (so the same in any number of processes).
        step_kwargs = {"generator": torch.Generator(device=device).manual_seed(seed + 1 + rows.start)}
        if "generator" not in inspect.signature(scheduler.step).parameters:
            step_kwargs = {}
        calls = 0
        for t in scheduler.timesteps:
            x_in = scale_input(x, t)
            t_in = t.expand(x.shape[0]).to(device)
            if uncond is not None:
                both = _unwrap(net(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), **both_cond))
                out_cond, out_uncond = both.chunk(2)
                out = out_uncond + guidance * (out_cond - out_uncond)
            else:
                out = _unwrap(net(x_in, t_in, **cond))
            calls += 1
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        outputs.append(x)
        nfe = max(nfe, calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start  # sampling alone, as generate() times it
    samples, images, nfe, held = collect(model, outputs, batches, n, nfe, gather)
    if distributed.sharding():  # the slowest process's, as generate() reports it
        seconds = distributed.all_max(seconds)
    labels = None if labels is None else labels[held.start : held.stop]
    return Generation(images.cpu(), labels, nfe, seconds, [], None, samples.cpu(), held)

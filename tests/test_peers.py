"""diffusers peers run through diffusers' own loop on a hasten model, from the same noise and labels."""

import pytest
import torch

import hasten
from hasten.bench.peers import PEERS, diffusers_generate, peers_for
from hasten.models.zoo import LoadedModel, ModelInfo, build_network
from hasten.schedules import from_timesteps

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet_model():
    torch.manual_seed(0)
    net = build_network("unet", (1, 28, 28), 10).eval().requires_grad_(False)
    with torch.no_grad():  # shrink the random network's output so samples stay in a sane range
        net.conv_out.weight.mul_(0.05)
    info = ModelInfo("random-unet", "unet", "eps", (1, 28, 28), 10, "mnist")
    return LoadedModel(hasten.EpsDenoiser(net, info.schedule()), net, info, None, "random")


@pytest.mark.parametrize(
    ("peer", "solver", "options"),
    [
        ("ddim", "ddim", {}),
        ("dpmpp_2m", "dpmpp_2m", {}),
        ("unipc", "unipc", {"variant": "bh2"}),
        ("euler", "euler", {}),
        ("pndm", "plms", {"warmup": "heun"}),
    ],
)
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_peer_matches_hasten_on_the_same_timesteps(unet_model, peer, solver, options, guidance):
    import diffusers

    spec = PEERS[peer]
    sched = getattr(diffusers, spec.scheduler)(**spec.config)
    sched.set_timesteps(5)  # 5 divides 1000: diffusers DDIM/PNDM step to t - 1000 // n, the next timestep only then
    ts = sched.timesteps.unique_consecutive()
    sigmas = from_timesteps(unet_model.schedule, ts)
    theirs = diffusers_generate(unet_model, 4, peer, steps=5, guidance=guidance)
    ours = hasten.generate(unet_model, 4, solver=solver, sigmas=sigmas, guidance=guidance, **options)
    assert theirs.nfe == ours.nfe
    # PNDM's formula (9) cancels terms ~6|x| on the step from t = 999 in float32 (see test_parity_diffusers).
    torch.testing.assert_close(ours.images01, theirs.images01, atol=1e-3 if peer == "pndm" else 2e-4, rtol=0)


def test_peer_lists_and_errors(unet_model):
    assert "ddim" in peers_for("eps") and "flow_euler" not in peers_for("eps")
    assert "flow_euler" in peers_for("flow")
    with pytest.raises(KeyError, match="available"):
        diffusers_generate(unet_model, 2, "nope")
    with pytest.raises(ValueError, match="does not support 'eps'"):
        diffusers_generate(unet_model, 2, "flow_euler")


@pytest.mark.parametrize(("scheduler", "solver"), [("FlowMatchEulerDiscreteScheduler", "euler"),
                                                    ("FlowMatchHeunDiscreteScheduler", "heun")])  # fmt: skip
def test_flow_solvers_match_diffusers_flowmatch_schedulers(scheduler, solver):
    """hasten's Euler and Heun (flow space) against diffusers' FlowMatch schedulers on a flow network.

    diffusers starts flow grids at t = 1 (VE sigma = inf, which hasten's VE state cannot hold), so both
    sides get the same grid starting at the schedule's t_max instead: diffusers through its ``sigmas``
    tables (Heun's layout repeats each inner level: one entry per model call), hasten through VE sigmas.
    """
    import diffusers

    torch.manual_seed(0)
    net = build_network("dit", (1, 28, 28), 10).eval().requires_grad_(False)
    with torch.no_grad():
        net.proj_out_2.weight.mul_(0.05)  # keep the random velocity field tame
    schedule = hasten.FlowMatching()
    den = hasten.FlowDenoiser(net, schedule, time_scale=1000.0)
    t_grid = [schedule.t_max, 0.7, 0.4, 0.15, 0.0]
    labels = torch.arange(4) % 10
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(len(t_grid) - 1)
    inner = t_grid[1:-1]
    table = [t_grid[0], *inner, 0.0] if solver == "euler" else [t_grid[0], *[t for t in inner for _ in (0, 1)], 0.0]
    sched.sigmas = torch.tensor(table, dtype=torch.float32)
    sched.timesteps = sched.sigmas[:-1] * 1000
    x, calls = noise.clone(), 0  # the flow state at t_max
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.expand(4), class_labels=labels).sample, t, x).prev_sample
            calls += 1
    sigmas = torch.tensor([t / (1 - t) for t in t_grid], dtype=torch.float64)
    with torch.no_grad():
        out = hasten.sample(den, noise / (1 - t_grid[0]), sigmas, solver, cond={"class_labels": labels},
                            return_info=True, **({"space": "flow"} if solver == "heun" else {}))  # fmt: skip
    assert out.nfe == calls == (4 if solver == "euler" else 7)
    torch.testing.assert_close(out.x, x, atol=2e-5, rtol=0)

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

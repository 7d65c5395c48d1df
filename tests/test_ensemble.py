"""Ensembles (hasten.ensemble): the output average and AFA as models, exactness limits, training, the folder, CLI."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.cli.app import app
from hasten.ensemble import Aggregator, FeatureEnsemble, OutputAverage, build_ensemble, default_blocks
from hasten.ensemble.model import build_afa_network
from hasten.models.zoo import build_network, make_denoiser, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def other_unet(tmp_path_factory):
    """A second UNet of the bundled architecture with other weights (the bundled one, perturbed)."""
    base = hasten.load("mnist-unet")
    net = build_network("unet", (1, 28, 28), 10)
    net.load_state_dict(base.network.state_dict())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("other-unet")
    save_model(net, base.info, folder)
    return str(folder)


def _inputs(n=3, sigma=4.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=gen) * sigma
    return x, torch.full((n,), sigma), torch.arange(n) % 10


def _randomise(module, scale=1.0):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def _afa_denoiser(models, blocks=None):
    network = build_afa_network(models, blocks or default_blocks(models[0].network), hidden=8)
    return network, make_denoiser(network, models[0].info)


def test_afa_with_one_member_equals_that_member_exactly():
    member = hasten.load("mnist-unet")
    network, denoiser = _afa_denoiser([member])
    _randomise(network.aggregator)  # any aggregator: the softmax over one member is 1
    x, s, y = _inputs()
    with torch.no_grad():
        assert torch.equal(denoiser(x, s, class_labels=y), member.denoiser(x, s, class_labels=y))


def test_identical_members_give_the_members_output_for_any_attention():
    a, b = hasten.load("mnist-unet"), hasten.load("mnist-unet")
    network, denoiser = _afa_denoiser([a, b])
    _randomise(network.aggregator, scale=3.0)  # attention far from uniform
    x, s, y = _inputs()
    with torch.no_grad():
        out, ref = denoiser(x, s, class_labels=y), a.denoiser(x, s, class_labels=y)
    # sum_i A_i F = F up to the rounding of sum_i A_i = 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("chosen", [0, 1])
def test_one_hot_attention_gives_the_chosen_member(other_unet, chosen):
    # every row block runs through its own member's weights: attention all on member k is member k
    models = [hasten.load("mnist-unet"), hasten.load(other_unet)]
    network, denoiser = _afa_denoiser(models)
    with torch.no_grad():
        for head in network.aggregator.heads.values():
            head.preference.copy_(torch.tensor([60.0, -60.0] if chosen == 0 else [-60.0, 60.0]))
    x, s, y = _inputs()
    with torch.no_grad():
        out = denoiser(x, s, class_labels=y)
        ref = models[chosen].denoiser(x, s, class_labels=y)
        other = models[1 - chosen].denoiser(x, s, class_labels=y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - other).abs().max() > 1e-3  # the members do differ
    # the first member's network is untouched when used on its own
    with torch.no_grad():
        assert torch.equal(
            models[0].denoiser(x, s, class_labels=y), hasten.load("mnist-unet").denoiser(x, s, class_labels=y)
        )
    network.remove_hooks()
    assert not any(hasattr(m, "_hasten_hooks") for m in models[0].network.modules())


def test_gradients_reach_the_aggregator_only(other_unet):
    models = [hasten.load("mnist-unet"), hasten.load(other_unet)]
    network, denoiser = _afa_denoiser(models)
    x, s, y = _inputs(2)
    loss = denoiser(x, s, class_labels=y).square().mean()
    loss.backward()
    for name, p in network.aggregator.named_parameters():
        assert p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for p in network.aggregator.parameters())
    for model in models:
        assert all(p.grad is None and not p.requires_grad for p in model.network.parameters())


def test_average_of_one_member_is_that_member():
    member = hasten.load("mnist-dit")
    average = OutputAverage([member.denoiser], torch.tensor([1.0]))
    x, s, y = _inputs()
    with torch.no_grad():
        assert torch.equal(average(x, s, class_labels=y), member.denoiser(x, s, class_labels=y))


def test_average_across_architectures_round_trip(tmp_path):
    unet, dit = hasten.load("mnist-unet"), hasten.load("mnist-dit")
    build_ensemble(members=("mnist-unet", "mnist-dit"), method="average", weights=(0.25, 0.75), out=tmp_path / "e")
    model = hasten.load(tmp_path / "e")
    assert model.info.ensemble["method"] == "average" and model.info.folder_format == "ensemble"
    assert model.schedule is model.members[0].schedule  # sampled on the first member's levels
    x, s, y = _inputs()
    with torch.no_grad():
        out = model.denoiser(x, s, class_labels=y)
        ref = 0.25 * unet.denoiser(x, s, class_labels=y) + 0.75 * dit.denoiser(x, s, class_labels=y)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert model.bytes_on_disk() > unet.bytes_on_disk() + dit.bytes_on_disk()
    images = hasten.generate(model, 2, solver="dpmpp_2m", steps=3, seed=0).images01
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    # the DiT first: its noise levels reach beyond the UNet's, refused by name
    with pytest.raises(ValueError, match=r"member 2 \(mnist-unet\) does not cover"):
        build_ensemble(members=("mnist-dit", "mnist-unet"), method="average", out=tmp_path / "f")


def test_mismatched_architectures_are_refused_with_the_feature_method(tmp_path):
    with pytest.raises(ValueError, match=r"member 2 \(mnist-dit\) is a 'dit' network"):
        build_ensemble(members=("mnist-unet", "mnist-dit"), method="afa", minutes=1, out=tmp_path / "a")
    from diffusers import UNet2DModel

    config = {k: v for k, v in hasten.load("mnist-unet").network.config.items() if not k.startswith("_")}
    wide = UNet2DModel(**{**config, "block_out_channels": (32, 64, 96)})  # a UNet, but not the same one
    save_model(wide, hasten.load("mnist-unet").info, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"identical architectures: member 2 .* block_out_channels"):
        build_ensemble(members=("mnist-unet", str(tmp_path / "wide")), method="afa", minutes=1, out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_afa_folder_round_trip_and_exact_resume(other_unet, tmp_path):
    members = ("mnist-unet", other_unet)
    settings = dict(members=members, method="afa", minutes=5, batch_size=4, blocks=("up_blocks.2", "conv_out"))
    straight = build_ensemble(**settings, out=tmp_path / "straight", max_steps=2, progress=False)
    assert straight.steps == 2
    build_ensemble(**settings, out=tmp_path / "split", max_steps=1, progress=False)
    resumed = build_ensemble(**settings, out=tmp_path / "split", max_steps=2, resume=True, progress=False)
    assert resumed.resumed_from_step == 1 and resumed.steps == 2
    a, b = hasten.load(tmp_path / "straight"), hasten.load(tmp_path / "split")
    for (name, p), q in zip(a.network.aggregator.state_dict().items(), b.network.aggregator.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(h.preference.abs().sum() > 0 for h in a.network.aggregator.heads.values())  # it trained
    assert a.fingerprint == b.fingerprint and a.info.ensemble["blocks"] == ["up_blocks.2", "conv_out"]
    assert isinstance(a.network, FeatureEnsemble) and isinstance(a.network.aggregator, Aggregator)
    # the loaded model samples; the members' weights were not changed by training
    images = hasten.generate(a, 2, solver="ddim", steps=2, seed=0, guidance=2.0).images01
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    assert a.members[0].fingerprint == hasten.load("mnist-unet").fingerprint
    # a member whose weights changed since is refused, naming it
    record = json.loads((tmp_path / "straight" / "hasten.json").read_text())
    record["ensemble"]["members"][1]["fingerprint"] = "0" * 16
    (tmp_path / "straight" / "hasten.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"member 2 .* fingerprint .* built on 0000000000000000"):
        hasten.load(tmp_path / "straight")
    # other settings do not resume the run
    with pytest.raises(ValueError, match="other settings"):
        build_ensemble(**{**settings, "hidden": 4}, out=tmp_path / "split", max_steps=3, resume=True, progress=False)


def test_ensemble_folder_moves_with_a_relative_member(other_unet, tmp_path):
    shutil.copytree(other_unet, tmp_path / "member")
    build_ensemble(members=("mnist-unet", str(tmp_path / "member")), method="average", out=tmp_path / "e")
    record = json.loads((tmp_path / "e" / "hasten.json").read_text())
    record["ensemble"]["members"][1]["model"] = "../member"
    (tmp_path / "e" / "hasten.json").write_text(json.dumps(record))
    assert len(hasten.load(tmp_path / "e").members) == 2


def test_cli_builds_samples_and_refuses_bad_input(tmp_path):
    out = tmp_path / "avg"
    result = runner.invoke(app, ["ensemble", "mnist-unet", "mnist-dit", "--method", "average", "--weights", "0.5,0.5",
                                 "--out", str(out), "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["method"] == "average"
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--model", str(out), "--n", "2", "--steps", "2", "--out", str(grid)])
    assert result.exit_code == 0, result.output
    assert grid.exists()
    refusals = [
        (["--method", "bogus"], "--method 'bogus'"),
        (["--method", "average", "--weights", "0.5,0.6"], "sum to 1"),
        (["--method", "average", "--weights", "a,b"], "--weights 'a,b'"),
        (["--method", "afa", "--weights", "0.5,0.5", "--minutes", "1"], "weights are the output average's"),
        (["--method", "afa"], "minutes must be a finite number > 0"),
        (["--method", "average", "--minutes", "3"], "minutes is an AFA setting"),
        (["--method", "afa", "--minutes", "1", "--blocks", "up_blocks.9"], "block 'up_blocks.9' is not a module"),
    ]
    for flags, message in refusals:
        result = runner.invoke(app, ["ensemble", "mnist-unet", "mnist-unet", *flags, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (flags, result.output)
        assert message in result.output, (flags, result.output)
    # an existing folder is not overwritten unless asked
    result = runner.invoke(app, ["ensemble", "mnist-unet", "--method", "average", "--out", str(out)])
    assert result.exit_code == 2 and "already holds files" in result.output
    result = runner.invoke(app, ["ensemble", "mnist-unet", "--method", "average", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert len(hasten.load(out).members) == 1


def test_average_of_pipeline_models_in_memory():
    """hasten.ensemble.average over hasten.from_pipeline models: the denoiser is the weighted sum of the members',
    images decode through the first member's VAE, and members conditioned otherwise are refused."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines
    from hasten.ensemble import average

    pipe_a, kwargs = tiny_pipelines.stable_diffusion()
    pipe_b, _ = tiny_pipelines.stable_diffusion()
    with torch.no_grad():
        for p in pipe_b.unet.parameters():  # a "fine-tune": the same architecture, other weights
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    conditions = {k: v[:1] for k, v in kwargs.items()}
    a = hasten.from_pipeline(pipe_a, **conditions, height=16, width=16)
    b = hasten.from_pipeline(pipe_b, **conditions, height=16, width=16)
    both = average([a, b], [0.25, 0.75])
    x = torch.randn(2, *a.info.image_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 3.0)
    cond = both.conditioning(None, range(2))
    expected = 0.25 * a.denoiser(x, sigma, **cond) + 0.75 * b.denoiser(x, sigma, **cond)
    torch.testing.assert_close(both.denoiser(x, sigma, **cond), expected)
    out = hasten.generate(both, 2, steps=3)
    assert out.images01.shape == (2, 3, 16, 16) and out.nfe == 3
    only_a = hasten.generate(average([a, b], [1.0, 0.0]), 2, steps=3)
    torch.testing.assert_close(only_a.images01, hasten.generate(a, 2, steps=3).images01)
    second_prompt = {
        "prompt_embeds": kwargs["prompt_embeds"][1:],
        "negative_prompt_embeds": conditions["negative_prompt_embeds"],
    }
    other = hasten.from_pipeline(pipe_b, **second_prompt, height=16, width=16)
    with pytest.raises(ValueError, match="conditioned otherwise"):
        average([a, other])
    with pytest.raises(ValueError, match="weights"):
        average([a, b], [0.5, 0.6])

"""Inversion and editing (hasten.invert / hasten.edit / `hasten edit`): exact replay, DDIM inversion's order, the
DPM-Encoder's noise, pipelines, bad input."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hasten
import hasten.editing.encoders as encoders
from hasten.cli.app import app
from hasten.models.analytic import ProductMixture, as_network
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser


def _analytic(shape=(1, 4, 4)) -> LoadedModel:
    """An exact eps-network of a smooth two-component product mixture on the 1000-step linear DDPM schedule."""
    info = ModelInfo(name="mixture", arch="toy", objective="eps", image_shape=shape, num_classes=0, data="")
    mixture = ProductMixture(means=(-0.5, 0.4), stds=(0.35, 0.4), weights=(0.4, 0.6))
    network = as_network(mixture, info.schedule(), "eps")
    return LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "analytic")


def _images(n: int, shape=(1, 4, 4), dtype=torch.float64) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("method", ["ddpm-inversion", "cyclediffusion"])
@pytest.mark.parametrize("steps,eta", [(1, 1.0), (7, 1.0), (30, 0.3)])
def test_stochastic_inversions_replay_exactly_on_the_analytic_model(method, steps, eta):
    model, images = _analytic(), _images(12)
    inversion = hasten.invert(model, images, method=method, steps=steps, eta=eta)
    replay = hasten.edit(model, inversion)
    torch.testing.assert_close(replay.samples, inversion.source, rtol=0, atol=1e-12)
    torch.testing.assert_close(replay.images01, images.float(), rtol=0, atol=1e-6)  # images are float32
    assert replay.nfe == inversion.nfe == steps
    # the replay passes through the recorded states bit for bit, so starting from any of them ends the same
    if steps > 1:
        assert torch.equal(hasten.edit(model, inversion, skip=steps // 2).samples, replay.samples)


def test_the_inversion_does_not_depend_on_the_batch():
    model, images = _analytic(), _images(10)
    whole = hasten.invert(model, images, steps=5)
    split = hasten.invert(model, images, steps=5, batch_size=3)
    torch.testing.assert_close(whole.step_noise, split.step_noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole.states, split.states, rtol=0, atol=1e-12)


def test_ddim_inversion_is_exact_in_the_limit_at_first_order():
    """DDIM inversion is the explicit Euler method run upwards: its round-trip error falls as 1 / steps."""
    model, images = _analytic(), _images(32)
    errors = []
    for steps in (10, 20, 40, 80):
        inversion = hasten.invert(model, images, method="ddim-inversion", steps=steps, schedule="logsnr")
        replay = hasten.edit(model, inversion).samples
        errors.append(float((replay - inversion.source).pow(2).mean().sqrt()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(0.8 < s < 1.2 for s in slopes), (errors, slopes)
    assert errors[-1] < 0.03


def test_the_dpm_encoder_recovers_standard_normal_noise_from_a_sample_and_ddpm_inversion_does_not():
    """CycleDiffusion draws the sampler's own posterior chain: for an image the sampler made, the noise it recovers is
    close to N(0, 1), closer as steps grow (the ancestral step's Gaussian is the exact reverse transition only in
    the limit). Edit-friendly DDPM inversion's independent states give far larger noise (the paper's observation)."""
    model = _analytic((1, 8, 8))
    spread = {}
    for steps in (20, 100):
        grid = tuple(hasten.get_sigmas("auto", steps, model.schedule).tolist())
        gen = torch.Generator().manual_seed(1)
        start = torch.randn(256, 1, 8, 8, dtype=torch.float64, generator=gen) * math.sqrt(grid[0] ** 2 + 1)
        x0 = hasten.sample(model.denoiser, start, grid, "ddpm", generator=gen)
        for name, draw_states in (("cyc", encoders._posterior_chain), ("ddpm", encoders._independent_states)):
            draws = torch.randn(steps, *x0.shape, dtype=torch.float64, generator=gen)
            targets = draw_states(x0, grid, 1.0, draws)
            _, noise, _, _ = encoders._record_noise(model.denoiser, x0, grid, 1.0, targets, {})
            z = noise[:-1].flatten()  # the last step adds none
            spread[name, steps] = float(z.std())
            assert abs(float(z.mean())) < 0.02
    assert abs(spread["cyc", 100] - 1) < 0.05
    assert abs(spread["cyc", 100] - 1) < abs(spread["cyc", 20] - 1)
    assert spread["ddpm", 20] > 1.5 and spread["ddpm", 100] > 1.5


def test_ddpm_inversion_of_held_out_digits_is_exact_on_the_bundled_model():
    model = hasten.load("mnist-unet")
    data = hasten.data.load_mnist("heldout")
    images, labels = data.images[:4].float() / 255, data.labels[:4]
    inversion = hasten.invert(model, images, labels=labels, steps=10)
    replay = hasten.edit(model, inversion)
    mse = (replay.images01 - images).pow(2).flatten(1).mean(1)
    assert float(mse.max()) < 1e-9  # float32 rounding: PSNR above 90 dB
    edited = hasten.edit(model, inversion, to_label=7)
    assert edited.labels.tolist() == [7] * 4
    assert not torch.allclose(edited.images01, images, atol=1e-2)


def test_edit_inverts_images_given_directly_and_honours_the_options():
    model, images = _analytic(), _images(3)
    direct = hasten.edit(model, images, method="cyclediffusion", steps=6, eta=0.5, seed=3)
    inversion = hasten.invert(model, images, method="cyclediffusion", steps=6, eta=0.5, seed=3)
    assert torch.equal(direct.samples, hasten.edit(model, inversion).samples)
    other_seed = hasten.invert(model, images, method="cyclediffusion", steps=6, eta=0.5, seed=4)
    assert not torch.equal(other_seed.step_noise, inversion.step_noise)


def _bad(call, match):
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        call()


def test_bad_input_is_refused_by_name():
    model, images = _analytic(), _images(2)
    _bad(lambda: hasten.invert(model, images * 2, steps=3), r"\[0, 1\]")
    _bad(lambda: hasten.invert(model, images[:, :, :2], steps=3), r"shape \[N, 1, 4, 4\]")
    _bad(lambda: hasten.invert(model, images.to(torch.uint8), steps=3), "floating-point")
    _bad(lambda: hasten.invert(model, images * float("nan"), steps=3), "NaN")
    _bad(lambda: hasten.invert(model, images, steps=3, method="null-text"), "null-text")
    _bad(lambda: hasten.invert(model, images, steps=3, eta=0), "eta > 0")
    _bad(lambda: hasten.invert(model, images, steps=3, method="ddim-inversion", eta=0.5), "takes no eta")
    _bad(lambda: hasten.invert(model, images, steps=0), "steps")
    _bad(lambda: hasten.invert(model, images, steps=3, labels=[1, 2]), "not class-conditional")
    inversion = hasten.invert(model, images, steps=3)
    _bad(lambda: hasten.edit(model, inversion, skip=3), "skip must be an integer in")
    _bad(lambda: hasten.edit(model, inversion, steps=5), "belong to the inversion")
    _bad(lambda: hasten.edit(model, images, strength=0.5), "strength")
    unet = hasten.load("mnist-unet")
    digits = torch.zeros(2, 1, 28, 28)
    _bad(lambda: hasten.invert(unet, digits, steps=2), "labels are needed")
    _bad(lambda: hasten.invert(unet, digits, steps=2, labels=[3, 10]), "label 10 is outside")
    _bad(lambda: hasten.edit(unet, inversion), "other weights")
    unet_inversion = hasten.invert(unet, digits, steps=2, labels=[3, 4])
    _bad(lambda: hasten.edit(unet, unet_inversion, to_label=-1), "label -1 is outside")


def test_pipeline_edit_replays_in_latent_space_and_follows_the_target_prompt():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    pipe, kwargs = tiny_pipelines.stable_diffusion()
    embeds, negative = kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"][:1]
    gen = torch.Generator().manual_seed(0)
    source = hasten.from_pipeline(pipe, prompt_embeds=embeds[:1], negative_prompt_embeds=negative, height=16, width=16)
    target = hasten.from_pipeline(pipe, prompt_embeds=embeds[1:], negative_prompt_embeds=negative, height=16, width=16)
    assert source.pixel_shape == (3, 16, 16)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    inversion = hasten.invert(source, images, steps=4)
    assert inversion.source.shape[1:] == source.info.image_shape
    replay = hasten.edit(source, inversion)
    torch.testing.assert_close(replay.samples, inversion.source, rtol=0, atol=1e-5)
    edited = hasten.edit(target, inversion)
    assert edited.images01.shape == images.shape
    assert not torch.allclose(edited.samples, inversion.source, atol=1e-3)


runner = CliRunner()


def test_cli_edit_round_trip_and_bad_input(tmp_path):
    data = hasten.data.load_mnist("heldout")
    source = tmp_path / "digits.npz"
    np.savez(source, samples=(data.images[:3].float() / 255).numpy(), labels=data.labels[:3].numpy())
    out = tmp_path / "edited.npz"
    args = ["edit", "--images", str(source), "--save", str(out), "--steps", "4", "--model", "mnist-unet"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "grid.png"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"psnr_to_source"' in result.output
    with np.load(out) as edited:
        assert edited["samples"].shape == (3, 1, 28, 28)
        assert edited["labels"].tolist() == data.labels[:3].tolist()
        assert np.abs(edited["samples"] - (data.images[:3].float() / 255).numpy()).max() < 1e-4
    assert (tmp_path / "grid.png").exists()
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, samples=(data.images[:3].float() / 255).numpy())
    for args, message in (
        (["--images", str(unlabelled)], "needs a 'labels' array"),
        (["--images", str(source), "--to-label", "10"], "label 10 is outside"),
        (["--images", str(source), "--method", "sdedit"], "--method 'sdedit' is unknown"),
        (["--images", str(source), "--to-prompt", "a cat"], "go with --pipeline"),
        (["--images", str(tmp_path / "missing.npz")], "no such file"),
    ):
        result = runner.invoke(app, ["edit", "--save", str(tmp_path / "x.npz"), "--steps", "2", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_cli_edits_a_pipeline_folder_from_one_prompt_to_another(tmp_path):
    """`hasten edit --pipeline DIR --prompt-embeds A --to-prompt-embeds B`: the same pipeline conditioned twice;
    with B = A the images come back up to the VAE's own reconstruction (exact in latent space)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    import tiny_pipelines

    pipe, kwargs = tiny_pipelines.stable_diffusion()
    pipe.save_pretrained(tmp_path / "sd")
    negative = kwargs["negative_prompt_embeds"][:1].contiguous()
    save_file({"prompt_embeds": kwargs["prompt_embeds"][:1].contiguous(), "negative_prompt_embeds": negative},
              str(tmp_path / "a.safetensors"))  # fmt: skip
    save_file({"prompt_embeds": kwargs["prompt_embeds"][1:].contiguous(), "negative_prompt_embeds": negative},
              str(tmp_path / "b.safetensors"))  # fmt: skip
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "in.npz", samples=images.numpy())
    base = ["edit", "--pipeline", str(tmp_path / "sd"), "--prompt-embeds", str(tmp_path / "a.safetensors"),
            "--images", str(tmp_path / "in.npz"), "--height", "16", "--width", "16", "--steps", "3"]  # fmt: skip
    runs = {}
    for name in ("a", "b"):
        out = tmp_path / f"to-{name}.npz"
        result = runner.invoke(app, [*base, "--to-prompt-embeds", str(tmp_path / f"{name}.safetensors"),
                                     "--save", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        with np.load(out) as data:
            assert "labels" not in data.files
            runs[name] = data["samples"]
    assert runs["a"].shape == (2, 3, 16, 16)
    source = hasten.from_pipeline(pipe, prompt_embeds=kwargs["prompt_embeds"][:1], negative_prompt_embeds=negative,
                                  height=16, width=16)  # fmt: skip
    vae_round_trip = source.to_images(source.from_images(images)).numpy()
    assert np.abs(runs["a"] - vae_round_trip).max() < 1e-3
    assert np.abs(runs["a"] - runs["b"]).max() > 1e-2  # another prompt, another image
    both = runner.invoke(app, [*base, "--save", str(tmp_path / "x.npz")])
    assert both.exit_code == 2 and "exactly one target" in both.output

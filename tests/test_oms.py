"""One More Step (hasten.oms): the start and first-level prediction from SNR 0, its module, generate and the CLI."""

import dataclasses
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hasten
from hasten.cli.app import app
from hasten.models.analytic import GaussianMixture
from hasten.oms import (
    MIN_SIGMA,
    FirstLevelDenoiser,
    OMSNet,
    OMSTrainConfig,
    OneMoreStep,
    bundled_oms,
    load_oms,
    save_oms,
    train_oms,
)
from hasten.schedules.grids import get_sigmas

RUNNER = CliRunner()
D = 16
DATA_MEAN = 0.8  # the mixture's mean: a brightness far from 0, which a start from pure noise lacks


class MeanNet(nn.Module):
    """The exact OMS optimum: the per-label data mean (last row: the null class), whatever the noise."""

    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means)
        self.image_shape, self.num_classes = tuple(means.shape[1:]), means.shape[0] - 1

    def forward(self, z, labels):
        return self.means[labels] + 0.0 * z


def _mixture():
    return GaussianMixture([[0.6] * D, [1.0] * D], [0.2, 0.2])  # mean 0.8 in every coordinate


def _exact_oms(num_classes: int = 0) -> OneMoreStep:
    means = torch.full((num_classes + 1, D), DATA_MEAN)
    return OneMoreStep(MeanNet(means), "gmm")


class BiasedAtFirstLevel:
    """The exact mixture denoiser, except a dark bias at the first level: an eps network's poor x0 at SNR ~ 0."""

    def __init__(self, sigma_0: float, bias: float = -3.0):
        self.exact, self.sigma_0, self.bias, self.calls_at_first = _mixture(), sigma_0, bias, 0

    def __call__(self, x, sigma, **cond):
        out = self.exact(x, sigma)
        if float(sigma[0]) >= self.sigma_0 * (1 - 1e-6):
            self.calls_at_first += 1
            return out + self.bias
        return out


@pytest.fixture(scope="module")
def vp_grid():
    schedule = hasten.VPDiscrete.from_betas("linear")  # alphas_cumprod[-1] ~ 4e-5: non-zero terminal SNR
    return schedule, get_sigmas("auto", 2, schedule)


def test_oms_start_has_mean_sqrt_abar_times_data_mean(vp_grid):
    schedule, sigmas = vp_grid
    sigma_0 = float(sigmas[0])
    z = torch.randn(20000, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start, _ = _exact_oms().begin(_mixture(), z, None, sigma_0)
    alpha = float(schedule.alpha_from_ve_sigma(sigma_0))
    network_input = alpha * start  # what the network sees: sqrt(abar_0) x0_hat + sqrt(1 - abar_0) z
    assert network_input.mean().item() == pytest.approx(alpha * DATA_MEAN, abs=4 * (1 - alpha**2) ** 0.5 / 400)
    assert torch.allclose(network_input - alpha * DATA_MEAN, (1 - alpha**2) ** 0.5 * z, atol=1e-9)
    # the base start has no data mean: pure noise at unit variance
    base = z * schedule.initial_noise_scale(sigma_0) * alpha
    assert abs(base.mean().item()) < 4 / 400 and abs(base.std().item() - 1) < 0.01


def test_first_step_is_the_ddim_jump_from_snr_0_and_never_calls_the_model_there(vp_grid):
    _, sigmas = vp_grid
    sigma_0, sigma_1 = float(sigmas[0]), float(sigmas[1])
    z = torch.randn(64, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flawed = BiasedAtFirstLevel(sigma_0)
    start, denoiser = _exact_oms().begin(flawed, z, None, sigma_0)
    x1 = hasten.sample(denoiser, start, sigmas[:2], "ddim")
    assert torch.allclose(x1, DATA_MEAN + sigma_1 * z, atol=1e-9)
    assert flawed.calls_at_first == 0


def test_oms_removes_a_first_level_brightness_bias(vp_grid):
    # a dark first-level prediction darkens few-step samples; OMS stands in for it and gives the exact model's result
    _, sigmas = vp_grid
    sigma_0 = float(sigmas[0])
    z = torch.randn(4000, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flawed, exact = BiasedAtFirstLevel(sigma_0), _mixture()
    scale = hasten.VPDiscrete.from_betas("linear").initial_noise_scale(sigma_0)
    base = hasten.sample(flawed, z * scale, sigmas, "dpmpp_2m")
    oms = _exact_oms()
    fixed = hasten.sample(*reversed(oms.begin(flawed, z, None, sigma_0)), sigmas, "dpmpp_2m")
    reference = hasten.sample(*reversed(oms.begin(exact, z, None, sigma_0)), sigmas, "dpmpp_2m")
    stderr = 0.25 / (z.numel()) ** 0.5
    assert base.mean().item() < DATA_MEAN - 0.1  # the flaw: measured 0.66 against 0.80
    assert fixed.mean().item() == pytest.approx(DATA_MEAN, abs=6 * stderr)
    assert torch.equal(fixed, reference)


def test_guided_prediction_extrapolates_from_the_null_class():
    means = torch.stack([torch.full((D,), 1.0), torch.full((D,), -1.0), torch.full((D,), 0.5)])  # 2 classes + null
    oms = OneMoreStep(MeanNet(means), "gmm")
    z = torch.zeros(2, D)
    labels = torch.tensor([0, 1])
    assert torch.equal(oms.predict_x0(z, labels), means[:2])
    guided = oms.predict_x0(z, labels, guidance=3.0)
    assert torch.allclose(guided, means[2] + 3.0 * (means[:2] - means[2]))
    assert torch.equal(oms.predict_x0(z, None), means[2].expand(2, D))


def test_first_level_denoiser_passes_other_levels_through():
    calls = []

    def base(x, sigma, **cond):
        calls.append(float(sigma[0]))
        return x * 0 + 7.0

    x0 = torch.ones(3, D)
    wrapped = FirstLevelDenoiser(base, 100.0, x0)
    assert torch.equal(wrapped(torch.zeros(3, D), torch.full((3,), 100.0, dtype=torch.float32)), x0)
    assert calls == []
    assert torch.equal(wrapped(torch.zeros(3, D), torch.full((3,), 50.0)), torch.full((3, D), 7.0))
    assert calls == [50.0]


def test_bad_input_is_refused_by_name(vp_grid):
    oms = _exact_oms(num_classes=2)
    with pytest.raises(ValueError, match=r"first level must be >= 50 .* got 10"):
        oms.begin(_mixture(), torch.zeros(2, D), None, 10.0)
    with pytest.raises(ValueError, match=r"labels must be 2 values in 0\.\.2 .* got \[0, 3\]"):
        oms.predict_x0(torch.zeros(2, D), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"noise must be \[B, 16\], got \(2, 8\)"):
        oms.predict_x0(torch.zeros(2, 8), None)
    with pytest.raises(ValueError, match="OMS guidance needs labels"):
        oms.predict_x0(torch.zeros(2, D), None, guidance=2.0)
    assert MIN_SIGMA == 50.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("oms") / "mnist.safetensors"
    record = train_oms(out, OMSTrainConfig(max_steps=30, batch_size=16, width=4, lr=1e-2), progress=False)
    return out, record


def test_train_writes_a_module_that_loads_and_approaches_the_class_mean(trained):
    out, record = trained
    assert record["steps"] == 30 and record["parameters"] > 0 and not out.with_name(out.name + ".train").exists()
    oms = load_oms(out)
    assert oms.data == "mnist" and oms.num_classes == 10 and oms.image_shape == (1, 28, 28)
    assert oms.record["rmse_to_class_mean"] == record["rmse_to_class_mean"]
    # 30 steps from a random start: already closer to the optimum than the mean of all digits is to zero
    assert record["rmse_to_class_mean"] < 0.7
    with pytest.raises(FileExistsError, match="already exists"):
        train_oms(out, OMSTrainConfig(max_steps=1), progress=False)


def test_train_and_load_refuse_bad_input(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"lr must be > 0, got -1"):
        train_oms(tmp_path / "x.safetensors", OMSTrainConfig(lr=-1.0), progress=False)
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\), got 1"):
        train_oms(tmp_path / "x.safetensors", OMSTrainConfig(label_dropout=1.0), progress=False)
    with pytest.raises(FileNotFoundError, match=r"no OMS module at 'nope\.safetensors'"):
        load_oms("nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_oms(tmp_path / "junk.safetensors")
    save_oms(OMSNet((1, 28, 28), 10, 4), tmp_path / "ok.safetensors", "emoji", {})
    with pytest.raises(ValueError, match=r"trained for data 'emoji'.*model 'tiny-dit' has data 'mnist'"):
        load_oms(tmp_path / "ok.safetensors", hasten.load(tiny))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-step flow DiT on MNIST: a real model folder of the data set the OMS module is trained on."""
    from hasten.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny")
    train(TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=8), out, max_steps=1, progress=False,
          name="tiny-dit")  # fmt: skip
    return out


def test_generate_with_oms_is_the_oms_start_and_first_level(trained, tiny):
    out, _ = trained
    model, oms = hasten.load(tiny), load_oms(out)
    got = hasten.generate(model, 3, steps=2, seed=5, oms=oms)
    plain = hasten.generate(model, 3, steps=2, seed=5)
    assert got.nfe == plain.nfe == 2 and not torch.equal(got.images01, plain.images01)
    assert isinstance(got.seconds, float) and got.seconds > 0
    # the same run by hand: the noise of generate's convention, the OMS start and first-level prediction
    from hasten.seeds import initial_noise

    sigmas = torch.tensor(got.sigmas, dtype=torch.float64)
    z, labels = initial_noise(5, range(3), model.info.image_shape), got.labels
    start, denoiser = oms.begin(model.denoiser, z, labels, float(sigmas[0]))
    x = hasten.sample(denoiser, start, sigmas, "dpmpp_2m", cond=model.conditioning(labels, range(3)))
    assert torch.equal(model.to_images(x), got.images01)
    with pytest.raises(ValueError, match=r"first level must be >= 50 .* got 10"):
        hasten.generate(model, 1, sigmas=hasten.schedules.karras(2, 0.1, 10.0), oms=oms)


def test_cli_sample_with_oms(trained, tiny, tmp_path):
    out, _ = trained
    args = ["sample", "--model", str(tiny), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]
    result = RUNNER.invoke(app, [*args, "--oms", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["oms"] == str(out) and data["nfe"] == 2
    text = RUNNER.invoke(app, [*args, "--oms", str(out)])
    assert text.exit_code == 0 and f"+ oms[{out.stem}], 2 NFE" in text.output
    bad = RUNNER.invoke(app, [*args, "--oms", str(tmp_path / "missing.safetensors")])
    assert bad.exit_code == 2 and "no OMS module at" in bad.output
    recipe = tmp_path / "recipe.json"
    hasten.save_recipe(hasten.Recipe.from_files(hasten.load(tiny), steps=2, oms=str(out)), recipe)
    both = RUNNER.invoke(app, ["sample", "--recipe", str(recipe), "--oms", str(out), "--out", str(tmp_path / "g.png")])
    assert both.exit_code == 2 and "drop --oms" in both.output
    by_recipe = RUNNER.invoke(app, ["sample", "--recipe", str(recipe), "--n", "2", "--out", str(tmp_path / "r.png"),
                                    "--format", "json"])  # fmt: skip
    assert by_recipe.exit_code == 0, by_recipe.output
    assert json.loads(by_recipe.output)["recipe_digest"] == data["recipe_digest"]


def test_a_recipe_carries_the_oms_module(trained, tiny, tmp_path):
    """One More Step is a recipe ingredient: generate(recipe) applies it, its file is identified by fingerprint,
    a changed file is refused unless forced, and recipes without it keep the digests they had."""
    out, _ = trained
    model = hasten.load(tiny)
    plain = hasten.Recipe.from_files(model, steps=2)
    assert "oms" not in plain.to_dict()  # recipes written before OMS read and hash as before
    recipe = hasten.Recipe.from_files(model, steps=2, oms=str(out))
    assert recipe.oms_fingerprint and recipe.digest() != plain.digest()
    assert "oms[" in recipe.describe()
    again = hasten.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe
    by_recipe = hasten.generate(model, 3, recipe=recipe, seed=4)
    by_hand = hasten.generate(model, 3, steps=2, seed=4, oms=load_oms(out))
    assert torch.equal(by_recipe.images01, by_hand.images01)
    with pytest.raises(TypeError, match="do not also pass oms"):
        hasten.generate(model, 1, recipe=recipe, oms=load_oms(out))
    changed = dict(recipe.to_dict(), oms_fingerprint="0" * 16)
    with pytest.raises(hasten.RecipeError, match="changed since the recipe was written"):
        hasten.Recipe.from_dict(changed)
    forced = hasten.Recipe.from_dict(dict(changed, forced=["oms"]))  # a recipe written with force=True
    assert forced.forced == ("oms",)
    with pytest.raises(hasten.RecipeError, match="no OMS module at"):
        hasten.Recipe.from_files(model, steps=2, oms=str(tmp_path / "missing.safetensors"))


def test_bundled_module_matches_the_mnist_models():
    if "mnist" not in bundled_oms():
        pytest.skip("no bundled OMS module")
    oms = load_oms("mnist")
    assert oms.record["rmse_to_class_mean"] < 0.1
    oms.check_model(hasten.load("mnist-unet"))


def test_training_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    import hasten.oms as oms_module

    config = OMSTrainConfig(batch_size=8, width=2, label_channels=1, max_steps=6)
    real_save = oms_module.save_oms

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after its last checkpoint, before the module is written

    monkeypatch.setattr(oms_module, "save_oms", killed)
    with pytest.raises(KeyboardInterrupt):
        train_oms(tmp_path / "a.safetensors", config, progress=False)
    monkeypatch.setattr(oms_module, "save_oms", real_save)
    with pytest.raises(ValueError, match="other settings"):  # the checkpoint is of another run: refused
        train_oms(tmp_path / "a.safetensors", dataclasses.replace(config, lr=0.5), progress=False)
    more = dataclasses.replace(config, max_steps=12)
    resumed = train_oms(tmp_path / "a.safetensors", more, progress=False)
    straight = train_oms(tmp_path / "b.safetensors", more, progress=False)
    assert resumed["resumed_from"] == 6 and resumed["steps"] == straight["steps"] == 12
    a, b = load_oms(tmp_path / "a.safetensors").net.state_dict(), load_oms(tmp_path / "b.safetensors").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

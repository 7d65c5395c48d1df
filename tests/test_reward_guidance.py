"""Derivative-free reward guidance (SVDD-PM), its rewards and its baselines (best-of-N, gradient guidance)."""

import math

import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

import hasten
from hasten.cli.app import app
from hasten.models import ProductMixture, RewardGradientDenoiser
from hasten.reward_baselines import best_of_n, gradient_guided
from hasten.rewards import REWARDS, get_reward, ink_area, symmetry
from hasten.solvers import SoftValueDecoding, get_solver
from hasten.solvers.brownian import BrownianNoise, IndependentNoise, RecordedNoise

GMM = ProductMixture()
GRID = hasten.schedules.karras(10, 0.01, 20.0)  # ends at 0: the last step is deterministic


def _start(rows: int, dims: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dims, generator=torch.Generator().manual_seed(seed)) * GRID[0]


def _svdd(particles: int, alpha: float = 0.0, value=lambda d: d[:, 0], **transition) -> SoftValueDecoding:
    return SoftValueDecoding(get_solver("ddpm", **transition), particles, alpha, value)


def _first_coordinate(d: torch.Tensor) -> torch.Tensor:
    return d[:, 0]


# -- the sampler -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("brownian", [True, False])
def test_one_particle_is_plain_sampling_bit_for_bit(brownian):
    x, seeds = _start(8), list(range(8))
    plain = hasten.sample(GMM, x, GRID, "ddpm", noise_seeds=seeds, brownian=brownian, return_info=True)
    one = hasten.sample(GMM, x, GRID, _svdd(1, brownian=brownian), noise_seeds=seeds, return_info=True)
    assert torch.equal(one.x, plain.x) and one.nfe == plain.nfe == 10


def test_one_particle_is_plain_sampling_through_generate(tiny_model):
    model = hasten.load(tiny_model)
    plain = hasten.generate(model, 3, steps=4, solver="ddpm", seed=5)
    scored = hasten.generate(model, 3, steps=4, seed=5, reward="symmetry", particles=1)  # ddpm is the default
    assert torch.equal(scored.images01, plain.images01) and scored.nfe == plain.nfe == 4
    assert torch.equal(scored.rewards, symmetry(plain.images01))


def test_a_constant_reward_at_alpha_zero_keeps_candidate_zero_the_plain_move():
    x, seeds = _start(6), list(range(6))
    plain = hasten.sample(GMM, x, GRID, "ddpm", noise_seeds=seeds)
    constant = _svdd(4, value=lambda d: torch.zeros(d.shape[0]))
    assert torch.equal(hasten.sample(GMM, x, GRID, constant, noise_seeds=seeds), plain)


@pytest.mark.parametrize("final", [0.0, 0.01])
def test_network_calls_count_every_candidate(final):
    grid = GRID if final == 0 else GRID[:-1]  # karras ends at 0.01, then 0
    steps = len(grid) - 1
    for k in (2, 4, 8):
        out = hasten.sample(GMM, _start(4), grid, _svdd(k), noise_seeds=range(4), return_info=True)
        # one call to start, K per stochastic step (the kept candidate's is the next step's call); a last step onto
        # sigma = 0 is deterministic and reuses the kept candidate's estimate
        noisy = steps - 1 if final == 0 else steps
        assert out.nfe == 1 + k * noisy, (k, final, out.nfe)


def test_alpha_zero_keeps_the_best_candidate_and_small_alpha_tends_to_it():
    grid = torch.tensor([8.0, 2.0])  # one stochastic step: every candidate valued once
    seen = []

    def value(d):
        seen.append(d[:, 0].clone())
        return d[:, 0]

    x = _start(16)
    out = hasten.sample(GMM, x, grid, _svdd(5, value=value), noise_seeds=range(16))
    candidates = torch.stack(seen)  # [K, rows]
    assert torch.equal(GMM(out, torch.full((16,), 2.0))[:, 0], candidates.max(0).values)
    tiny = hasten.sample(GMM, x, grid, _svdd(5, alpha=1e-9), noise_seeds=range(16))
    assert torch.equal(tiny, out)
    # a large alpha is nearly uniform: it often keeps a candidate that is not the best
    warm = hasten.sample(GMM, x, grid, _svdd(5, alpha=1e6), noise_seeds=range(16))
    assert not torch.equal(warm, out)


def test_a_constant_reward_with_alpha_leaves_the_law_unchanged():
    # KS against plain ddpm on other noise: a constant value gives uniform weights, so the kept candidate is a
    # draw of the pre-trained transition; a reward that prefers large values is rejected by the same test
    rows, grid = 3000, hasten.schedules.karras(12, 0.01, 20.0)
    x = torch.randn(rows, 1, generator=torch.Generator().manual_seed(1)) * grid[0]
    plain = hasten.sample(GMM, torch.randn(rows, 1, generator=torch.Generator().manual_seed(2)) * grid[0], grid,
                          "ddpm", generator=torch.Generator().manual_seed(3))  # fmt: skip
    constant = _svdd(4, alpha=1.0, value=lambda d: torch.full((d.shape[0],), 3.0))
    steered = _svdd(4, alpha=1.0, value=_first_coordinate)
    out = hasten.sample(GMM, x, grid, constant, generator=torch.Generator().manual_seed(4))
    moved = hasten.sample(GMM, x, grid, steered, generator=torch.Generator().manual_seed(4))
    assert stats.ks_2samp(out[:, 0].numpy(), plain[:, 0].numpy()).pvalue > 0.01
    assert stats.ks_2samp(moved[:, 0].numpy(), plain[:, 0].numpy()).pvalue < 1e-6
    assert moved.mean() > plain.mean() + 0.2


def test_candidates_are_per_sample_reproducible(tiny_model):
    model = hasten.load(tiny_model)
    whole = hasten.generate(model, 4, steps=4, seed=2, reward="ink", particles=3, alpha=0.5)
    split = hasten.generate(model, 4, steps=4, seed=2, reward="ink", particles=3, alpha=0.5, batch_size=3)
    assert torch.allclose(whole.images01, split.images01, atol=1e-5)
    assert whole.nfe == split.nfe == 1 + 3 * 3


def test_extra_draws_of_every_noise_source():
    shape = (3, 4)
    brownian = BrownianNoise([1, 2, 3], shape, torch.float32, torch.device("cpu"))
    first, again, other = brownian(5.0, 2.0, draw=1), brownian(5.0, 2.0, draw=1), brownian(5.0, 2.0, draw=2)
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, brownian(5.0, 2.0))
    # row 1's draw does not depend on the rows beside it
    alone = BrownianNoise([2], (1, 4), torch.float32, torch.device("cpu"))(5.0, 2.0, draw=1)
    assert torch.equal(alone[0], first[1])
    independent = IndependentNoise(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert not torch.equal(independent(5.0, 2.0), independent(5.0, 2.0, draw=1))
    with pytest.raises(ValueError, match="one draw per step"):
        RecordedNoise([torch.zeros(shape)], [5.0, 2.0], shape, torch.float32, torch.device("cpu"))(5.0, 2.0, draw=1)


def test_reward_raises_the_reward_on_a_bundled_model():
    model = hasten.load("mnist-dit")
    plain = hasten.generate(model, 16, steps=8, seed=11, reward="symmetry")
    guided = hasten.generate(model, 16, steps=8, seed=11, reward="symmetry", particles=4)
    assert guided.nfe == 1 + 4 * 7 and plain.nfe == 8
    assert guided.rewards.mean() > plain.rewards.mean() + 0.01
    assert guided.rewards.quantile(0.1) > plain.rewards.quantile(0.1)


# -- rewards and bad input ------------------------------------------------------------------------------------


def test_bundled_rewards():
    assert {"class", "ink", "symmetry"} <= set(REWARDS.names())
    images = torch.zeros(2, 1, 28, 28)
    images[0, :, :, :14] = 1.0  # left half inked: half the area, not symmetric
    images[1, :, 10:18, :] = 1.0  # a horizontal bar: symmetric
    assert torch.allclose(ink_area(images), torch.tensor([0.5, 8 / 28]))
    assert torch.allclose(symmetry(images), torch.tensor([-1.0, 0.0]))
    digits = hasten.data.load_mnist("heldout")
    probe, labels = digits.images[:64].float() / 255.0, digits.labels[:64]
    scores = torch.stack([get_reward(f"class:{d}")(probe) for d in range(10)], 1)
    assert (scores.argmax(1) == labels).float().mean() > 0.9 and (scores <= 0).all()
    custom = get_reward(lambda im: im.mean((1, 2, 3)))
    assert torch.allclose(custom(images), images.mean((1, 2, 3)))


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("nope", KeyError, r"unknown reward 'nope'; available: class, ink, symmetry"),
        ("class", ValueError, r"needs a digit 0-9"),
        ("class:12", ValueError, r"class:12"),
        ("ink:3", ValueError, r"reward 'ink' takes no argument"),
    ],
)
def test_bad_reward_specs_are_refused_by_name(spec, error, message):
    with pytest.raises(error, match=message):
        get_reward(spec)


def test_bad_rewards_and_settings_are_refused(tiny_model):
    model = hasten.load(tiny_model)

    def nan_reward(images):
        return torch.full((images.shape[0],), math.nan)

    def flat_reward(images):
        return images.flatten(1)

    with pytest.raises(ValueError, match=r"reward 'test_bad_rewards.*nan_reward' returned NaN or infinity for 2 of 2"):
        hasten.generate(model, 2, steps=3, reward=nan_reward, particles=2)
    with pytest.raises(ValueError, match=r"flat_reward' returned shape \(2, \d+\) for 2 images; .* shape \[2\]"):
        hasten.generate(model, 2, steps=3, reward=flat_reward, particles=2)
    with pytest.raises(ValueError, match=r"particles must be an integer >= 1, got 0"):
        hasten.generate(model, 2, steps=3, reward="ink", particles=0)
    with pytest.raises(ValueError, match=r"particles=3 chooses among candidates by a reward"):
        hasten.generate(model, 2, steps=3, particles=3)
    with pytest.raises(ValueError, match=r"alpha must be a number >= 0.*got -1"):
        hasten.generate(model, 2, steps=3, reward="ink", particles=2, alpha=-1.0)
    with pytest.raises(ValueError, match=r"solver 'dpmpp_2m' has none. Use one of ddim, ddpm, euler_ancestral"):
        hasten.generate(model, 2, steps=3, solver="dpmpp_2m", reward="ink", particles=2)
    with pytest.raises(ValueError, match=r"solver 'ddim' \(eta=0\) has none"):
        hasten.generate(model, 2, steps=3, solver="ddim", reward="ink", particles=2)
    with pytest.raises(ValueError, match=r"particles=2 needs a stochastic transition"):
        SoftValueDecoding(get_solver("ddim"), 2, 0.0, _first_coordinate)
    with pytest.raises(TypeError, match="not plain data"):
        _svdd(2).to_dict()


def test_cli_sample_with_a_reward(tiny_model, tmp_path):
    runner = CliRunner()
    base = ["sample", "--model", tiny_model, "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png")]
    ok = runner.invoke(app, [*base, "--reward", "ink", "--particles", "2", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    import json

    data = json.loads(ok.output)
    assert data["nfe"] == 1 + 2 * 2 and data["reward"] == "ink" and data["particles"] == 2
    for flags, message in [
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--reward", "ink", "--particles", "0"], "greater than or equal to 1"),
        (["--particles", "2"], "--particles 2 chooses among candidates by a reward"),
        (["--reward", "ink", "--particles", "2", "--solver", "dpmpp_2m"], "solver 'dpmpp_2m' has none"),
    ]:
        bad = runner.invoke(app, [*base, *flags])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), (flags, bad.output)


# -- baselines --------------------------------------------------------------------------------------------------


def test_best_of_n_keeps_the_best_draw_and_one_draw_is_plain(tiny_model):
    model = hasten.load(tiny_model)
    plain = hasten.generate(model, 4, steps=3, solver="ddpm", seed=1)
    one = best_of_n(model, 4, "ink", 1, seed=1, steps=3, solver="ddpm")
    assert torch.equal(one.images01, plain.images01) and one.nfe == 3
    three = best_of_n(model, 4, "ink", 3, seed=1, steps=3, solver="ddpm")
    assert three.nfe == 9 and (three.rewards >= one.rewards).all()
    assert torch.equal(three.rewards, ink_area(three.images01))
    with pytest.raises(ValueError, match="draws must be an integer >= 1, got 0"):
        best_of_n(model, 4, "ink", 0)


def test_gradient_guidance_moves_the_estimate_up_the_reward():
    value = _first_coordinate
    x, sigma = _start(64) / GRID[0] * 2.0, torch.full((64,), 2.0, dtype=torch.float64)
    plain = GMM(x, sigma)
    assert torch.equal(RewardGradientDenoiser(GMM, value, 0.0)(x, sigma), plain)
    pushed = RewardGradientDenoiser(GMM, value, 0.5)(x, sigma)
    assert (pushed[:, 0] > plain[:, 0]).all() and torch.equal(pushed[:, 1:], plain[:, 1:])
    out = hasten.sample(RewardGradientDenoiser(GMM, value, 0.5), _start(256), GRID, "ddpm", noise_seeds=range(256))
    base = hasten.sample(GMM, _start(256), GRID, "ddpm", noise_seeds=range(256))
    assert out[:, 0].mean() > base[:, 0].mean() + 0.1


def test_gradient_guided_generation(tiny_model):
    model = hasten.load(tiny_model)
    plain = hasten.generate(model, 2, steps=3, solver="ddpm", seed=0)
    zero = gradient_guided(model, 2, "symmetry", 0.0, steps=3, solver="ddpm", seed=0)
    assert torch.allclose(zero.images01, plain.images01, atol=1e-5) and zero.nfe == 3
    assert torch.allclose(zero.rewards, symmetry(zero.images01))


def test_reward_guidance_on_a_pipeline_model():
    """SVDD on a latent pipeline (hasten.from_pipeline): every candidate's x0 estimate is decoded by the pipeline's
    VAE for the reward; one particle is plain ddpm bit for bit and the NFE counts every candidate."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    pipe, kwargs = tiny_pipelines.stable_diffusion()
    model = hasten.from_pipeline(pipe, **kwargs, height=16, width=16)
    plain = hasten.generate(model, 3, solver="ddpm", steps=4)
    one = hasten.generate(model, 3, steps=4, reward="symmetry", particles=1)
    assert torch.equal(one.images01, plain.images01)
    four = hasten.generate(model, 3, steps=4, reward="symmetry", particles=4)
    assert four.nfe == 1 + 4 * 3
    assert four.rewards.shape == (3,) and four.images01.shape == (3, 3, 16, 16)

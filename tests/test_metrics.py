"""Metrics on cases with known answers."""

import math

import pytest
import torch

from hasten.data import load_emoji, load_mnist
from hasten.metrics import frechet_distance, frechet_distance_from_features, gaussian_stats, precision_recall
from hasten.metrics.cost import peak_memory_bytes, time_call
from hasten.metrics.features import emoji_features, mnist_features
from hasten.metrics.quality import evaluate_emoji, evaluate_mnist, memorisation_share
from hasten.metrics.reference import psnr, rmse


def test_fd_identical_sets_is_zero():
    f = torch.randn(500, 16, dtype=torch.float64)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_closed_form_for_gaussians():
    # Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 2.0, 1.5])
    fd = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert fd == pytest.approx(float((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()), rel=1e-10)
    # Non-commuting full covariances against scipy's definition on a well-conditioned case
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    c1, c2 = a @ a.T + torch.eye(5, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(5, dtype=torch.float64)
    m1, m2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float((m1 - m2).pow(2).sum() + torch.trace(c1) + torch.trace(c2)) - 2 * float(covmean.trace())
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_fd_of_samples_converges_to_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * 2 + 1
    assert frechet_distance_from_features(a, b) == pytest.approx(4 * 1 + 4 * 1, rel=0.05)


def test_fd_survives_singular_covariances():
    f = torch.randn(300, 8, dtype=torch.float64)
    f[:, 4:] = 0.0  # rank-deficient, like dead feature units
    g = f + 0.01
    value = frechet_distance(*gaussian_stats(f), *gaussian_stats(g))
    assert math.isfinite(value) and value == pytest.approx(8 * 1e-4, rel=1e-6)


def test_precision_recall_constructed_sets():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    same = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    far = same + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(400, 1) + 1e-3 * torch.randn(400, 2, generator=gen, dtype=torch.float64)
    p, r = precision_recall(real, collapsed)  # mode collapse: precise, no recall
    assert p > 0.95 and r < 0.05


def test_feature_net_classifies_heldout_digits():
    heldout = load_mnist("heldout")
    feats, logits = mnist_features(heldout.images[:1000].float() / 255.0)
    assert feats.shape == (1000, 128)
    assert (logits.argmax(1) == heldout.labels[:1000]).double().mean() > 0.96
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        mnist_features(torch.zeros(2, 3, 28, 28))


def test_evaluate_mnist_real_digits_and_noise():
    train = load_mnist("train")
    real = evaluate_mnist(train.images[:500].float() / 255.0, train.labels[:500])
    noise = evaluate_mnist(torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert real["fd"] < 2 * real["fd_real_vs_real"] and noise["fd"] > 20 * real["fd"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and noise["precision"] < 0.05
    assert real["label_accuracy"] > 0.97 and sum(real["class_histogram"]) == 500
    assert real["memorised_share"] == 1.0  # training digits are, by definition, copies


def test_evaluate_emoji_real_emoji_and_noise():
    """The emoji feature space: held-out accuracy, FD of real training emoji near the floor, noise far off."""
    heldout = load_emoji(split="heldout")
    feats, logits = emoji_features(heldout.images.float() / 255.0)
    assert feats.shape == (802, 128)
    assert (logits.argmax(1) == heldout.labels).double().mean() > 0.75  # the card records the exact value
    x = load_emoji(split="train").images[:400].float() / 255.0
    real = evaluate_emoji(x)
    blurred = evaluate_emoji(torch.nn.functional.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3))
    gray = evaluate_emoji(x.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous())
    noise = evaluate_emoji(torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    # FD orders the damage (measured: 50, 158, 771, 2490 against a floor of 54).
    assert real["fd"] < 1.5 * real["fd_real_vs_real"] < blurred["fd"] < gray["fd"] < noise["fd"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and len(real["class_histogram"]) == 8
    # Noise features collapse into a dense region of real ones: precision is fooled, recall is not.
    assert noise["recall"] < 0.05
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        emoji_features(torch.zeros(2, 1, 28, 28))


def test_memorisation_share_of_heldout_is_small():
    heldout = load_mnist("heldout").images[:500].float() / 255.0
    share, threshold = memorisation_share(heldout)
    assert share < 0.05 and threshold > 0


def test_rmse_psnr():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.1)
    assert rmse(a, b) == pytest.approx(0.1)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf


def test_cost_helpers():
    calls = []
    out = time_call(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and out["median_s"] >= 0 and out["repeats"] == 3
    assert peak_memory_bytes() > 10 * 2**20
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_reference_solve_accumulates_in_float64(tiny_model):
    """The reference every error is measured against keeps its state in float64 (the network in its own dtype);
    it matches a float32 solve to float32 rounding, and the cache key says which it is."""
    import hasten
    from hasten.metrics.reference import REFERENCE_SOLVER, reference_path, reference_samples

    model = hasten.load(tiny_model)
    ref = reference_samples(model, 4, steps=6)
    assert ref.dtype == torch.float32  # stored as images, like every sampler's
    solver = {"solver": REFERENCE_SOLVER["solver"], "steps": 6, "schedule": REFERENCE_SOLVER["schedule"]}
    f64 = hasten.generate(model, 4, state_dtype=torch.float64, **solver, **REFERENCE_SOLVER["options"])
    f32 = hasten.generate(model, 4, **solver, **REFERENCE_SOLVER["options"])
    assert f64.samples.dtype == torch.float64 and f32.samples.dtype == torch.float32
    assert torch.equal(ref, f64.images01.float())
    assert (f64.images01 - f32.images01.double()).abs().max() < 1e-3
    assert reference_path(model, 4, steps=6)[1]["state"] == "float64"

"""MMD fine-tuning (``--method mmd``): the statistic, the loss, gradients through the sampler, resume, the student."""

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hasten
import hasten.metrics.features as metric_features
from hasten.distill import METHODS, DistillConfig
from hasten.distill.mmd import MMD, MMDOptions, kernel_matrix, unbiased_mmd2
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser

# -- the statistic ------------------------------------------------------------------------------------------------


def _k_poly(a, b):
    return (sum(x * y for x, y in zip(a, b, strict=True)) / len(a) + 1.0) ** 3


def _k_rbf(a, b):
    return math.exp(-sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a))


@pytest.mark.parametrize(("kernel", "k"), [("poly", _k_poly), ("rbf", _k_rbf)])
def test_unbiased_mmd2_matches_the_hand_computed_value_on_2d_features(kernel, k):
    x = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    y = [[-1.0, 0.5], [0.5, 0.5]]
    within_x = sum(k(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6
    within_y = 2 * k(y[0], y[1]) / 2
    across = sum(k(a, b) for a in x for b in y) / 6
    expected = within_x + within_y - 2 * across
    got = unbiased_mmd2(torch.tensor(x), torch.tensor(y), kernel)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert kernel_matrix(torch.tensor(x), torch.tensor(y), kernel)[2, 0].item() == pytest.approx(k(x[2], y[0]))


def test_unbiased_mmd2_has_mean_zero_for_two_samples_of_one_distribution():
    """Over many seeds the unbiased estimate averages to 0 (within 4 standard errors); the biased V-statistic (Gram
    diagonals kept) does not, so the test can tell the two apart."""
    gen = torch.Generator().manual_seed(0)
    unbiased, biased = [], []
    for _ in range(2000):
        x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        unbiased.append(unbiased_mmd2(x, y).item())
        biased.append((kernel_matrix(x, x).mean() + kernel_matrix(y, y).mean() - 2 * kernel_matrix(x, y).mean()).item())
    u, b = torch.tensor(unbiased), torch.tensor(biased)
    assert abs(u.mean()) < 4 * u.std() / math.sqrt(len(u)), (u.mean(), u.std())
    assert b.mean() > 10 * b.std() / math.sqrt(len(b))
    # and a shifted distribution gives a clearly positive value
    shifted = unbiased_mmd2(torch.randn(256, 2, generator=gen) + 1.0, torch.randn(256, 2, generator=gen))
    assert shifted > 0.1


def test_unbiased_mmd2_refuses_single_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        unbiased_mmd2(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="kernel must be one of 'poly', 'rbf'; got 'cosine'"):
        kernel_matrix(torch.zeros(2, 2), torch.zeros(2, 2), "cosine")


# -- the loss on a toy network ---------------------------------------------------------------------------------


class _Affine(nn.Module):
    """An x0-predicting toy network ``x0_hat = w * x_t + c`` (scalars)."""

    def __init__(self, w: float, c: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x_t, t, **cond):
        return self.w * x_t + self.c


def _toy_method(w=0.0, c=0.5, nfe=2, **options) -> MMD:
    info = ModelInfo(name="toy", arch="toy", objective="x0", image_shape=(1, 2, 2), num_classes=0, data="")
    network = _Affine(w, c)
    teacher = LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "toy")
    config = DistillConfig(teacher="toy", method="mmd", nfe=nfe, batch_size=3, cfg_dropout=0.0)
    opts = MMDOptions(**{"feature": "pixels", **options})
    MMD.check(teacher, config, opts)
    method = MMD(teacher, config, opts, torch.device("cpu"))
    method.build()
    return method


@pytest.mark.parametrize("checkpoint_calls", [True, False])
def test_loss_matches_the_hand_computed_value_on_a_toy_network(checkpoint_calls):
    """A network predicting the constant c: the last Euler step (to sigma 0) returns c, so every sample is c
    everywhere; pixel features (the 2x2 image and its mean; no data set, so not standardised) give the MMD in
    closed form, and its derivative in c too."""
    c = 0.5
    method = _toy_method(c=c, checkpoint_calls=checkpoint_calls)
    reals = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]]
    x0 = torch.tensor(reals).view(3, 1, 2, 2)
    feats = [[*r, sum(r) / 4] for r in reals]  # full resolution, then the 2x2 average
    sums = [sum(f) for f in feats]
    within_fake = (c * c + 1) ** 3  # (5 c^2 / 5 + 1)^3 for every pair
    within_real = sum(_k_poly(feats[i], feats[j]) for i in range(3) for j in range(3) if i != j) / 6
    across = sum((c * s / 5 + 1) ** 3 for s in sums) / 3
    expected = within_fake + within_real - 2 * across
    d_expected = 6 * c * (c * c + 1) ** 2 - 2 * sum(3 * (c * s / 5 + 1) ** 2 * s / 5 for s in sums) / 3
    loss = method.loss(x0, None)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert method.student.c.grad.item() == pytest.approx(d_expected, rel=1e-5)


def test_gradients_reach_every_denoiser_call_of_the_sampler():
    """A 2-step toy whose x0 estimate depends on x: the loss has a gradient with respect to both network calls'
    outputs, and checkpointing the calls changes no gradient."""
    grads = {}
    for checkpoint_calls in (False, True):
        method = _toy_method(w=0.3, c=0.2, nfe=2, checkpoint_calls=checkpoint_calls)
        outputs = []
        make = method.student_denoiser

        def recording(network, make=make, outputs=outputs):
            inner = make(network)

            def denoiser(x, sigma, **cond):
                out = inner(x, sigma, **cond)
                if len(outputs) < 2 and out.requires_grad:  # the forward pass (not the recomputation)
                    out.retain_grad()
                    outputs.append(out)
                return out

            return denoiser

        method.student_denoiser = recording
        x0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]]).view(3, 1, 2, 2)
        method.loss(x0, None).backward()
        assert len(outputs) == 2
        for k, out in enumerate(outputs):
            assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient reaches call {k}"
        grads[checkpoint_calls] = (method.student.w.grad.clone(), method.student.c.grad.clone())
        assert grads[checkpoint_calls][0].abs() > 0
    torch.testing.assert_close(grads[True], grads[False])


# -- never the metric's feature network -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "metric", "classifier", "emoji"])
def test_the_metric_feature_network_is_refused(name):
    with pytest.raises(ValueError, match="never computed in the quality metric's feature network"):
        _toy_method(feature=name)


def test_training_never_uses_the_metric_feature_network(monkeypatch):
    """With the metric's network made unusable, the default feature map builds and trains, and no module the
    method checkpoints is (or holds) the metric's network."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the quality metric's feature network was used in training")

    monkeypatch.setattr(metric_features, "load_feature_net", forbidden)
    monkeypatch.setattr(metric_features.FeatureNet, "forward", forbidden)
    method = _toy_method(w=0.1, feature="random_conv")
    x0 = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    value = method.step(0, x0, None)
    assert math.isfinite(value)
    modules, _ = method.build()
    for module in modules.values():
        assert not any(isinstance(m, metric_features.FeatureNet) for m in module.modules())


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="kernel must be one of"):
        _toy_method(kernel="linear")
    with pytest.raises(ValueError, match="feature must be one of"):
        _toy_method(feature="lpips")
    with pytest.raises(ValueError, match="denoise_weight must be a finite number >= 0"):
        _toy_method(denoise_weight=-1.0)
    with pytest.raises(ValueError, match="stats_images must be >= 2"):
        _toy_method(stats_images=1)
    info = ModelInfo(name="toy", arch="toy", objective="x0", image_shape=(1, 2, 2), num_classes=10, data="")
    net = _Affine(0.0, 0.0)
    teacher = LoadedModel(make_denoiser(net, info), net, info, pathlib.Path("."), "toy")
    with pytest.raises(ValueError, match="guidance 2: mmd matches real data"):
        MMD.check(teacher, DistillConfig(method="mmd", guidance=2.0), MMDOptions())


def test_denoising_regulariser_adds_the_x0_error():
    """With c = 0 and w = 0 the student predicts 0: the regulariser is the weight times the mean square of x0."""
    x0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]]).view(3, 1, 2, 2)
    plain = _toy_method(c=0.0).loss(x0, None).item()
    regularised = _toy_method(c=0.0, denoise_weight=0.5).loss(x0, None).item()
    assert regularised - plain == pytest.approx(0.5 * x0.pow(2).mean().item(), rel=1e-5)


# -- the real teacher: a student folder, exact resume ------------------------------------------------------------

SMOKE = dict(teacher="mnist-dit", method="mmd", nfe=2, batch_size=4, minutes=5, options={"stats_images": 256})


def test_student_of_the_real_teacher_samples_at_its_nfe_with_no_flags(tmp_path):
    out = tmp_path / "student"
    result = hasten.distill(out=out, max_steps=2, progress=False, **SMOKE)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    student = hasten.load(out)
    assert student.info.sampler == {"solver": "euler", "options": {}, "schedule": "auto", "steps": 2, "guidance": 1.0}
    assert student.info.objective == "flow"  # the teacher's parameterisation
    assert student.info.distillation["method"] == "mmd"
    generation = hasten.generate(student, 3)
    assert generation.nfe == 2 and torch.isfinite(generation.samples).all()
    # the exported weights moved away from the teacher's
    teacher = hasten.load("mnist-dit")
    assert any(not torch.equal(a, b) for a, b in zip(student.network.parameters(), teacher.network.parameters(),
                                                     strict=True))  # fmt: skip


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    hasten.distill(out=straight, max_steps=3, progress=False, **SMOKE)
    hasten.distill(out=interrupted, max_steps=1, progress=False, **SMOKE)
    again = hasten.distill(out=interrupted, resume=True, max_steps=3, progress=False, **SMOKE)
    assert again.resumed_from_step == 1
    a = load_file(str(straight / "checkpoint" / "state.safetensors"))
    b = load_file(str(interrupted / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(key.startswith("features.") for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((straight / "checkpoint" / "state.json").read_text())["step"] == 3
    assert "mmd" in METHODS


def test_samples_are_compared_clipped_to_the_data_range():
    """A sample at 5 is saved and measured as 1: with ``clamp`` (the default) the loss sees what is measured."""
    x0 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]]).view(3, 1, 2, 2)
    assert _toy_method(c=5.0).loss(x0, None).item() == pytest.approx(_toy_method(c=1.0).loss(x0, None).item())
    raw = _toy_method(c=5.0, clamp=False).loss(x0, None).item()
    assert raw > 10 * _toy_method(c=1.0, clamp=False).loss(x0, None).item()

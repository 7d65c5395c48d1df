"""DMD2 distillation: the distribution-matching gradient and loss, the fake score, TTUR, backward simulation, resume."""

import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hasten
from hasten.distill import METHODS, DistillConfig
from hasten.distill.dmd import (
    DMD,
    DMDOptions,
    distribution_matching_gradient,
    distribution_matching_loss,
    fake_score_loss,
)
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser


class Scale(nn.Module):
    """A toy x0-predicting network: ``x0 = p * x_t`` (+ a per-class offset when it has classes; the last is null)."""

    def __init__(self, p: float, offsets: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.offsets = nn.Parameter(torch.tensor(offsets))

    def forward(self, x_t, t, class_labels=None):
        out = self.p * x_t
        return out if class_labels is None else out + self.offsets[class_labels].view(-1, 1, 1, 1)


def toy_method(nfe: int = 1, p: float = 0.7, offsets=(), guidance: float = 1.0, **options) -> DMD:
    net = Scale(p, offsets)
    classes = max(len(offsets) - 1, 0)
    info = ModelInfo(name="toy", arch="dit", objective="x0", image_shape=(1, 2, 2), num_classes=classes, data="")
    teacher = LoadedModel(make_denoiser(net, info), net, info, pathlib.Path("."), "toy")
    config = DistillConfig(
        teacher="toy", method="dmd", nfe=nfe, batch_size=4, cfg_dropout=0.0, lr=1e-2, guidance=guidance
    )
    method = DMD(teacher, config, DMDOptions.create(**options), torch.device("cpu"))
    method.build()
    return method


def test_dmd_is_registered_and_refuses_bad_options():
    assert METHODS.get("dmd") is DMD and DMD.needs_data is False
    teacher, config = toy_method().teacher, DistillConfig(method="dmd")
    for bad, name in (
        (dict(generator_every=0), "generator_every"),
        (dict(fake_lr_scale=0.0), "fake_lr_scale"),
        (dict(dm_time_min=0.5, dm_time_max=0.4), "dm_time_min"),
        (dict(schedule="nope"), "schedule"),
        (dict(parameterisation="flow"), "parameterisation"),  # an x0 teacher has no velocity head
    ):
        with pytest.raises(ValueError, match=name):
            DMD.check(teacher, config, DMDOptions.create(**bad))


def test_dm_loss_gradient_is_g_over_numel():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    g = torch.randn(3, 1, 4, 4)
    distribution_matching_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel(), rtol=0, atol=1e-7)


def test_dm_gradient_and_loss_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    real = torch.tensor([[0.0, 3.0, 3.0, 2.0], [2.0, -2.0, 2.0, -2.0]]).view(2, 1, 2, 2)
    fake = torch.tensor([[1.0, 3.0, 2.0, 2.0], [3.0, -2.0, 2.0, -1.0]]).view(2, 1, 2, 2)
    g = distribution_matching_gradient(x, real, fake)
    # row 0: |x - real| = [1, 1, 0, 2] (mean 1), fake - real = [1, 0, -1, 0]; row 1: mean 2, fake - real = [1, 0, 0, 1]
    torch.testing.assert_close(g.flatten(1), torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.5, 0.0, 0.0, 0.5]]))
    assert float(distribution_matching_loss(x, g)) == pytest.approx(0.5 * (1 + 1 + 0.25 + 0.25) / 8)
    # degenerate entries give no gradient rather than NaN
    assert torch.isfinite(distribution_matching_gradient(x, x, x)).all()


def test_fake_score_loss_hand_values():
    denoised = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    x = torch.zeros(2, 2)
    sigma = torch.tensor([1.0, 2.0])
    # weights 1/1 + 1/0.25 = 5 and 1/4 + 4 = 4.25; squared errors 1 and 4: (5 + 17) / 2
    assert float(fake_score_loss(denoised, x, sigma)) == pytest.approx(11.0)


def test_method_gradient_uses_teacher_as_real_and_fake_net_as_fake():
    method = toy_method(p=0.7)
    with torch.no_grad():
        method.fake.p.fill_(0.4)
    x = torch.randn(4, 1, 2, 2)
    x_t = x + 0.8 * torch.randn_like(x)
    sigma = torch.full((4,), 0.8, dtype=torch.float64)
    alpha = float(method.teacher.schedule.alpha_from_ve_sigma(torch.tensor(0.8)))
    real, fake = 0.7 * alpha * x_t, 0.4 * alpha * x_t  # the network sees alpha * x_t and predicts x0
    expected = (fake - real) / (x - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(method.dm_gradient(x, x_t, sigma, None), expected)


def test_guidance_applies_to_the_real_score_only():
    method = toy_method(p=0.7, offsets=(1.0, -1.0, 0.5), guidance=3.0)  # classes 0, 1 and the null class 2
    labels = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 2, 2)
    x_t = x + 0.8 * torch.randn_like(x)
    sigma = torch.full((4,), 0.8, dtype=torch.float64)
    alpha = float(method.teacher.schedule.alpha_from_ve_sigma(torch.tensor(0.8)))
    offsets = torch.tensor([1.0, -1.0, 0.5])
    # guided: null + 3 (class - null) for labelled rows; the null row stays unguided; the fake is never guided
    guided = torch.where(labels == 2, offsets[2], offsets[2] + 3.0 * (offsets[labels] - offsets[2]))
    real = 0.7 * alpha * x_t + guided.view(-1, 1, 1, 1)
    fake = 0.7 * alpha * x_t + offsets[labels].view(-1, 1, 1, 1)
    expected = (fake - real) / (x - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(method.dm_gradient(x, x_t, sigma, labels), expected)


def test_equal_scores_give_zero_generator_gradient():
    method = toy_method()  # the fake network starts as an exact copy of the teacher
    x = torch.randn(4, 1, 2, 2, requires_grad=True)
    x_t = x.detach() + 2.0 * torch.randn(4, 1, 2, 2)
    g = method.dm_gradient(x, x_t, torch.full((4,), 2.0, dtype=torch.float64), None)
    distribution_matching_loss(x, g).backward()
    assert torch.count_nonzero(x.grad) == 0
    before = method.student.p.detach().clone()
    method.step(0, None, None)  # a generator update with zero gradient leaves the generator as it was
    assert torch.equal(method.student.p, before)


def test_generator_updated_only_on_multiples_of_r():
    method = toy_method(generator_every=3)
    with torch.no_grad():
        method.fake.p.fill_(0.3)  # the scores differ, so every generator update moves it
    changed_generator, changed_fake = [], []
    for index in range(7):
        g0, f0 = method.student.p.item(), method.fake.p.item()
        method.step(index, None, None)
        changed_generator.append(method.student.p.item() != g0)
        changed_fake.append(method.fake.p.item() != f0)
    assert changed_generator == [i % 3 == 0 for i in range(7)]
    assert all(changed_fake) and method.state["generator_updates"] == 3


def test_backward_simulation_inputs():
    method = toy_method(nfe=2)
    grid = method.grid()
    state = method.gen.get_state()
    x, sigma = method.generator_input(0, None, 4)
    method.gen.set_state(state)
    noise = method.initial_noise(4)
    assert torch.equal(x, noise) and torch.equal(sigma, grid[0].expand(4))  # k = 0: the pure noise itself
    method.gen.set_state(state)
    x1, sigma1 = method.generator_input(1, None, 4)
    s0, s1 = grid[0], grid[1]
    d = method.student.p.detach() * method.teacher.schedule.alpha_from_ve_sigma(s0).float() * noise
    torch.testing.assert_close(x1, d + float(s1 / s0) * (noise - d))  # one DDIM step of the generator itself
    assert torch.equal(sigma1, grid[1].expand(4))
    assert method.sampler()["solver"] == "euler" and method.sampler()["steps"] == 2


def test_one_dimensional_gaussian_moves_toward_the_data():
    """Data N(mu, s^2) per coordinate, G(z) = a z + b, exact real and fake denoisers (card I4 (4))."""
    mu, s = 1.0, 0.5
    a = torch.tensor(1.5, requires_grad=True)
    b = torch.tensor(-0.5, requires_grad=True)
    opt = torch.optim.SGD([a, b], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        z = torch.randn(64, 32, generator=gen)
        x = a * z + b
        sigma = torch.exp(torch.empty(64, 1).uniform_(-2.0, 1.5, generator=gen))
        x_t = x.detach() + sigma * torch.randn(64, 32, generator=gen)
        real = mu + s**2 / (s**2 + sigma**2) * (x_t - mu)
        av, bv = a.detach(), b.detach()
        fake = bv + av**2 / (av**2 + sigma**2) * (x_t - bv)  # the exact denoiser of G's own N(b, a^2)
        loss = distribution_matching_loss(x, distribution_matching_gradient(x, real, fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert a.item() == pytest.approx(s, abs=1e-3) and b.item() == pytest.approx(mu, abs=1e-3)  # from (1.5, -0.5)


def _checkpoint(folder):
    return load_file(str(folder / "checkpoint" / "state.safetensors"))


def test_resume_after_kill_is_bit_identical(tiny_model, tmp_path):
    settings = dict(teacher=tiny_model, method="dmd", nfe=2, batch_size=2, options={"generator_every": 2})
    hasten.distill(out=tmp_path / "a", max_steps=4, progress=False, **settings)
    hasten.distill(out=tmp_path / "b", max_steps=2, progress=False, **settings)
    hasten.distill(out=tmp_path / "b", max_steps=4, progress=False, resume=True, **settings)
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("fake.") for k in a)
    diff = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, sorted({k.split(".")[0] for k in diff})


def test_smoke_on_mnist_dit_then_sample_with_no_flags(tmp_path):
    result = hasten.distill(
        teacher="mnist-dit", method="dmd", nfe=1, batch_size=4, out=tmp_path / "s", max_steps=3, progress=False
    )
    assert result.steps == 3 and result.final_loss == result.final_loss  # a number, not NaN
    student = hasten.load(tmp_path / "s")
    assert student.info.sampler["steps"] == 1 and student.info.distillation["method"] == "dmd"
    out = hasten.generate(student, 2, seed=0)
    assert out.images01.shape == (2, 1, 28, 28) and torch.isfinite(out.images01).all()

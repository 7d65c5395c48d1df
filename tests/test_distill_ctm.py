"""CTM distillation: the jump's boundary, the loss by hand, gamma-sampling, resume, the student folder."""

import itertools
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hasten
from hasten.distill import METHODS, DistillConfig
from hasten.distill.ctm import CTM, CTMOptions, jump, output_layer
from hasten.hooks import hooked_modules
from hasten.models import ProductMixture
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser
from hasten.solvers import GammaSampling, sample


class Toy(nn.Module):
    """A toy x0-predicting network with a diffusers timestep embedding (what the target level is added to)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.time_embedding = TimestepEmbedding(8, 4)
        self.p = nn.Parameter(torch.tensor(0.7))

    def forward(self, x_t, t, **cond):
        from diffusers.models.embeddings import get_timestep_embedding

        emb = self.time_embedding(get_timestep_embedding(t.reshape(-1).float(), 8))
        return self.p * x_t + 0.3 * emb.mean(1).view(-1, *([1] * (x_t.ndim - 1)))


def toy_method(nfe: int = 2, **options) -> CTM:
    net = Toy()
    info = ModelInfo(name="toy", arch="unet", objective="x0", image_shape=(1, 2, 2), num_classes=0, data="")
    teacher = LoadedModel(make_denoiser(net, info), net, info, pathlib.Path("."), "toy")
    config = DistillConfig(teacher="toy", method="ctm", nfe=nfe, batch_size=4, cfg_dropout=0.0)
    opts = CTMOptions.create(**options)
    CTM.check(teacher, config, opts)
    method = CTM(teacher, config, opts, torch.device("cpu"))
    method.build()
    return method


def perturb(network: nn.Module, seed: int) -> None:
    """Give the target embedding's zero-initialised last layer values, so the target level matters."""
    gen = torch.Generator().manual_seed(seed)
    last = network.target_level_embedding.mlp[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
        last.bias.copy_(torch.randn(last.bias.shape, generator=gen))


def test_registered_and_bad_options_refused():
    assert METHODS.get("ctm") is CTM and hasten.get_solver("ctm_gamma", gamma=0.5).gamma == 0.5
    for bad, match in [({"gamma": 1.5}, "gamma"), ({"grid_steps": 5}, "grid_steps"), ({"max_teacher_steps": 0},
                       "max_teacher_steps"), ({"dsm_weight": -1.0}, "dsm_weight"), ({"embedding_channels": 3},
                       "embedding_channels")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            toy_method(**bad)
    with pytest.raises(ValueError, match="gamma"):
        GammaSampling(gamma=-0.1)
    plain = nn.Linear(2, 2)  # no timestep embedding to add the target level to
    info = ModelInfo(name="plain", arch="unet", objective="x0", image_shape=(1, 2, 2), num_classes=0, data="")
    teacher = LoadedModel(make_denoiser(plain, info), plain, info, pathlib.Path("."), "plain")
    with pytest.raises(ValueError, match="TimestepEmbedding"):
        CTM.check(teacher, DistillConfig(method="ctm"), CTMOptions())


def test_student_starts_as_the_teacher_and_the_boundary_is_exact():
    method = toy_method()
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64)
    s = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    teacher = method.teacher.denoiser(x, t)
    # zero-initialised embedding: g(x, t, s) is the teacher's denoiser for every s
    torch.testing.assert_close(method.g(method.student, x, t, s, None), teacher, rtol=0, atol=0)
    perturb(method.student, 0)
    assert not torch.allclose(method.g(method.student, x, t, s, None), teacher)
    # G(x, t, t) = x bit for bit, whatever g is; and at t = 0 (then s = 0) G is the identity
    assert torch.equal(method.G(method.student, x, t, t, None), x)
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(jump(x, torch.randn_like(x), zero, zero), x)
    # without target_sigma the student is g(x, t, t): the denoiser ordinary solvers call
    den = method.student_denoiser(method.student)
    torch.testing.assert_close(den(x, t), den(x, t, target_sigma=t), rtol=0, atol=0)


def test_loss_against_a_hand_computation():
    method = toy_method(nfe=2, grid_steps=4, dsm_weight=0.5, adaptive_dsm=False)
    perturb(method.student, 1)
    perturb(method.ema, 2)
    grid = [float(v) for v in method.grid]
    assert len(grid) == 5 and grid[-1] == 0.0
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float32)
    noise = torch.randn(4, 1, 2, 2)
    i, j, m = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 2, 4, 4]), torch.tensor([3, 2, 4, 4])
    got = float(method.loss(x0, noise, i, j, m, None).detach())

    def g(net, x, t, s):  # one row, through the adapter
        return method.student_denoiser(net)(x, torch.tensor([t], dtype=torch.float64), target_sigma=torch.tensor([s]))

    def G(net, x, t, s):
        return x if t == 0 else (s / t) * x + (1 - s / t) * g(net, x, t, s)

    def Z(y, s):
        return y if s == 0 else G(method.ema, y, s, 0.0)

    total = 0.0
    for r in range(4):
        t, u, s = grid[int(i[r])], grid[int(j[r])], grid[int(m[r])]
        x_t = x0[r : r + 1] + t * noise[r : r + 1]
        x = x_t
        for a in range(int(i[r]), int(j[r])):  # teacher DDIM steps
            d = method.teacher.denoiser(x, torch.tensor([grid[a]], dtype=torch.float64))
            x = d + (grid[a + 1] / grid[a]) * (x - d)
        consistency = (Z(G(method.student, x_t, t, s), s) - Z(G(method.ema, x, u, s), s)).pow(2).mean()
        dsm = max(1.0, 1.0 / t**2) * (g(method.student, x_t, t, t) - x0[r : r + 1]).pow(2).mean()
        total += float(consistency.detach()) + 0.5 * float(dsm.detach())
    assert got == pytest.approx(total / 4, rel=1e-5)


def test_adaptive_dsm_weight_balances_the_gradient_norms_at_the_output_layer():
    method = toy_method(nfe=2, grid_steps=4, dsm_weight=0.5)
    perturb(method.student, 1)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    i, j, m = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3, 3, 4]), torch.tensor([2, 3, 4, 4])
    consistency, dsm = method.loss_terms(x0, noise, i, j, m, None)
    layer = method.student.time_embedding.linear_2.weight  # the toy's last weight matrix
    assert output_layer(method.student) is layer
    (g_c,) = torch.autograd.grad(consistency, layer, retain_graph=True)
    (g_d,) = torch.autograd.grad(dsm, layer, retain_graph=True)
    balance = float(g_c.norm()) / (float(g_d.norm()) + 1e-4)
    assert 0 < balance < 1e4 and balance != pytest.approx(1.0)
    got = float(method.loss(x0, noise, i, j, m, None).detach())
    assert got == pytest.approx(float(consistency.detach()) + 0.5 * balance * float(dsm.detach()), rel=1e-6)


def test_draw_keeps_t_above_u_above_or_at_s():
    method = toy_method(nfe=2, grid_steps=6, max_teacher_steps=3)
    for _ in range(20):
        i, j, m = method.draw(16)
        assert bool((i < j).all() and (j <= m).all() and (m <= 6).all() and (j - i <= 3).all())


class TwoTimeMixture(nn.Module):
    """The exact two-time network of a product mixture: ``g`` whose jump is the exact ODE map from t to s."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = ProductMixture()

    def forward(self, x, sigma, target_sigma=None):
        t = float(sigma[0])
        s = t if target_sigma is None else float(target_sigma[0])
        if s >= t:
            return self.mix(x, sigma)
        mapped = self.mix.exact_flow(x.double(), t, s).to(x.dtype)
        return (mapped - (s / t) * x) / (1 - s / t)


def test_gamma_zero_with_an_exact_jump_is_the_exact_ode_map():
    net = TwoTimeMixture()
    sigmas = [20.0, 3.0, 0.7, 0.1, 0.0]
    x = torch.randn(64, 3, dtype=torch.float64) * 20.0
    out = sample(net, x, sigmas, "ctm_gamma", gamma=0.0, return_info=True)
    assert out.nfe == 4
    torch.testing.assert_close(out.x, net.mix.exact_flow(x, 20.0, 0.0), rtol=1e-6, atol=1e-6)


def test_gamma_one_is_multistep_consistency_sampling():
    net = TwoTimeMixture()
    sigmas = [20.0, 3.0, 0.75, 0.0]  # float32-exact (the grid is stored in float32)
    x = torch.randn(64, 3, dtype=torch.float64) * 20.0
    got = sample(net, x, sigmas, GammaSampling(gamma=1.0, brownian=False),
                 generator=torch.Generator().manual_seed(5))  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    want = x
    for a, b in itertools.pairwise(sigmas):  # x <- f(x, sigma) + sigma' z, f the jump to 0
        want = net(want, torch.full((64,), a, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
        if b > 0:
            want = want + b * torch.randn(want.shape, generator=gen, dtype=want.dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gamma_sampling_with_an_exact_jump_keeps_the_marginal():
    # gamma in (0, 1) with the exact G: after each step x has the data's law noised to sigma' (the paper's claim);
    # checked on the first two moments of every coordinate against exact samples.
    net = TwoTimeMixture()
    sigmas = [20.0, 2.0, 0.5, 0.0]
    gen = torch.Generator().manual_seed(0)
    x = net.mix.sample((20000, 3), sigma=20.0, generator=gen).double()
    got = sample(net, x, sigmas, "ctm_gamma", gamma=0.6, generator=gen)
    ref = net.mix.sample((20000, 3), generator=gen).double()
    torch.testing.assert_close(got.mean(0), ref.mean(0), rtol=0, atol=0.05)
    torch.testing.assert_close(got.std(0), ref.std(0), rtol=0, atol=0.05)


def _checkpoint(folder):
    return load_file(str(folder / "checkpoint" / "state.safetensors"))


def test_resume_after_kill_is_bit_identical(tiny_model, tmp_path):
    settings = dict(teacher=tiny_model, method="ctm", nfe=2, batch_size=2, options={"max_teacher_steps": 2})
    hasten.distill(out=tmp_path / "a", max_steps=4, progress=False, **settings)
    hasten.distill(out=tmp_path / "b", max_steps=2, progress=False, **settings)
    hasten.distill(out=tmp_path / "b", max_steps=4, progress=False, resume=True, **settings)
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and any("target_level_embedding" in k for k in a)
    diff = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, diff


def test_smoke_on_mnist_dit_then_load_and_sample_with_no_flags(tmp_path):
    result = hasten.distill(
        teacher="mnist-dit", method="ctm", nfe=2, batch_size=4, out=tmp_path / "s", max_steps=2, progress=False,
        options={"gamma": 0.3},
    )  # fmt: skip
    assert result.steps == 2 and math.isfinite(result.final_loss)
    student = hasten.load(tmp_path / "s")
    assert student.info.target_level == {"channels": 64} and student.info.sampler["solver"] == "ctm_gamma"
    assert hooked_modules(student.network)[""] == ("hasten.ctm.target_level",)
    # the saved embedding is the trained one (not a fresh zero one)
    weight = student.network.target_level_embedding.mlp[-1].weight
    assert weight.abs().sum() > 0
    out = hasten.generate(student, 2, seed=0)
    assert out.images01.shape == (2, 1, 28, 28) and torch.isfinite(out.images01).all() and out.nfe == 2
    # guidance on top: target_sigma goes to both branches of classifier-free guidance
    guided = hasten.generate(student, 2, seed=0, guidance=2.0)
    assert torch.isfinite(guided.images01).all() and not torch.equal(guided.images01, out.images01)

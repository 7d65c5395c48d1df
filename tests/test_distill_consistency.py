"""Consistency distillation and multistep consistency sampling: the loss, the boundary, the solver, resume."""

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hasten
from hasten.distill import DistillConfig
from hasten.distill.consistency import Consistency, ConsistencyOptions, consistency_distance
from hasten.models.analytic import ProductMixture, as_network, point_set
from hasten.models.zoo import LoadedModel, ModelInfo, build_network, make_denoiser
from hasten.schedules.noise import FlowMatching

# -- the boundary parameterisation -------------------------------------------------------------------------------


def test_the_boundary_holds_exactly_for_random_weights():
    """f(x, sigma_min) = x bit for bit for an untrained DiT (flow head) and a VP eps network; at and below the
    boundary the network's answer is not used, above it it is."""
    torch.manual_seed(0)
    dit = build_network("dit", (1, 28, 28), 10).eval()
    flow_info = ModelInfo("s", "dit", "flow", (1, 28, 28), 10, "mnist", consistency={"sigma_min": 0.0123})
    vp_info = ModelInfo("s", "toy", "eps", (1, 2, 2), 0, "", consistency={"sigma_min": 0.03})
    wild = nn.Linear(4, 4)  # a random eps network on 2x2 images
    vp_net = lambda x_t, t, **c: wild(x_t.flatten(1)).view_as(x_t)  # noqa: E731
    cases = [
        (make_denoiser(dit, flow_info), 0.0123, {"class_labels": torch.tensor([3, 10])}, (2, 1, 28, 28)),
        (make_denoiser(vp_net, vp_info), 0.03, {}, (2, 1, 2, 2)),
    ]
    for f, sigma_min, cond, shape in cases:
        x = torch.randn(shape) * 5
        with torch.no_grad():
            assert torch.equal(f(x, sigma_min, **cond), x)
            assert torch.equal(f(x, torch.tensor([sigma_min, sigma_min / 2]), **cond), x)
            assert not torch.allclose(f(x, 2.0, **cond), x)


def test_the_boundary_is_the_ddim_jump_to_sigma_min_and_off_without_a_record():
    mixture = ProductMixture()
    info = ModelInfo("s", "toy", "x0", (1, 2, 2), 0, "")
    net = as_network(mixture, info.schedule(), "x0")
    plain = make_denoiser(net, info)
    f = make_denoiser(net, ModelInfo("s", "toy", "x0", (1, 2, 2), 0, "", consistency={"sigma_min": 0.5}))
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64) * 4
    d = plain(x, 4.0)
    torch.testing.assert_close(f(x, 4.0), d + (0.5 / 4.0) * (x - d))
    assert plain.consistency_sigma_min is None
    with pytest.raises(ValueError, match="exactly 'sigma_min'"):
        make_denoiser(net, ModelInfo("s", "toy", "x0", (1, 2, 2), 0, "", consistency={"sigma_data": 0.5}))
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        make_denoiser(net, ModelInfo("s", "toy", "x0", (1, 2, 2), 0, "", consistency={"sigma_min": -1}))


# -- the solver ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_min", [0.0, 0.02])
def test_consistency_sampling_of_a_point_mass_returns_the_point(sigma_min):
    point = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64) * 80
    for steps in (1, 2, 4):
        grid = hasten.karras(steps, 0.1, 80.0)
        out = hasten.sample(point_set(point), x, grid, "consistency", sigma_min=sigma_min, return_info=True,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.nfe == steps
        torch.testing.assert_close(out.x, point.expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("brownian", [True, False])
def test_consistency_sampling_with_the_exact_function_keeps_the_marginal(brownian):
    """With the exact consistency function of the mixture (the ODE map to sigma_min = 0.6), three steps give
    samples of p_{sigma_min}: the re-noising must bring x0 to sigma_next exactly (sqrt(s'^2 - sigma_min^2) z)."""
    mix, sigma_min, n = ProductMixture(), 0.6, 20_000

    def exact_f(x, sigma, **cond):
        return mix.exact_flow(x, float(sigma[0]), sigma_min, iterations=60)

    x = mix.sample((n, 1), sigma=20.0, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([20.0, 2.0, 0.9, 0.0], dtype=torch.float64)
    out = hasten.sample(exact_f, x, grid, "consistency", sigma_min=sigma_min, brownian=brownian,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    sorted_, _ = torch.sort(out[:, 0])
    cdf = mix._cdf_sf(sorted_, sigma_min)[0]
    i = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((cdf - i).abs(), (cdf - i + 1 / n).abs()).max())
    assert ks < 0.012, ks  # measured 0.004; 5% critical value ~0.0096; adding sigma' z instead: 0.030
    with pytest.raises(ValueError, match="sigma_min must be a finite number >= 0"):
        hasten.get_solver("consistency", sigma_min=-0.1)


# -- the loss --------------------------------------------------------------------------------------------------


class _Scaled(nn.Module):
    """A toy x0 network: ``w * x_t``, one learnable number."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.8))

    def forward(self, x_t, t, **cond):
        return self.w * x_t


def _scaled_f(x, sigma, w, schedule, sigma_min):
    """By hand: the toy student's x0 (``w * alpha * x``), then the DDIM jump to ``sigma_min``."""
    alpha = float(schedule.alpha_from_ve_sigma(torch.tensor(sigma, dtype=torch.float64)))
    denoised = w * alpha * x
    return denoised + (sigma_min / sigma) * (x - denoised)


def _toy_teacher(objective: str, network: nn.Module, mixture: ProductMixture) -> LoadedModel:
    info = ModelInfo(name="mixture", arch="toy", objective=objective, image_shape=(1, 2, 2), num_classes=0, data="")
    return LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "analytic")


def _method(teacher, **options) -> Consistency:
    config = DistillConfig(teacher="analytic", method="consistency", nfe=1, batch_size=4, cfg_dropout=0.0)
    opts = ConsistencyOptions(**options)
    Consistency.check(teacher, config, opts)
    return Consistency(teacher, config, opts, torch.device("cpu"))


def test_the_loss_matches_a_hand_computed_value():
    """VP teacher = the exact mixture denoiser, student = w * x_t read as x0: levels, noise, the teacher's Heun
    step, the boundary and the l2 / pseudo-Huber distances written out by hand."""
    mixture = ProductMixture()
    exact = as_network(mixture, ModelInfo("m", "toy", "x0", (1, 2, 2), 0, "").schedule(), "x0")
    teacher = _toy_teacher("x0", exact, mixture)
    x0 = mixture.sample((4, 1, 2, 2), generator=torch.Generator().manual_seed(3)).float()
    for loss, scale in (("l2", 0.00054), ("pseudo_huber", 0.3)):
        method = _method(teacher, levels=5, parameterisation="x0", loss=loss, huber_scale=scale)
        method.student, method.target = _Scaled(), _Scaled()
        method.target.w.data.fill_(0.7)
        method.student_f = method.student_denoiser(method.student)
        method.target_f = method.student_denoiser(method.target)
        value = method.loss(x0, None)

        gen = torch.Generator().manual_seed(0)  # the run's seed: the same draws, in the same order
        n = torch.randint(0, 4, (4,), generator=gen)
        z = torch.randn(x0.shape, generator=gen)
        schedule = teacher.schedule
        levels = schedule.ve_sigma(torch.linspace(999.0, 0.0, 5, dtype=torch.float64))
        sigma_min = float(levels[-1])
        assert method.sigma_min == sigma_min
        rows = []
        for r in range(4):
            s, s2 = float(levels[n[r]]), float(levels[n[r] + 1])
            x = x0[r : r + 1].double() + s * z[r : r + 1].double()
            d = mixture(x, s)
            x_e = x + (s2 - s) * (x - d) / s
            x_h = x + 0.5 * (s2 - s) * ((x - d) / s + (x_e - mixture(x_e, s2)) / s2)
            diff = (_scaled_f(x, s, 0.8, schedule, sigma_min) - _scaled_f(x_h, s2, 0.7, schedule, sigma_min)).flatten()
            if loss == "l2":
                rows.append(float(diff.pow(2).mean()))
            else:
                c = scale * 2.0  # sqrt(4 values)
                rows.append(math.sqrt(float(diff.pow(2).sum()) + c * c) - c)
        assert abs(value.item() - sum(rows) / 4) < 1e-5 * max(1.0, sum(rows) / 4), (value.item(), sum(rows) / 4)
        value.backward()  # gradients reach the student only
        assert method.student.w.grad is not None and method.target.w.grad is None


def test_with_the_exact_consistency_function_the_loss_is_the_teachers_step_error():
    """Flow teacher = the exact mixture. With f = the exact ODE map to sigma_min, the loss is zero when the
    teacher's step is the exact ODE step, and otherwise only the teacher's local error: its square falls ~h^5-h^6
    with Heun as the grid refines, and Heun's is far below DDIM's (local error h^2) on the same grid."""
    mixture = ProductMixture()
    teacher = _toy_teacher("flow", as_network(mixture, FlowMatching(), "flow"), mixture)
    x0 = mixture.sample((64, 1, 2, 2), generator=torch.Generator().manual_seed(5)).float().double()

    def losses(levels, teacher_solver, exact_step=False):
        method = _method(teacher, levels=levels, teacher_solver=teacher_solver)

        def exact_f(x, sigma, **cond):
            return torch.cat([mixture.exact_flow(x[r : r + 1], float(sigma[r]), method.sigma_min, iterations=80)
                              for r in range(x.shape[0])])  # fmt: skip

        method.student_f = method.target_f = exact_f
        if exact_step:
            method.teacher_step = lambda x, s, s2, labels: torch.cat(
                [mixture.exact_flow(x[r : r + 1], float(s[r]), float(s2[r]), iterations=80) for r in range(x.shape[0])]
            )
        return float(method.loss(x0, None))

    assert losses(10, "heun", exact_step=True) < 1e-12  # float64 quantile maps from sigma ~1e4: ~1e-8 apart
    heun_10, heun_40, ddim_40 = losses(10, "heun"), losses(40, "heun"), losses(40, "ddim")
    assert heun_40 < heun_10 / 50, (heun_10, heun_40)  # measured 8.4e-6 -> 5.7e-9 (1470x for 4x finer)
    assert heun_40 < ddim_40 / 10, (heun_40, ddim_40)  # measured 5.7e-9 vs 1.2e-6


def test_consistency_distance_by_hand():
    a = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]]])
    torch.testing.assert_close(consistency_distance(a, b, "l2", 0.1), torch.tensor([2.5, 12.5]))
    c = 0.1 * math.sqrt(2)
    expected = torch.tensor([math.sqrt(5 + c * c) - c, math.sqrt(25 + c * c) - c])
    torch.testing.assert_close(consistency_distance(a, b, "pseudo_huber", 0.1), expected)


def test_the_method_refuses_what_it_cannot_use():
    mixture = ProductMixture()
    teacher = _toy_teacher("flow", as_network(mixture, FlowMatching(), "flow"), mixture)
    with pytest.raises(ValueError, match="levels must be >= 2"):
        _method(teacher, levels=1)
    with pytest.raises(ValueError, match="grid 'auto' cannot end at sigma_min"):
        _method(teacher, grid="auto")
    with pytest.raises(ValueError, match="loss must be one of 'l2', 'pseudo_huber'; got 'lpips'"):
        _method(teacher, loss="lpips")
    with pytest.raises(ValueError, match="teacher_solver"):
        _method(teacher, teacher_solver="euler")
    with pytest.raises(ValueError, match="parameterisation"):
        _method(teacher, parameterisation="v")
    with pytest.raises(ValueError, match="target_decay"):
        _method(teacher, target_decay=1.0)


# -- the driver: a real student, resume ----------------------------------------------------------------------


def test_a_consistency_student_loads_and_samples_at_its_nfe_with_no_flags(tmp_path):
    out = tmp_path / "student"
    result = hasten.distill(teacher="mnist-dit", method="consistency", nfe=2, batch_size=4, minutes=5, out=out,
                            max_steps=2, progress=False)  # fmt: skip
    assert result.steps == 2 and math.isfinite(result.final_loss)
    student = hasten.load(out)
    sigma_min = student.info.consistency["sigma_min"]
    assert sigma_min == pytest.approx(1e-4, rel=1e-3)  # the flow schedule's lowest level
    assert student.denoiser.consistency_sigma_min == sigma_min
    assert student.info.sampler == {"solver": "consistency", "options": {"sigma_min": sigma_min}, "schedule": "auto",
                                    "steps": 2, "guidance": 1.0}  # fmt: skip
    assert student.info.objective == "flow" and student.info.distillation["method"] == "consistency"
    run = hasten.generate(student, 3)
    assert run.nfe == 2 and torch.isfinite(run.images01).all()


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    """mnist-unet (a VP eps teacher, so the student is read as a v-head): 2 updates, stop, 2 more on resume;
    every network (student, EMA, target), the optimizer and the generator equal a straight run of 4."""
    settings = dict(teacher="mnist-unet", method="consistency", nfe=1, batch_size=4, minutes=5, progress=False,
                    options={"levels": 8})  # fmt: skip
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    hasten.distill(out=straight, max_steps=4, **settings)
    hasten.distill(out=interrupted, max_steps=2, **settings)
    again = hasten.distill(out=interrupted, resume=True, max_steps=4, **settings)
    assert again.resumed_from_step == 2
    a = load_file(str(straight / "checkpoint" / "state.safetensors"))
    b = load_file(str(interrupted / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("target.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert hasten.load(straight).info.objective == "v"
    assert json.loads((straight / "hasten.json").read_text())["consistency"]["sigma_min"] > 0

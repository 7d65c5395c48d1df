"""Reflow and SlimFlow distillation: the loss, the couplings, the schedules, resume, refusals, a real smoke run."""

from __future__ import annotations

import itertools
import json
import math
import pathlib

import pytest
import torch
from torch import nn

import hasten
from hasten.distill import DistillConfig, prepare
from hasten.distill._base import has_run
from hasten.distill.reflow import (
    Reflow,
    ReflowOptions,
    anneal_beta,
    annealed_noise,
    pseudo_huber,
    reflow_loss,
)
from hasten.models.analytic import ProductMixture, as_network
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser
from hasten.schedules.grids import get_sigmas
from hasten.schedules.noise import FlowMatching

CPU = torch.device("cpu")
TINY = {"couplings": 8, "chunk_size": 4, "teacher_steps": 3}  # a handful of couplings, 3 teacher steps


def analytic_teacher(shape=(1, 2, 2)) -> tuple[LoadedModel, ProductMixture]:
    """The analytic mixture as a flow-matching teacher (velocity network fed 1000 t)."""
    mixture = ProductMixture()
    net = as_network(mixture, FlowMatching(), "flow", time_scale=1000.0)
    info = ModelInfo(name="analytic", arch="dit", objective="flow", image_shape=shape, num_classes=0, data="",
                     time_scale=1000.0)  # fmt: skip
    return LoadedModel(make_denoiser(net, info), net, info, pathlib.Path("."), "analytic"), mixture


def analytic_method(folder: pathlib.Path, **options) -> tuple[Reflow, ProductMixture]:
    teacher, mixture = analytic_teacher()
    config = DistillConfig(teacher="analytic", method="reflow", nfe=1, batch_size=4, cfg_dropout=0.0)
    method = Reflow(teacher, config, ReflowOptions(**{"couplings": 16, "chunk_size": 8, **options}), CPU)
    method.folder = folder
    return method, mixture


def test_reflow_loss_matches_a_hand_computed_value():
    # v(x_t, t) = 2 x_t + t on two 1-pixel rows: x_t = (1-t) x + t z = (2.5, -0.75), target z - x = (-2, -2.5),
    # v = (5.25, -1.0): errors (7.25, 1.5), mean square (52.5625 + 2.25) / 2
    z = torch.tensor([[1.0], [-2.0]])
    x = torch.tensor([[3.0], [0.5]])
    t = torch.tensor([0.25, 0.5])
    loss = reflow_loss(lambda x_t, tt: 2 * x_t + tt.view(-1, 1), z, x, t)
    assert float(loss) == pytest.approx(27.40625, abs=1e-6)


def test_the_method_step_optimises_that_loss_on_the_student_network():
    # a toy network whose velocity is a * x_t + b, fed the flow time in 1000 t: one step's loss is the formula's
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(-0.25))

        def forward(self, x_t, timestep, **cond):
            assert float(timestep.max()) > 1.0  # the time label is 1000 t
            return self.a * x_t + self.b + 0 * timestep.view(-1, 1, 1, 1)

    teacher, _ = analytic_teacher()
    config = DistillConfig(teacher="analytic", method="reflow", nfe=1, batch_size=4, cfg_dropout=0.0)
    method = Reflow(teacher, config, ReflowOptions(couplings=4, chunk_size=4), CPU)
    method.student = Toy()
    z, x, t = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.rand(4)
    got = reflow_loss(method.velocity(method.student), z, x, t)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * z
    assert float(got.detach()) == pytest.approx(float(((0.5 * x_t - 0.25) - (z - x)).pow(2).mean()), rel=1e-6)


def test_pseudo_huber_is_half_the_squared_distance_when_small_and_linear_when_large():
    a, b = torch.zeros(2, 100), torch.zeros(2, 100)
    c = 0.00054 * 10
    b[:, 0] = 1e-4
    assert float(pseudo_huber(a, b)) == pytest.approx(1e-8 / (2 * c), rel=1e-2)
    b[:, 0] = 10.0
    assert float(pseudo_huber(a, b)) == pytest.approx(10.0 - c, rel=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_schedule_goes_from_one_to_zero_monotonically(schedule):
    values = [anneal_beta(u / 100, schedule) for u in range(-5, 120)]
    assert anneal_beta(0.0, schedule) == 1.0 and anneal_beta(1.0, schedule) == pytest.approx(0.0, abs=1e-15)
    assert anneal_beta(-1.0, schedule) == 1.0 and anneal_beta(3.0, schedule) == pytest.approx(0.0, abs=1e-15)
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert any(b < a for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="beta_schedule"):
        anneal_beta(0.5, "exp")


def test_annealed_noise_keeps_unit_variance_and_its_ends():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert torch.equal(annealed_noise(z, eps, 0.0), z)
    assert torch.allclose(annealed_noise(z, eps, 1.0), eps)
    assert float(annealed_noise(z, eps, 0.6).var()) == pytest.approx(1.0, abs=0.01)


def test_couplings_are_the_teachers_ode_map_from_the_noise_generate_starts_with(tmp_path):
    # the exact PF-ODE map of the mixture (its quantile map) from z scaled as hasten.generate scales noise
    method, mixture = analytic_method(tmp_path, teacher_steps=100)
    data = method.make_couplings().load(CPU)
    sigmas = get_sigmas("auto", 100, FlowMatching())
    scale = FlowMatching().initial_noise_scale(float(sigmas[0]))
    exact = mixture.exact_flow(data["z"].double() * scale, float(sigmas[0]), 0.0)
    assert float((data["x"].double() - exact).abs().max()) < 5e-3
    assert "labels" not in data  # an unconditional teacher


class IdealReflow(nn.Module):
    """The exact velocity of the reflowed mixture: per coordinate the coupling z -> T(z) is monotone, so the straight
    lines do not cross and v(x_t, t) = z - T(z) for the one z with (1 - t) T(z) + t z = x_t (found by bisection)."""

    def __init__(self, mixture: ProductMixture, sigma_max: float):
        super().__init__()
        self.mixture, self.sigma_max = mixture, sigma_max

    def coupling(self, z):
        return self.mixture.exact_flow(z * (1 + self.sigma_max), self.sigma_max, 0.0)

    def forward(self, x_t, timestep, **cond):
        t = (timestep.double() / 1000.0).view(-1, *([1] * (x_t.ndim - 1))).expand_as(x_t)
        x_t = x_t.double()
        lo, hi = torch.full_like(x_t, -12.0), torch.full_like(x_t, 12.0)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = (1 - t) * self.coupling(mid) + t * mid > x_t
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        z = 0.5 * (lo + hi)
        return z - self.coupling(z)


@pytest.mark.parametrize("nfe", [1, 3])
def test_euler_on_the_ideal_reflow_velocity_reproduces_the_coupling(tmp_path, nfe):
    teacher, mixture = analytic_teacher()
    config = DistillConfig(teacher="analytic", method="reflow", nfe=nfe, batch_size=4, cfg_dropout=0.0)
    method = Reflow(teacher, config, ReflowOptions(couplings=4, chunk_size=4), CPU)
    recipe = method.sampler()
    sigmas = get_sigmas(recipe["schedule"], recipe["steps"], method.student_schedule)
    ideal = IdealReflow(mixture, float(sigmas[0]))
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = ideal.coupling(z)
    # its reflow loss on the couplings vanishes (the teacher's own, curved, velocity does not)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    assert float(reflow_loss(method.velocity(ideal.double()), z, x, t)) < 1e-12
    assert float(reflow_loss(method.velocity(teacher.network), z, x, t)) > 1e-3
    # the student's own sampler (Euler, auto grid, nfe steps) from generate's starting noise lands on the coupling;
    # the 1e-4 of data left at t_max < 1 bounds the agreement
    student = make_denoiser(ideal, method.student_info)
    start = z * method.student_schedule.initial_noise_scale(float(sigmas[0]))
    out = hasten.sample(student, start, sigmas, recipe["solver"], **recipe["options"])
    assert float((out - x).abs().max()) < 1e-3
    teacher_out = hasten.sample(teacher.denoiser, start, sigmas, recipe["solver"])
    assert float((teacher_out - x).abs().max()) > 0.05  # the teacher's curved flow is not one Euler step


def test_coupling_generation_resumes_after_a_kill_without_redoing_finished_chunks(tmp_path, monkeypatch):
    whole, _ = analytic_method(tmp_path / "whole", couplings=24, chunk_size=8)
    expected = whole.make_couplings().load(CPU)

    killed, _ = analytic_method(tmp_path / "killed", couplings=24, chunk_size=8)
    real, calls = Reflow.teacher_couplings, []

    def dies_on_the_second_chunk(self, z, labels):
        calls.append(z.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of chunk 1
        return real(self, z, labels)

    monkeypatch.setattr(Reflow, "teacher_couplings", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        killed.make_couplings()
    store = tmp_path / "killed" / "method" / "couplings"
    assert sorted(p.name for p in store.glob("chunk_*")) == ["chunk_00000.safetensors"]  # no partial chunk
    assert has_run(tmp_path / "killed")  # the driver lets --resume continue it
    before = (store / "chunk_00000.safetensors").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(Reflow, "teacher_couplings", lambda self, z, labels: calls.append(1) or real(self, z, labels))
    again, _ = analytic_method(tmp_path / "killed", couplings=24, chunk_size=8)
    got = again.make_couplings().load(CPU)
    assert len(calls) == 2  # chunks 1 and 2 only
    assert (store / "chunk_00000.safetensors").stat().st_mtime_ns == before
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert again.make_couplings().seconds() > 0

    other, _ = analytic_method(tmp_path / "killed", couplings=24, chunk_size=8, teacher_steps=5)
    with pytest.raises(ValueError, match="steps 32 -> 5"):
        other.make_couplings()


def _weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_slimflow_training_resumes_bit_identically_across_its_stages(tmp_path):
    # a half-width student from scratch, annealing over its first update, flow-guided distillation from update 2
    options = {**TINY, "total_steps": 4, "anneal_share": 0.5, "distill_share": 0.5, "distill_loss": "pseudo_huber"}
    settings = dict(teacher="mnist-dit", method="slimflow", nfe=1, batch_size=4, progress=False, options=options)
    hasten.distill(out=tmp_path / "whole", max_steps=4, **settings)
    hasten.distill(out=tmp_path / "killed", max_steps=2, **settings)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["method.state"]["stage"] == "reflow"
    result = hasten.distill(out=tmp_path / "killed", max_steps=4, resume=True, **settings)
    assert result.resumed_from_step == 2
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["method.state"]["stage"] == "distill"

    student = hasten.load(tmp_path / "killed")  # config.json of the smaller network loads with from_pretrained
    teacher = hasten.load("mnist-dit")
    assert student.network.config.attention_head_dim == 16
    count = sum(p.numel() for p in student.network.parameters())
    assert count < 0.4 * sum(p.numel() for p in teacher.network.parameters())
    assert student.info.distillation["parameters"] == count
    assert student.info.objective == "flow" and student.info.distillation["extra_seconds"] > 0


@pytest.mark.parametrize(
    ("nfe", "options", "match"),
    [
        (2, {"distill_share": 0.2}, "one-step student; nfe must be 1, got 2"),
        (4, {"teacher_steps": 4}, r"teacher_steps \(4\) must exceed nfe \(4\)"),
        (1, {"teacher_solver": "dpmpp_sde"}, "stochastic"),
        (1, {"width": 0.5, "init": "teacher"}, "init 'teacher' needs the teacher's size"),
        (1, {"width": 0.0}, "width must be in"),
        (1, {"teacher_schedule": "nope"}, "teacher_schedule 'nope' is not a grid"),
        (1, {"distill_loss": "lpips"}, "distill_loss must be one of"),
        (1, {"couplings": 2}, r"couplings \(2\) must be at least batch_size"),
        (1, {"widht": 0.5}, "does not take option"),
        (1, {"teacher_options": "order=3"}, "teacher_options must be a mapping"),
        (1, {"teacher_solver": "heun", "teacher_options": {"ordr": 2}}, "ordr"),
    ],
)
def test_refusals_name_the_reason(nfe, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prepare(DistillConfig(teacher="mnist-dit", method="reflow", nfe=nfe, batch_size=4, options=options))


def test_students_drop_labels_once_per_image_not_inside_every_dit_block(tmp_path):
    from diffusers.models.embeddings import LabelEmbedding

    method = prepare(DistillConfig(teacher="mnist-dit", method="reflow", nfe=1, batch_size=4, options=TINY))
    method.folder = tmp_path
    modules, _ = method.build()
    drops = [m.dropout_prob for m in modules["student"].modules() if isinstance(m, LabelEmbedding)]
    assert drops and set(drops) == {0.0}  # from_pretrained restores diffusers' 0.1 in every block


def test_slimflow_distils_a_one_step_student_only_when_it_can():
    assert prepare(DistillConfig(teacher="mnist-dit", method="slimflow", nfe=1, batch_size=4)).distill_share == 0.2
    assert prepare(DistillConfig(teacher="mnist-dit", method="slimflow", nfe=2, batch_size=4)).distill_share == 0.0


def test_reflow_of_the_bundled_dit_loads_and_samples_with_no_flags(tmp_path):
    result = hasten.distill(teacher="mnist-dit", method="reflow", nfe=2, out=tmp_path / "s", batch_size=4,
                            max_steps=2, progress=False, options=TINY)  # fmt: skip
    assert result.steps == 2 and math.isfinite(result.final_loss)
    student = hasten.load(tmp_path / "s")
    assert student.info.sampler == {"solver": "euler", "options": {}, "schedule": "auto", "steps": 2, "guidance": 1.0}
    assert student.info.time_scale == 1000.0 and student.info.objective == "flow"
    teacher = hasten.load("mnist-dit")
    assert student.network.config.num_layers == teacher.network.config.num_layers  # the teacher's size, reflowed
    gen = hasten.generate(student, 3)
    assert gen.nfe == 2 and torch.isfinite(gen.images01).all()
    assert "teacher samples and earlier students included" in (tmp_path / "s" / "MODEL_CARD.md").read_text()


def test_a_noise_predicting_teacher_is_converted_to_a_flow_student(tmp_path):
    hasten.distill(teacher="mnist-unet", method="reflow", nfe=1, out=tmp_path / "u", batch_size=4, max_steps=1,
                   progress=False, options=TINY)  # fmt: skip
    student = hasten.load(tmp_path / "u")
    assert (student.info.objective, student.info.time_scale, student.info.arch) == ("flow", 1000.0, "unet")
    assert type(student.schedule).__name__ == "FlowMatching"
    gen = hasten.generate(student, 2)
    assert gen.nfe == 1 and torch.isfinite(gen.images01).all()

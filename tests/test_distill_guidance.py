"""Guidance distillation: the guided target, the loss by hand, the ideal student on an analytic class-conditional
teacher, refusals, exact resume, the real DiT's student at nfe calls, and a progressive student of it."""

import dataclasses
import math
import pathlib

import pytest
import torch
from torch import nn

import hasten
from hasten.distill import DistillConfig, prepare
from hasten.distill.guidance import ONE_CALL_SOLVERS, GuidanceDistillation, GuidanceOptions, weighted_x0_loss
from hasten.models.adapters import Denoiser, as_sigma
from hasten.models.analytic import GaussianMixture, as_network
from hasten.models.zoo import LoadedModel, ModelInfo, load, make_denoiser
from hasten.schedules.grids import get_sigmas
from hasten.schedules.noise import FlowMatching

MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -1.5]], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)


class ClassConditionalMixture(Denoiser):
    """Exact denoisers of a labelled 2-D Gaussian mixture: class k is component k, the null class (index K) the
    whole mixture; the guided prediction ``uncond + scale (cond - uncond)`` with a learnable ``scale`` (1: the
    plain class-conditional model), so a student initialised from it can represent every guided target exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = [GaussianMixture(MEANS[k : k + 1], STDS[k : k + 1]) for k in range(len(MEANS))]
        self.mixture = GaussianMixture(MEANS, STDS)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, sigma, class_labels=None):
        sigma = as_sigma(sigma, x)
        uncond = self.mixture(x, sigma).to(torch.float64)
        cond = uncond.clone()
        for k, component in enumerate(self.classes):
            rows = class_labels == k
            if rows.any():
                cond[rows] = component(x[rows], sigma[rows]).to(torch.float64)
        return uncond + self.scale.to(torch.float64) * (cond - uncond)


def analytic_teacher() -> LoadedModel:
    network = as_network(ClassConditionalMixture(), FlowMatching(), "flow", time_scale=1000.0)
    info = ModelInfo(name="labelled-gmm", arch="dit", objective="flow", image_shape=(2,), num_classes=len(MEANS),
                     data="", time_scale=1000.0)  # fmt: skip
    return LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "analytic")


def method_for(teacher: LoadedModel, **settings) -> GuidanceDistillation:
    options = settings.pop("options", {})
    config = DistillConfig(teacher="analytic", method="guidance", **{"guidance": 3.0, "nfe": 2, **settings})
    method = GuidanceDistillation(teacher, config, GuidanceOptions.create(**options), torch.device("cpu"))
    GuidanceDistillation.check(teacher, config, method.options)
    method.build()
    return method


def labelled_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(MEANS), (n,), generator=gen)
    x0 = MEANS[labels] + STDS[labels, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x0.float(), labels


def test_guided_target_is_the_conditional_teacher_at_one_and_linear_in_the_scale():
    teacher = analytic_teacher()
    x = torch.randn(6, 2) * 2
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 20.0])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method = method_for(teacher)

    def target(scale):
        method.config = dataclasses.replace(method.config, guidance=scale)
        return method.teacher_denoise(x, sigma, labels).double()

    cond = teacher.denoiser(x, sigma, class_labels=labels).double()
    uncond = teacher.denoiser(x, sigma, class_labels=torch.full_like(labels, 3)).double()
    assert not torch.allclose(cond, uncond, atol=1e-3)  # guidance has something to change
    torch.testing.assert_close(target(1.0), cond)
    torch.testing.assert_close(target(0.0), uncond, rtol=1e-5, atol=1e-6)
    for scale in (2.0, 3.0, 7.5):  # the two-call path is uncond + scale (cond - uncond)
        torch.testing.assert_close(target(scale), uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target(5.0) - target(3.0), 2 * (target(4.0) - target(3.0)), rtol=1e-5, atol=1e-5)
    # null-class rows stay unconditional whatever the scale (the student keeps an unconditional branch)
    null = torch.full_like(labels, 3)
    method.config = dataclasses.replace(method.config, guidance=4.0)
    torch.testing.assert_close(method.teacher_denoise(x, sigma, null).double(), uncond, rtol=1e-5, atol=1e-6)


class ScaledX0(nn.Module):
    """Toy x0-predicting network: ``out = a[label] * x_t``."""

    def __init__(self, gains):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gains))

    def forward(self, x_t, t, class_labels):
        return self.gain[class_labels].view(-1, 1) * x_t


@pytest.mark.parametrize("weighting", ["snr_trunc", "snr_plus_one", "snr", "uniform", "auto"])
def test_loss_by_hand(weighting):
    info = ModelInfo(name="toy", arch="unet", objective="x0", image_shape=(2,), num_classes=2, data="")
    network = ScaledX0([0.5, 2.0, 1.5])  # classes 0, 1 and the null class 2
    teacher = LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "toy")
    method = method_for(teacher, guidance=3.0, options={"weighting": weighting})
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]])
    sigma = torch.tensor([1.0, 0.5, 2.0])
    labels = torch.tensor([0, 1, 2])
    value = float(method.loss(x, sigma, labels).detach())
    # by hand: the network sees x_t = alpha x, alpha = 1 / sqrt(1 + sigma^2) (the 1000-step VP schedule in VE form);
    # guided gain = 1.5 + 3 (a_c - 1.5); the student (the teacher's copy) predicts a_c x_t.
    total = 0.0
    for row, (s, c) in enumerate([(1.0, 0), (0.5, 1), (2.0, 2)]):
        gain = [0.5, 2.0, 1.5][c]
        guided = gain if c == 2 else 1.5 + 3.0 * (gain - 1.5)
        alpha = 1 / math.sqrt(1 + s * s)
        err = sum(((gain - guided) * alpha * xi) ** 2 for xi in x[row].tolist()) / 2
        snr = 1 / (s * s)
        # auto: an x0-predicting teacher gets the paper's truncated SNR
        weight = {"snr_trunc": max(1.0, snr), "snr_plus_one": 1.0 + snr, "snr": snr, "uniform": 1.0,
                  "auto": max(1.0, snr)}[weighting]  # fmt: skip
        total += weight * err
    assert value == pytest.approx(total / 3, rel=1e-5)
    assert value > 0
    # and the plain helper on a hand-made pair
    pred, tgt = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert float(weighted_x0_loss(pred, tgt, torch.tensor([0.5]), "snr_trunc")) == pytest.approx(4 * 2.5)
    assert float(weighted_x0_loss(pred, tgt, torch.tensor([2.0]), "snr_trunc")) == pytest.approx(2.5)
    assert float(weighted_x0_loss(pred, tgt, torch.tensor([2.0]), "snr")) == pytest.approx(2.5 / 4)


def test_auto_weighting_is_the_eps_loss_for_a_noise_predicting_teacher():
    """An eps head's x0 error is sigma times its own: ``auto`` weights it by SNR, which is the eps MSE."""
    info = ModelInfo(name="toy", arch="unet", objective="eps", image_shape=(2,), num_classes=2, data="")
    network = ScaledX0([0.5, 2.0, 1.5])  # read as an eps prediction this time
    teacher = LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "toy")
    method = method_for(teacher, guidance=2.0)
    assert method.weighting == "snr"
    x, sigma, labels = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([50.0, 0.2]), torch.tensor([0, 1])
    x_t = x / (1 + sigma**2).sqrt().view(-1, 1)
    gains = torch.tensor([0.5, 2.0])[labels].view(-1, 1)
    eps_error = (gains - (1.5 + 2.0 * (gains - 1.5))) * x_t  # student eps - guided eps
    assert float(method.loss(x, sigma, labels).detach()) == pytest.approx(float(eps_error.pow(2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        weighted_x0_loss(x, x, sigma, "auto")


@pytest.mark.parametrize("inputs", ["data", "trajectory"])
def test_ideal_student_on_an_analytic_teacher_is_the_guided_target(inputs):
    """The student starts as the class-conditional teacher (scale 1); training on the guided target at scale 3
    drives its guidance scale to 3, where its one-call prediction equals the teacher's two-call guided one."""
    teacher = analytic_teacher()
    method = method_for(teacher, lr=0.05, ema_decay=0.9, options={"inputs": inputs, "trajectory_steps": 4}
                        if inputs == "trajectory" else {})  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    losses = []
    for index in range(250):
        x0, labels = labelled_batch(64, gen)
        losses.append(method.step(index, x0, labels))
    scale = float(method.student.denoiser.scale.detach())
    assert scale == pytest.approx(3.0, abs=0.05), scale
    assert sum(losses[-20:]) < 1e-2 * sum(losses[:20])
    x = torch.randn(32, 2, generator=gen) * 2
    sigma = torch.logspace(-1, 1.3, 32)
    labels = torch.arange(32) % 3
    student = method.student_denoiser(method.student)(x, sigma, class_labels=labels)
    target = method.teacher_denoise(x, sigma, labels)
    assert (student - target).abs().max() < 0.05 * target.abs().max()


def test_trajectory_points_lie_on_the_teachers_guided_sampler():
    teacher = analytic_teacher()
    method = method_for(teacher, nfe=3, options={"inputs": "trajectory"})
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    state = method.gen.get_state()
    x, sigma = method.trajectory_points(labels)
    grid = method.sigmas(3).float()
    assert all(float(s) in grid[:3].tolist() for s in sigma)
    # replay: the same noise through hasten.sample with the guided teacher, read at each row's level
    method.gen.set_state(state)
    scale = teacher.schedule.initial_noise_scale(float(grid[0]))
    noise = torch.randn((8, 2), generator=method.gen) * scale
    seen = [noise]
    hasten.sample(method.guided_teacher, noise, method.sigmas(3), "dpmpp_2m", cond={"class_labels": labels},
                  callback=lambda i, s, state: seen.append(state.clone()))  # fmt: skip
    for row in range(8):
        level = grid[:3].tolist().index(float(sigma[row]))
        torch.testing.assert_close(x[row], seen[level][row].float())


def test_refusals():
    teacher = analytic_teacher()
    with pytest.raises(ValueError, match="guidance 1 means no guidance"):
        method_for(teacher, guidance=1.0)
    unconditional = dataclasses.replace(teacher.info, num_classes=0)
    with pytest.raises(ValueError, match="is unconditional"):
        GuidanceDistillation.check(dataclasses.replace(teacher, info=unconditional),
                                   DistillConfig(method="guidance", guidance=3.0), GuidanceOptions())  # fmt: skip
    distilled = dataclasses.replace(teacher.info, distillation={"method": "guidance", "config": {"guidance": 3.0}})
    with pytest.raises(ValueError, match="already guidance-distilled"):
        GuidanceDistillation.check(dataclasses.replace(teacher, info=distilled),
                                   DistillConfig(method="guidance", guidance=2.0), GuidanceOptions())  # fmt: skip
    for options, message in [
        ({"solver": "heun"}, "one network call per step"),
        ({"weighting": "p2"}, "weighting"),
        ({"inputs": "noise"}, "inputs"),
        ({"trajectory_steps": 4}, "needs inputs='trajectory'"),
        ({"inputs": "trajectory", "trajectory_steps": 1}, "trajectory_steps"),
        ({"schedule": "nope"}, "not a grid"),
    ]:
        with pytest.raises(ValueError, match=message):
            method_for(teacher, options=options)
    with pytest.raises((TypeError, ValueError), match="steps_per_round"):
        GuidanceOptions.create(steps_per_round=3)


@pytest.mark.parametrize("solver", ONE_CALL_SOLVERS)
def test_one_call_solvers_make_one_call_per_step(solver):
    teacher = analytic_teacher()
    for steps in (1, 2, 3, 5):
        for schedule in ("auto", "karras"):
            grid = get_sigmas(schedule, steps, teacher.schedule)
            out = hasten.sample(teacher.denoiser, torch.randn(4, 2) * float(grid[0]), grid, solver,
                                cond={"class_labels": torch.zeros(4, dtype=torch.long)}, return_info=True)  # fmt: skip
            assert out.nfe == steps, (schedule, steps)


_DATASETS: dict[str, object] = {}


@pytest.fixture
def parsed_once(monkeypatch):
    """Parse MNIST once for this module's distillation runs (the CSV parse takes seconds; the driver reloads it)."""
    import hasten.data

    load_dataset = hasten.data.load_dataset

    def cached(name, *args, **kwargs):
        if args or kwargs:
            return load_dataset(name, *args, **kwargs)
        if name not in _DATASETS:
            _DATASETS[name] = load_dataset(name)
        return _DATASETS[name]

    monkeypatch.setattr(hasten.data, "load_dataset", cached)


def test_resume_after_a_kill_is_exact(tmp_path, parsed_once):
    """4 updates straight equal 2 updates, a stop at the checkpoint (what a kill -9 leaves), then 2 more."""
    settings = dict(teacher="mnist-dit", method="guidance", nfe=2, guidance=2.5, batch_size=4, minutes=5,
                    progress=False, options={"inputs": "trajectory"})  # fmt: skip
    hasten.distill(out=tmp_path / "a", max_steps=4, **settings)
    hasten.distill(out=tmp_path / "b", max_steps=2, **settings)
    again = hasten.distill(out=tmp_path / "b", resume=True, max_steps=4, **settings)
    assert again.resumed_from_step == 2 and again.steps == 4
    a, b = load(tmp_path / "a").network.state_dict(), load(tmp_path / "b").network.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match=r"guidance 2\.5 -> 3"):
        hasten.distill(out=tmp_path / "b", resume=True, max_steps=5, **{**settings, "guidance": 3.0})


def test_a_loaded_dit_drops_no_labels_inside_its_blocks():
    """diffusers' DiT config restores label dropout 0.1 per block; a student in training mode would drop labels
    from the global random generator (noise in the target's conditioning, and no exact resume)."""
    from diffusers.models.embeddings import LabelEmbedding

    network = load("mnist-dit").network.train()
    embeddings = [m for m in network.modules() if isinstance(m, LabelEmbedding)]
    assert embeddings and all(m.dropout_prob == 0.0 for m in embeddings)
    x, t, y = torch.randn(8, 1, 28, 28), torch.full((8,), 500.0), torch.arange(8)
    torch.testing.assert_close(network(x, t, class_labels=y).sample, network(x, t, class_labels=y).sample)


def count_rows(model) -> list[int]:
    rows: list[int] = []
    model.network.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows


def test_mnist_dit_student_samples_at_nfe_calls_and_teaches_progressive(tmp_path, parsed_once):
    """The smoke run: 2 updates of batch 4 on the real DiT; the student samples with no flags at nfe calls (the
    teacher's guided sampler at the same steps makes 2 nfe); a progressive student of it uses guidance 1."""
    result = hasten.distill(teacher="mnist-dit", method="guidance", nfe=3, guidance=3.0, batch_size=4, minutes=5,
                            out=tmp_path / "guided", max_steps=2, progress=False)  # fmt: skip
    assert result.steps == 2 and math.isfinite(result.final_loss)
    student = load(tmp_path / "guided")
    assert student.info.sampler == {"solver": "dpmpp_2m", "options": {}, "schedule": "auto", "steps": 3,
                                    "guidance": 1.0}  # fmt: skip
    assert student.info.distillation["method"] == "guidance"
    assert student.info.distillation["config"]["guidance"] == 3.0 and student.info.null_class == 10
    rows = count_rows(student)
    generation = hasten.generate(student, 2)
    assert generation.nfe == 3 and rows == [2, 2, 2]  # one unguided call of the batch per step
    teacher = load("mnist-dit")
    teacher_rows = count_rows(teacher)
    guided = hasten.generate(teacher, 2, solver="dpmpp_2m", steps=3, guidance=3.0)
    assert guided.nfe == 3 and teacher_rows == [4, 4, 4]  # the CFG batch: two evaluations per image per step

    method = prepare(DistillConfig(teacher=str(tmp_path / "guided"), method="progressive", nfe=1, batch_size=4,
                                   options={"start_steps": 2}))  # fmt: skip
    assert method.config.guidance == 1.0
    rows = count_rows(method.teacher)
    method.teacher_denoise(torch.randn(4, 1, 28, 28), torch.full((4,), 2.0), torch.tensor([0, 1, 2, 10]))
    assert rows == [4]  # the guidance student is the teacher as it is, one call
    chained = hasten.distill(teacher=str(tmp_path / "guided"), method="progressive", nfe=1, batch_size=4,
                             minutes=5, out=tmp_path / "chained", max_steps=1, progress=False,
                             options={"start_steps": 2})  # fmt: skip
    assert chained.steps == 1
    final = load(tmp_path / "chained")
    with pytest.raises(ValueError, match="already learned guidance 3"):  # CFG on top would apply it twice
        hasten.generate(student, 1, guidance=2.0)
    record = final.info.distillation  # it stands in for the original model, at the guidance it inherited
    assert record["teacher"] == "mnist-dit" and [step["student"] for step in record["lineage"]] == ["guided"]
    assert record["guidance"] == 3.0 and hasten.generate(final, 1).nfe == 1
    with pytest.raises(ValueError, match="would compound"):  # a second scale on top of the learned one
        prepare(DistillConfig(teacher=str(tmp_path / "guided"), method="progressive", nfe=1, batch_size=4,
                              guidance=2.0, options={"start_steps": 2}))  # fmt: skip

"""The distillation spine (driver, student folders, own sampler, CLI refusals) and progressive distillation."""

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import hasten
from hasten.cli.app import app
from hasten.distill import METHODS, DistillConfig
from hasten.distill.progressive import Progressive, ProgressiveOptions, progressive_target
from hasten.models.analytic import ProductMixture, as_network
from hasten.models.zoo import LoadedModel, ModelInfo, make_denoiser
from hasten.solvers._base import ddim_step

RUNNER = CliRunner()


def _run(args):
    return RUNNER.invoke(app, args)


# -- progressive distillation: the target and its weights ------------------------------------------------------


@pytest.mark.parametrize("sigma_next", [0.7, 0.0])
def test_progressive_target_lands_one_ddim_step_on_the_teachers_two(sigma_next):
    """One student DDIM step with the target x~ from x_t ends exactly where the teacher's two steps ended."""
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64) * 4.0
    x_next = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    sigma_t = torch.full((5,), 4.0, dtype=torch.float64)
    sigma_n = torch.full((5,), sigma_next, dtype=torch.float64)
    target = progressive_target(x_t, x_next, sigma_t, sigma_n)
    assert torch.isfinite(target).all()
    torch.testing.assert_close(ddim_step(x_t, target, sigma_t, sigma_n), x_next, rtol=1e-12, atol=1e-12)
    if sigma_next == 0.0:
        torch.testing.assert_close(target, x_next)  # the last interval: the teacher's own end point


class _Corrected(nn.Module):
    """An exact analytic network plus a small learnable correction that starts at zero (a student that starts as
    its teacher, like a copy of a real teacher's weights)."""

    def __init__(self, exact: nn.Module, dim: int) -> None:
        super().__init__()
        self.exact = exact
        self.mlp = nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x_t, t, **cond):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(x_t.shape[0])
        features = torch.cat([x_t.flatten(1), (t / 1000.0)[:, None]], dim=1)
        return self.exact(x_t, t) + self.mlp(features.float()).to(x_t.dtype).view_as(x_t)


def _analytic_teacher() -> tuple[LoadedModel, ProductMixture]:
    mixture = ProductMixture()
    info = ModelInfo(name="mixture", arch="toy", objective="x0", image_shape=(1, 2, 2), num_classes=0, data="")
    network = _Corrected(as_network(mixture, info.schedule(), "x0"), 4)
    return LoadedModel(make_denoiser(network, info), network, info, pathlib.Path("."), "analytic"), mixture


def test_progressive_one_step_student_reproduces_the_teachers_two_step_map():
    """On the analytic mixture (exact teacher), a 1-step student trained from the teacher's 2-step DDIM map
    reproduces that map from pure noise: its error to the map falls to a small fraction of where it started."""
    torch.manual_seed(0)
    teacher, mixture = _analytic_teacher()
    config = DistillConfig(teacher="analytic", method="progressive", nfe=1, batch_size=128, lr=3e-3, cfg_dropout=0.0,
                           ema_decay=0.9)  # fmt: skip
    options = ProgressiveOptions(start_steps=2, parameterisation="x0")
    Progressive.check(teacher, config, options)
    method = Progressive(teacher, config, options, torch.device("cpu"))
    method.build()
    sigmas = method.sigmas(2)
    gen = torch.Generator().manual_seed(123)
    x_T = torch.randn(512, 1, 2, 2, generator=gen) * teacher.schedule.initial_noise_scale(float(sigmas[0]))

    def teacher_two_steps(x):
        return hasten.sample(teacher.denoiser, x, sigmas, "euler")

    def student_one_step(net):
        return hasten.sample(method.student_denoiser(net), x_T, method.sigmas(1), "euler")

    with torch.no_grad():
        reference = teacher_two_steps(x_T)
        before = (student_one_step(method.student) - reference).pow(2).mean().sqrt().item()
    data_gen = torch.Generator().manual_seed(7)
    for index in range(400):
        x0 = mixture.sample((128, 1, 2, 2), generator=data_gen).float()
        method.step(index, x0, None)
    with torch.no_grad():
        after = (student_one_step(method.student) - reference).pow(2).mean().sqrt().item()
    assert before > 0.1  # one DDIM step is far from two on this mixture
    assert after < 0.25 * before, (before, after)


def test_progressive_refuses_what_it_cannot_make():
    teacher, _ = _analytic_teacher()
    config = DistillConfig(teacher="analytic", nfe=3)
    with pytest.raises(ValueError, match=r"start_steps \(32\) must be nfe \(3\) times a power of two"):
        Progressive.check(teacher, config, ProgressiveOptions())
    with pytest.raises(ValueError, match="parameterisation"):
        Progressive.check(teacher, DistillConfig(nfe=2), ProgressiveOptions(parameterisation="flow"))
    with pytest.raises(ValueError, match="weighting"):
        Progressive.check(teacher, DistillConfig(nfe=2), ProgressiveOptions(weighting="lpips"))


# -- the driver: student folders, the own sampler, exact resume -------------------------------------------------

SMOKE = dict(teacher="mnist-dit", method="progressive", nfe=2, batch_size=4, minutes=5,
             options={"start_steps": 8, "steps_per_round": 2})  # fmt: skip


def test_student_folder_samples_at_its_nfe_with_no_sampler_arguments(tmp_path):
    out = tmp_path / "student"
    result = hasten.distill(out=out, max_steps=3, progress=False, **SMOKE)
    assert result.steps == 3 and result.resumed_from_step == 0
    student = hasten.load(out)
    assert student.info.sampler == {"solver": "euler", "options": {}, "schedule": "auto", "steps": 2, "guidance": 1.0}
    record = student.info.distillation
    assert record["method"] == "progressive" and record["nfe"] == 2 and record["teacher"] == "mnist-dit"
    assert record["teacher_fingerprint"] == hasten.load("mnist-dit").fingerprint and record["seconds"] > 0
    assert student.info.objective == "flow"  # a flow teacher's student keeps the velocity head
    assert (out / "MODEL_CARD.md").read_text().startswith("# student")
    assert hasten.generate(student, 3).nfe == 2  # its own sampler
    assert hasten.generate(student, 3, steps=4).nfe > 2  # any sampler argument: the library's defaults fill in
    # the CLI too: no sampler flag, the student's sampler
    done = _run(["sample", "--model", str(out), "--n", "2", "--out", str(tmp_path / "g.png"), "--format", "json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["nfe"] == 2
    measured = _run(["evaluate", "--model", str(out), "--n", "10", "--no-reference", "--format", "json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.output.strip().splitlines()[-1])["nfe"] == 2


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    hasten.distill(out=straight, max_steps=4, progress=False, **SMOKE)  # crosses a round boundary at step 2
    hasten.distill(out=interrupted, max_steps=2, progress=False, **SMOKE)
    again = hasten.distill(out=interrupted, resume=True, max_steps=4, progress=False, **SMOKE)
    assert again.resumed_from_step == 2
    a = load_file(str(straight / "checkpoint" / "state.safetensors"))
    b = load_file(str(interrupted / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = json.loads((straight / "checkpoint" / "state.json").read_text())
    assert state_a["method.state"]["round"] == 1


def test_a_student_of_a_student_stands_in_for_the_original_model(tmp_path):
    """Chained students (e.g. MMD fine-tuning of a progressive student) record the original model as their
    teacher (the converged sampler they are judged against), the chain, and what the earlier students cost."""
    first, second = tmp_path / "first", tmp_path / "second"
    hasten.distill(out=first, max_steps=1, progress=False, **SMOKE)
    hasten.distill(out=second, max_steps=1, progress=False, **{**SMOKE, "teacher": str(first), "nfe": 1,
                                                                "options": {"start_steps": 2}})  # fmt: skip
    parent = hasten.load(first).info.distillation
    record = hasten.load(second).info.distillation
    assert record["teacher"] == "mnist-dit" and record["teacher_fingerprint"] == parent["teacher_fingerprint"]
    assert [step["student"] for step in record["lineage"]] == ["first"]
    assert record["lineage"][0]["fingerprint"] == hasten.load(first).fingerprint
    assert record["parent_seconds"] == pytest.approx(parent["seconds"] + parent["extra_seconds"], abs=0.11)
    assert "via `first` (progressive)" in (second / "MODEL_CARD.md").read_text()
    from hasten.recipe import student_recipe

    recipe = student_recipe(second, teacher_fingerprint=parent["teacher_fingerprint"])  # judged against mnist-dit
    assert recipe.student["training_seconds"] >= record["seconds"] + record["parent_seconds"] - 0.1


def test_driver_refusals(tmp_path):
    out = tmp_path / "s"
    hasten.distill(out=out, max_steps=1, progress=False, **SMOKE)
    with pytest.raises(FileExistsError, match="already holds files"):
        hasten.distill(out=out, max_steps=1, progress=False, **SMOKE)
    with pytest.raises(ValueError, match=r"other settings \(batch_size 4 -> 8\)"):
        hasten.distill(out=out, resume=True, max_steps=2, progress=False, **{**SMOKE, "batch_size": 8})
    with pytest.raises(KeyError, match="unknown distillation method 'nope'"):
        hasten.distill(out=tmp_path / "t", progress=False, **{**SMOKE, "method": "nope"})
    with pytest.raises(TypeError, match="does not take option"):
        hasten.distill(out=tmp_path / "t", progress=False, **{**SMOKE, "options": {"bogus": 1}})
    with pytest.raises(TypeError, match="does not take option"):
        hasten.distill(out=tmp_path / "t", progress=False, bogus_setting=1, **SMOKE)
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        DistillConfig(nfe=0)
    assert not (tmp_path / "t").exists()  # nothing written for a refused run
    assert "progressive" in METHODS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "--method 'nope' is not a distillation method"),
        (["--nfe", "3"], "start_steps (32) must be nfe (3) times a power of two"),
        (["--option", "bogus=1"], "does not take option(s) 'bogus'"),
        (["--option", "start_steps"], "must look like key=value"),
        (["--teacher", "no-such-model"], "no hasten model 'no-such-model'"),
        (["--lr", "0"], "lr must be a finite number > 0"),
        (["--cfg-dropout", "1"], "cfg_dropout must be in [0, 1)"),
    ],
)
def test_cli_bad_input_exits_2_before_any_work(tmp_path, args, message):
    base = {"--teacher": "mnist-dit", "--method": "progressive", "--nfe": "2", "--out": str(tmp_path / "o")}
    base.update(zip(args[::2], args[1::2], strict=True))
    flat = [item for pair in base.items() for item in pair]
    done = _run(["distill", *flat, "--max-steps", "1", "--batch-size", "2"])
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert not (tmp_path / "o").exists()


def test_cli_existing_out_needs_resume(tmp_path):
    out = tmp_path / "o"
    common = ["distill", "--teacher", "mnist-dit", "--method", "progressive", "--nfe", "2", "--out", str(out),
              "--batch-size", "2", "--option", "start_steps=4", "--format", "json"]  # fmt: skip
    done = _run([*common, "--max-steps", "1"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["steps"] == 1
    refused = _run([*common, "--max-steps", "2"])
    assert refused.exit_code == 2 and "pass --resume" in refused.output
    changed = _run([*common, "--max-steps", "2", "--resume", "--lr", "0.001"])
    assert changed.exit_code == 2 and "lr 0.0001 -> 0.001" in changed.output
    resumed = _run([*common, "--max-steps", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output.strip().splitlines()[-1])["resumed_from_step"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    other = _run([*common[:8], str(tmp_path / "other"), *common[9:], "--resume"])
    assert other.exit_code == 2 and "no distillation checkpoint" in other.output
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["mnist-dit-fast", "mnist-unet-fast"])
def test_bundled_students_load_by_name_and_sample_at_their_nfe(name):
    """The shipped students: loaded by name, distilled from the bundled teacher's weights (fingerprint), sampled
    with no sampler arguments at their own NFE, with a card that states method, cost and measured quality."""
    student = hasten.load(name)
    record = student.info.distillation
    assert record["teacher_fingerprint"] == hasten.load(record["teacher"]).fingerprint
    assert hasten.generate(student, 2).nfe == record["nfe"] == student.info.sampler["steps"]
    folder = student.folder
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20
    assert not (folder / "checkpoint").exists() and not (folder / "method").exists()
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"`{record['method']}`" in card and "Training cost" in card and "| NFE | FD |" in card
    assert json.loads((folder / "hasten.json").read_text())["quality"]["student"]["fd"] > 0

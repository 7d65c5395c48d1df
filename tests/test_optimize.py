"""hasten optimize: the search on a synthetic world with a known answer, the budget rules, and an end-to-end run
on a tiny model (caches and quantisation composed, recipe replayed, resume after a kill, refusals)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import pytest
import torch

import hasten
from hasten.optimize import CONFIRM_SEED, OptimizeConfig, OptimizeError, Optimizer, optimize
from hasten.recipe import load_recipe

# -- a synthetic world: quality and cost of every recipe are known, so the best composition is too ----------

FINGERPRINT = "a" * 64
REFERENCE_FD = 100.0
# FD loss at s steps = error / s: dpmpp_2m on karras is the best stock family (0.29 / 6 < 5% at 6 steps)
ERROR = {
    ("euler", "auto"): 0.6,
    ("euler", "karras"): 0.5,
    ("dpmpp_2m", "auto"): 0.4,
    ("dpmpp_2m", "karras"): 0.29,
    ("unipc", "auto"): -0.45,
}  # an FD *below* the reference's: unipc's error lowers FD, as UniPC-bh1 can


class World(Optimizer):
    """Measures nothing: FD from the table above, one time unit per network call."""

    def __init__(self, *args, plan_loss=None, confirm_penalty=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan_loss = plan_loss or {}
        self.confirm_penalty = confirm_penalty
        self.measured = []

    def reference(self, seed):
        self.reference_fd[seed] = REFERENCE_FD
        return None

    def measure(self, recipe, seed):
        self.measured.append((recipe.digest(), seed))
        if recipe.plan is not None:
            loss = self.plan_loss[recipe.plan.nfe] + (self.confirm_penalty if seed == CONFIRM_SEED else 0.0)
            nfe = recipe.plan.nfe
        else:
            loss, nfe = ERROR[(recipe.solver, recipe.schedule)] / recipe.steps, recipe.steps
        return {"fd": REFERENCE_FD * (1 + loss), "rmse_ref": loss / 10, "nfe": nfe, "seconds": float(nfe),
                "nfe_equivalent": float(nfe)}  # fmt: skip

    def time_pair(self, base, candidate):
        return [float(self.evaluations[base.digest()]["nfe"])], [float(self.evaluations[candidate.digest()]["nfe"])]


def _fake_model():
    info = types.SimpleNamespace(name="synthetic", data="mnist", objective="eps")
    return types.SimpleNamespace(info=info, fingerprint=FINGERPRINT, folder=None, default_guidance=1.0, network=None)


def _plan(nfe):
    sigmas = [*torch.logspace(1, -2, nfe).tolist(), 0.0]
    return hasten.Plan(tuple(sigmas), "dpmpp_2m", nfe=nfe, fingerprint=FINGERPRINT)


def _config(tmp_path, **changes):
    plans = tmp_path / "plans"
    plans.mkdir(exist_ok=True)
    for nfe in (3, 4):
        hasten.tune.save_plan(_plan(nfe), plans / f"nfe{nfe}.json")
    base = OptimizeConfig(minutes=5, solvers=("euler", "dpmpp_2m"), schedules=("auto", "karras"), peers=False,
                          tune_share=0.0, caches=False, quant=(), timed=20, plans=(str(plans),))  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_search_finds_the_known_best_composition(tmp_path):
    world = World(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    result = world.run()
    # the stock baseline: the first family passing 5% at the lowest NFE (dpmpp_2m karras, 0.29 / 6 = 4.8%)
    assert result.baseline["label"].startswith("dpmpp_2m (karras, 6 steps)")
    # the answer: the 4-NFE plan (the 3-NFE one fails), 6/4 = 1.5x the baseline
    assert result.recipe.kind == "plan" and result.recipe.plan.nfe == 4
    assert result.chosen["speedup"] == pytest.approx(1.5) and result.chosen["confirmation"]["passed"]
    assert [row["step"] for row in result.path] == ["stock sampler", "+ tuned plans"]
    # the lead families (default grid) climb until one passes (dpmpp_2m at 10); the others start just below
    # the best NFE and go lower only while they pass
    runs = {}
    for r in world.evaluations.values():  # in evaluation order
        if r["stage"] == "stock":
            recipe = r["recipe"]
            runs.setdefault((recipe.solver, recipe.schedule), []).append(recipe.steps)
    # the written result keeps every evaluation, the full recipe of the timed ones
    assert len(result.evaluations) == len(world.evaluations)
    assert all(("recipe" in r) == ("speedup" in r) for r in result.evaluations)
    assert runs == {("euler", "auto"): [2, 3, 4, 5, 6, 7, 8, 10], ("dpmpp_2m", "auto"): [2, 3, 4, 5, 6, 7, 8, 10],
                    ("euler", "karras"): [8], ("dpmpp_2m", "karras"): [8, 7, 6, 5]}  # fmt: skip
    assert result.front and all("speedup" in r for r in result.front)


def test_a_candidate_failing_confirmation_is_not_chosen(tmp_path):
    world = World(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04}, confirm_penalty=0.05)
    result = world.run()
    assert result.recipe.kind == "stock" and result.chosen["label"].startswith("dpmpp_2m (karras, 6 steps)")
    failed = [r for r in result.evaluations if r.get("confirmation") and not r["confirmation"]["passed"]]
    assert [r["label"].split(" ")[0] for r in failed] == ["plan[nfe4.json]"]
    from hasten.cli.app import _not_kept  # the summary says why a faster candidate was not chosen

    assert _not_kept(result) == ["  not kept: plan[nfe4.json] (4 steps, NFE 4): 1.50x, failed confirmation (+9.0% "
                                 f"on seed {CONFIRM_SEED})"]  # fmt: skip


def test_an_fd_below_the_reference_is_a_loss_too(tmp_path):
    config = _config(tmp_path, solvers=("unipc",), schedules=("auto",), plans=())
    result = World(_fake_model(), config, tmp_path).run()
    assert result.baseline["label"].startswith("unipc (auto, 10 steps)")  # -4.5%; at 8 steps -5.6% fails
    assert result.baseline["quality_loss"] == pytest.approx(-0.045)


def test_nothing_meets_the_budget(tmp_path):
    world = World(_fake_model(), _config(tmp_path, max_quality_loss=0.001), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    result = world.run()
    assert result.recipe is None and result.chosen is None
    assert result.closest["quality_loss"] == pytest.approx(0.29 / 50)  # dpmpp_2m karras at the last rung


def test_evaluations_are_cached_across_runs(tmp_path):
    first = World(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    first.run()
    second = World(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    second.run()
    assert [seed for _, seed in second.measured] == [CONFIRM_SEED]  # only the confirmation is measured again
    assert sum(r["cached"] for r in second.evaluations.values()) == len(second.evaluations)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"minutes": float("inf")}, "minutes must be a finite number > 0"),
        ({"minutes": 0}, "minutes must be a finite number > 0"),
        ({"max_quality_loss": float("nan")}, "max_quality_loss must be a finite number"),
        ({"n": 5}, "n must be >= 10"),
        ({"quant": ("w2a2",)}, "quant modes ['w2a2'] are unknown"),
        ({"solvers": ("unipc:ordr=3",)}, "solver spec 'unipc:ordr=3'"),
        ({"tune_share": 1.0}, "tune_share must be a finite number >= 0 and <= 0.9"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(OptimizeError) as err:
        OptimizeConfig(**changes)
    assert message in str(err.value)


# -- end to end on a tiny trained model ------------------------------------------------------------------------


def _tiny_config(**changes):
    base = OptimizeConfig(max_quality_loss=5.0, minutes=4, n=10, reference_steps=8, solvers=("dpmpp_2m",),
                          schedules=("auto",), peers=False, tune_share=0.0, quant=("w8a8",), top_k=1, timed=4,
                          n_time=10, timing_repeats=1)  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_optimize_end_to_end_composes_and_replays(tiny_model, tmp_path):
    model = hasten.load(tiny_model)
    out = tmp_path / "recipe.json"
    result = optimize(model, _tiny_config(), out)
    kinds = {r["kind"] for r in result.evaluations}
    assert {"stock", "cache", "quant"} <= kinds  # caches calibrated on the sampler, quantised weights under it
    composed = [r for r in result.evaluations if r["stage"] == "quant" and " + cache " in r["label"]]
    assert composed, "a cache and quantised weights on one network"
    recipe = load_recipe(out)
    assert recipe.digest() == result.chosen["digest"]
    if recipe.quant is not None:  # the quantised weights lie beside the recipe, not in the search's cache
        assert pathlib.Path(recipe.quant).resolve().parent == tmp_path.resolve()
    replay = hasten.generate(recipe.load_model(), 4, recipe=recipe)
    assert replay.images01.shape[0] == 4
    work = tmp_path / "recipe.optimize"
    assert (work / "report.html").read_text().count("data:image/png;base64") == 1
    assert json.loads((work / "optimize.json").read_text())["chosen"]["digest"] == recipe.digest()
    # an existing output is refused, and nothing is touched
    before = out.read_bytes()
    with pytest.raises(OptimizeError, match="pass --resume"):
        optimize(model, _tiny_config(), out)
    assert out.read_bytes() == before


def test_resume_after_a_kill_loses_at_most_one_evaluation(tiny_model, tmp_path):
    model = hasten.load(tiny_model)
    out = tmp_path / "r.json"
    seen = []

    def killer(kind, row):
        seen.append(row["digest"])
        if len(seen) == 3:
            raise KeyboardInterrupt  # the process dies after its third evaluation was written

    config = _tiny_config(quant=(), caches=False, solvers=("dpmpp_2m", "euler"), schedules=("auto", "karras"),
                          max_quality_loss=0.0001)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        optimize(model, config, out, on_event=killer)
    assert not out.exists()
    with pytest.raises(OptimizeError, match="pass --resume"):
        optimize(model, config, out)
    again = optimize(model, config, out, resume=True)
    cached = [r for r in again.evaluations if r["cached"]]
    assert {r["digest"] for r in cached} >= set(seen[:3])


def test_cli_optimize(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from hasten.cli.app import app

    runner = CliRunner()
    out = tmp_path / "recipe.json"
    base = ["optimize", "--model", tiny_model, "--n", "10", "--solver", "dpmpp_2m", "--no-peers", "--tune-share",
            "0", "--no-caches", "--no-quant", "--minutes", "3", "--out", str(out)]  # fmt: skip
    none = runner.invoke(app, [*base, "--max-quality-loss", "0", "--max-rmse", "1e-9"])
    assert none.exit_code == 3, none.output
    assert "nothing meets the budget" in none.output and "closest" in none.output and not out.exists()
    ok = runner.invoke(app, [*base, "--max-quality-loss", "5", "--force", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout.strip().splitlines()[-1])
    assert data["out"] == str(out) and data["chosen"]["confirmation"]["passed"]
    replay = runner.invoke(app, ["sample", "--recipe", str(out), "--n", "2", "--out", str(tmp_path / "g.png")])
    assert replay.exit_code == 0, replay.output
    before = out.read_bytes()
    for args, message in (
        (["--minutes", "inf"], "minutes must be a finite number"),
        (["--minutes", "0.001", "--force"], "too short here"),
        (["--plan", str(tmp_path / "missing.json")], "does not exist"),
        ([], "pass --resume"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--student", tiny_model], "is not a distilled student"),
    ):
        bad = runner.invoke(app, [*base, *args])  # a later --out wins over the base's
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert out.read_bytes() == before  # untouched by the refused runs


def test_optimize_paths_are_plain_data(tmp_path):
    world = World(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    json.dumps(world.run().to_dict(), default=str)
    assert pathlib.Path(tmp_path).exists()


# -- distilled students as candidates ----------------------------------------------------------------------------


def _student_of(source, folder, teacher_fingerprint):
    """A copy of the student folder ``source`` recorded as distilled from ``teacher_fingerprint``."""
    import shutil

    shutil.copytree(source, folder)
    info = json.loads((folder / "hasten.json").read_text())
    info["distillation"]["teacher_fingerprint"] = teacher_fingerprint
    (folder / "hasten.json").write_text(json.dumps(info))
    return folder


class StudentWorld(World):
    """The synthetic world with one more candidate: a student, 2 NFE at a 2% FD loss."""

    def measure(self, recipe, seed):
        if recipe.student is None:
            return super().measure(recipe, seed)
        self.measured.append((recipe.digest(), seed))
        return {"fd": REFERENCE_FD * 1.02, "rmse_ref": 0.002, "nfe": recipe.steps, "seconds": float(recipe.steps),
                "nfe_equivalent": float(recipe.steps)}  # fmt: skip


def test_a_student_is_a_candidate_and_the_speedup_stays_against_the_teachers_stock(tiny_student, tmp_path):
    student = _student_of(tiny_student, tmp_path / "student", FINGERPRINT)
    world = StudentWorld(_fake_model(), _config(tmp_path, students=(str(student),)), tmp_path,
                         plan_loss={3: 0.09, 4: 0.04})  # fmt: skip
    assert [r.student["teacher_fingerprint"] for r in world.student_recipes()] == [FINGERPRINT]
    result = world.run()
    # the baseline and the best stock configuration are still the teacher's own sampler
    assert result.baseline["label"].startswith("dpmpp_2m (karras, 6 steps)") and result.best_stock["kind"] == "stock"
    (row,) = [r for r in result.evaluations if r["stage"] == "students"]
    assert row["kind"] == "student" and row["label"] == "student[student, progressive] euler (auto, 2 steps)"
    # the student wins: 2 NFE against the 6-NFE baseline, and the recipe written names the student's folder
    assert result.recipe.kind == "student" and result.recipe.model == str(student.resolve())
    assert result.chosen["speedup"] == pytest.approx(3.0)
    assert [step["step"] for step in result.path] == ["stock sampler", "+ distilled students"]


def test_students_of_other_weights_are_refused_or_skipped(tiny_student, tmp_path, monkeypatch):
    other = _student_of(tiny_student, tmp_path / "other", "f" * 16)
    world = StudentWorld(_fake_model(), _config(tmp_path, students=(str(other),)), tmp_path)
    with pytest.raises(OptimizeError, match=f"weights ffffffffffff\\), not from 'synthetic' \\(weights {'a' * 12}\\)"):
        world.student_recipes()
    with pytest.raises(OptimizeError, match=r"--student .*nope.* is not a bundled model or a model folder"):
        OptimizeConfig(students=(str(tmp_path / "nope"),))
    # the bundled <model>-fast: taken when it is a student of these weights, skipped (with a note) when not
    import hasten.models.zoo as zoo

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(zoo, "BUNDLED", bundled)
    fast = _student_of(tiny_student, bundled / "synthetic-fast", FINGERPRINT)
    world = StudentWorld(_fake_model(), _config(tmp_path), tmp_path)
    assert [r.model for r in world.student_recipes()] == ["synthetic-fast"]
    assert world.student_recipes()[0].fingerprint == zoo.folder_fingerprint(fast)
    no_default = StudentWorld(_fake_model(), _config(tmp_path, bundled_students=False), tmp_path)
    assert no_default.student_recipes() == []
    info = json.loads((fast / "hasten.json").read_text())
    info["distillation"]["teacher_fingerprint"] = "f" * 16
    (fast / "hasten.json").write_text(json.dumps(info))
    world = StudentWorld(_fake_model(), _config(tmp_path), tmp_path)
    assert world.student_recipes() == [] and "skipped the bundled synthetic-fast" in world.notes[0]


def test_a_student_is_scored_against_the_teachers_reference_and_quantised(tiny_model, tiny_student, tmp_path):
    from hasten.metrics.reference import reference_samples, rmse

    teacher, student = hasten.load(tiny_model), hasten.load(tiny_student)
    config = _tiny_config(students=(tiny_student,), caches=False, bundled_students=False)
    optimizer = Optimizer(teacher, config, tmp_path)
    optimizer.stage_students()
    (row,) = optimizer.evaluations.values()
    assert row["kind"] == "student" and row["stage"] == "students" and row["nfe"] == 2
    # the student's own sampler on the held-out noise, against the teacher's converged sampler on that noise
    images = hasten.generate(student, config.n, seed=0).images01
    reference = reference_samples(teacher, config.n, seed=0, guidance=1.0, steps=config.reference_steps)
    assert row["rmse_ref"] == pytest.approx(rmse(images, reference), rel=1e-6, abs=1e-9)
    assert row["quality_loss"] == pytest.approx(row["fd"] / optimizer.reference_fd[0] - 1.0)
    # quantisation builds on a passing student: the student's own weights, quantised
    optimizer.stage_quant()
    (quant,) = [r for r in optimizer.evaluations.values() if r["stage"] == "quant"]
    assert quant["recipe"].student is not None and quant["recipe"].fingerprint == student.fingerprint
    source = json.loads((pathlib.Path(quant["recipe"].quant) / "hasten.json").read_text())["quantization"]["source"]
    assert source["fingerprint"] == student.fingerprint


def test_a_bundled_pruned_model_is_tried_at_its_own_and_at_the_baselines_sampler(tiny_student, tmp_path, monkeypatch):
    """A pruned network is a full sampler's network: besides its own sampler it runs the stock baseline's."""
    import hasten.models.zoo as zoo

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(zoo, "BUNDLED", bundled)
    pruned = _student_of(tiny_student, bundled / "synthetic-pruned", FINGERPRINT)
    info = json.loads((pruned / "hasten.json").read_text())
    info["distillation"]["method"] = "prune"
    (pruned / "hasten.json").write_text(json.dumps(info))
    world = StudentWorld(_fake_model(), _config(tmp_path), tmp_path, plan_loss={3: 0.09, 4: 0.04})
    assert [r.model for r in world.student_recipes()] == ["synthetic-pruned"]
    result = world.run()
    labels = sorted(r["label"] for r in result.evaluations if r["stage"] == "students")
    assert len(labels) == 2 and all(label.startswith("student[synthetic-pruned, prune]") for label in labels)
    assert any("euler (auto, 2 steps)" in label for label in labels)  # its own sampler
    assert any("dpmpp_2m (karras, 6 steps)" in label for label in labels)  # the baseline's


def test_exit_heads_join_the_caches_stage_for_the_models_own_network_only(tmp_path, monkeypatch):
    import hasten.accel.calibrate as calibrate

    asked = []
    monkeypatch.setattr(calibrate, "techniques_for", lambda network, exit_heads=None: asked.append(exit_heads) or [])
    model = _fake_model()
    world = World(model, _config(tmp_path, caches=True, exit_heads="heads.safetensors"), tmp_path)
    student = types.SimpleNamespace(network=None)
    monkeypatch.setattr(world, "bases", lambda: [hasten.Recipe(model="synthetic"), hasten.Recipe(model="other")])
    monkeypatch.setattr(world, "model_for", lambda base: model if base.model == "synthetic" else student)
    monkeypatch.setattr(calibrate, "calibration_setting", lambda model, base: {})
    world.stage_caches()
    assert asked == ["heads.safetensors", None]  # a student's network gets no heads made for the model's weights

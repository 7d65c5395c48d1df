"""Per-step model assembly: a plan's steps split between the model and a student of it (plan field, execution by one
registry hook, the student's checks, cost, the tuner's stage)."""

import dataclasses
import json
import pathlib
import shutil

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.accel.assembly import assemble, call_share, check_student, installed_assembly, load_student
from hasten.cli.app import app
from hasten.hooks import add_hook, hooked_modules, remove_hooks
from hasten.schedules import get_sigmas
from hasten.tune import Assembly, Plan, PlanError, TuneConfig, TuneError, load_plan, save_plan, tune
from hasten.tune.fit import multistep_samples


@pytest.fixture(scope="module")
def model(tiny_model):
    return hasten.load(tiny_model)


@pytest.fixture(scope="module")
def student(tiny_student):
    return hasten.load(tiny_student)


@pytest.fixture(scope="module")
def pruned(tiny_model, tmp_path_factory):
    """The tiny model with two of its blocks removed and one fine-tune step: a student cheaper per call."""
    out = tmp_path_factory.mktemp("pruned") / "pruned"
    hasten.prune(tiny_model, out, structure="blocks", blocks=(1, 3), batch_size=4, max_steps=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def twin(tiny_model, tmp_path_factory):
    """The model's own weights in a folder that says it was distilled from them: a student that is the model."""
    folder = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(tiny_model, folder)
    model = hasten.load(tiny_model)
    info = json.loads((folder / "hasten.json").read_text())
    info["name"] = "twin"
    info["distillation"] = {"method": "copy", "teacher": model.info.name, "teacher_fingerprint": model.fingerprint,
                            "lineage": []}  # fmt: skip
    (folder / "hasten.json").write_text(json.dumps(info))
    return str(folder)


def _sample_recording_own_steps(network, *args, **kwargs):
    """``hasten.generate(*args, **kwargs)`` and the steps at which ``network`` itself ran. The recording hook is
    added before the run's assembly, so it sits inside it: it sees only the calls the network answers."""
    own_steps = []

    def record(forward, *a, **kw):
        own_steps.append(hasten._context.current_step_index())
        return forward(*a, **kw)

    handle = add_hook(network, "test/record", record)
    try:
        with torch.no_grad():
            return hasten.generate(*args, **kwargs), own_steps
    finally:
        remove_hooks([handle])


def _plan(model, assembly=None, steps=4, **fields) -> Plan:
    sigmas = tuple(get_sigmas("auto", steps, model.schedule).tolist())
    return Plan(sigmas, "dpmpp_2m", nfe=steps, model=model.info.name, fingerprint=model.fingerprint,
                assembly=assembly, **fields)  # fmt: skip


def _assembly(student_ref, student, steps, share=0.5) -> Assembly:
    return Assembly(str(student_ref), student.fingerprint, tuple(steps), share)


def test_an_assembly_plan_is_schema_3_round_trips_and_costs_its_student_calls(model, student, tiny_student, tmp_path):
    plan = _plan(model, _assembly(tiny_student, student, (3, 0), share=0.25))
    assert plan.assembly.steps == (0, 3) and plan.per_step_architecture == "assembly"
    assert plan.cost == pytest.approx(4 - 2 * 0.75)
    data = plan.to_dict()
    assert data["schema_version"] == 3 and data["assembly"]["steps"] == [0, 3] and data["cost"] == plan.cost
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path) == plan and load_plan(path).digest() == plan.digest()
    assert plan.digest() != _plan(model).digest()  # the student's steps are part of what the plan samples
    assert "at steps 0,3" in plan.describe() and "cost 2.50" in plan.describe()
    assert _plan(model).to_dict()["schema_version"] == 1 and "assembly" not in _plan(model).to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": [0, 4]}, "names step 4, but the plan has 4 steps"),
        ({"steps": [1, 1]}, "names a step twice"),
        ({"steps": []}, "non-empty list of step indices"),
        ({"steps": [-1]}, "not a step index"),
        ({"call_share": 0}, "call_share must be in \\(0, 1\\]"),
        ({"call_share": 1.5}, "call_share must be in \\(0, 1\\]"),
        ({"student": ""}, "student must name a model"),
        ({"fingerprint": ""}, "fingerprint must be"),
        ({"extra": 1}, "unknown field\\(s\\) \\['extra'\\]"),
    ],
)
def test_a_bad_assembly_is_refused_by_name(model, student, tiny_student, change, message):
    data = {**_assembly(tiny_student, student, (1,)).to_dict(), **change}
    with pytest.raises(PlanError, match=message):
        _plan(model, data)


def test_a_plan_file_with_a_mismatched_cost_skips_too_or_an_old_schema_is_refused(model, student, tiny_student):
    data = _plan(model, _assembly(tiny_student, student, (1,))).to_dict()
    with pytest.raises(PlanError, match="does not match its assembly"):
        Plan.from_dict({**data, "cost": 1.0})
    with pytest.raises(PlanError, match="assemblies need schema 3"):
        Plan.from_dict({**data, "schema_version": 2, "cost": None})
    with pytest.raises(PlanError, match="not both"):
        Plan.from_dict({**data, "skip": [[0], [], [], []]})
    with pytest.raises(PlanError, match="is missing the field 'steps'"):
        Plan.from_dict({**data, "assembly": {k: v for k, v in data["assembly"].items() if k != "steps"}})


def test_a_student_with_the_models_own_weights_at_every_step_is_the_plain_plan_bit_for_bit(model, twin):
    other = load_student(model, twin)
    assert call_share(model, other) == pytest.approx(1.0)
    plan = _plan(model, _assembly(twin, other, range(4), share=1.0))
    with torch.no_grad():
        plain = hasten.generate(model, 4, plan=_plan(model), seed=3).images01
        assembled = hasten.generate(model, 4, plan=plan, seed=3).images01
    assert torch.equal(plain, assembled)


def test_the_student_answers_exactly_the_plans_steps_and_the_hook_comes_off(model, student, tiny_student):
    plan = _plan(model, _assembly(tiny_student, student, (0, 2)))
    gen, own_steps = _sample_recording_own_steps(model.network, model, 3, plan=plan, seed=1)
    assert own_steps == [1, 3] and gen.nfe == 4  # dpmpp_2m: one call per step; the student's two count as calls
    assert hooked_modules(model.network) == {} and installed_assembly(model.network) is None
    with torch.no_grad():
        plain = hasten.generate(model, 3, plan=_plan(model), seed=1).images01
        swapped = hasten.generate(student, 3, plan=_plan(model), seed=1, force_plan=True).images01
    assert not torch.equal(plain, gen.images01) and not torch.equal(swapped, gen.images01)


def test_the_hook_comes_off_after_an_error_and_refuses_a_second_student(model, student):
    with pytest.raises(RuntimeError, match="boom"), assemble(model, student, [0]):
        with pytest.raises(RuntimeError, match="already has a per-step student"), assemble(model, student, [1]):
            pass
        raise RuntimeError("boom")
    assert installed_assembly(model.network) is None and hooked_modules(model.network) == {}


def test_a_student_of_other_weights_or_conventions_or_changed_since_is_refused(model, student, tiny_student, twin):
    dit = hasten.load("mnist-dit")
    with pytest.raises(ValueError, match="was not made from the weights of 'mnist-dit'"):
        check_student(dit, student)
    check_student(dit, student, ancestor=model.fingerprint)  # a plan of the tiny model forced onto mnist-dit
    with pytest.raises(ValueError, match="has objective 'eps' where 'mnist-dit' has 'flow'"):
        check_student(dit, hasten.load("mnist-unet-pruned"))
    with pytest.raises(ValueError, match="not distilled or pruned from any model"):
        load_student(model, "mnist-dit")
    with pytest.raises(ValueError, match="the same network object"):
        check_student(model, model)
    consistency = dataclasses.replace(student, info=dataclasses.replace(student.info, consistency={"sigma_min": 0.002}))
    with pytest.raises(ValueError, match="is a consistency model"):
        check_student(model, consistency)
    record = {**student.info.distillation, "guidance": 2.0}
    guided = dataclasses.replace(student, info=dataclasses.replace(student.info, distillation=record))
    with pytest.raises(ValueError, match="learned guidance 2"):
        check_student(model, guided)
    stale = dataclasses.replace(_assembly(tiny_student, student, (1,)), fingerprint="0" * 16)
    with pytest.raises(ValueError, match="now has weights"):
        hasten.generate(model, 2, plan=_plan(model, stale))
    missing = dataclasses.replace(_assembly(tiny_student, student, (1,)), student="no-such-student")
    with pytest.raises(ValueError, match="the plan's student: no hasten model 'no-such-student'"):
        hasten.generate(model, 2, plan=_plan(model, missing))


def test_an_assembly_plan_refuses_a_cache_a_scheduler_and_a_recipe_with_a_cache(model, student, tiny_student):
    from hasten import Recipe, RecipeError
    from hasten.accel import BlockCacheConfig
    from hasten.pipelines import HastenScheduler

    plan = _plan(model, _assembly(tiny_student, student, (1,)))
    with pytest.raises(ValueError, match="cannot run under a cache"):
        hasten.generate(model, 2, plan=plan, accel=BlockCacheConfig())
    assert hooked_modules(model.network) == {}
    with pytest.raises(ValueError, match="runs a student network at some steps"):
        HastenScheduler.from_plan(plan)
    with pytest.raises(RecipeError, match="runs a student at some steps"):
        Recipe(model=model.info.name, fingerprint=model.fingerprint, plan=plan, cache=BlockCacheConfig())


def test_an_assembled_plan_composes_with_quantised_weights_in_a_recipe(model, pruned, tiny_model, tmp_path):
    from hasten import Recipe
    from hasten.quant.storage import quantize_to_folder

    other = hasten.load(pruned)
    plan = _plan(model, Assembly(pruned, other.fingerprint, (0, 3), call_share(model, other)))
    quantize_to_folder(tiny_model, hasten.QuantConfig(weights=8, activations=None), tmp_path / "q", n=32, steps=2)
    recipe = Recipe(model=tiny_model, fingerprint=model.fingerprint, plan=plan, quant=str(tmp_path / "q"))
    assert f"{pathlib.Path(pruned).name} at steps 0,3, cost {plan.cost:.2f}" in recipe.describe()
    quantised = recipe.load_model()
    assert quantised.fingerprint != model.fingerprint  # the plan is forced onto the quantised copy by the recipe
    gen, own_steps = _sample_recording_own_steps(quantised.network, quantised, 2, recipe=recipe)
    assert own_steps == [1, 2] and torch.isfinite(gen.images01).all()  # the float student at 0 and 3


def test_multistep_samples_takes_one_denoiser_per_step(model):
    from hasten.generate import guided_denoiser
    from hasten.tune.fit import dpmpp_2m_weights

    sigmas = get_sigmas("auto", 3, model.schedule)
    weights = [torch.tensor(r, dtype=torch.float32) for r in dpmpp_2m_weights(sigmas[:-1])]
    noise = torch.randn(2, *model.info.image_shape)
    cond = model.conditioning(torch.tensor([1, 2]), range(2))
    den = guided_denoiser(model, 1.0)
    calls = []

    def counted(x, s, **c):
        calls.append(1)
        return den(x, s, **c)

    with torch.no_grad():
        one = multistep_samples(den, model, sigmas[:-1].log(), weights, noise, cond)
        per_step = multistep_samples([den, counted, den], model, sigmas[:-1].log(), weights, noise, cond)
    assert torch.equal(one, per_step) and len(calls) == 1


def test_tune_with_a_student_chooses_its_steps_within_the_cost_and_fits_through_them(model, pruned, tmp_path):
    share = call_share(model, hasten.load(pruned))
    assert 0.5 < share < 1  # two of the blocks gone; the embeddings and the output layer stay
    config = TuneConfig(nfe=4, student=pruned, student_cost=4 - 2 * (1 - share) + 1e-6, minutes=30, n_search=4,
                        n_heldout=10, reference_steps=8, max_evaluations=12, fd_candidates=0, use_v3=False,
                        fit_iterations=2, fit_every=1, n_fit=4)  # fmt: skip
    out = tmp_path / "assembled.json"
    plan = tune(model, config, out, progress=False)
    assert plan.assembly is not None and len(plan.assembly.steps) == 2 and plan.cost <= config.student_cost
    record = plan.search["assembly"]
    assert [len(r["steps"]) for r in record["rounds"]] == [0, 1, 2]
    assert record["rounds"][1]["rmse_ref"] == min(record["rounds"][1]["tried"].values())
    assert "heldout_without_student" in record and load_plan(out) == plan
    assert plan.search["fit"]["iterations"] == 2


def test_tune_refuses_a_student_setting_it_cannot_honour(model, twin, tmp_path):
    with pytest.raises(TuneError, match="student and student_cost go together"):
        TuneConfig(nfe=4, student="x")
    with pytest.raises(TuneError, match=r"student_cost must be a number in \(0, nfe=4\)"):
        TuneConfig(nfe=4, student="x", student_cost=4)
    with pytest.raises(TuneError, match="not both"):
        TuneConfig(nfe=4, student="x", student_cost=3, skip_cost=3)
    config = TuneConfig(nfe=4, student=twin, student_cost=3.5, n_search=4, n_heldout=10, reference_steps=8,
                        max_evaluations=2, fd_candidates=0, use_v3=False)  # fmt: skip
    with pytest.raises(TuneError, match=r"costs 1\.000 of a model call"):
        tune(model, config, tmp_path / "twin.json", progress=False)
    assert not (tmp_path / "twin.json").exists()
    res = CliRunner().invoke(app, ["tune", "--model", "mnist-dit", "--nfe", "4", "--student", "mnist-unet-pruned",
                                   "--student-cost", "3", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert res.exit_code == 2 and "has objective 'eps' where 'mnist-dit' has 'flow'" in res.output
    res = CliRunner().invoke(app, ["tune", "--model", "mnist-dit", "--nfe", "4", "--student-cost", "3",
                                   "--out", str(tmp_path / "y.json")])  # fmt: skip
    assert res.exit_code == 2 and "student and student_cost go together" in res.output


def test_the_bundled_pruned_dit_runs_in_a_plan_of_the_bundled_dit():
    dit = hasten.load("mnist-dit")
    pruned = load_student(dit, "mnist-dit-pruned")
    share = call_share(dit, pruned)
    assert 0.4 < share < 0.8  # FLOPs of the pruned network over the original's
    plan = Plan(
        tuple(get_sigmas("auto", 4, dit.schedule).tolist()),
        "dpmpp_2m",
        nfe=4,
        model="mnist-dit",
        fingerprint=dit.fingerprint,
        assembly=Assembly("mnist-dit-pruned", pruned.fingerprint, (0,), share),
    )
    with torch.no_grad():
        gen = hasten.generate(dit, 2, plan=plan, seed=0)
    assert gen.images01.shape == (2, 1, 28, 28) and torch.isfinite(gen.images01).all()
    assert pathlib.Path(pruned.folder).name == "mnist-dit-pruned"

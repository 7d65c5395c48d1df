"""hasten bench: matrix expansion, JSONL rows, resume after a kill, refusal of another matrix, the report;
rows are recipes (every kind round-trips through results.jsonl), --recipe rows, old result folders."""

import dataclasses
import itertools
import json
import pathlib
import shutil

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.accel import BlockCacheConfig
from hasten.bench.matrix import PRESETS, BenchConfig, expand
from hasten.bench.report import cache_comparison, pareto_front, quant_comparison, render, row_kind
from hasten.bench.runner import ROW_KEYS, BenchError, read_results, run_bench, sample_recipe
from hasten.cli.app import app
from hasten.metrics.reference import reference_samples, rmse
from hasten.recipe import Recipe, save_recipe
from hasten.solvers import parse_solver
from hasten.tune.plan import save_plan

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(model, **kw):
    base = dict(model=model, solvers=("euler", "dpmpp_2m"), steps=(2, 3), peers=("euler",), n=10)
    return BenchConfig(**{**base, **kw})


def test_matrix_expansion():
    cfg = BenchConfig(solvers=("euler", "unipc:variant=bh2"), steps=(5, 10), schedules=("karras", "logsnr"),
                      guidance=(1.0, 2.0), peers=("ddim", "euler", "flow_euler"))  # fmt: skip
    eps = expand(cfg, objective="eps", conditional=True)
    # 2 guidance x (2 solvers x 2 schedules x 2 steps + 2 eps peers x 2 steps)
    assert len(eps) == 2 * (8 + 4) and len({e.key for e in eps}) == len(eps)
    assert {e.solver for e in eps if e.library == "diffusers"} == {"ddim", "euler"}
    assert next(e.options for e in eps if e.solver == "unipc") == {"variant": "bh2"}
    flow = expand(cfg, objective="flow", conditional=False)  # peers map to their flow variants, no guidance axis
    assert {e.solver for e in flow if e.library == "diffusers"} == {"flow_euler"} and {e.guidance for e in flow} == {
        1.0
    }
    assert set(PRESETS) == {"quick", "tuning", "standard", "full", "caching", "quantization", "distill"}
    assert {r.kind for r in eps} == {"stock", "peer"} and all(isinstance(r, Recipe) for r in eps)
    assert {r.library for r in eps} == {"hasten", "diffusers"}
    # a pipeline's own scheduler is a diffusers row at every step count, named by its class
    own = [r for r in expand(cfg, objective="eps", conditional=False, own_scheduler="DDIMScheduler")
           if r.solver == "pipeline"]  # fmt: skip
    assert [(r.library, r.options, r.steps) for r in own] == [
        ("diffusers", {"scheduler": "DDIMScheduler"}, 5),
        ("diffusers", {"scheduler": "DDIMScheduler"}, 10),
    ]
    assert own[0].describe() == "diffusers:pipeline[scheduler=DDIMScheduler] (5 steps)"


def test_parse_solver_validates_early():
    assert parse_solver("unipc:order=3,variant=bh2") == ("unipc", {"order": 3, "variant": "bh2"})
    with pytest.raises(KeyError, match="available"):
        parse_solver("nope")
    with pytest.raises(TypeError, match="does not take"):
        parse_solver("euler:eta=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_solver("unipc:bh2")
    with pytest.raises(ValueError, match="peer"):
        BenchConfig(peers=("nope",))


def test_bench_rows_resume_and_report(tiny_model, tmp_path):
    cfg = _config(tiny_model)
    out = tmp_path / "bench"

    class Killed(Exception):
        pass

    def kill_after_two(row, i, total):
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        run_bench(cfg, out, on_row=kill_after_two)
    partial = read_results(out)
    assert len(partial) == 1 + 2  # the reference row and two configurations survived the kill
    with pytest.raises(BenchError, match="--resume"):
        run_bench(cfg, out)
    with pytest.raises(BenchError, match="different matrix"):
        run_bench(dataclasses.replace(cfg, steps=(2, 4)), out, resume=True)
    rows = run_bench(cfg, out, resume=True)
    entries = expand(cfg, objective="flow", conditional=True)
    assert len(rows) == len(entries) + 1 and len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        for key in ROW_KEYS:
            assert key in row, key
        json.dumps(row)
    hasten_rows = [r for r in rows if r["library"] == "hasten"]
    assert all(r["nfe"] == r["steps"] for r in hasten_rows) and all(r["seconds"] > 0 for r in hasten_rows)
    assert {r["library"] for r in rows} == {"hasten", "diffusers", "reference"}
    runs = json.loads((out / "runs.json").read_text())  # the interrupted run and the resumed one
    assert [r["rows_measured"] for r in runs] == [2, len(entries) - 2] and all(r["wall_seconds"] > 0 for r in runs)
    html = render(out).read_text()
    assert "Bench wall time" in html
    assert html.count("data:image/png;base64,") >= 3 + len(rows)  # three plots and one grid per row
    assert "<table>" in html and (out / "pareto_nfe.png").exists()


def test_pareto_front():
    rows = [
        {"nfe": 5, "fd": 10},
        {"nfe": 10, "fd": 5},
        {"nfe": 10, "fd": 8},
        {"nfe": 20, "fd": 6},
        {"nfe": 20, "fd": 1},
    ]
    assert [(r["nfe"], r["fd"]) for r in pareto_front(rows, "nfe", "fd")] == [(5, 10), (10, 5), (20, 1)]


def test_cli_bench_and_report_errors(tiny_model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--model", tiny_model, "--preset", "huge", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "unknown preset 'huge'" in res.output
    res = runner.invoke(app, ["bench", "--model", "no-such-model", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "no hasten model" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no results" in res.output


def test_gmm_bench_exact_errors_fall_with_nfe(tmp_path):
    # From 12 steps on; below that, the karras grid's last jump (to sigma_min = 0.002) dominates the error.
    cfg = BenchConfig(model="gmm", solvers=("heun", "dpmpp_2m", "dpmpp_3m", "unipc"), steps=(12, 20, 40, 80), n=64)
    rows = run_bench(cfg, tmp_path / "gmm")
    assert len(rows) == 16 and all(r["fd"] is None and r["exact_error"] > 0 for r in rows)
    for solver in cfg.solvers:
        errs = [r["exact_error"] for r in sorted((r for r in rows if r["solver"] == solver), key=lambda r: r["nfe"])]
        assert all(a > b for a, b in itertools.pairwise(errs)), (solver, errs)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "gmm"), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.output)["rows"] == 16


def test_results_of_an_older_matrix_resume_after_new_options_appear():
    """A folder written before BenchConfig gained an option (absent there, at its default now) still resumes."""
    from hasten.bench.store import _same_matrix

    config = BenchConfig(model="mnist-dit").to_dict()
    new = {"config": config, "model_fingerprint": "f", "entries": ["a"]}
    old = {"config": {k: v for k, v in config.items() if k not in ("quants", "quant_peers")},
           "model_fingerprint": "f", "entries": ["a"]}  # fmt: skip
    assert _same_matrix(old, new)
    changed = {**new, "config": {**config, "quants": ["somewhere"]}}
    assert not _same_matrix(old, changed)
    assert not _same_matrix({**old, "entries": ["b"]}, new)
    assert not _same_matrix(None, new)


def _rows_setup(model, tmp_path):
    """A plan, a calibrated cache, a quantised folder and a recipe file for ``model``, each a bench row."""
    from hasten.quant import QuantConfig
    from hasten.quant.storage import quantize_to_folder

    sigmas = hasten.get_sigmas("auto", 2, model.schedule)
    plan = hasten.Plan(tuple(sigmas.tolist()), "dpmpp_2m", nfe=2, model=model.info.name, fingerprint=model.fingerprint)
    plan_file = save_plan(plan, tmp_path / "plan.json")
    accel = BlockCacheConfig(interval=2).save(
        tmp_path / "accel.json", calibration={"setting": {"solver": "euler", "steps": 4, "guidance": 1.0}}
    )
    quant = tmp_path / "w8a8"
    # from the folder: a LoadedModel would be quantised in place
    quantize_to_folder(model.folder, QuantConfig(weights=8, activations=8), quant, n=32, solver="euler", steps=2)
    recipe = Recipe.from_files(model, solver="heun", steps=2, seed=7)  # a stock recipe the matrix lacks
    recipe_file = save_recipe(recipe, tmp_path / "heun.recipe.json")
    return [str(plan_file), str(accel), str(quant), str(recipe_file)]


def test_every_row_kind_round_trips_through_results(tiny_model, tmp_path):
    model = hasten.load(tiny_model)
    plan, accel, quant, recipe_file = _rows_setup(model, tmp_path)
    cfg = _config(tiny_model, solvers=("euler",), steps=(2,), reference_steps=20, plans=(plan,), accels=(accel,),
                  quants=(quant,), recipes=(recipe_file,))  # fmt: skip
    out = tmp_path / "bench"
    rows = run_bench(cfg, out)
    assert rows == read_results(out)
    expected = expand(cfg, objective="flow", conditional=True, network=model.network, model=tiny_model,
                      fingerprint=model.fingerprint)  # fmt: skip
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(expected) + 1 and len(by_key) == len(rows)
    assert {r["kind"] for r in rows} == {"reference", "stock", "plan", "cache", "quant", "peer"}
    for recipe in expected:
        row = by_key[recipe.key]
        again = Recipe.from_dict(row["recipe"])  # from the file's JSON
        assert again == recipe and again.kind == row["kind"] == row_kind(row) and row["label"] == again.describe()
        assert again.seed == cfg.seed
    (reference,) = [r for r in rows if r["kind"] == "reference"]
    assert reference["label"].startswith("reference: dpmpp_3m[third_order_term=taylor] (karras, 20 steps)")
    assert Recipe.from_dict(reference["recipe"]).key in reference["key"]
    # the --recipe row is the recipe sampled from the bench's noise: same images as sample_recipe on that seed
    (replayed,) = [r for r in rows if r["recipe"]["provenance"].get("recipe_file") == recipe_file]
    assert replayed["kind"] == "stock" and replayed["label"] == "heun (auto, 2 steps)"
    images = sample_recipe(model, Recipe.from_dict(replayed["recipe"]), cfg.n).images01
    ref = reference_samples(model, cfg.n, seed=cfg.seed, guidance=1.0, steps=cfg.reference_steps)
    assert rmse(images, ref) == pytest.approx(replayed["rmse_ref"], rel=1e-6, abs=1e-9)
    # the report's tables find the technique rows by their recorded kind
    assert len(cache_comparison(rows)) == len([r for r in rows if r["kind"] == "cache"]) >= 1
    assert len(quant_comparison(rows)) == len([r for r in rows if r["kind"] == "quant"]) >= 1
    html = render(out).read_text()
    assert "Caching: against the uncached run" in html and "Quantisation: against the float model" in html


def test_a_recipe_for_another_model_is_refused_before_any_row(tiny_model, tmp_path):
    other = save_recipe(Recipe("mnist-dit", fingerprint="f" * 16, solver="euler", steps=2), tmp_path / "other.json")
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match="is for model 'mnist-dit' \\(weights ffffffffffff\\), not the benchmarked"):
        run_bench(_config(tiny_model, recipes=(str(other),)), out)
    assert not (out / "results.jsonl").exists() and not (out / "grids").exists()
    res = CliRunner().invoke(app, ["bench", "--model", tiny_model, "--recipe", str(other), "--n", "10",
                                   "--out", str(out)])  # fmt: skip
    assert res.exit_code == 2 and "bench it with --model mnist-dit" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a hasten recipe"):
        _config(tiny_model, recipes=(str(bad),))  # checked when the config is built


def test_a_recipe_the_model_cannot_run_is_refused_before_any_row(tiny_model, tmp_path):
    fingerprint = hasten.load(tiny_model).fingerprint
    cases = {
        "own-scheduler": (dict(library="diffusers", solver="pipeline", options={"scheduler": "DDIMScheduler"}),
                          "needs a pipeline"),
        "eps-peer": (dict(library="diffusers", solver="ddim"), "ddim does not support 'flow' models"),
        "unet-cache": (dict(cache_peer="deepcache"), "peer cache 'deepcache' does not apply"),
    }  # fmt: skip
    for name, (fields, message) in cases.items():
        path = save_recipe(Recipe(tiny_model, fingerprint=fingerprint, steps=2, **fields), tmp_path / f"{name}.json")
        out = tmp_path / name
        with pytest.raises(BenchError, match=message):
            run_bench(_config(tiny_model, recipes=(str(path),)), out)
        assert not (out / "results.jsonl").exists()


def test_peer_sampler_recipes_are_checked():
    assert Recipe("m", library="diffusers", solver="unipc").kind == "peer"
    with pytest.raises(ValueError, match="diffusers sampler 'unipcc' is unknown"):
        Recipe("m", library="diffusers", solver="unipcc")
    with pytest.raises(ValueError, match="takes no options"):
        Recipe("m", library="diffusers", solver="unipc", options={"solver_order": 3})
    with pytest.raises(ValueError, match="takes the option 'scheduler' only"):
        Recipe("m", library="diffusers", solver="pipeline", options={"shift": 3})
    own = Recipe("m", library="diffusers", solver="pipeline", options={"scheduler": "DDIMScheduler"}, steps=2)
    pipeline_of_another_scheduler = type("FakePipelineModel", (), {"pipeline": type("P", (), {
        "scheduler": type("EulerDiscreteScheduler", (), {})()})()})()  # fmt: skip
    with pytest.raises(BenchError, match="own DDIMScheduler; this pipeline's is EulerDiscreteScheduler"):
        sample_recipe(pipeline_of_another_scheduler, own, 2)


def test_a_folder_of_an_older_bench_is_refused_on_resume(tiny_model, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "matrix.json").write_text(json.dumps({"config": {}, "model_fingerprint": "f", "entries": ["a"]}))
    (out / "results.jsonl").write_text(json.dumps({"key": "a", "label": "x", "library": "hasten"}) + "\n")
    with pytest.raises(BenchError, match=r"written by an older hasten .* use another --out"):
        run_bench(_config(tiny_model), out, resume=True)
    assert len(read_results(out)) == 1


@pytest.mark.parametrize("folder", ["caching/bench-dit", "quantization/bench-dit"])
def test_report_renders_a_committed_folder_of_rows_before_recipes(folder, tmp_path):
    source = ROOT / "benchmarks" / "results" / folder
    copy = tmp_path / "old"
    shutil.copytree(source, copy)
    rows = read_results(copy)
    assert rows and not any("kind" in r or "recipe" in r for r in rows)  # the old row format
    html = render(copy).read_text()
    kinds = {row_kind(r) for r in rows}
    assert kinds == {"reference", "stock", "cache" if "caching" in folder else "quant"}
    if "caching" in folder:
        assert "Caching: against the uncached run" in html
        assert len(cache_comparison(rows)) == len([r for r in rows if row_kind(r) == "cache"])
    else:
        assert "Quantisation: against the float model" in html
        assert len(quant_comparison(rows)) == len([r for r in rows if row_kind(r) == "quant"])


def test_a_student_row_sits_beside_the_teachers_rows(tiny_model, tiny_student, tmp_path):
    teacher = hasten.load(tiny_model)
    cfg = _config(tiny_model, solvers=("euler",), steps=(2,), peers=(), reference_steps=8, students=(tiny_student,))
    out = tmp_path / "bench"
    rows = run_bench(cfg, out)
    assert {r["kind"] for r in rows} == {"reference", "stock", "student"}
    (row,) = [r for r in rows if r["kind"] == "student"]
    record = json.loads((pathlib.Path(tiny_student) / "hasten.json").read_text())["distillation"]
    assert (
        row["label"]
        == "student[student, progressive] euler (auto, 2 steps)"
        == Recipe.from_dict(row["recipe"]).describe()
    )
    assert row["nfe"] == 2 and row["fd"] is not None and row["seconds"] > 0
    training = row["training"]
    assert {k: training[k] for k in ("method", "seconds", "extra_seconds", "device", "teacher_fingerprint")} == {
        k: record[k] for k in ("method", "seconds", "extra_seconds", "device", "teacher_fingerprint")
    }
    assert training["training_seconds"] == pytest.approx(record["seconds"] + record["extra_seconds"])
    # the student's own network at its own sampler (what `hasten sample --model STUDENT` runs), from the bench's
    # noise, against the teacher's reference solve of that noise
    images = hasten.generate(hasten.load(tiny_student), cfg.n, seed=cfg.seed).images01
    assert torch.equal(images, sample_recipe(teacher, Recipe.from_dict(row["recipe"]), cfg.n).images01)
    ref = reference_samples(teacher, cfg.n, seed=cfg.seed, guidance=1.0, steps=cfg.reference_steps)
    assert rmse(images, ref) == pytest.approx(row["rmse_ref"], rel=1e-6, abs=1e-9)
    html = render(out).read_text()
    assert "<th>training</th>" in html and f"<td>progressive, {record['seconds']:.0f} s on cpu</td>" in html


def test_a_student_of_other_weights_is_refused_naming_both(tiny_model, tiny_student, tmp_path):
    other = tmp_path / "other-student"
    shutil.copytree(tiny_student, other)
    info = json.loads((other / "hasten.json").read_text())
    info["distillation"]["teacher_fingerprint"] = "f" * 16
    (other / "hasten.json").write_text(json.dumps(info))
    fingerprint = hasten.load(tiny_model).fingerprint
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match=f"weights ffffffffffff\\), not from .* \\(weights {fingerprint[:12]}\\)"):
        run_bench(_config(tiny_model, students=(str(other),)), out)
    assert not (out / "results.jsonl").exists()
    forced = expand(_config(tiny_model, students=(str(other),), force_students=True), objective="flow",
                    conditional=True, model=tiny_model, fingerprint=fingerprint)  # fmt: skip
    assert [r.forced for r in forced if r.kind == "student"] == [("teacher",)]
    res = CliRunner().invoke(app, ["bench", "--model", tiny_model, "--student", tiny_model, "--out", str(out)])
    assert res.exit_code == 2 and "is not a distilled student" in res.output
    # a recipe file naming a student (what `hasten optimize` may write) is checked against its teacher too
    from hasten.recipe import student_recipe

    mine = save_recipe(student_recipe(tiny_student), tmp_path / "student.recipe.json")
    (row,) = [r for r in expand(_config(tiny_model, recipes=(str(mine),)), objective="flow", conditional=True,
                                model=tiny_model, fingerprint=fingerprint) if r.kind == "student"]  # fmt: skip
    assert row.student["teacher_fingerprint"] == fingerprint
    theirs = save_recipe(student_recipe(other), tmp_path / "other.recipe.json")
    cfg = _config(tiny_model, recipes=(str(theirs),))
    with pytest.raises(ValueError, match=r"samples a student of .* \(weights ffffffffffff\), not of the benchmarked"):
        expand(cfg, objective="flow", conditional=True, model=tiny_model, fingerprint=fingerprint)

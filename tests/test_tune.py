"""Plans (JSON round trip, validation, replay) and the plan search (analytic mixture, resume, tune on a model)."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.bench.matrix import BenchConfig
from hasten.bench.runner import run_bench
from hasten.cli.app import app
from hasten.models import ProductMixture
from hasten.schedules import VE, get_sigmas
from hasten.solvers import PerStepSolver, get_solver
from hasten.tune import (
    Candidate,
    Plan,
    PlanError,
    TuneConfig,
    TuneError,
    candidate_from_plan,
    load_plan,
    plan_from_stock,
    save_plan,
    search,
    tune,
)

RUNNER = CliRunner()
MIXTURE = ProductMixture()
SCHEDULE = VE(0.002, 80.0)


def _per_step_plan() -> Plan:
    steps = ({"order": 1, "corrector": False}, {"order": 2, "corrector": True}, {"order": 3, "corrector": True})
    options = {"lower_order_final": False}
    return Plan((80.0, 5.0, 0.5, 0.0), "unipc", options, steps, nfe=3, model="m", fingerprint="abc")


def test_plan_round_trip_and_validation(tmp_path):
    plan = _per_step_plan()
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan and isinstance(plan.build_solver(), PerStepSolver)
    data = json.loads(path.read_text())
    assert data["format"] == "hasten-plan" and data["schema_version"] == 1 and data["nfe"] == 3

    def write(d):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        return bad

    with pytest.raises(PlanError, match="schema version 99"):
        load_plan(write({**data, "schema_version": 99}))
    with pytest.raises(PlanError, match="strictly descending"):
        load_plan(write({**data, "sigmas": [80.0, 0.5, 5.0, 0.0]}))
    with pytest.raises(PlanError, match="3 steps but 2"):
        load_plan(write({**data, "steps": data["steps"][:2]}))
    with pytest.raises(PlanError, match="invalid"):
        load_plan(write({**data, "steps": [{"order": 7}] * 3}))
    with pytest.raises(PlanError, match="missing the field 'solver'"):
        load_plan(write({k: v for k, v in data.items() if k != "solver"}))
    (tmp_path / "corrupt.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "corrupt.json")
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="made for model 'm'"):
        plan.check_model("other", "def")
    plan.check_model("other", "def", force=True)


def test_plan_replays_stock_solvers_exactly():
    """A stock plan is the stock solver; DPM-Solver++(2M) is the search-space point UniP-2 bh2 without corrector."""
    sigmas = get_sigmas("logsnr", 6, SCHEDULE)
    x = MIXTURE.sample((16, 4), sigma=80.0, generator=torch.Generator().manual_seed(0))
    stock = hasten.sample(MIXTURE, x, sigmas, "dpmpp_2m", lower_order_final=False)
    via_plan = hasten.sample(MIXTURE, x, plan=plan_from_stock(sigmas.tolist(), "dpmpp_2m", lower_order_final=False))
    torch.testing.assert_close(via_plan, stock, rtol=1e-6, atol=1e-6)
    candidate = candidate_from_plan(plan_from_stock(sigmas.tolist(), "dpmpp_2m"))
    as_unipc = hasten.sample(MIXTURE, x, plan=candidate.to_plan(80.0))
    torch.testing.assert_close(as_unipc, stock, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="plan supplies"):
        hasten.sample(MIXTURE, x, sigmas, plan=candidate.to_plan(80.0))


def test_per_step_solver_checks():
    with pytest.raises(TypeError, match="one solver class"):
        PerStepSolver((get_solver("unipc"), get_solver("dpmpp_2m")))
    solver = PerStepSolver((get_solver("unipc"),) * 2)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="2 steps, the grid has 3"):
        hasten.sample(MIXTURE, x * 80, get_sigmas("karras", 3, SCHEDULE), solver)


def _mixture_objective(nfe: int):
    x = MIXTURE.sample((64, 4), sigma=80.0, generator=torch.Generator().manual_seed(1))
    exact = MIXTURE.exact_flow(x, 80.0, 0.0)
    calls = []

    def objective(candidate: Candidate):
        calls.append(candidate.key())
        out = hasten.sample(MIXTURE, x, plan=candidate.to_plan(80.0))
        return float(((out - exact) ** 2).mean().sqrt()), 0.01

    return objective, calls


def _logsnr_start(nfe: int) -> Candidate:
    return candidate_from_plan(plan_from_stock(get_sigmas("logsnr", nfe, SCHEDULE).tolist(), "unipc"))


def test_search_beats_uniform_logsnr_on_the_mixture():
    objective, _ = _mixture_objective(4)
    start = _logsnr_start(4)
    result = search(
        objective, [start], log_sigma_max=math.log(80.0), log_sigma_min=math.log(0.002), seconds=1e9, max_evaluations=80
    )
    assert result.best_score < 0.8 * result.start_best  # strictly better than uniform logSNR, by a margin
    assert result.best.to_plan(80.0).nfe == 4 and result.evaluations == 80


def test_search_with_islands_keeps_the_budget_and_beats_the_start():
    objective, calls = _mixture_objective(4)
    starts = [
        _logsnr_start(4),
        candidate_from_plan(plan_from_stock(get_sigmas("karras", 4, SCHEDULE).tolist(), "unipc")),
    ]
    result = search(
        objective, starts, log_sigma_max=math.log(80.0), log_sigma_min=math.log(0.002), seconds=1e9,
        max_evaluations=60, islands=2,
    )  # fmt: skip
    assert result.evaluations == 60 == len(calls) and result.best_score < 0.8 * result.start_best


def test_search_resumes_from_its_cache_after_a_kill():
    kwargs = dict(log_sigma_max=math.log(80.0), log_sigma_min=math.log(0.002), seconds=1e9, max_evaluations=40)
    objective, _ = _mixture_objective(4)
    full = search(objective, [_logsnr_start(4)], **kwargs)

    class Killed(Exception):
        pass

    cache: dict = {}

    def dying(candidate):
        if len(cache) == 15:
            raise Killed
        return objective(candidate)

    with pytest.raises(Killed):
        search(dying, [_logsnr_start(4)], cache=cache, **kwargs)
    assert len(cache) == 15
    counting, calls = _mixture_objective(4)
    resumed = search(counting, [_logsnr_start(4)], cache=cache, **kwargs)
    assert len(calls) == 40 - 15  # the 15 saved evaluations were replayed, not recomputed
    assert resumed.best == full.best and resumed.best_score == full.best_score


def test_tune_on_a_model_writes_a_plan_that_replays(tiny_model, tmp_path):
    model = hasten.load(tiny_model)
    config = TuneConfig(
        nfe=3,
        minutes=30,
        n_search=4,
        n_heldout=10,
        reference_steps=8,
        max_evaluations=12,
        fd_candidates=4,
        n_fd=10,
        use_v3=False,
    )
    out = tmp_path / "plan.json"
    plan = tune(model, config, out, progress=False)
    assert load_plan(out) == plan and plan.nfe == 3 and plan.fingerprint == model.fingerprint
    assert plan.search["evaluations"] == 12
    assert plan.search["stock_starts"] == 3 * 5  # flow model: auto, karras, logsnr grids x 5 stock solvers
    val = plan.scores["validation"]  # the plan returned never loses to the best stock start on validation noise
    assert val["kept"] in ("searched", "stock") and val["seed"] == 2000
    assert (val["kept"] == "searched") == (val["rmse_ref_searched"] < val["rmse_ref_best_stock"])
    held, base = plan.scores["heldout"], plan.scores["baseline"]
    assert {"rmse_ref", "fd", "fd_reference"} <= set(held) and "label" in base
    full = plan.search["full_objective"]  # FD stage: 2 by proxy rank, 2 chosen by the learned predictor
    assert len(full["evaluated"]) == 4 and [e["predicted_fd"] is None for e in full["evaluated"]] == [1, 1, 0, 0]
    if plan.scores["validation"]["kept"] == "searched":
        assert plan.scores["search"]["rmse_ref"] <= 1.1 * plan.search["best_proxy_rmse_ref"]
    assert plan.search["best_proxy_rmse_ref"] <= base["search_rmse_ref"]  # never worse than its best start
    gen = hasten.generate(model, 4, plan=plan)
    assert gen.nfe == 3
    with pytest.raises(TuneError, match="--resume"):
        tune(model, config, out, progress=False)
    again = tune(model, config, out, resume=True, progress=False)  # replays the saved search
    assert again.sigmas == plan.sigmas
    more = tune(model, dataclasses.replace(config, max_evaluations=16), out, resume=True, progress=False)
    assert more.search["evaluations"] == 16  # a resumed search may be given a larger budget
    with pytest.raises(TuneError, match="other settings"):
        tune(model, dataclasses.replace(config, n_search=5), out, resume=True, progress=False)
    res = RUNNER.invoke(app, ["sample", "--model", tiny_model, "--plan", str(out), "--n", "4",
                              "--out", str(tmp_path / "g.png"), "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["nfe"] == 3
    # A plan is a bench row at its own guidance scale, next to the stock configurations.
    bench = BenchConfig(model=tiny_model, solvers=("dpmpp_2m",), steps=(3,), peers=(), n=10, plans=(str(out),))
    rows = run_bench(bench, tmp_path / "bench")
    (row,) = [r for r in rows if r["solver"] == "plan"]
    assert row["nfe"] == 3 and row["library"] == "hasten" and row["rmse_ref"] > 0 and "plan.json" in row["label"]
    with pytest.raises(FileNotFoundError):
        BenchConfig(model=tiny_model, plans=(str(tmp_path / "nope.json"),))
    res = RUNNER.invoke(app, ["sample", "--model", "mnist-dit", "--plan", str(out), "--n", "2",
                              "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert res.exit_code == 2 and "plans are model-specific" in res.output


def test_tune_errors(tiny_model, tmp_path):
    with pytest.raises(TuneError, match="nfe must be an integer >= 2"):
        TuneConfig(nfe=1)
    with pytest.raises(TuneError, match="must all differ"):
        TuneConfig(search_seed=0, heldout_seed=0)
    with pytest.raises(TuneError, match="must all differ"):
        TuneConfig(validation_seed=1000)
    model = hasten.load(tiny_model)
    with pytest.raises(TuneError, match="too short"):
        config = TuneConfig(nfe=3, minutes=1e-5, n_search=4, reference_steps=8, use_v3=False)
        tune(model, config, tmp_path / "p.json", progress=False)
    assert not (tmp_path / "p.json").exists()
    res = RUNNER.invoke(app, ["tune", "--model", tiny_model, "--nfe", "1", "--out", str(tmp_path / "q.json")])
    assert res.exit_code == 2 and "nfe must be" in res.output
    res = RUNNER.invoke(app, ["tune", "--model", tiny_model, "--fit-iterations", "5", "--fit-lr-schedule", "step",
                              "--out", str(tmp_path / "q.json")])  # fmt: skip
    assert res.exit_code == 2 and "fit_lr_schedule must be one of ('cosine', 'constant'), got 'step'" in res.output


def test_cli_tune_json(tiny_model, tmp_path):
    out = tmp_path / "cli-plan.json"
    args = ["tune", "--model", tiny_model, "--nfe", "3", "--minutes", "0.1", "--n-search", "4", "--n-fd", "10",
            "--fd-candidates", "2", "--n-heldout", "10", "--reference-steps", "8", "--no-v3", "--out", str(out),
            "--format", "json"]  # fmt: skip
    res = RUNNER.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["nfe"] == 3 and data["evaluations"] > 0 and "rmse_ref" in data["heldout"] and out.exists()
    from hasten.recipe import load_recipe

    recipe = load_recipe(data["recipe"])  # the recipe beside the plan replays it
    assert data["recipe"] == str(tmp_path / "cli-plan.recipe.json") and recipe.plan == hasten.load_plan(out)
    assert recipe.kind == "plan" and recipe.fingerprint == hasten.load(tiny_model).fingerprint
    again = RUNNER.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_dpm_solver_v3_auto_statistics_through_generate(tiny_model, monkeypatch):
    """ems='auto': generate estimates the model's statistics once, caches them, and samples with them."""
    import hasten.tune.ems as ems_module

    monkeypatch.setattr(ems_module, "EMS_SAMPLES", 32)
    monkeypatch.setattr(ems_module, "EMS_LAMBDAS", 10)
    model = hasten.load(tiny_model)
    gen = hasten.generate(model, 4, solver="dpm_solver_v3", steps=4)
    assert gen.nfe == 4 and torch.isfinite(gen.images01).all()
    path = ems_module.ems_path_for_model(model, 1.0)
    assert path.exists() and ems_module.ems_for_model(model).l.shape == (10, 1, 28, 28)
    again = hasten.generate(model, 4, solver="dpm_solver_v3", steps=4)  # from the cache: same statistics
    torch.testing.assert_close(again.images01, gen.images01)
    # A v3 point of the search space is a plan with ems="auto", resolved by generate for the model.
    sigmas = hasten.get_sigmas("auto", 4, model.schedule).tolist()
    candidate = candidate_from_plan(plan_from_stock(sigmas, "dpm_solver_v3", ems="auto"))
    assert candidate.prediction == "v3"
    plan = candidate.to_plan(sigmas[0])
    assert plan.solver == "dpm_solver_v3" and plan.options["ems"] == "auto"
    replay = hasten.generate(model, 4, plan=plan)
    torch.testing.assert_close(replay.images01, gen.images01, atol=1e-5, rtol=0)  # same solver, same grid
    with pytest.raises(ValueError, match="ems='auto' needs the model"):
        hasten.sample(model.denoiser, torch.randn(2, 1, 28, 28), plan=plan)


def test_stock_starts_include_the_trailing_grid_for_discrete_schedules_only():
    import hasten
    from hasten.tune.tuner import stock_plans

    unet_grids = {label.rsplit("(", 1)[1].rstrip(")") for label, _ in stock_plans(hasten.load("mnist-unet"), 5)}
    dit_grids = {label.rsplit("(", 1)[1].rstrip(")") for label, _ in stock_plans(hasten.load("mnist-dit"), 5)}
    # on a discrete schedule `auto` is the trailing grid: one start, labelled by the first name that made it
    assert "auto" in unet_grids and "trailing" not in unet_grids and "trailing" not in dit_grids
    trailing = next(p for label, p in stock_plans(hasten.load("mnist-unet"), 5) if label.endswith("(auto)"))
    assert trailing.sigmas[-1] == 0.0 and trailing.sigmas[-2] > 0.5  # no model call spent at sigma_min


@pytest.mark.parametrize(
    "name",
    ["mnist-dit-nfe5-fitted.json", "mnist-dit-nfe8-fitted.json", "mnist-dit-nfe10-fitted.json",
     "mnist-unet-nfe5-fitted.json", "mnist-unet-nfe8-fitted.json", "mnist-unet-nfe10-fitted.json"],
)  # fmt: skip
def test_the_shipped_fitted_plans_replay_their_recorded_scores(name):
    """The plans `hasten tune --fit-iterations` wrote (solver learned_multistep) sample at the held-out error
    they record, which is below their recorded stock baseline's. They were scored before the index noise
    convention, so they replay on the legacy one (which one process still honours)."""
    import pathlib

    import hasten
    from hasten.metrics.reference import reference_samples, rmse
    from hasten.seeds import LEGACY_CONVENTION

    plan = hasten.load_plan(pathlib.Path(__file__).parents[1] / "plans" / name)
    model = hasten.load(plan.model)
    assert plan.solver == "learned_multistep" and plan.fingerprint == model.fingerprint
    assert plan.search["fit"]["kept"] == "fitted"
    gen = hasten.generate(model, 100, plan=plan, seed=0, noise=LEGACY_CONVENTION)
    measured = rmse(gen.images01, reference_samples(model, 100, seed=0, steps=100, noise=LEGACY_CONVENTION))
    assert gen.nfe == plan.nfe and measured == pytest.approx(plan.scores["heldout"]["rmse_ref"], abs=5e-4)
    assert measured < 0.85 * plan.scores["baseline"]["heldout"]["rmse_ref"]

"""Recipes: JSON round trip, hashing, validation when built, generate(recipe=...) equal to the same settings
passed one by one, every plan and cache file in the repo still loading, and `hasten sample --recipe`."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import hasten
from hasten.accel import BlockCacheConfig
from hasten.recipe import NOISE_CONVENTION, Recipe, RecipeError, load_recipe, recipe_path_beside, save_recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "plans").glob("*.json"))
CACHES = sorted((ROOT / "caches").glob("*.json"))


@pytest.fixture(scope="module")
def dit():
    return hasten.load("mnist-dit")


def _plan_for(model, steps=4):
    sigmas = hasten.get_sigmas("auto", steps, model.schedule)
    return hasten.Plan(tuple(sigmas.tolist()), "dpmpp_2m", nfe=steps, model=model.info.name,
                       fingerprint=model.fingerprint)  # fmt: skip


def test_round_trip_and_hash(dit, tmp_path):
    cache = BlockCacheConfig(interval=2)
    recipe = Recipe.from_files(dit, plan=_plan_for(dit), accel=cache, seed=3, provenance={"made_by": "test"})
    path = save_recipe(recipe, tmp_path / "r.json")
    again = load_recipe(path)
    assert again == recipe and hash(again) == hash(recipe) and again.key == recipe.key
    assert again.to_dict() == recipe.to_dict()
    assert again.kind == "cache" and again.steps == 4 and again.noise == NOISE_CONVENTION
    # provenance is not identity; every sampling field is
    assert recipe.replace(provenance={"other": 1}).digest() == recipe.digest()
    assert recipe.replace(seed=4).digest() != recipe.digest()
    assert recipe.replace(cache=BlockCacheConfig(interval=3)).digest() != recipe.digest()
    assert len({recipe, again, recipe.replace(seed=4)}) == 2  # hashable, usable as a set member / dict key


def test_stock_recipe_checks_solver_and_schedule():
    with pytest.raises(RecipeError, match="nope"):
        Recipe("mnist-dit", solver="nope")
    with pytest.raises(RecipeError, match="takes"):
        Recipe("mnist-dit", solver="unipc", options={"ordr": 3})
    with pytest.raises(RecipeError, match="unknown discretisation 'karas'"):
        Recipe("mnist-dit", schedule="karas")
    with pytest.raises(RecipeError, match="steps must be an integer >= 1"):
        Recipe("mnist-dit", steps=0)
    with pytest.raises(RecipeError, match="guidance must be a finite number"):
        Recipe("mnist-dit", guidance=float("nan"))
    with pytest.raises(RecipeError, match="noise convention"):
        Recipe("mnist-dit", noise="numpy")
    with pytest.raises(RecipeError, match="execution 'kernel' applies to quantised weights only"):
        Recipe("mnist-dit", execution="kernel")


def test_schema_and_format_refused(dit):
    data = Recipe("mnist-dit").to_dict()
    with pytest.raises(RecipeError, match="schema version 2"):
        Recipe.from_dict({**data, "schema_version": 2})
    with pytest.raises(RecipeError, match="not a hasten recipe"):
        Recipe.from_dict({**data, "format": "hasten-plan"})
    with pytest.raises(RecipeError, match="unknown fields \\['stepz'\\]"):
        Recipe.from_dict({**data, "stepz": 3})


def test_plan_for_other_weights_refused_or_forced(dit):
    plan = hasten.Plan((10.0, 1.0, 0.0), "dpmpp_2m", model="other", fingerprint="f" * 64)
    with pytest.raises(RecipeError, match="plan was made for weights ffffffffffff"):
        Recipe.from_files(dit, plan=plan)
    forced = Recipe.from_files(dit, plan=plan, force=True)
    assert forced.forced == ("plan",)
    assert Recipe.from_dict(forced.to_dict()).forced == ("plan",)  # stays forced after a round trip


def test_cache_calibrated_for_other_setting_refused(dit):
    """The issue's example: a 20-step calibration applied to a 5-NFE plan is refused with the reason."""
    with pytest.raises(RecipeError, match="calibrated for 20 steps \\(this recipe runs 5\\)"):
        Recipe.from_files(dit, plan=ROOT / "plans/mnist-dit-nfe5-fitted.json",
                          accel=ROOT / "caches/mnist-dit-block-cache-20.json")  # fmt: skip
    with pytest.raises(RecipeError, match="20 steps \\(this recipe runs 4\\)"):
        Recipe.from_files(dit, steps=4, accel=ROOT / "caches/mnist-dit-block-cache-20.json")
    ok = Recipe.from_files(dit, steps=20, accel=ROOT / "caches/mnist-dit-block-cache-20.json")
    assert ok.forced == () and ok.cache_setting["steps"] == 20
    forced = Recipe.from_files(dit, steps=4, accel=ROOT / "caches/mnist-dit-block-cache-20.json", force=True)
    assert forced.forced == ("cache",)


def test_cache_for_a_unet_refused_on_a_transformer(dit):
    recipe = Recipe.from_files(dit, accel=hasten.accel.DeepCacheConfig(interval=2))
    with pytest.raises(RecipeError, match="cannot apply to 'mnist-dit'"):
        recipe.check_model(dit)


def test_recipe_for_other_weights_refused(dit):
    recipe = Recipe("mnist-unet", fingerprint="0" * 64)
    with pytest.raises(RecipeError, match="not 'mnist-dit'"):
        hasten.generate(dit, 2, recipe=recipe)


@pytest.mark.parametrize("path", PLANS + CACHES, ids=lambda p: p.name)
def test_every_shipped_plan_and_cache_loads_into_a_recipe(path):
    model = hasten.load("mnist-unet" if "unet" in path.name else "mnist-dit")
    if path.parent.name == "plans":
        recipe = Recipe.from_files(model, plan=path)
        assert recipe.kind == "plan" and recipe.steps == hasten.load_plan(path).num_steps
    else:
        steps = json.loads(path.read_text())["calibration"]["setting"]["steps"]
        recipe = Recipe.from_files(model, steps=steps, accel=path)
        assert recipe.kind == "cache" and recipe.forced == ()
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_generate_with_recipe_equals_settings_one_by_one(dit):
    cache = BlockCacheConfig(interval=2)
    plan = _plan_for(dit, 4)
    recipe = Recipe.from_files(dit, plan=plan, accel=cache, guidance=2.0, seed=5)
    a = hasten.generate(dit, 6, recipe=recipe)
    b = hasten.generate(dit, 6, plan=plan, accel=cache, guidance=2.0, seed=5)
    assert torch.equal(a.images01, b.images01) and a.nfe == b.nfe and a.accel_stats == b.accel_stats
    stock = Recipe.from_files(dit, solver="unipc", options={"order": 3}, schedule="karras", steps=5, seed=2)
    c = hasten.generate(dit, 6, recipe=stock)
    d = hasten.generate(dit, 6, solver="unipc", order=3, schedule="karras", steps=5, seed=2)
    assert torch.equal(c.images01, d.images01)
    e = hasten.generate(dit, 6, recipe=stock, seed=9)  # an explicit seed overrides the recipe's
    assert torch.equal(e.images01, hasten.generate(dit, 6, solver="unipc", order=3, schedule="karras", steps=5,
                                                   seed=9).images01)  # fmt: skip
    with pytest.raises(TypeError, match="do not also pass solver, steps"):
        hasten.generate(dit, 2, recipe=stock, solver="euler", steps=3)
    with pytest.raises(TypeError, match="do not also pass order"):
        hasten.generate(dit, 2, recipe=stock, order=2)


def test_recipe_path_beside(tmp_path):
    assert recipe_path_beside(tmp_path / "plan.json") == tmp_path / "plan.recipe.json"
    (tmp_path / "folder").mkdir()
    assert recipe_path_beside(tmp_path / "folder") == tmp_path / "folder" / "recipe.json"


def test_cli_sample_recipe(dit, tmp_path):
    from typer.testing import CliRunner

    from hasten.cli.app import app

    recipe = Recipe.from_files(dit, plan=_plan_for(dit, 3), seed=7)
    path = save_recipe(recipe, tmp_path / "r.json")
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--recipe", str(path), "--n", "4", "--out", str(tmp_path / "g.png"),
                                 "--save", str(tmp_path / "s.npz"), "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["nfe"] == 3 and data["seed"] == 7 and data["recipe_digest"] == recipe.digest()
    import numpy as np

    saved = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    assert torch.equal(saved, hasten.generate(dit, 4, recipe=recipe).images01)
    # --model and sampler flags are refused beside a recipe, naming each
    bad = runner.invoke(app, ["sample", "--recipe", str(path), "--model", "mnist-unet", "--steps", "4",
                              "--out", str(tmp_path / "g2.png")])  # fmt: skip
    assert bad.exit_code == 2 and "--model, --steps" in bad.output
    # the example: a 20-step cache on a 5-NFE plan is refused before sampling
    clash = runner.invoke(
        app,
        [
            "sample",
            "--plan",
            str(ROOT / "plans/mnist-dit-nfe5-fitted.json"),
            "--accel",
            str(ROOT / "caches/mnist-dit-block-cache-20.json"),
            "--out",
            str(tmp_path / "c.png"),
        ],
    )
    assert clash.exit_code == 2 and "calibrated for 20 steps" in clash.output and not (tmp_path / "c.png").exists()
    # an output path that is a folder is refused before any work
    folder = runner.invoke(app, ["sample", "--recipe", str(path), "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.output

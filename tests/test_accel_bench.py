"""Caches in the bench and on the command line: calibration, cached/uncached/peer rows, --accel, honesty."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.accel import BlockCacheConfig, accelerate_
from hasten.accel.calibrate import calibrate, ladders, techniques_for
from hasten.bench.cache_peers import cache_peers_for, peer_cache
from hasten.bench.matrix import BenchConfig, accel_setting
from hasten.bench.report import cache_comparison, render
from hasten.bench.runner import run_bench
from hasten.cli.app import app


def calibrated_file(path, config=None, steps=4):
    config = config or BlockCacheConfig(interval=2)
    return config.save(path, calibration={"setting": {"solver": "euler", "steps": steps, "guidance": 1.0}})


def test_bench_puts_cached_uncached_and_peer_rows_side_by_side(tiny_model, tmp_path):
    accel = calibrated_file(tmp_path / "accel.json")
    cfg = BenchConfig(model=tiny_model, solvers=(), steps=(), peers=(), n=10, accels=(str(accel),))
    rows = run_bench(cfg, tmp_path / "bench")
    libraries = {r["library"] for r in rows}
    installed, _ = cache_peers_for(hasten.load(tiny_model).network)
    assert {"reference", "hasten"} <= libraries
    assert len(rows) == 1 + 2 + len(installed)  # reference, uncached, cached, one per installed peer
    cached = next(r for r in rows if r["kind"] == "cache" and r["recipe"]["cache"] is not None)
    assert cached["accel_stats"]["reused"] > 0 and cached["accel_stats"]["calls"] == 4
    comparison = cache_comparison(rows)
    assert len(comparison) == 1 + len(installed)
    for c in comparison:
        assert c["speedup"] > 0 and c["seconds_uncached"] > 0 and c["peak_memory_bytes"] > 0
    assert all(r["peak_memory_scope"] for r in rows if r["library"] != "reference")
    assert "Caching: against the uncached run" in render(tmp_path / "bench").read_text()


def test_a_cache_file_without_its_setting_is_refused_before_the_run(tmp_path):
    bare = BlockCacheConfig().save(tmp_path / "bare.json")
    with pytest.raises(ValueError, match="which solver and steps"):
        accel_setting(str(bare))
    with pytest.raises(ValueError, match="which solver and steps"):
        BenchConfig(accels=(str(bare),))


def test_peer_caches_are_taken_off_completely(tiny_model):
    model = hasten.load(tiny_model)
    installed, _ = cache_peers_for(model.network)
    before = hasten.generate(model, 4, solver="euler", steps=6).images01
    for name in installed:
        with peer_cache(name, model.network, 6):
            hasten.generate(model, 4, solver="euler", steps=6)
        assert not [n for n, m in model.network.named_modules() if "forward" in m.__dict__], name
    assert hasten.generate(model, 4, solver="euler", steps=6).images01.equal(before)
    with pytest.raises(ValueError, match="unknown cache peer"):
        with peer_cache("fastercache", model.network, 6):
            pass


def test_calibration_returns_a_setting_within_the_budget(tiny_model):
    model = hasten.load(tiny_model)
    assert techniques_for(model.network) == ["block_cache", "first_block_cache", "ras"]
    found = calibrate(model, "block_cache", solver="euler", steps=6, n=10, max_quality_loss=5.0, timing_repeats=1)
    assert found.met and found.heldout["passed"] and found.heldout["quality_loss"] <= 5.0
    assert found.speed["speedup"] > 0
    # the most work skipped among the settings that passed on calibration noise
    passed = [r["saved_fraction"] for r in found.rows if r["passed"]]
    assert found.heldout["saved_fraction"] == pytest.approx(max(passed), abs=1e-9) or found.heldout["passed"]
    json.dumps(found.to_dict())


def test_calibration_says_so_when_nothing_meets_the_target(tiny_model):
    model = hasten.load(tiny_model)
    found = calibrate(model, "block_cache", solver="euler", steps=6, n=10, max_rmse=1e-9)
    assert not found.met and found.config is None and found.heldout is None
    tried = len(found.rows)
    assert tried == len(ladders("block_cache", model.network))  # each ladder stops at its first failure


def test_calibration_bad_input(tiny_model):
    model = hasten.load(tiny_model)
    with pytest.raises(ValueError, match="technique must be one of"):
        calibrate(model, "fastercache")
    with pytest.raises(TypeError, match="down_blocks, mid_block and up_blocks"):
        calibrate(model, "deepcache")
    with pytest.raises(ValueError, match="max_quality_loss"):
        calibrate(model, "block_cache", max_quality_loss=-0.1)


def test_cli_calibrate_writes_nothing_harmful_and_sample_applies_a_config(tiny_model, tmp_path):
    runner = CliRunner()
    out = tmp_path / "accel.json"
    args = ["accelerate", "calibrate", "--model", tiny_model, "--technique", "block_cache", "--solver", "euler",
            "--steps", "4", "--n", "10", "--out", str(out)]  # fmt: skip
    none = runner.invoke(app, [*args, "--max-rmse", "1e-9"])
    assert none.exit_code == 3, none.output
    assert not out.exists() and (tmp_path / "accel.json.calibration.json").exists()
    ok = runner.invoke(app, [*args, "--max-quality-loss", "5"])
    assert ok.exit_code == 0, ok.output
    assert "wall clock" in ok.output and out.exists()
    grid = tmp_path / "grid.png"
    sampled = runner.invoke(
        app,
        [
            "sample",
            "--model",
            tiny_model,
            "--n",
            "4",
            "--solver",
            "euler",
            "--steps",
            "4",
            "--accel",
            str(out),
            "--out",
            str(grid),
            "--format",
            "json",
        ],
    )
    assert sampled.exit_code == 0, sampled.output
    data = json.loads(sampled.output)
    assert data["accel_stats"]["calls"] == 4 and grid.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    failed = runner.invoke(app, ["sample", "--model", tiny_model, "--n", "2", "--accel", str(bad)])
    assert failed.exit_code == 2 and "not valid JSON" in failed.output
    # the recipe written beside the config replays the same run; the config at other steps is refused
    recipe = tmp_path / "accel.recipe.json"
    assert json.loads(recipe.read_text())["cache_setting"]["steps"] == 4
    replay = runner.invoke(app, ["sample", "--recipe", str(recipe), "--n", "4", "--out", str(tmp_path / "r.png"),
                                 "--format", "json"])  # fmt: skip
    assert replay.exit_code == 0, replay.output
    assert json.loads(replay.output)["accel_stats"] == data["accel_stats"]
    other = runner.invoke(app, ["sample", "--model", tiny_model, "--n", "2", "--solver", "euler", "--steps", "6",
                                "--accel", str(out), "--out", str(tmp_path / "o.png")])  # fmt: skip
    assert other.exit_code == 2 and "calibrated for 4 steps (this recipe runs 6)" in other.output


def test_cli_calibrate_for_a_plan(tiny_model, tmp_path):
    """A cache calibrated on a tuned plan is valid for that plan only, and its recipe replays the plan + cache."""
    import hasten
    from hasten.recipe import load_recipe

    model = hasten.load(tiny_model)
    sigmas = hasten.get_sigmas("karras", 5, model.schedule)
    plan_file = tmp_path / "plan.json"
    hasten.tune.save_plan(hasten.Plan(tuple(sigmas.tolist()), "dpmpp_2m", nfe=5, fingerprint=model.fingerprint),
                          plan_file)  # fmt: skip
    out = tmp_path / "accel.json"
    runner = CliRunner()
    ok = runner.invoke(app, ["accelerate", "calibrate", "--model", tiny_model, "--technique", "block_cache", "--plan",
                             str(plan_file), "--n", "10", "--max-quality-loss", "5", "--out", str(out)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    recipe = load_recipe(tmp_path / "accel.recipe.json")
    assert recipe.kind == "cache" and recipe.plan is not None and recipe.steps == 5
    assert recipe.cache_setting["plan"] == recipe.plan.digest()
    images = hasten.generate(model, 4, recipe=recipe)
    assert torch.equal(images.images01, hasten.generate(model, 4, plan=recipe.plan, accel=recipe.cache).images01)
    # the same cache on the stock grid at the same step count is another grid: refused
    stock = runner.invoke(app, ["sample", "--model", tiny_model, "--n", "2", "--steps", "5", "--accel", str(out),
                                "--out", str(tmp_path / "s.png")])  # fmt: skip
    assert stock.exit_code == 2 and "a tuned plan" in stock.output
    both = runner.invoke(app, ["accelerate", "calibrate", "--model", tiny_model, "--plan", str(plan_file),
                               "--steps", "7", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert both.exit_code == 2 and "--plan supplies the solver and the steps" in both.output


def test_generate_reports_stats_of_a_cache_installed_beforehand(tiny_model):
    model = hasten.load(tiny_model)
    with accelerate_(model, BlockCacheConfig(interval=3)):
        first = hasten.generate(model, 2, solver="euler", steps=6)
        second = hasten.generate(model, 2, solver="euler", steps=6)
    assert first.accel_stats["calls"] == second.accel_stats["calls"] == 6  # per generation, not cumulative
    assert first.accel_stats["computed"] == 2 and first.images01.equal(second.images01)
    assert hasten.generate(model, 2, solver="euler", steps=6).accel_stats is None

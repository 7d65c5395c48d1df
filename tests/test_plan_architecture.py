"""Per-step architecture plans: which blocks each step skips (plan fields, execution by hooks, cost, search)."""

import functools
import json
import math
import pathlib

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hasten
from hasten.accel.skip import block_flop_shares, installed_skip, skip_blocks, skippable_blocks
from hasten.cli.app import app
from hasten.hooks import add_hook, hooked_modules, remove_hooks
from hasten.schedules import get_sigmas
from hasten.tune import Candidate, Plan, PlanError, TuneConfig, TuneError, load_plan, save_plan, search, tune
from hasten.tune.search import budget_pattern

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model):
    return hasten.load(tiny_model)


def _plan(model, skip=None, steps=4, cost=None) -> Plan:
    sigmas = tuple(get_sigmas("auto", steps, model.schedule).tolist())
    return Plan(sigmas, "dpmpp_2m", nfe=steps, model=model.info.name, fingerprint=model.fingerprint, skip=skip,
                cost=cost)  # fmt: skip


def _state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_a_plan_that_skips_nothing_is_the_plain_plan_bit_for_bit(model):
    plain, empty = _plan(model), _plan(model, skip=((),) * 4)
    assert empty.skip is None and empty == plain and empty.digest() == plain.digest()
    assert empty.to_dict() == plain.to_dict() and plain.to_dict()["schema_version"] == 1  # still a v1 file
    with torch.no_grad():
        a = hasten.generate(model, 4, plan=plain, seed=3).images01
        b = hasten.generate(model, 4, plan=empty, seed=3).images01
    assert torch.equal(a, b)


def test_a_skipping_plan_skips_those_blocks_at_those_steps_and_leaves_the_network_exact(model):
    network = model.network
    paths = [path for path, _ in skippable_blocks(network)]
    assert paths == [f"transformer_blocks.{i}" for i in range(len(network.transformer_blocks))]
    before = _state(network)
    skip = ((1, 2), (), (5,), (1,))
    counts = dict.fromkeys(paths, 0)

    def count(path, forward, *args, **kwargs):
        counts[path] += 1
        return forward(*args, **kwargs)

    # counting hooks sit inside the skip hooks (added first), so they see only the calls that really run
    handles = [add_hook(block, f"test/{p}", functools.partial(count, p)) for p, block in skippable_blocks(network)]
    try:
        with torch.no_grad():
            skipped = hasten.generate(model, 4, plan=_plan(model, skip=skip), seed=3)
    finally:
        remove_hooks(handles)
    steps = 4  # dpmpp_2m: one call per step
    expected = {p: steps - sum(i in s for s in skip) for i, p in enumerate(paths)}
    assert counts == expected and skipped.nfe == 4
    assert hooked_modules(network) == {} and not installed_skip(network)  # hooks gone
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    with torch.no_grad():
        plain = hasten.generate(model, 4, plan=_plan(model), seed=3).images01
    assert not torch.equal(plain, skipped.images01)


def test_the_skip_hooks_come_off_after_an_error(model):
    network = model.network

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with skip_blocks(network, ((0,), (), (), ())) as hooks:
            assert list(hooks) == ["transformer_blocks.0"] and installed_skip(network)
            raise Boom
    assert hooked_modules(network) == {}


def test_json_round_trip_and_cost(model, tmp_path):
    plan = _plan(model, skip=([2, 1], (), (5,), ()), cost=3.5)
    assert plan.skip == ((1, 2), (), (5,), ())
    path = save_plan(plan, tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and data["skip"] == [[1, 2], [], [5], []] and data["cost"] == 3.5
    again = load_plan(path)
    assert again == plan and again.digest() == plan.digest()
    assert plan.digest() != _plan(model).digest()  # the skips are part of what the plan samples
    assert "skips step:blocks 0:1-2 2:5" in plan.describe() and "cost 3.50" in plan.describe()
    shares = [1 / 6] * 6
    assert plan.cost_with(shares) == pytest.approx(4 - 3 / 6)
    assert _plan(model).cost_with(shares) == 4.0


def test_bad_skips_are_refused_by_name(model, tmp_path):
    with pytest.raises(PlanError, match="4 steps but 3 per-step skip sets"):
        _plan(model, skip=((1,), (), ()))
    with pytest.raises(PlanError, match="step 1 has -1"):
        _plan(model, skip=((), (-1,), (), ()))
    with pytest.raises(PlanError, match="step 0 has 'a'"):
        _plan(model, skip=(("a",), (), (), ()))
    with pytest.raises(PlanError, match="names a block twice"):
        _plan(model, skip=((1, 1), (), (), ()))
    with pytest.raises(PlanError, match="cost must be"):
        _plan(model, skip=((1,), (), (), ()), cost=-1.0)
    bad = _plan(model, skip=((), (), (6,), ()))
    with pytest.raises(PlanError, match=r"skips block 6 at step 2, but the network has 6 skippable blocks"):
        bad.check_network(model.network)
    with pytest.raises(PlanError, match="skips block 6 at step 2"):
        hasten.generate(model, 2, plan=bad)
    assert hooked_modules(model.network) == {}
    data = {**_plan(model, skip=((1,), (), (), ())).to_dict(), "schema_version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="schema 1 plan has no per-step architecture"):
        load_plan(tmp_path / "v1.json")
    # a cache and a plan's skips would both decide which blocks run
    with pytest.raises(ValueError, match="cannot run under a cache"):
        hasten.generate(model, 2, plan=_plan(model, skip=((1,), (), (), ())), accel=hasten.accel.BlockCacheConfig())
    assert hooked_modules(model.network) == {}


def test_loops_that_cannot_see_the_network_refuse_a_skipping_plan(model):
    plan = _plan(model, skip=((1,), (), (), ()))
    x = torch.randn(2, 1, 28, 28) * plan.sigmas[0]
    with pytest.raises(ValueError, match="skips blocks per step, which needs the network"):
        hasten.sample(model.denoiser, x, plan=plan)
    from hasten.pipelines.scheduler import HastenScheduler

    with pytest.raises(ValueError, match="cannot apply"):
        HastenScheduler.from_plan(plan)


def test_old_v1_plan_files_still_load():
    plan = load_plan(ROOT / "plans" / "mnist-dit-nfe5.json")
    assert plan.skip is None and plan.cost is None
    raw = json.loads((ROOT / "plans" / "mnist-dit-nfe5.json").read_text())
    assert plan.to_dict() == {**raw, "options": plan.options}  # written back as the same v1 file
    assert plan.to_dict()["schema_version"] == 1 and "skip" not in plan.to_dict()


def test_flop_shares_of_transformer_blocks_and_unet_units(model):
    with torch.no_grad():
        shares = block_flop_shares(model.network, lambda: hasten.generate(model, 1, steps=1))
    assert len(shares) == len(model.network.transformer_blocks) and 0.9 < sum(shares) < 1.0
    assert max(shares) - min(shares) < 1e-9  # identical blocks
    assert hooked_modules(model.network) == {}
    unet = hasten.load("mnist-unet").network
    names = [path for path, _ in skippable_blocks(unet)]
    assert "mid_block.attentions.0" in names and "mid_block.resnets.0" in names
    assert all("downsamplers" not in n and "upsamplers" not in n for n in names)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    with torch.no_grad():
        for path, module in skippable_blocks(unet):  # each unit alone skipped: shapes still fit
            handle = add_hook(module, "test/skip", lambda forward, *a, **k: a[0])
            try:
                assert unet(x, t, class_labels=torch.tensor([1, 10])).sample.shape == x.shape, path
            finally:
                handle.remove()


def _toy_objective(shares):
    """Prefers few skips at the last steps and levels near a target; counts its calls."""
    calls = []

    def objective(c: Candidate):
        calls.append(c)
        weight = [0.1 * (i + 1) for i in range(c.num_steps)]
        skipped = sum(w * len(b) for w, b in zip(weight, c.skip or ((),) * c.num_steps))
        return skipped + sum((v - t) ** 2 for v, t in zip(c.log_sigmas, (2.0, 0.5, -1.0, -2.5))), 0.0

    return objective, calls


def test_the_joint_search_keeps_the_cost_budget_and_the_step_count():
    shares, budget, n = (0.16,) * 6, 3.2, 5
    start_skip = budget_pattern(n, shares, budget, "late")
    assert Candidate((0.0,) * 4, (1,) * n, (False,) * n, ("bh2",) * n, skip=start_skip).cost(shares) <= budget
    start = Candidate((3.0, 1.0, 0.0, -1.0), (2,) * n, (True,) * n, ("bh2",) * n, "data", start_skip)
    objective, calls = _toy_objective(shares)
    result = search(
        objective, [start], log_sigma_max=math.log(80.0), log_sigma_min=math.log(0.002), seconds=1e9,
        max_evaluations=400, shares=shares, cost_budget=budget, seed=1,
    )  # fmt: skip
    assert calls and all(c.cost(shares) <= budget + 1e-9 for c in calls)  # nothing over budget is ever run
    assert all(len(c.skip) == n and c.num_steps == n and len(set(c.log_sigmas)) == n - 1 for c in calls)
    assert len({c.skip for c in calls}) > 3  # the skip sets were searched
    assert result.best.cost(shares) <= budget + 1e-9 and result.best_score < result.start_best

    def mean_step(skip):
        return sum(i * len(b) for i, b in enumerate(skip)) / sum(len(b) for b in skip)

    assert mean_step(result.best.skip) < mean_step(start_skip) - 0.5  # skips moved to the cheap (early) steps
    with pytest.raises(ValueError, match="no skip pattern"):
        budget_pattern(n, shares, 0.5, "early")
    with pytest.raises(ValueError, match="both shares and cost_budget"):
        search(objective, [start], log_sigma_max=4.0, log_sigma_min=-6.0, seconds=1.0, shares=shares)


def test_the_search_is_progressive_steps_first_then_skip_sets():
    shares, budget, n = (0.16,) * 6, 3.2, 5
    start = Candidate((3.0, 1.0, 0.0, -1.0), (2,) * n, (True,) * n, ("bh2",) * n, "data",
                      budget_pattern(n, shares, budget, "late"))  # fmt: skip
    kwargs = dict(log_sigma_max=math.log(80.0), log_sigma_min=math.log(0.002), seconds=1e9, max_evaluations=60,
                  shares=shares, cost_budget=budget, evolution_share=1.0)  # fmt: skip
    objective, calls = _toy_objective(shares)
    search(objective, [start], steps_first=1.0, **kwargs)  # only the steps move: the start's skips ride along
    assert len(calls) > 30 and {c.skip for c in calls} == {start.skip}
    assert len({c.log_sigmas for c in calls}) > 30
    objective, calls = _toy_objective(shares)
    search(objective, [start], steps_first=0.5, **kwargs)
    first, second = calls[: len(calls) // 3], calls[2 * len(calls) // 3 :]
    assert {c.skip for c in first} == {start.skip} and len({c.skip for c in second}) > 3


def test_steps_only_candidates_keep_their_keys():
    c = Candidate((1.0,), (1, 1), (False, False), ("bh2", "bh2"))
    assert "skip" not in json.loads(c.key())  # saved searches from before skips replay unchanged
    assert "skip" in json.loads(Candidate((1.0,), (1, 1), (False, False), ("bh2", "bh2"), skip=((1,), ())).key())


def test_tune_with_skip_cost_writes_a_skipping_plan_within_budget(model, tmp_path):
    config = TuneConfig(nfe=4, skip_cost=3.0, minutes=30, n_search=4, n_heldout=10, reference_steps=8,
                        max_evaluations=70, fd_candidates=0, use_v3=False)  # fmt: skip
    out = tmp_path / "joint.json"
    plan = tune(model, config, out, progress=False)
    assert plan.skip is not None and plan.num_steps == 4 and plan.nfe == 4
    shares = plan.search["architecture"]["flop_shares"]
    assert plan.cost == pytest.approx(plan.cost_with(shares)) and plan.cost <= 3.0 + 1e-9
    assert plan.search["stock_starts"] == 3 * 5 * 3  # grids x solvers x skip patterns
    assert load_plan(out) == plan
    assert hasten.generate(model, 2, plan=plan).nfe == 4 and hooked_modules(model.network) == {}
    with pytest.raises(TuneError, match="skip_cost must be a number in"):
        TuneConfig(nfe=4, skip_cost=4.0)
    with pytest.raises(TuneError, match="fit stage"):
        TuneConfig(nfe=4, skip_cost=3.0, fit_iterations=10)
    res = CliRunner().invoke(app, ["tune", "--model", "mnist-dit", "--nfe", "3", "--skip-cost", "5",
                                   "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert res.exit_code == 2 and "skip_cost must be a number in (0, nfe=3)" in res.output


def test_a_recipe_refuses_a_skipping_plan_with_a_cache_before_sampling():
    from hasten import Recipe, RecipeError
    from hasten.accel import BlockCacheConfig
    from hasten.tune.plan import Plan

    plan = Plan((10.0, 1.0, 0.0), "euler", skip=((0,), ()), cost=1.8, nfe=2)
    with pytest.raises(RecipeError, match="skips blocks at some steps and a cache"):
        Recipe(model="mnist-dit", plan=plan, cache=BlockCacheConfig(interval=2))
    assert Recipe(model="mnist-dit", plan=plan).plan.skip == ((0,), ())

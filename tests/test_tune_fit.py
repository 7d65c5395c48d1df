"""The fit stage of `hasten tune`: the differentiable sampler is the plan's sampler, a killed fit resumes to
the same weights, and the tuner keeps fitted weights only when they win on validation noise."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch

import hasten
from hasten.generate import default_labels
from hasten.metrics.reference import reference_samples, rmse
from hasten.seeds import initial_noise
from hasten.tune import FitConfig, Plan, TuneConfig, TuneError, dpmpp_2m_weights, fit_weights, tune
from hasten.tune.fit import multistep_samples


def test_the_fit_sampler_is_the_plan_sampler(tiny_model):
    model = hasten.load(tiny_model)
    sigmas = hasten.get_sigmas("auto", 3, model.schedule)
    weights = dpmpp_2m_weights(sigmas[:-1])
    offsets = torch.tensor([0.01, -0.02, 0.03])
    x_weights = [b / a + float(e) for a, b, e in zip(sigmas.tolist(), sigmas[1:].tolist(), offsets, strict=False)]
    plan = Plan(tuple(sigmas.tolist()), "learned_multistep", {"coefficients": weights, "x_weights": x_weights})
    expected = hasten.generate(model, 4, plan=plan, seed=5).samples
    noise = initial_noise(5, range(4), model.info.image_shape)  # the noise generate() draws for seed 5
    labels = default_labels(model, 4, None)
    cond = model.conditioning(labels, range(4))
    with torch.no_grad():
        got = multistep_samples(model.denoiser, model, torch.log(sigmas[:-1]),
                                [torch.tensor(w) for w in weights], noise, cond, offsets)  # fmt: skip
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)


def _fit_setup(tiny_model):
    model = hasten.load(tiny_model)
    sigmas = tuple(hasten.get_sigmas("auto", 3, model.schedule).tolist())
    reference = reference_samples(model, 6, seed=2000, steps=8)

    def validate(levels, coefficients, x_weights) -> float:
        plan = Plan(levels, "learned_multistep", {"coefficients": coefficients, "x_weights": x_weights})
        return rmse(hasten.generate(model, 6, plan=plan, seed=2000).images01, reference)

    config = FitConfig(iterations=6, lr=0.05, n_train=8, batch_size=4, every=2, reference_steps=8)
    return model, sigmas, validate, config


def test_a_killed_fit_resumes_to_the_same_weights(tiny_model):
    model, sigmas, validate, config = _fit_setup(tiny_model)
    grad_flags = [p.requires_grad for p in model.network.parameters()]
    whole = fit_weights(model, sigmas, config, validate, progress=False)
    assert [h["iteration"] for h in whole.history] == [0, 2, 4, 6]
    assert whole.validation_rmse <= whole.start_validation_rmse  # the start is a candidate: never worse
    assert whole.start in ("dpmpp_2m", "ddim")  # the better of the two on the validation noise
    assert whole.history[0]["validation_rmse"] == whole.start_validation_rmse
    assert whole.sigmas[0] == sigmas[0] and whole.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(whole.sigmas, whole.sigmas[1:], strict=False))
    assert any(abs(a - b) > 1e-6 for a, b in zip(whole.coefficients[1], dpmpp_2m_weights(torch.tensor(sigmas[:-1]))[1],
                                                  strict=True))  # fmt: skip

    saved = {}

    def kill_at_four(state):
        saved.update(copy.deepcopy(json.loads(json.dumps(state))))  # what the tuner writes to disk
        if state["iteration"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_weights(model, sigmas, config, validate, on_checkpoint=kill_at_four, progress=False)
    assert saved["iteration"] == 4
    resumed = fit_weights(model, sigmas, config, validate, state=saved, progress=False)
    assert [h["iteration"] for h in resumed.history] == [0, 2, 4, 6]
    for a, b in zip(resumed.coefficients, whole.coefficients, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert resumed.sigmas == pytest.approx(whole.sigmas, rel=1e-6)
    assert resumed.x_weights == pytest.approx(whole.x_weights, abs=1e-6)
    with pytest.raises(ValueError, match="fit version 1"):  # a checkpoint of the model-space fit, no a_i
        fit_weights(model, sigmas, config, validate, state={k: v for k, v in saved.items() if k != "version"},
                    progress=False)  # fmt: skip
    assert [p.requires_grad for p in model.network.parameters()] == grad_flags  # the network is left as it was
    with pytest.raises(ValueError, match="descending grid"):
        fit_weights(model, (1.0, 2.0, 0.0), config, validate, progress=False)


def test_the_fit_starts_from_the_best_grid_and_resumes_on_it(tiny_model):
    """With an alternative grid the start is the best of 2M and DDIM on either grid by validation; a killed
    fit resumes on the grid it started from."""
    model, sigmas, validate, config = _fit_setup(tiny_model)
    other = tuple(hasten.karras(3, float(model.schedule.sigma_min), sigmas[0]).tolist())
    scored = {}

    def recording(levels, coefficients, x_weights):
        score = validate(levels, coefficients, x_weights)
        scored.setdefault(tuple(levels), []).append(score)
        return score

    whole = fit_weights(model, sigmas, config, recording, alternatives=[other, sigmas], progress=False)
    starts = [v for grid in (sigmas, other) for v in scored[grid][:2]]  # 2M and DDIM on each grid, first
    assert len(starts) == 4 and whole.start_validation_rmse == min(starts)
    assert whole.start.endswith(", grid 1") == (min(scored[other][:2]) < min(scored[sigmas][:2]))

    saved = {}

    def kill_at_four(state):
        saved.update(copy.deepcopy(json.loads(json.dumps(state))))
        if state["iteration"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_weights(model, sigmas, config, validate, alternatives=[other], on_checkpoint=kill_at_four, progress=False)
    resumed = fit_weights(model, sigmas, config, validate, alternatives=[other], state=saved, progress=False)
    assert resumed.sigmas == pytest.approx(whole.sigmas, rel=1e-6) and resumed.start == whole.start
    for a, b in zip(resumed.coefficients, whole.coefficients, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    with pytest.raises(ValueError, match="alternative grids need 3 steps"):
        fit_weights(model, sigmas, config, validate, alternatives=[other[1:]], progress=False)


def test_tune_with_a_fit_stage(tiny_model, tmp_path):
    model = hasten.load(tiny_model)
    config = TuneConfig(nfe=3, minutes=30, n_search=4, n_heldout=10, reference_steps=8, max_evaluations=6,
                        fd_candidates=0, use_v3=False, fit_iterations=4, fit_every=2, n_fit=8)  # fmt: skip
    out = tmp_path / "plan.json"
    plan = tune(model, config, out, progress=False)
    fit = plan.search["fit"]
    assert fit["kept"] == ("fitted" if fit["validation_rmse"] < fit["plan_validation_rmse"] else "plan")
    assert (plan.solver == "learned_multistep") == (fit["kept"] == "fitted")
    assert [h["iteration"] for h in fit["history"]] == [0, 2, 4]
    state = json.loads(out.with_name(out.name + ".search.json").read_text())
    assert state["fit"]["iteration"] == 4
    again = tune(model, config, out, resume=True, progress=False)  # replays the search and the finished fit
    assert again.sigmas == plan.sigmas and again.options == plan.options
    assert hasten.generate(model, 2, plan=plan).nfe == 3
    with pytest.raises(TuneError, match="fit with other settings"):
        tune(model, dataclasses.replace(config, fit_lr=0.5), out, resume=True, progress=False)
    longer = tune(model, dataclasses.replace(config, fit_iterations=6), out, resume=True, progress=False)
    assert [h["iteration"] for h in longer.search["fit"]["history"]] == [0, 2, 4, 6]  # continued, not restarted
    state_path = out.with_name(out.name + ".search.json")
    state = json.loads(state_path.read_text())
    del state["fit"]["version"]  # a fit an earlier hasten saved (model-space loss, no a_i)
    state_path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="the fit starts again"):
        refit = tune(model, config, out, resume=True, progress=False)
    assert [h["iteration"] for h in refit.search["fit"]["history"]] == [0, 2, 4]  # the search replayed, not redone
    assert json.loads(state_path.read_text())["cache"] == state["cache"]
    with pytest.raises(TuneError, match="fit_iterations must be >= 0"):
        TuneConfig(fit_iterations=-1)


def test_the_fit_learning_rate_schedules():
    """Cosine decays from lr to LR_FLOOR * lr at the last iteration (and stays there when extended past it);
    constant stays at lr; an unknown schedule is refused by name."""
    from hasten.tune.fit import LR_FLOOR, learning_rate

    cosine = FitConfig(iterations=100, lr=0.02)
    assert learning_rate(cosine, 1) == pytest.approx(0.02, rel=1e-3)
    assert learning_rate(cosine, 50) == pytest.approx(0.02 * (LR_FLOOR + (1 - LR_FLOOR) / 2))
    assert learning_rate(cosine, 100) == pytest.approx(0.02 * LR_FLOOR)
    steps = [learning_rate(cosine, i) for i in range(1, 101)]
    assert all(a > b for a, b in itertools.pairwise(steps))
    assert learning_rate(FitConfig(iterations=100, lr=0.02, lr_schedule="constant"), 100) == 0.02
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        FitConfig(iterations=10, lr_schedule="step")
    with pytest.raises(TuneError, match="fit_lr_schedule must be one of"):
        TuneConfig(fit_lr_schedule="linear")

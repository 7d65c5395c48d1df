"""Noise schedules and discretisations: round trips, endpoints, agreement with diffusers' tables."""

import math

import pytest
import torch

from hasten.schedules import (
    VE,
    FlowMatching,
    VPCosine,
    VPDiscrete,
    VPLinear,
    betas_for,
    discrete_timesteps,
    from_sigmas,
    from_timesteps,
    get_sigmas,
    karras,
    logsnr_uniform,
    rescale_zero_terminal_snr,
    time_quadratic,
    time_uniform,
)

SCHEDULES = [
    VPDiscrete.from_betas("linear"),
    VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012),
    VPDiscrete.from_betas("squaredcos_cap_v2"),
    VPLinear(),
    VPCosine(),
    VE(),
    FlowMatching(),
    FlowMatching(shift=3.0),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_time_lambda_round_trip(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 57, dtype=torch.float64)
    lam = schedule.lambda_(t)
    assert torch.all(lam[1:] < lam[:-1]), "lambda must decrease with t"
    torch.testing.assert_close(schedule.t_from_lambda(lam), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.t_from_ve_sigma(schedule.ve_sigma(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_alpha_sigma_consistent_with_lambda(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 11, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(torch.log(a) - torch.log(s), schedule.lambda_(t))
    if isinstance(schedule, VPDiscrete | VPLinear | VPCosine):
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))
    if isinstance(schedule, FlowMatching):
        torch.testing.assert_close(a + s, torch.ones_like(a))  # x_t = (1 - t) x0 + t eps
        torch.testing.assert_close(s, t)


def test_vp_discrete_matches_alphas_cumprod_at_integers():
    betas = betas_for("linear")
    ab = torch.cumprod(1 - betas, 0)
    sched = VPDiscrete(ab)
    idx = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha(idx) ** 2, ab)
    assert sched.sigma_max == pytest.approx(math.sqrt((1 - ab[-1]) / ab[-1]))


def test_vp_linear_continuous_formula():
    sched = VPLinear(0.1, 20.0)
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    log_alpha = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    torch.testing.assert_close(sched.alpha(t), torch.exp(log_alpha))


def test_beta_tables_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for kind, kw in [
        ("linear", {}),
        ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("squaredcos_cap_v2", {}),
    ]:
        sched = diffusers.DDPMScheduler(beta_schedule=kind, **kw)
        ours = VPDiscrete.from_betas(kind, **kw).alphas_cumprod
        torch.testing.assert_close(ours.float(), sched.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr():
    ab = torch.cumprod(1 - betas_for("scaled_linear", beta_start=0.00085, beta_end=0.012), 0)
    rescaled = rescale_zero_terminal_snr(ab)
    assert rescaled[-1] == 0
    torch.testing.assert_close(rescaled[0], ab[0])
    assert torch.all(rescaled[1:] < rescaled[:-1])
    sched = VPDiscrete(rescaled)  # the exact zero is clamped so the VE level stays finite
    assert math.isfinite(sched.sigma_max) and sched.sigma_max > 1000
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    torch.testing.assert_close(rescaled[:-1].float(), ref.alphas_cumprod[:-1].float(), rtol=1e-4, atol=1e-7)


def test_flow_shift_and_resolution():
    flow = FlowMatching(shift=3.0)
    u = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(flow.time_shift(u), 3 * u / (1 + 2 * u))
    assert FlowMatching.for_resolution(256).shift == pytest.approx(math.exp(0.5))
    assert FlowMatching.for_resolution(4096).shift == pytest.approx(math.exp(1.15))


def test_initial_noise_scale():
    assert VPDiscrete.from_betas().initial_noise_scale(3.0) == pytest.approx(math.sqrt(10.0))
    assert FlowMatching().initial_noise_scale(3.0) == pytest.approx(4.0)
    assert VE().initial_noise_scale(3.0) == pytest.approx(3.0)


# -- discretisations -----------------------------------------------------------------------------


def _check_grid(s, n, last_zero=True):
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert torch.all(s[1:] < s[:-1])
    assert (s[-1] == 0) == last_zero


def test_karras_matches_formula():
    s = karras(5, 0.002, 80.0, rho=7.0)
    _check_grid(s, 5)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], expected)
    s2 = karras(5, 0.002, 80.0, final="sigma_min")
    _check_grid(s2, 5, last_zero=False)
    assert s2[0] == pytest.approx(80.0) and s2[-1] == pytest.approx(0.002)


def test_logsnr_is_geometric():
    s = logsnr_uniform(4, 0.1, 10.0)
    _check_grid(s, 4)
    ratios = s[1:-1] / s[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))


@pytest.mark.parametrize(
    "schedule", [VPLinear(), VPCosine(), VPDiscrete.from_betas(), FlowMatching(shift=3.0)], ids=repr
)
def test_time_grids(schedule):
    for fn in (time_uniform, time_quadratic):
        s = fn(8, schedule)
        _check_grid(s, 8)
        t = schedule.t_from_ve_sigma(s[:-1])
        if not isinstance(schedule, FlowMatching):
            assert t[0] == pytest.approx(schedule.t_max) and t[-1] == pytest.approx(schedule.t_min)
    u = torch.linspace(VPLinear().t_max, VPLinear().t_min, 6, dtype=torch.float64)
    torch.testing.assert_close(VPLinear().t_from_ve_sigma(time_uniform(6, VPLinear())[:-1]), u)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_discrete_spacings_match_diffusers_ddim(spacing):
    diffusers = pytest.importorskip("diffusers")
    for n in (1, 7, 10, 50):
        sch = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        sch.set_timesteps(n)
        ours = discrete_timesteps(n, 1000, spacing, steps_offset=1 if spacing == "leading" else 0)
        assert ours.tolist() == sch.timesteps.tolist(), (spacing, n)


def test_get_sigmas_registry():
    sched = VPDiscrete.from_betas()
    for name in ["karras", "logsnr", "time_uniform", "time_quadratic", "linspace", "leading", "trailing"]:
        _check_grid(get_sigmas(name, 10, sched), 10)
    with pytest.raises(KeyError, match=r"available: .*karras"):
        get_sigmas("nope", 10, sched)
    with pytest.raises(ValueError, match="discrete schedule"):
        get_sigmas("trailing", 10, VPLinear())


def test_from_timesteps():
    sched = VPDiscrete.from_betas()
    s = from_timesteps(sched, [999, 500, 0])
    torch.testing.assert_close(s[:-1], sched.ve_sigma(torch.tensor([999.0, 500.0, 0.0])))
    assert s[-1] == 0
    with pytest.raises(ValueError, match="lie in"):
        from_timesteps(sched, [1500, 10])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1.0], "at least 2"),
        ([1.0, 2.0], "strictly descending"),
        ([2.0, 2.0, 0.0], "strictly descending"),
        ([2.0, -1.0], "non-negative"),
        ([float("nan"), 0.0], "finite"),
        ([float("inf"), 0.0], "finite"),
    ],
)
def test_from_sigmas_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        from_sigmas(bad)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="positive integer"):
        karras(n, 0.1, 10.0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="strictly decreasing"):
        VPDiscrete(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        betas_for("cubic")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras(4, 10.0, 1.0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(shift=0.0)


def test_auto_grid():
    vp, flow = VPDiscrete.from_betas(), FlowMatching(shift=3.0)
    # DDPM-type: trailing, so the last model call is at timestep T/n - 1, not at the smallest trained level
    torch.testing.assert_close(get_sigmas("auto", 6, vp), get_sigmas("trailing", 6, vp))
    assert float(vp.t_from_ve_sigma(get_sigmas("auto", 5, vp)[-2])) == pytest.approx(199, abs=1e-6)
    continuous = VPLinear()
    torch.testing.assert_close(get_sigmas("auto", 6, continuous), get_sigmas("karras", 6, continuous))
    s = get_sigmas("auto", 5, FlowMatching())
    _check_grid(s, 5)
    # SD3 / Flux: t uniform from t_max down to t_max / n (no model call at already-clean t_min), then 0
    t = FlowMatching().t_from_ve_sigma(s[:-1])
    torch.testing.assert_close(t, torch.linspace(1 - 1e-4, 0, 6, dtype=torch.float64)[:-1])
    shifted = flow.t_from_ve_sigma(get_sigmas("auto", 5, flow)[:-1])
    torch.testing.assert_close(shifted, flow.time_shift(torch.linspace(1 - 1e-4, 0, 6, dtype=torch.float64)[:-1]))

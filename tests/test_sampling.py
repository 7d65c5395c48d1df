"""The shared sampling loop: the contract every solver keeps, NFE accounting, bad input, stochastic solvers."""

import itertools
import json
import math

import pytest
import torch

import hasten
from hasten.models import ProductMixture
from hasten.solvers import NonFiniteOutputError, get_solver

MIX = ProductMixture()
ALL = hasten.available()
# Options a solver needs to run on a bare denoiser (v3's default ems="auto" needs a model, see test_tune).
BARE = {"dpm_solver_v3": {"ems": "degenerate"}}
DETERMINISTIC = [name for name in ALL if not get_solver(name, **BARE.get(name, {})).stochastic]


def _start(shape=(3, 2, 4), sigma=10.0, seed=0, dtype=torch.float32):
    return (MIX.sample(shape, sigma=sigma, generator=torch.Generator().manual_seed(seed))).to(dtype)


def expected_nfe(name: str, n: int) -> int:
    """NFE per solver for an n-step grid ending at 0 (each formula follows from the algorithm)."""
    table = {
        "heun": 2 * n - 1,  # the step onto sigma = 0 is a plain Euler step
        "dpm_solver_2": 2 * n - 1,
        "dpmpp_2s": 2 * n - 1,
        "dpmpp_sde": 2 * n - 1,
        "dpm_solver_3": 3 * n - 2,
        "dpmpp_3s": 3 * n - 2,
        "plms": n + 3 * min(3, n - 1),  # F-PNDM: pseudo-RK4 warm-up on the first three steps (not onto 0)
        "dpmpp_3m": n + (n >= 2),  # the Taylor 3M's singlestep first step (none when it lands on 0)
        "dpm_solver_3m": n + (n >= 2),
    }
    return table.get(name, n)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_every_solver_contract(name, n):
    x = _start()
    sigmas = hasten.karras(n, 0.05, 10.0)
    gen = torch.Generator().manual_seed(7)
    options = BARE.get(name, {})
    out = hasten.sample(MIX, x, sigmas, name, generator=gen, return_info=True, **options)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype
    assert torch.isfinite(out.x).all()
    assert out.nfe == expected_nfe(name, n), f"{name}: {out.nfe} NFE"
    again = hasten.sample(MIX, x, sigmas, name, generator=torch.Generator().manual_seed(7), **options)
    torch.testing.assert_close(out.x, again, rtol=0, atol=0)  # same generator, same result


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solvers_converge_to_the_same_answer(name):
    """Deterministic solvers (40 steps, 400 for first order) land within 1e-2 of the exact flow to sigma = 0.05."""
    solver = get_solver(name, **BARE.get(name, {}))
    x = _start(dtype=torch.float64)
    exact = MIX.exact_flow(x, 10.0, 0.05)
    n = 400 if solver.convergence_order == 1 else 40
    out = hasten.sample(MIX, x, hasten.karras(n, 0.05, 10.0, final="sigma_min"), solver)
    assert (out - exact).abs().max() < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = _start(dtype=dtype)
    seen = []

    def den(x_, s):
        seen.append(x_.dtype)
        return MIX(x_, s)

    out = hasten.sample(den, x, hasten.karras(6, 0.05, 10.0), "dpmpp_2m")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert set(seen) == {torch.float32}  # numerics run in float32
    ref = hasten.sample(MIX, x.float(), hasten.karras(6, 0.05, 10.0), "dpmpp_2m")
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    ("name", "options"),
    [("dpmpp_3m", {}), ("unipc", {"order": 3}), ("plms", {}), ("dpm_solver_v3", {"ems": "degenerate", "order": 3})],
)
def test_explicit_state_resumes_exactly(name, options):
    """Splitting a run in two and passing the state on reproduces the single run."""
    options = {**options, "lower_order_final": False} if name != "plms" else options
    x = _start(dtype=torch.float64)
    sigmas = hasten.karras(12, 0.05, 10.0, final="sigma_min")
    whole = hasten.sample(MIX, x, sigmas, name, **options)
    first = hasten.sample(MIX, x, sigmas[:6], name, return_info=True, **options)
    second = hasten.sample(MIX, first.x, sigmas[5:], name, state=first.state, **options)
    torch.testing.assert_close(second, whole, rtol=1e-12, atol=1e-12)


def test_denoise_to_zero_callback_and_hooks():
    x = _start()
    events = []

    class Hook:
        def begin_step(self, info):
            events.append(("hook", info.index, info.num_steps))

    out = hasten.sample(
        MIX,
        x,
        hasten.karras(4, 0.05, 10.0, final="sigma_min"),
        "euler",
        denoise_to_zero=True,
        hooks=[Hook()],
        callback=lambda i, s, x_: events.append(("cb", i, round(s, 4))),
        return_info=True,
    )
    assert out.nfe == 5
    assert [e for e in events if e[0] == "hook"] == [("hook", i, 4) for i in range(4)]
    assert [e[1] for e in events if e[0] == "cb"] == [0, 1, 2, 3]
    torch.testing.assert_close(
        out.x, MIX(hasten.sample(MIX, x, hasten.karras(4, 0.05, 10.0, final="sigma_min"), "euler"), 0.05)
    )


def test_conditioning_is_passed_through():
    def den(x, sigma, shift):
        return torch.zeros_like(x) + shift

    out = hasten.sample(den, torch.randn(2, 3) * 5, hasten.karras(3, 0.1, 5.0), "euler", cond={"shift": 1.5})
    torch.testing.assert_close(out, torch.full((2, 3), 1.5))


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_solver_lists_available():
    with pytest.raises(KeyError, match=r"available: .*dpmpp_2m.*unipc"):
        hasten.sample(MIX, _start(), hasten.karras(3, 0.1, 5.0), "dpmpp_9m")


def test_unknown_option_lists_accepted():
    with pytest.raises(TypeError, match=r"'dpmpp_2m'.*'etaa'.*takes: order, prediction"):
        hasten.sample(MIX, _start(), hasten.karras(3, 0.1, 5.0), "dpmpp_2m", etaa=1.0)
    with pytest.raises(TypeError, match="already-configured"):
        hasten.sample(MIX, _start(), hasten.karras(3, 0.1, 5.0), get_solver("euler"), order=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order": 4}, "order must be one of 1, 2, 3; got 4"),
        ({"solver_type": "rk4"}, "solver_type"),
        ({"eta": -1.0}, "eta"),
        ({"order": 3, "eta": 1.0}, "SDE variant"),
    ],
)
def test_invalid_option_values(options, message):
    with pytest.raises(ValueError, match=message):
        get_solver("dpmpp_2m", **options)


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ([5.0], "at least 2"),
        ([1.0, 5.0, 0.0], "strictly descending"),
        ([5.0, float("nan"), 0.0], "finite"),
        ([5.0, -1.0], "non-negative"),
    ],
)
def test_bad_sigmas(sigmas, message):
    with pytest.raises(ValueError, match=message):
        hasten.sample(MIX, _start(), torch.tensor(sigmas), "euler")


def test_wrong_shape_and_non_finite_outputs():
    with pytest.raises(ValueError, match=r"shape \(3, 2\) for input shape \(3, 2, 4\) at step 0"):
        hasten.sample(lambda x, s: x[..., 0], _start(), hasten.karras(3, 0.1, 5.0), "euler")

    def blows_up(x, sigma):
        return x * float("nan") if sigma[0] < 1.0 else MIX(x, sigma)

    with pytest.raises(NonFiniteOutputError, match=r"at step 2 \(sigma=0\.\d+"):
        hasten.sample(blows_up, _start(), hasten.karras(4, 0.1, 5.0), "dpmpp_2m")
    with pytest.raises(TypeError, match="must return a Tensor"):
        hasten.sample(lambda x, s: x.numpy(), _start(), hasten.karras(3, 0.1, 5.0), "euler")


def test_bad_start():
    with pytest.raises(TypeError, match="floating-point"):
        hasten.sample(MIX, torch.zeros(2, 3, dtype=torch.int64), hasten.karras(3, 0.1, 5.0), "euler")
    with pytest.raises(ValueError, match="NaN or infinity"):
        hasten.sample(MIX, torch.full((2, 3), float("inf")), hasten.karras(3, 0.1, 5.0), "euler")


def test_solver_configs_round_trip_json():
    for name in ALL:
        solver = get_solver(name)
        data = json.loads(json.dumps(solver.to_dict()))
        assert hasten.Solver.from_dict(data) == solver


def test_every_registered_name_names_its_solver():
    """Each name builds a solver that reports that name (an alias reports the name it aliases), and a class
    behind several names reports the preset its options match, on instances and on the class."""
    from hasten.solvers import SOLVERS

    for name in ALL:
        spec = SOLVERS.get(name)
        solver = get_solver(name, **BARE.get(name, {}))
        assert type(solver) is spec.cls
        assert solver.name == (spec.alias_of or name), f"get_solver({name!r}).name == {solver.name!r}"
        assert get_solver(solver.name, **BARE.get(name, {})) == solver  # the reported name rebuilds it
        assert spec.cls.name in ALL and SOLVERS.get(spec.cls.name).cls is spec.cls
    assert hasten.solvers.DPMSolverMultistep.name == "dpmpp_2m"
    assert hasten.solvers.EulerAncestral.name == "euler_ancestral"
    assert hasten.solvers.DPMSolverMultistep(order=2, eta=1.0).name == "dpmpp_2m_sde"
    assert hasten.solvers.EulerAncestral(eta=0.0).name == "ddim"
    assert get_solver("dpmpp_3m", third_order_term="reference").name == "dpmpp_3m"  # other options keep the name
    assert get_solver("ddpm") == get_solver("euler_ancestral")
    with pytest.raises(ValueError, match="equals 'dpmpp_2m'; register it with alias_of"):
        hasten.solvers.register_solver("dpmpp_2m_again", order=2)(hasten.solvers.DPMSolverMultistep)
    assert "dpmpp_2m_again" not in hasten.available()


# -- stochastic samplers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("ddpm", {}), ("euler_ancestral", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m_sde", {}), ("dpmpp_sde", {})],
)
def test_stochastic_samplers_match_the_exact_distribution(name, options):
    """Samples from p_sigma_max pushed to sigma = 0 must follow p_0: compare quantiles with exact samples."""
    n = 20_000
    x = MIX.sample((n, 1), sigma=20.0, generator=torch.Generator().manual_seed(0))
    sigmas = hasten.karras(200, 0.01, 20.0)  # ancestral samplers are weak order 1: their variance error is O(1/n)
    out = hasten.sample(MIX, x, sigmas, name, generator=torch.Generator().manual_seed(1), **options)
    # One-sample Kolmogorov-Smirnov distance to the exact CDF of p_0 (5% critical value ~0.0096 at n = 20k).
    sorted_, _ = torch.sort(out[:, 0].double())
    cdf = MIX._cdf_sf(sorted_, 0.0)[0]
    i = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((cdf - i).abs(), (cdf - i + 1 / n).abs()).max())
    assert ks < 0.02, f"{name}: KS distance {ks:.4f}"
    mean = (MIX.weights * MIX.means).sum()  # exact moments of p_0
    std = ((MIX.weights * (MIX.means**2 + MIX.stds**2)).sum() - mean**2).sqrt()
    assert abs(out.mean() - mean) < 0.02 and abs(out.std() - std) < 0.02, (out.mean(), out.std(), mean, std)


def test_stochastic_noise_comes_from_the_generator():
    x = _start()
    sig = hasten.karras(5, 0.05, 10.0)
    a = hasten.sample(MIX, x, sig, "ddpm", generator=torch.Generator().manual_seed(1))
    b = hasten.sample(MIX, x, sig, "ddpm", generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)
    assert get_solver("ddpm").stochastic and not get_solver("ddim").stochastic


def test_a_callback_may_replace_the_state():
    """callback(i, sigma_next, x) returning a tensor replaces x (diffusers' callback_on_step_end contract);
    None leaves it; anything else is refused."""
    gmm = hasten.models.ProductMixture()
    sigmas = hasten.schedules.karras(6, 0.01, 20.0)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    plain = hasten.sample(gmm, x, sigmas, "dpmpp_2m")
    assert torch.equal(hasten.sample(gmm, x, sigmas, "dpmpp_2m", callback=lambda i, s, x: None), plain)
    zeroed = hasten.sample(gmm, x, sigmas, "dpmpp_2m", callback=lambda i, s, x: torch.zeros_like(x) if i == 4 else None)
    assert not torch.allclose(zeroed, plain)
    with pytest.raises(TypeError, match="return None or a replacement x"):
        hasten.sample(gmm, x, sigmas, "dpmpp_2m", callback=lambda i, s, x: True)
    with pytest.raises(ValueError, match="callback returned shape"):
        hasten.sample(gmm, x, sigmas, "dpmpp_2m", callback=lambda i, s, x: x[:1])


def test_learned_multistep_holds_ddim_and_dpmpp_2m():
    """learned_multistep with no weights is DDIM; with DPM-Solver++(2M)'s weights on a grid it is dpmpp_2m
    there (first order at the first and the last step, as dpmpp_2m below 15 steps); bad weights are refused."""
    from hasten.tune import dpmpp_2m_weights

    gmm = ProductMixture()
    sigmas = hasten.karras(6, 0.05, 10.0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    ddim = hasten.sample(gmm, x, sigmas, "ddim")
    torch.testing.assert_close(hasten.sample(gmm, x, sigmas, "learned_multistep"), ddim)
    levels = sigmas.tolist()
    rows = dpmpp_2m_weights(sigmas[:-1])  # what the fit stage of `hasten tune` starts from
    fitted = hasten.sample(gmm, x, sigmas, "learned_multistep", coefficients=rows)
    torch.testing.assert_close(fitted, hasten.sample(gmm, x, sigmas, "dpmpp_2m"), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="fitted for 6 steps; the grid has 3"):
        hasten.sample(gmm, x, hasten.karras(3, 0.05, 10.0), "learned_multistep", coefficients=rows)
    with pytest.raises(ValueError, match="row 1 must hold 2 weights"):
        get_solver("learned_multistep", coefficients=[[1.0], [1.0]])
    plan = hasten.Plan(tuple(levels), "learned_multistep", {"coefficients": rows})
    torch.testing.assert_close(hasten.sample(gmm, x, plan=plan), fitted)
    # State weights: a_i = r_i is the same update; another a_i changes exactly the weight on x_i.
    ratios = [b / a for a, b in itertools.pairwise(levels)]
    same = hasten.sample(gmm, x, sigmas, "learned_multistep", coefficients=rows, x_weights=ratios)
    torch.testing.assert_close(same, fitted, rtol=0, atol=1e-10)
    last_kept = hasten.sample(gmm, x, sigmas, "learned_multistep", coefficients=rows, x_weights=[*ratios[:-1], 0.1])
    before_last = hasten.sample(gmm, x, sigmas[:-1], "learned_multistep", coefficients=rows[:-1])
    torch.testing.assert_close(last_kept - fitted, 0.1 * before_last, rtol=0, atol=1e-10)  # the last r is 0
    with pytest.raises(ValueError, match="one weight per coefficients row"):
        get_solver("learned_multistep", coefficients=rows, x_weights=[1.0])
    with pytest.raises(ValueError, match="x_weights has a non-finite"):
        get_solver("learned_multistep", coefficients=rows[:1], x_weights=[math.nan])


# -- Brownian-path noise ----------------------------------------------------------------------------------


def test_brownian_noise_is_one_path_whatever_queries_it():
    """Increments over a coarse interval are the sums of the fine ones, in any query order; a seed fixes the
    path; the normalised increments are standard normal and independent across disjoint steps."""
    from hasten.solvers.brownian import SIGMA_RANGE, BrownianNoise

    levels = torch.exp(torch.linspace(math.log(80.0), math.log(0.002), 41, dtype=torch.float64)).tolist()
    levels.insert(7, 0.5 * (levels[6] + levels[7]))  # a level off the log grid

    def increment(path, a, b):  # B(1/b^2) - B(1/a^2)
        return path(a, b) * math.sqrt(abs(1 / b**2 - 1 / a**2))

    forward = BrownianNoise(3, (6,), torch.float64, torch.device("cpu"))
    backward = BrownianNoise(3, (6,), torch.float64, torch.device("cpu"))
    fine = [increment(forward, a, b) for a, b in itertools.pairwise(levels)]
    coarse = [increment(backward, levels[i], levels[i + 2]) for i in reversed(range(0, len(levels) - 2, 2))][::-1]
    for i, c in enumerate(coarse):
        torch.testing.assert_close(c, fine[2 * i] + fine[2 * i + 1], rtol=1e-9, atol=1e-9)
    other = BrownianNoise(4, (6,), torch.float64, torch.device("cpu"))
    assert not torch.allclose(other(levels[3], levels[4]), forward(levels[3], levels[4]))
    big = BrownianNoise(0, (40_000,), torch.float32, torch.device("cpu"))
    z1, z2 = big(levels[10], levels[11]), big(levels[11], levels[12])
    for z in (z1, z2):
        assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert abs(float((z1 * z2).mean())) < 0.02
    with pytest.raises(ValueError, match="Brownian noise covers sigma in"):
        big(SIGMA_RANGE[1] * 2, 1.0)


STRONG = [("ddpm", {}), ("dpmpp_2m_sde", {}), ("dpmpp_sde", {}), ("ddim", {"eta": 0.5})]


@pytest.mark.parametrize(("name", "options"), STRONG, ids=lambda v: str(v))
def test_stochastic_samplers_converge_strongly(name, options):
    """Same generator seed, finer grids: the sample approaches the fine-step solution on the same Brownian
    path (strong convergence); with fresh noise per step (brownian=False) it does not approach anything."""
    x = MIX.sample((512,), sigma=10.0, generator=torch.Generator().manual_seed(0))

    def run(n, **extra):
        grid = torch.exp(torch.linspace(math.log(10.0), math.log(0.05), n + 1, dtype=torch.float64))
        return hasten.sample(MIX, x, grid, name, generator=torch.Generator().manual_seed(5), **options, **extra)

    fine = run(1280)
    errs = [float(((run(n) - fine) ** 2).mean().sqrt()) for n in (10, 40, 160)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 4, errs  # measured 5.7-12
    fresh = [float(((run(n, brownian=False) - run(1280, brownian=False)) ** 2).mean().sqrt()) for n in (10, 160)]
    assert fresh[1] > 0.8 * fresh[0] and fresh[1] > 10 * errs[2], fresh

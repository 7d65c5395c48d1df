"""Parity with diffusers: hasten's solvers against diffusers' schedulers on one eps-model.

What is compared: a diffusers scheduler and the matching hasten solver are run on the same
noise-prediction network (the analytic :class:`~hasten.models.ProductMixture` re-expressed by
:func:`~hasten.models.as_network` for the linear-beta DDPM table), from the same initial noise, through the
same timesteps. The hasten grid is built from the scheduler's own ``timesteps`` with
:func:`~hasten.schedules.from_timesteps` and checked against ``scheduler.sigmas`` where diffusers has them.
diffusers' VP-space start ``x_T`` becomes hasten's VE start ``x_T / alpha(sigma_0)``, and hasten's VE result
is multiplied by ``alpha(sigma_last)`` (1 when the grid ends at 0). Euler and Heun schedulers work in VE
space already and are compared directly. Each test checks the final samples and that hasten's NFE equals
the number of network calls diffusers made.

* ``DDIMScheduler`` (eta 0) -> ``ddim``; ``set_alpha_to_one=False`` ends at ``sigma(t=0)``, not at 0.
* ``DPMSolverMultistepScheduler`` -> ``dpmpp_2m`` / ``dpmpp_3m`` / ``dpm_solver_2m`` / ``dpm_solver_3m``
  (hasten's ``lower_order_final_below=15`` default is diffusers' "< 15 steps" rule).
* ``DPMSolverSinglestepScheduler`` -> ``dpmpp_2s`` / ``dpmpp_3s`` with ``intermediate="grid"``.
* ``UniPCMultistepScheduler`` -> ``unipc`` with ``variant`` = diffusers' ``solver_type`` and
  ``lower_order_final_below=2**31``; ``disable_corrector=list(range(n))`` is ``corrector=False``.
* ``PNDMScheduler(skip_prk_steps=True)`` -> ``plms`` with ``warmup="heun"``.
* ``EulerDiscreteScheduler`` -> ``euler``; ``HeunDiscreteScheduler`` -> ``heun``.

Where hasten differs on purpose, the option that reproduces diffusers:

* ``dpmpp_3m`` / ``dpm_solver_3m``: ``third_order_term="reference"`` (with ``warmup="lower_order"``, what
  ``"auto"`` resolves to for it). hasten's default Taylor 3M weights the second difference as the Taylor
  expansion requires and starts with a singlestep step (third order from noise), so it differs from
  diffusers by far more than rounding (see ``test_dpmpp_3m_default_is_not_diffusers``).
* UniPC: ``lower_order_final_below=2**31``: diffusers lowers the order at the end of runs of any length,
  hasten below 15 steps (as diffusers' DPM-Solver does).
* Singlestep DPM-Solver: ``intermediate="grid"`` (hasten's default places k evaluations inside each step).
* PLMS: ``warmup="heun"`` (hasten's default "prk" is F-PNDM, 4 NFE per warm-up step).
* UniPC: both default to ``variant="bh2"``; the tests pass the variant explicitly.

Set-ups that are not compared, and why:

* DDIM/PNDM with ``timestep_spacing="linspace"``: diffusers steps from ``t`` to ``t - T // n``, which is
  not the next timestep on that spacing, so the model is evaluated at a different noise level than the
  sample has; a solver on one grid cannot reproduce that. Leading and trailing spacings with ``n`` dividing
  ``T`` are consistent and are compared. Leading spacing with ``steps_offset=0`` and
  ``set_alpha_to_one=False`` ends with a zero-length step (t = 0 to ``alphas_cumprod[0]``) that costs one NFE
  in diffusers and does not exist on a strictly decreasing hasten grid.
* Euler/Heun with fractional timesteps (e.g. ``linspace`` with 5 steps): diffusers interpolates sigma
  linearly in ``t``, hasten's ``VPDiscrete`` (and diffusers' own ``_sigma_to_t``) log-linearly; integer
  timesteps are compared.
* ``UniPCMultistepScheduler(solver_type="bh1")`` with ``final_sigmas_type="zero"``: diffusers returns NaN on
  the last step (``B(h) = h = -inf`` times a zero correction); bh1 is compared with ``"sigma_min"``.
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver")`` only supports ``"sigma_min"``.
* ``PNDMScheduler(skip_prk_steps=False)``: diffusers places the pseudo-RK midpoints at the middle timestep,
  hasten's ``warmup="prk"`` at the mean sigma.
* ``DDIMScheduler``'s default ``clip_sample=True`` clips x0 to [-1, 1]; the tests use ``clip_sample=False``.

Precision: diffusers computes in float32, including its ``alphas_cumprod`` table. hasten's schedule is built
from that same table: ``VPDiscrete.from_betas("linear")`` agrees with it to 4e-7 relative (checked below),
but ``1 - alphas_cumprod[0] = 1e-4`` turns that into 8e-5 relative in ``sigma(t=0)``, which would show up as
a 6e-5 difference in the third-order step onto ``sigma_min``; using the same table isolates the solvers.
Measured float32 differences stay below 1e-5 on samples of magnitude 2-3 (tolerance ``rtol = atol = 1e-5``),
except PNDM's (up to 5e-5 with trailing spacing and 5 steps, tolerance ``atol = 1e-4``): its formula (9)
subtracts two terms of size ``sqrt(a_prev / a) |x| ~ 6 |x|`` on the step from t = 999, and the Adams-Bashforth
weights amplify that rounding. Where diffusers can run in float64 (DDIM, PNDM, Heun, UniPC, singlestep), its
tables are swapped for float64 ones and both sides must agree to 1e-10: the float32 residue is rounding only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import hasten
from hasten.models import ProductMixture, as_network
from hasten.schedules import VPDiscrete, from_timesteps

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
SHAPE = (4, 2, 4, 4)
ATOL = RTOL = 1e-5
# The float32 table diffusers computes (torch.linspace + cumprod in float32), promoted to float64.
SCHED = VPDiscrete(diffusers.DDIMScheduler(**BETAS).alphas_cumprod)
NET = as_network(ProductMixture(), SCHED, "eps")
VE_SCHEDULERS = (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler)


@dataclasses.dataclass(frozen=True)
class Case:
    """A diffusers scheduler configuration and the hasten solver that reproduces it."""

    name: str
    scheduler: str
    config: dict[str, Any]
    solver: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: tuple[int, ...] = (5, 10, 20)
    atol: float = ATOL
    float64: bool = True  # diffusers' step runs in float64 once its tables are float64
    disable_correctors: bool = False  # UniPC: disable_corrector=list(range(steps))

    def make(self, steps: int):
        config = dict(self.config)
        if self.disable_correctors:
            config["disable_corrector"] = list(range(steps))
        return getattr(diffusers, self.scheduler)(**BETAS, **config)


def _ddim(spacing: str, offset: int, one: bool) -> Case:
    name = f"ddim-{spacing}{offset}-alpha_one_{one}"
    config = {"timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": one, "clip_sample": False}
    return Case(name, "DDIMScheduler", config, "ddim")


def _pndm(spacing: str, offset: int, one: bool) -> Case:
    name = f"pndm-{spacing}{offset}-alpha_one_{one}"
    config = {"skip_prk_steps": True, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": one}
    # PNDM's formula (9) cancels at t = 999 and AB4 amplifies its float32 rounding (see the module docstring).
    return Case(name, "PNDMScheduler", config, "plms", {"warmup": "heun"}, atol=1e-4)


def _dpm(solver: str, solver_type: str, final: str = "zero") -> Case:
    order = int(solver[-2])  # "dpmpp_3m" -> 3
    config = {
        "solver_order": order,
        "solver_type": solver_type,
        "algorithm_type": "dpmsolver++" if solver.startswith("dpmpp") else "dpmsolver",
        "final_sigmas_type": final,
        "lower_order_final": True,
    }
    options: dict[str, Any] = {"solver_type": solver_type}
    if order == 3:  # diffusers' 3M (hasten's default is the Taylor 3M)
        options.update(third_order_term="reference", warmup="lower_order")
    name = f"{solver}-{solver_type}" + ("" if final == "zero" else f"-{final}")
    # float64=False: diffusers' step casts the sample to float32.
    return Case(name, "DPMSolverMultistepScheduler", config, solver, options, float64=False)


def _singlestep(order: int, solver_type: str) -> Case:
    config = {"solver_order": order, "solver_type": solver_type, "lower_order_final": True}
    options = {"intermediate": "grid", "solver_type": solver_type}
    return Case(f"dpmpp_{order}s-{solver_type}", "DPMSolverSinglestepScheduler", config, f"dpmpp_{order}s", options)


def _unipc(order: int, variant: str, corrector: bool) -> Case:
    # diffusers' bh1 returns NaN on a last step onto sigma = 0, so bh1 ends at sigma(t=0).
    final = "zero" if variant == "bh2" else "sigma_min"
    config = {"solver_order": order, "solver_type": variant, "final_sigmas_type": final}
    # diffusers lowers UniPC's order at the end of runs of any length; hasten below 15 steps.
    options = {"order": order, "variant": variant, "corrector": corrector, "lower_order_final_below": 2**31}
    name = f"unipc-{variant}-order{order}-{'pc' if corrector else 'p'}"
    return Case(name, "UniPCMultistepScheduler", config, "unipc", options, disable_correctors=not corrector)


def _ve(cls: str, solver: str, spacing: str, offset: int = 0, steps: tuple[int, ...] = (5, 10, 20)) -> Case:
    config = {"timestep_spacing": spacing, "steps_offset": offset}
    # Euler's step casts the sample to float32; Heun's can run in float64.
    return Case(f"{solver}-{spacing}{offset}", cls, config, solver, steps=steps, float64=(solver == "heun"))


CASES = [
    _ddim("leading", 0, True),
    _ddim("leading", 1, True),
    _ddim("leading", 1, False),
    _ddim("trailing", 0, True),
    _ddim("trailing", 0, False),
    *(_dpm(solver, solver_type) for solver in ("dpmpp_2m", "dpmpp_3m") for solver_type in ("midpoint", "heun")),
    # Ending above 0 exercises the "< 15 steps" rule on the last two steps.
    _dpm("dpmpp_2m", "midpoint", "sigma_min"),
    _dpm("dpmpp_3m", "midpoint", "sigma_min"),
    # diffusers' algorithm_type="dpmsolver" (noise prediction) requires final_sigmas_type="sigma_min".
    _dpm("dpm_solver_2m", "midpoint", "sigma_min"),
    _dpm("dpm_solver_2m", "heun", "sigma_min"),
    _dpm("dpm_solver_3m", "midpoint", "sigma_min"),
    *(_singlestep(order, solver_type) for order in (2, 3) for solver_type in ("midpoint", "heun")),
    *(_unipc(order, v, c) for v in ("bh1", "bh2") for order in (1, 2, 3) for c in (True, False)),
    _pndm("leading", 0, True),
    _pndm("leading", 1, True),
    _pndm("leading", 1, False),
    _pndm("trailing", 0, True),
    _pndm("trailing", 0, False),
    _ve("EulerDiscreteScheduler", "euler", "leading", 1),
    _ve("EulerDiscreteScheduler", "euler", "trailing"),
    _ve("EulerDiscreteScheduler", "euler", "linspace", steps=(10,)),  # integer timesteps (111 apart)
    _ve("HeunDiscreteScheduler", "heun", "leading", 1),
    _ve("HeunDiscreteScheduler", "heun", "trailing"),
    _ve("HeunDiscreteScheduler", "heun", "linspace", steps=(10,)),
]

# Noise-prediction variants ending at sigma(t=0): checked in float64 only. In float32 their last step is
# ill-conditioned at 5 steps (e^h = 70 to 200 onto sigma(t=0)), and the two sides' rounding differs by up to 3e-3.
FLOAT64_ONLY = [
    *(
        Case(
            f"dpm_solver_{order}-{solver_type}",
            "DPMSolverSinglestepScheduler",
            {
                "solver_order": order,
                "solver_type": solver_type,
                "algorithm_type": "dpmsolver",
                "lower_order_final": True,
                "final_sigmas_type": "sigma_min",
            },
            f"dpm_solver_{order}",
            {"intermediate": "grid", "solver_type": solver_type},
        )
        for order in (2, 3)
        for solver_type in ("midpoint", "heun")
    ),
    *(
        Case(
            f"unipc-noise-{variant}-order{order}",
            "UniPCMultistepScheduler",
            {"solver_order": order, "solver_type": variant, "predict_x0": False, "final_sigmas_type": "sigma_min"},
            "unipc",
            {"order": order, "variant": variant, "prediction": "noise", "lower_order_final_below": 2**31},
        )
        for variant in ("bh1", "bh2")
        for order in (1, 2, 3)
    ),
]


def _params(cases: list[Case]) -> list:
    return [pytest.param(case, n, id=f"{case.name}-{n}") for case in cases for n in case.steps]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny; intra-op threads only add overhead (measured ~10 ms per softmax with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the two loops ----------------------------------------------------------------------------------------
class _CountingNet:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return NET(x, t)


def _ends_at_zero(sch) -> bool:
    """Whether diffusers' last step goes to sigma = 0 (else to sigma(t=0), i.e. alphas_cumprod[0])."""
    if "set_alpha_to_one" in sch.config:  # DDIM, PNDM
        return bool(sch.config.set_alpha_to_one)
    return sch.config.get("final_sigmas_type", "zero") == "zero"


def _hasten_grid(sch) -> torch.Tensor:
    """VE sigmas at diffusers' timesteps (duplicates of Heun and PLMS removed), then 0 or sigma(t=0)."""
    ts = sch.timesteps.unique_consecutive()
    if isinstance(sch, diffusers.DDIMScheduler | diffusers.PNDMScheduler):
        # These step from t to t - T // n: only a parity test when that is the next timestep.
        gaps = set((ts[:-1] - ts[1:]).tolist())
        assert gaps == {sch.config.num_train_timesteps // sch.num_inference_steps}, f"inconsistent steps {ts}"
    if _ends_at_zero(sch):
        return from_timesteps(SCHED, ts)
    return from_timesteps(SCHED, [*ts.tolist(), 0], final="sigma_min")


def _to_float64(sch, grid: torch.Tensor) -> None:
    """Swap diffusers' float32 tables for float64 ones (after ``set_timesteps``) so that it steps in float64."""
    if isinstance(sch, diffusers.DDIMScheduler | diffusers.PNDMScheduler):
        sch.alphas_cumprod = SCHED.alphas_cumprod.clone()
        one = torch.tensor(1.0, dtype=torch.float64)
        sch.final_alpha_cumprod = one if sch.config.set_alpha_to_one else sch.alphas_cumprod[0]
    elif isinstance(sch, diffusers.HeunDiscreteScheduler):
        sch.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
    else:
        sch.sigmas = grid.clone()


def _run_both(case: Case, steps: int, dtype: torch.dtype = torch.float32):
    """Run diffusers' loop and hasten on the same noise; returns (diffusers x, hasten x, diffusers calls, NFE)."""
    sch = case.make(steps)
    sch.set_timesteps(steps)
    grid = _hasten_grid(sch)
    if dtype == torch.float64:
        _to_float64(sch, grid)
    elif hasattr(sch, "sigmas"):  # the same grid: hasten's sigmas equal diffusers' float32 ones
        torch.testing.assert_close(grid, sch.sigmas.unique_consecutive().to(torch.float64), rtol=1e-6, atol=0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)).to(dtype)

    net = _CountingNet()
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(net(sch.scale_model_input(x, t), t), t, x).prev_sample

    if isinstance(sch, VE_SCHEDULERS):
        x_start, alpha_last = noise * sch.init_noise_sigma, 1.0  # already VE; grids end at 0
    else:  # VP sample: x_VE = x_VP / alpha
        x_start = noise / float(SCHED.alpha_from_ve_sigma(float(grid[0])))
        alpha_last = float(SCHED.alpha_from_ve_sigma(float(grid[-1])))
    den = hasten.EpsDenoiser(NET, SCHED)
    out = hasten.sample(den, x_start, grid, case.solver, return_info=True, **case.options)
    return x, out.x * alpha_last, net.calls, out.nfe


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "steps"), _params(CASES))
def test_matches_diffusers(case: Case, steps: int) -> None:
    """diffusers as shipped (float32) against hasten in float32: same samples to rounding, same NFE."""
    x_diffusers, x_hasten, calls, nfe = _run_both(case, steps)
    assert x_diffusers.dtype == x_hasten.dtype == torch.float32
    assert torch.isfinite(x_diffusers).all()
    torch.testing.assert_close(x_hasten, x_diffusers, rtol=RTOL, atol=case.atol)
    assert nfe == calls


@pytest.mark.parametrize(("case", "steps"), _params([c for c in CASES if c.float64] + FLOAT64_ONLY))
def test_matches_diffusers_in_float64(case: Case, steps: int) -> None:
    """diffusers with float64 tables against hasten in float64: the update formulas agree exactly."""
    x_diffusers, x_hasten, calls, nfe = _run_both(case, steps, torch.float64)
    assert x_diffusers.dtype == x_hasten.dtype == torch.float64
    torch.testing.assert_close(x_hasten, x_diffusers, rtol=1e-10, atol=1e-10)
    assert nfe == calls


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_3m_default_is_not_diffusers(steps: int) -> None:
    """hasten's default 3M (Taylor term, singlestep start) is a different method; "reference" is diffusers'."""
    case = _dpm("dpmpp_3m", "midpoint")
    x_diffusers, x_reference, _, _ = _run_both(case, steps)
    default = dataclasses.replace(case, options={"solver_type": "midpoint"})
    _, x_default, _, _ = _run_both(default, steps)
    taylor = dataclasses.replace(case, options={"solver_type": "midpoint", "third_order_term": "taylor"})
    _, x_taylor, _, _ = _run_both(taylor, steps)
    torch.testing.assert_close(x_reference, x_diffusers, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_default, x_taylor, rtol=0, atol=0)
    # Far above rounding (the reference term agrees with diffusers to 1e-6).
    assert (x_taylor - x_diffusers).abs().max() > 1e-3


def test_linear_betas_match_diffusers_table() -> None:
    """``VPDiscrete.from_betas("linear")`` (float64) agrees with diffusers' float32 table to its rounding."""
    ours = VPDiscrete.from_betas("linear").alphas_cumprod
    torch.testing.assert_close(ours, SCHED.alphas_cumprod, rtol=1e-6, atol=0)

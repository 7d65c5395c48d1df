"""Adapters, guidance and analytic fixtures."""

import math

import pytest
import torch

import hasten
from hasten.models import (
    CFGDenoiser,
    DynamicThreshold,
    EpsDenoiser,
    FlowDenoiser,
    GaussianMixture,
    ProductMixture,
    ThresholdedDenoiser,
    VDenoiser,
    X0Denoiser,
    as_network,
    point_set,
)
from hasten.schedules import VE, FlowMatching, VPCosine, VPDiscrete, VPLinear

MIX = ProductMixture()


@pytest.mark.parametrize(
    ("adapter", "prediction", "schedule"),
    [
        (EpsDenoiser, "eps", VPDiscrete.from_betas()),
        (EpsDenoiser, "eps", VPLinear()),
        (EpsDenoiser, "eps", VPCosine()),
        (EpsDenoiser, "eps", VE()),
        (VDenoiser, "v", VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (VDenoiser, "v", VPLinear()),
        (X0Denoiser, "x0", VPDiscrete.from_betas()),
        (X0Denoiser, "x0", VE()),
        (FlowDenoiser, "flow", FlowMatching()),
        (FlowDenoiser, "flow", FlowMatching(shift=3.0)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_adapter_recovers_exact_denoiser(adapter, prediction, schedule):
    """A network trained (exactly) with a parameterisation, wrapped by its adapter, is the exact denoiser."""
    den = adapter(as_network(MIX, schedule, prediction), schedule)
    sigma = torch.tensor([0.05, 0.7, 3.0, min(50.0, schedule.sigma_max * 0.9)], dtype=torch.float64)
    x = MIX.sample((4, 3, 2), sigma=1.0, generator=torch.Generator().manual_seed(0)) * 1.0
    x = x + sigma.reshape(-1, 1, 1) * torch.randn(4, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), MIX(x, sigma), rtol=1e-9, atol=1e-9)


def test_flow_reverse_orientation_and_time_scale():
    class DataAtOne(torch.nn.Module):  # rectified-flow code: x_tau = tau x0 + (1 - tau) z, v = x0 - z
        def forward(self, x_tau, tau):
            tau = tau.double() / 1000.0
            t = 1.0 - tau
            s = t / (1.0 - t)
            x0 = MIX(x_tau.double() / (1.0 - t).reshape(-1, 1), s)
            z = (x_tau - tau.reshape(-1, 1) * x0) / (1.0 - tau).reshape(-1, 1)
            return x0 - z

    den = FlowDenoiser(DataAtOne(), FlowMatching(), orientation="data_at_one", time_scale=1000.0)
    x = torch.randn(3, 5, dtype=torch.float64) * 2
    sigma = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), MIX(x, sigma), rtol=1e-9, atol=1e-9)


def test_time_labels():
    sched = VPDiscrete.from_betas()
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen["t"] = t.clone()
            return torch.zeros_like(x)

    sigma = sched.ve_sigma(torch.tensor([10.0, 500.4, 998.0]))
    x = torch.zeros(3, 2)
    EpsDenoiser(Probe(), sched)(x, sigma)
    torch.testing.assert_close(
        seen["t"].double(), torch.tensor([10.0, 500.4, 998.0], dtype=torch.float64), atol=1e-3, rtol=0
    )
    EpsDenoiser(Probe(), sched, time_label="round")(x, sigma)
    assert seen["t"].tolist() == [10.0, 500.0, 998.0]
    EpsDenoiser(Probe(), sched, time_label="sigma")(x, sigma)
    torch.testing.assert_close(seen["t"].double(), sigma, rtol=1e-6, atol=0)


def test_adapter_input_scaling_and_dtypes():
    sched = VPDiscrete.from_betas()

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, x, t):
            assert x.dtype == torch.float16 and t.dtype == torch.float16
            return x * self.w

    den = EpsDenoiser(Half(), sched)
    out = den(torch.ones(2, 3), 1.0)
    assert out.dtype == torch.float32
    alpha = 1 / math.sqrt(2.0)
    # eps = x_t = alpha * x, so x0 = x - sigma * alpha * x
    torch.testing.assert_close(out, torch.full((2, 3), 1 - alpha), atol=2e-3, rtol=0)


def test_adapter_errors():
    sched = VPDiscrete.from_betas()
    with pytest.raises(ValueError, match="shape"):
        EpsDenoiser(lambda x, t: x[:, :1], sched)(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        EpsDenoiser(lambda x, t: x, sched)(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="FlowMatching"):
        FlowDenoiser(lambda x, t: x, sched)
    with pytest.raises(ValueError, match="time_label"):
        EpsDenoiser(lambda x, t: x, sched, time_label="index")
    with pytest.raises(TypeError, match="expected a Tensor"):
        EpsDenoiser(lambda x, t: "nope", sched)(torch.zeros(2, 3), 1.0)


def test_adapter_unwraps_diffusers_outputs():
    from types import SimpleNamespace

    sched = VPDiscrete.from_betas()
    a = EpsDenoiser(lambda x, t: SimpleNamespace(sample=torch.zeros_like(x)), sched)(torch.ones(2, 3), 1.0)
    b = EpsDenoiser(lambda x, t: (torch.zeros_like(x),), sched)(torch.ones(2, 3), 1.0)
    torch.testing.assert_close(a, torch.ones(2, 3))
    torch.testing.assert_close(b, torch.ones(2, 3))


# -- guidance --------------------------------------------------------------------------------------


class LabelDenoiser(torch.nn.Module):
    """x0_hat = x * 0 + label (as a float), so guidance is hand-computable."""

    calls = 0

    def forward(self, x, sigma, class_labels):
        LabelDenoiser.calls += 1
        return torch.zeros_like(x) + class_labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def test_cfg_combines_branches_in_one_call():
    LabelDenoiser.calls = 0
    cfg = CFGDenoiser(LabelDenoiser(), scale=3.0, uncond={"class_labels": torch.tensor([10])})
    out = cfg(torch.zeros(2, 4), 1.0, class_labels=torch.tensor([2, 4]))
    # uncond + 3 (cond - uncond) = 10 + 3 (y - 10)
    torch.testing.assert_close(out, torch.tensor([[-14.0] * 4, [-8.0] * 4]))
    assert LabelDenoiser.calls == 1
    one = CFGDenoiser(LabelDenoiser(), scale=1.0, uncond={"class_labels": torch.tensor([10])})
    torch.testing.assert_close(
        one(torch.zeros(2, 4), 1.0, class_labels=torch.tensor([2, 4]))[:, 0], torch.tensor([2.0, 4.0])
    )


def test_cfg_errors():
    with pytest.raises(ValueError, match="uncond"):
        CFGDenoiser(LabelDenoiser(), 2.0, {})
    cfg = CFGDenoiser(LabelDenoiser(), 2.0, {"class_labels": torch.tensor([10])})
    with pytest.raises(ValueError, match="do not match"):
        cfg(torch.zeros(2, 4), 1.0, prompt=torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        CFGDenoiser(LabelDenoiser(), float("nan"), {"class_labels": torch.tensor([10])})


def test_dynamic_threshold():
    th = DynamicThreshold(percentile=1.0)
    x0 = torch.tensor([[0.5, -0.2, 0.1], [3.0, -1.5, 0.0]])
    out = th(x0)
    torch.testing.assert_close(out[0], x0[0])  # |x0| <= 1: identity
    torch.testing.assert_close(out[1], x0[1] / 3.0)  # rescaled into [-1, 1]
    clip = DynamicThreshold(percentile=1.0, min_scale=1.0, max_scale=1.0)  # diffusers' default: plain clipping
    torch.testing.assert_close(clip(x0)[1], torch.tensor([1.0, -1.0, 0.0]))
    wrapped = ThresholdedDenoiser(lambda x, s: x * 5, th)
    assert wrapped(torch.randn(3, 8), 1.0).abs().max() <= 1.0
    with pytest.raises(ValueError, match="percentile"):
        DynamicThreshold(percentile=0.0)
    assert DynamicThreshold.from_dict(th.to_dict()) == th


# -- analytic fixtures -------------------------------------------------------------------------------


def test_gaussian_mixture_denoiser_is_tweedie():
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x), with p_sigma the exact noisy mixture density."""
    means = torch.tensor([[-1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.3, 0.3], [0.5, 0.2]], dtype=torch.float64)
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    gmm = GaussianMixture(means, stds, weights)
    sigma = 0.8
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    var = stds**2 + sigma**2
    log_comp = -0.5 * (((x[:, None] - means) ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)
    log_p = torch.logsumexp(torch.log(weights) + log_comp, dim=1).sum()
    (score,) = torch.autograd.grad(log_p, x)
    torch.testing.assert_close(gmm(x.detach(), sigma), x.detach() + sigma**2 * score, rtol=1e-10, atol=1e-10)


def test_single_gaussian_exact_flow_and_tweedie():
    g = GaussianMixture([[1.0, -2.0]], [[0.5, 2.0]])
    x = torch.randn(6, 2, dtype=torch.float64) * 3
    # Tweedie: D = mu + s^2 / (s^2 + sigma^2) (x - mu)
    expected = torch.tensor([1.0, -2.0]) + torch.tensor([0.25, 4.0]) / (torch.tensor([0.25, 4.0]) + 1.0) * (
        x - torch.tensor([1.0, -2.0])
    )
    torch.testing.assert_close(g(x, 1.0), expected.double())
    y = g.exact_flow(x, 3.0, 0.5)
    back = g.exact_flow(y, 0.5, 3.0)
    torch.testing.assert_close(back, x)


def test_product_mixture_quantile_flow_matches_fine_solve():
    x = MIX.sample((256,), sigma=4.0, generator=torch.Generator().manual_seed(1))
    exact = MIX.exact_flow(x, 4.0, 0.2)
    fine = hasten.sample(MIX, x[:, None], hasten.karras(400, 0.2, 4.0, final="sigma_min"), "dpmpp_3m")[:, 0]
    torch.testing.assert_close(fine, exact, atol=2e-5, rtol=0)  # first-order warm-up step bounds it
    # The flow pushes p_4 to p_0.2: compare quantiles of a large sample
    big = MIX.sample((200_000,), sigma=4.0, generator=torch.Generator().manual_seed(2))
    pushed = MIX.exact_flow(big, 4.0, 0.2)
    direct = MIX.sample((200_000,), sigma=0.2, generator=torch.Generator().manual_seed(3))
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(pushed, qs), torch.quantile(direct, qs), atol=0.02, rtol=0)


def test_point_set_is_memorising_denoiser():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    den = point_set(pts)
    near = den(torch.tensor([[2.9, 4.1]], dtype=torch.float64), 0.05)
    torch.testing.assert_close(near, pts[1:].double(), atol=1e-9, rtol=0)


def test_analytic_input_validation():
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        GaussianMixture([1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        ProductMixture([0.0, 1.0], [1.0, 1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="R\\^2"):
        GaussianMixture([[0.0, 1.0]], [1.0])(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match="prediction"):
        as_network(MIX, VE(), "score")

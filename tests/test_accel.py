"""Feature caching: exactness at no reuse, hand-predictable reuse, isolation, removal, stats, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

import hasten
from hasten._context import guidance_branch
from hasten.accel import (
    AccelConfig,
    BlockCacheConfig,
    DeepCacheConfig,
    FirstBlockCacheConfig,
    RASConfig,
    RefreshSchedule,
    accelerate_,
    accelerator_of,
)
from hasten.models import CFGDenoiser, EpsDenoiser
from hasten.schedules import VPDiscrete


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        num_class_embeds=3,
    ).eval()


def tiny_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_embeds_ada_norm=2,
        norm_num_groups=4,
    ).eval()


class DiTEps(nn.Module):
    """diffusers' DiT predicts [eps, variance] with learned sigma off; adapt it to ``net(x, t, class_labels)``."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x, t, class_labels=None):
        return self.dit(x, timestep=t, class_labels=class_labels).sample


def denoiser_for(net: nn.Module, dit: bool = False):
    return EpsDenoiser(DiTEps(net) if dit else net, VPDiscrete.from_betas())


def run(denoiser, steps=12, solver="dpmpp_2m", seed=0, batch=2, **cond):
    sigmas = hasten.get_sigmas("karras", steps, VPDiscrete.from_betas())
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    return hasten.sample(denoiser, x, sigmas, solver, cond=cond)


labels = {"class_labels": torch.tensor([0, 1])}


# -- exactness and removal -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DeepCacheConfig(interval=1), DeepCacheConfig(interval=1, branch=2)])
def test_deepcache_never_reuse_is_bitwise_uncached(config):
    net = tiny_unet()
    den = denoiser_for(net)
    ref = run(den, **labels)
    with accelerate_(net, config) as acc:
        out = run(den, **labels)
        assert acc.stats.reused == 0 and acc.stats.computed == 12
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "config", [BlockCacheConfig(interval=1), BlockCacheConfig(interval=1, first_blocks=2, last_blocks=1)]
)
def test_block_cache_never_reuse_is_bitwise_uncached(config):
    net = tiny_dit()
    den = denoiser_for(net, dit=True)
    ref = run(den, **labels)
    with accelerate_(net, config):
        out = run(den, **labels)
    assert torch.equal(out, ref)


def test_remove_restores_the_original_forward_exactly():
    net = tiny_unet()
    original = type(net).forward
    submodules_before = {name for name, m in net.named_modules() if "forward" in m.__dict__}
    acc = accelerate_(net, DeepCacheConfig(interval=3))
    assert "forward" in net.__dict__ and accelerator_of(net) is acc
    acc.remove()
    assert "forward" not in net.__dict__ and net.forward.__func__ is original
    assert {name for name, m in net.named_modules() if "forward" in m.__dict__} == submodules_before
    assert accelerator_of(net) is None
    with pytest.raises(RuntimeError, match="already removed"):
        acc.remove()


def test_applying_twice_is_refused():
    net = tiny_dit()
    acc = accelerate_(net, BlockCacheConfig())
    with pytest.raises(RuntimeError, match="already has BlockCacheConfig installed"):
        accelerate_(net, FirstBlockCacheConfig())
    acc.remove()
    accelerate_(net, FirstBlockCacheConfig()).remove()  # fine once removed


# -- hand-predictable toy blocks ---------------------------------------------------------------------


class Double(nn.Module):
    def forward(self, h):
        return 2 * h


class ToyTransformer(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Double() for _ in range(n))

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


def test_block_cache_reuses_the_middle_residual_as_predicted_by_hand():
    toy = ToyTransformer(4)
    acc = accelerate_(toy, BlockCacheConfig(interval=2, first_blocks=1))
    x0, x1, x2 = torch.full((1, 3), 1.0), torch.full((1, 3), 5.0), torch.full((1, 3), 7.0)
    assert torch.equal(toy(x0), 16 * x0)  # call 0: full, middle residual R = 16 x0 - 2 x0
    assert torch.equal(toy(x1), 2 * x1 + 14 * x0)  # call 1: first block fresh, middle reused
    assert torch.equal(toy(x2), 16 * x2)  # call 2: full again
    stats = acc.stats
    assert (stats.calls, stats.computed, stats.reused) == (3, 2, 1)
    assert stats.nfe_saved == pytest.approx(0.0)  # scalar multiplies count no FLOPs in the toy


def test_extrapolated_reuse_is_the_linear_forecast_from_the_last_two_full_steps():
    toy = ToyTransformer(3)
    acc = accelerate_(toy, BlockCacheConfig(interval=3, extrapolate=1))
    x = [torch.full((1, 2), float(v)) for v in (1, 2, 4, 5, 7)]
    assert torch.equal(toy(x[0]), 8 * x[0])  # step 0 full: middle residual 6 x0
    assert torch.equal(toy(x[1]), 2 * x[1] + 6 * x[0])  # one full step so far: plain reuse
    toy(x[2])
    assert torch.equal(toy(x[3]), 8 * x[3])  # step 3 full: residual 6 x3
    forecast = 6 * x[3] + (4 - 3) / (3 - 0) * (6 * x[3] - 6 * x[0])
    assert torch.allclose(toy(x[4]), 2 * x[4] + forecast)  # step 4: forecast from steps 3 and 0
    assert acc.stats.reused == 3


def test_quadratic_forecast_is_exact_for_a_quadratic_in_the_step():
    """Inputs x(s) = s^2: the middle residual 6 x(s) is quadratic in the step, so order 2 predicts it exactly."""
    toy = ToyTransformer(3)
    accelerate_(toy, BlockCacheConfig(interval=2, extrapolate=2))
    for step in range(9):
        x = torch.full((1, 1), float(step * step))
        out = toy(x)
        if step >= 5:  # from the third full step (4) on, three points are known
            assert torch.allclose(out, 8 * x, rtol=1e-6), step


def test_first_block_cache_decides_on_the_relative_residual_change():
    toy = ToyTransformer(3)
    acc = accelerate_(toy, FirstBlockCacheConfig(threshold=0.05))
    x0 = torch.ones(1, 4)
    assert torch.equal(toy(x0), 8 * x0)
    # head residual r = 2x - x = x; change |1.01 - 1| / 1 = 0.01 < 0.05: reuse R = 8 x0 - 2 x0
    x1 = 1.01 * x0
    assert torch.equal(toy(x1), 2 * x1 + 6 * x0)
    # change 1.0 >= 0.05: compute in full (and the comparison point moves to x2)
    x2 = 2 * x0
    assert torch.equal(toy(x2), 8 * x2)
    assert (acc.stats.computed, acc.stats.reused) == (2, 1)


def test_first_block_cache_max_reuse_forces_a_full_call():
    toy = ToyTransformer(3)
    acc = accelerate_(toy, FirstBlockCacheConfig(threshold=0.5, max_reuse=2))
    for _ in range(7):
        toy(torch.ones(1, 2))
    # full, reuse, reuse, full, reuse, reuse, full
    assert (acc.stats.computed, acc.stats.reused) == (3, 4)


# -- isolation: runs, resets, guidance branches --------------------------------------------------------


def test_each_sampling_call_starts_from_an_empty_cache():
    net = tiny_unet()
    den = denoiser_for(net)
    acc = accelerate_(net, DeepCacheConfig(interval=3))
    first = run(den, seed=0, **labels)
    run(den, seed=5, **labels)  # a different generation in between
    again = run(den, seed=0, **labels)
    assert torch.equal(first, again)
    assert acc.stats.computed == 3 * 4 and acc.stats.reused == 3 * 8


def test_reset_isolates_generations_in_a_hand_written_loop():
    toy = ToyTransformer(3)
    acc = accelerate_(toy, BlockCacheConfig(interval=2))
    x0, x1 = torch.ones(1, 2), 3 * torch.ones(1, 2)
    toy(x0)
    assert torch.equal(toy(x1), 2 * x1 + 6 * x0)  # without a reset the second call reuses x0's residual
    acc.reset()
    assert torch.equal(toy(x1), 8 * x1)  # after a reset it starts afresh
    assert acc.stats.calls == 1


def test_guidance_branches_never_share_state():
    toy = ToyTransformer(3)
    accelerate_(toy, BlockCacheConfig(interval=2))
    xc, xu = torch.ones(1, 2), 10 * torch.ones(1, 2)
    with guidance_branch("cond"):
        toy(xc)
    with guidance_branch("uncond"):
        assert torch.equal(toy(xu), 8 * xu)  # its own first call: full, not the cond branch's features
    y = 2 * torch.ones(1, 2)
    with guidance_branch("cond"):
        assert torch.equal(toy(y), 2 * y + 6 * xc)
    with guidance_branch("uncond"):
        assert torch.equal(toy(y), 2 * y + 6 * xu)


def test_cfg_denoiser_names_its_branch():
    net = tiny_unet()
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append(hasten._context.current_branch()))
    cfg = CFGDenoiser(denoiser_for(net), 2.0, {"class_labels": torch.tensor([2])})
    run(cfg, steps=2, **labels)
    assert seen == ["cond+uncond", "cond+uncond"]


def test_stats_count_exactly_with_guidance_and_two_evaluation_solvers():
    net = tiny_unet()
    cfg = CFGDenoiser(denoiser_for(net), 2.0, {"class_labels": torch.tensor([2])})
    acc = accelerate_(net, DeepCacheConfig(interval=3, branch=0))
    run(cfg, steps=9, solver="heun", **labels)
    # Heun: 2 calls per step, 1 on the last (sigma_next = 0); refresh steps 0, 3, 6 computed in full.
    stats = acc.stats
    assert stats.calls == 17
    assert stats.computed == 6 and stats.reused == 11
    assert 0.0 < stats.nfe_saved < stats.reused
    assert stats.cache_bytes > 0


def test_deepcache_cached_call_skips_the_deep_modules():
    net = tiny_unet()
    calls = {"mid": 0, "conv_in": 0}
    net.mid_block.resnets[0].register_forward_hook(lambda *a: calls.__setitem__("mid", calls["mid"] + 1))
    net.conv_in.register_forward_hook(lambda *a: calls.__setitem__("conv_in", calls["conv_in"] + 1))
    acc = accelerate_(net, DeepCacheConfig(interval=4))
    run(denoiser_for(net), steps=8, **labels)
    assert calls == {"mid": 2, "conv_in": 8}
    assert "mid_block" in acc.cached_modules and "conv_in" not in acc.cached_modules


def test_deepcache_cached_output_equals_manual_recomputation():
    """A cached call equals the UNet run with the deep modules' outputs frozen at the last full call."""
    net = tiny_unet()
    t0, t1 = torch.tensor([500, 500]), torch.tensor([400, 400])
    x0, x1 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    acc = accelerate_(net, DeepCacheConfig(interval=2, branch=1))
    net(x0, t0, class_labels=labels["class_labels"])
    cached = net(x1, t1, class_labels=labels["class_labels"]).sample
    stored = {}
    for name in acc.cached_modules:
        stored[name] = acc._slots[("", (2, 1, 8, 8))][name][0][1]  # newest (step, output) of a full call
    acc.remove()
    handles = []
    for name in stored:
        module = net.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, _v=stored[name]: _v))
    manual = net(x1, t1, class_labels=labels["class_labels"]).sample
    for h in handles:
        h.remove()
    assert torch.allclose(cached, manual, atol=1e-6)
    assert not torch.allclose(cached, net(x1, t1, class_labels=labels["class_labels"]).sample, atol=1e-4)


def test_block_cache_on_a_tiny_dit_reuses_and_saves_flops():
    net = tiny_dit()
    den = denoiser_for(net, dit=True)
    ref = run(den, **labels)
    acc = accelerate_(net, BlockCacheConfig(interval=3, first_blocks=1, last_blocks=1))
    out = run(den, **labels)
    assert acc.stats.reused == 8 and acc.stats.computed == 4
    assert 0.0 < acc.stats.nfe_saved / acc.stats.reused < 0.5  # 2 of 4 blocks skipped, the rest still runs
    assert not torch.equal(out, ref) and torch.isfinite(out).all()


# -- schedules -----------------------------------------------------------------------------------------


def test_refresh_schedules():
    assert RefreshSchedule(interval=3).refresh_steps(10) == {0, 3, 6, 9}
    assert RefreshSchedule(interval=1).refresh_steps(5) == set(range(5))
    windowed = RefreshSchedule(interval=4, start=0.2, stop=0.8).refresh_steps(10)
    assert {0, 1, 8, 9} <= windowed and 2 in windowed and 6 in windowed and 3 not in windowed
    nonuniform = sorted(RefreshSchedule(interval=4, schedule="nonuniform").refresh_steps(40))
    assert len(nonuniform) == 10 and nonuniform[0] == 0 and nonuniform[-1] == 39
    gaps = [b - a for a, b in itertools.pairwise(nonuniform)]
    assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]  # denser at both ends


def test_nonuniform_schedule_outside_the_loop_needs_the_step_count():
    toy = ToyTransformer(3)
    acc = accelerate_(toy, BlockCacheConfig(interval=2, schedule="nonuniform"))
    toy(torch.ones(1, 2))
    with pytest.raises(ValueError, match="needs the number of steps"):
        toy(torch.ones(1, 2))
    acc.reset(num_steps=4)
    for _ in range(4):
        toy(torch.ones(1, 2))
    assert acc.stats.calls == 4


# -- configs and bad input -----------------------------------------------------------------------------


def test_config_save_load_round_trip(tmp_path):
    for config in (
        DeepCacheConfig(interval=4, branch=2, start=0.1),
        FirstBlockCacheConfig(threshold=0.12, max_reuse=3),
    ):
        path = config.save(tmp_path / "accel.json", calibration={"fd_change": 0.01})
        assert AccelConfig.load(path) == config
        assert json.loads(path.read_text())["calibration"] == {"fd_change": 0.01}
    with pytest.raises(TypeError, match="not a DeepCacheConfig"):
        DeepCacheConfig.load(path)


def test_config_load_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        AccelConfig.load(bad)
    bad.write_text(json.dumps({"hasten_accel": 99, "config": {}}))
    with pytest.raises(ValueError, match="schema 99"):
        AccelConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AccelConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DeepCacheConfig(interval=0), "interval must be an integer >= 1"),
        (lambda: DeepCacheConfig(branch=-1), "branch must be an integer >= 0"),
        (lambda: DeepCacheConfig(schedule="quad"), "schedule must be one of"),
        (lambda: DeepCacheConfig(start=0.6, stop=0.4), "start <= stop"),
        (lambda: FirstBlockCacheConfig(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (lambda: FirstBlockCacheConfig(threshold=0.0), r"threshold must be in \(0, 1\]"),
        (lambda: FirstBlockCacheConfig(first_blocks=0), "first_blocks must be >= 1"),
        (lambda: FirstBlockCacheConfig(max_reuse=0), "max_reuse"),
        (lambda: BlockCacheConfig(last_blocks=-2), "last_blocks must be an integer >= 0"),
        (lambda: DeepCacheConfig(extrapolate=3), "extrapolate must be 0"),
    ],
)
def test_bad_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_models_a_technique_cannot_hook_are_refused_with_what_was_looked_for():
    with pytest.raises(TypeError, match="down_blocks, mid_block and up_blocks"):
        accelerate_(tiny_dit(), DeepCacheConfig())
    with pytest.raises(TypeError, match="transformer_blocks or blocks"):
        accelerate_(tiny_unet(), BlockCacheConfig())
    with pytest.raises(ValueError, match="branch must be < 4"):
        accelerate_(tiny_unet(), DeepCacheConfig(branch=4))
    with pytest.raises(ValueError, match="leave a middle block"):
        accelerate_(tiny_dit(), BlockCacheConfig(first_blocks=2, last_blocks=2))
    with pytest.raises(TypeError, match="AccelConfig"):
        accelerate_(tiny_dit(), {"interval": 2})
    net = tiny_unet()
    accelerate_(net, DeepCacheConfig(branch=3)).remove()  # the deepest branch exists
    assert "forward" not in net.__dict__


# -- RAS -------------------------------------------------------------------------------------------------


def test_ras_ratio_one_is_bitwise_uncached():
    net = tiny_dit()
    den = denoiser_for(net, dit=True)
    ref = run(den, **labels)
    with accelerate_(net, RASConfig(ratio=1.0)) as acc:
        assert torch.equal(run(den, **labels), ref)
        assert acc.stats.reused == 0


def dit_call(net, x, t=500, y=(0, 1)):
    return net(x, timestep=torch.full((x.shape[0],), t), class_labels=torch.tensor(y[: x.shape[0]])).sample


def test_ras_step_on_an_unchanged_input_reproduces_the_full_output():
    """Cached keys/values and outputs are exact when nothing moved: a RAS step equals a full step."""
    net = tiny_dit()
    x = torch.randn(2, 1, 8, 8)
    full = dit_call(net, x)
    acc = accelerate_(net, RASConfig(ratio=0.5, interval=4, start=0.0))
    acc.reset(num_steps=4)
    assert torch.equal(dit_call(net, x), full)  # step 0: full
    ras = dit_call(net, x)  # step 1: 8 of 16 tokens per image
    assert acc.stats.reused == 1
    assert torch.allclose(ras, full, atol=1e-5)


def test_ras_inactive_tokens_keep_their_last_output_and_active_ones_change():
    net = tiny_dit()
    acc = accelerate_(net, RASConfig(ratio=0.25, interval=4, start=0.0))
    acc.reset(num_steps=4)
    x0, x1 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    first = dit_call(net, x0)
    second = dit_call(net, x1, t=400)
    slot = next(iter(acc._slots.values()))
    active = slot["active"]  # [B, 4] token indices (4 of 16 patches of 2x2)
    assert active.shape == (2, 4)
    changed = (first != second).reshape(2, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1).any(-1)
    for b in range(2):
        expected = torch.zeros(16, dtype=torch.bool)
        expected[active[b]] = True
        assert torch.equal(changed[b], expected)


def test_ras_selects_per_image_so_batches_of_any_size_agree():
    net = tiny_dit()
    den = denoiser_for(net, dit=True)
    with accelerate_(net, RASConfig(ratio=0.5, interval=3, start=0.1)):
        both = run(den, batch=2, **labels)
        sigmas = hasten.get_sigmas("karras", 12, VPDiscrete.from_betas())
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        one = hasten.sample(den, x[1:], sigmas, "dpmpp_2m", cond={"class_labels": torch.tensor([1])})
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_ras_saves_the_skipped_tokens_share_of_the_blocks():
    net = tiny_dit()
    acc = accelerate_(net, RASConfig(ratio=0.5, interval=100, start=0.0))
    run(denoiser_for(net, dit=True), **labels)
    stats = acc.stats
    assert (stats.computed, stats.reused) == (1, 11)
    per_call = stats.nfe_saved / stats.reused
    assert 0.2 < per_call < 0.5  # half the tokens of the blocks, which are most but not all of the FLOPs


def test_ras_bad_input():
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        RASConfig(ratio=0.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        RASConfig(metric="entropy")
    with pytest.raises(TypeError, match="RAS needs a patch transformer"):
        accelerate_(tiny_unet(), RASConfig())


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_deepcache_forecasts_only_the_value_that_reaches_fresh_modules(branch):
    """Forecasting every cached module or only the boundary one gives the same samples (the rest is unused)."""
    net = tiny_unet()
    den = denoiser_for(net)
    outputs = []
    for everywhere in (False, True):
        with accelerate_(net, DeepCacheConfig(interval=3, branch=branch, extrapolate=2)) as acc:
            if everywhere:
                acc.forecast_names = None
            outputs.append(run(den, **labels))
    with accelerate_(net, DeepCacheConfig(interval=3, branch=branch)):
        stale = run(den, **labels)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], stale)

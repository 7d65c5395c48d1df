"""Reward steering of masked diffusion: discrete SVDD on an exact joint table, DRAKES on a tiny random MaskedUNet."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from scipy import stats

from hasten.discrete import DISCRETE_SAMPLERS, JointTable, MaskedUNet, get_discrete_sampler
from hasten.discrete.drakes import (
    DrakesConfig,
    fine_tune,
    relaxed_step,
    relaxed_trajectory,
    still_masked_kl,
    token_images,
)
from hasten.discrete.generate import row_generators
from hasten.discrete.sampling import AncestralSampler, FirstHittingSampler, uniform
from hasten.discrete.svdd import DiscreteSVDD

BASES = [
    AncestralSampler(steps=3),
    AncestralSampler(steps=64),
    FirstHittingSampler(),
    FirstHittingSampler(tokens_per_call=2),
]


def _table(seed=0) -> JointTable:
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand((2,) * 4, generator=gen, dtype=torch.float64) ** 3
    return JointTable(table / table.sum())


def _images(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.float().reshape(-1, 1, 2, 2)


def _ink(images01: torch.Tensor) -> torch.Tensor:
    return images01.flatten(1).mean(1)


def _run(sampler, model, n, seed=1):
    return sampler.run(model, torch.full((n, 4), 2), 2, row_generators(seed, range(n)))


def _index(tokens):
    return (tokens * 2 ** torch.arange(3, -1, -1)).sum(1)


@pytest.mark.parametrize("base", BASES, ids=["ancestral3", "ancestral64", "fhs", "fhs2"])
def test_one_particle_is_the_base_sampler_bit_for_bit(base):
    model = _table()
    plain = _run(base, model, 64)
    svdd = _run(DiscreteSVDD(base=base, reward=_ink, particles=1, images=_images), model, 64)
    assert torch.equal(plain.tokens, svdd.tokens) and torch.equal(plain.calls, svdd.calls)


def test_calls_are_counted_exactly():
    """first_hitting with one token per call has 4 events: 1 + K (4 - 1) calls, all counted by the model too."""
    model = _table()
    for k in (2, 3):
        model.calls = 0
        out = _run(DiscreteSVDD(base="first_hitting", reward=_ink, particles=k, images=_images), model, 8)
        assert out.calls.tolist() == [1 + k * 3] * 8
        assert model.calls == 1 + k * 3  # the table counts batch calls; all rows move together here
    # ancestral: unchanged or finished candidates cost nothing, so calls stay within 1 + K (steps - 1)
    out = _run(DiscreteSVDD(base=AncestralSampler(steps=8), reward=_ink, particles=3, images=_images), model, 200)
    assert int(out.calls.max()) <= 1 + 3 * 7 and int(out.calls.min()) >= 1


def test_constant_reward_leaves_the_law_unchanged():
    """alpha > 0 with a constant reward draws the candidate uniformly: every candidate has the base move's law."""
    model = _table(3)
    n = 6000
    svdd = DiscreteSVDD(base="first_hitting", reward=lambda im: torch.zeros(len(im)), particles=3, alpha=1.0,
                        images=_images)  # fmt: skip
    out = _run(svdd, model, n)
    counts = torch.bincount(_index(out.tokens), minlength=16).double()
    expected = model.table.flatten() * n
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2 / expected)[keep]).sum())
    assert stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-3


def test_a_reward_for_one_sequence_raises_its_frequency():
    model = _table(1)
    target = torch.tensor([1, 0, 0, 1])
    reward = lambda im: (im.flatten(1) == target).all(1).double()  # noqa: E731
    n = 3000
    plain = _run(FirstHittingSampler(), model, n)
    for alpha in (0.0, 0.5):
        steered = _run(DiscreteSVDD(base="first_hitting", reward=reward, particles=4, alpha=alpha, images=_images),
                       model, n)  # fmt: skip
        share = lambda t: float((t == target).all(1).double().mean())  # noqa: E731
        assert share(steered.tokens) > share(plain.tokens) + 0.1, alpha


def test_bad_rewards_and_options_are_refused():
    model = _table()
    nan = DiscreteSVDD(base="first_hitting", reward=lambda im: torch.full((len(im),), float("nan")), particles=2,
                       images=_images)  # fmt: skip
    with pytest.raises(ValueError, match="NaN"):
        _run(nan, model, 4)
    with pytest.raises(ValueError, match="shape"):
        _run(DiscreteSVDD(reward=lambda im: torch.zeros(3), particles=2, images=_images), model, 4)
    with pytest.raises(ValueError, match="needs a reward"):
        DiscreteSVDD()
    with pytest.raises(ValueError, match="particles"):
        DiscreteSVDD(reward="ink", particles=0)
    with pytest.raises(ValueError, match="alpha"):
        DiscreteSVDD(reward="ink", alpha=float("nan"))
    with pytest.raises(ValueError, match="completion"):
        DiscreteSVDD(reward="ink", completion="mean")
    with pytest.raises(ValueError, match="base must be"):
        DiscreteSVDD(reward="ink", base=3)
    with pytest.raises(ValueError, match="ancestral or first_hitting"):
        DiscreteSVDD(reward="ink", base=DiscreteSVDD(reward="ink"))
    with pytest.raises(ValueError, match="generate_masked"):
        _run(DiscreteSVDD(reward="ink", particles=2), model, 2)
    with pytest.raises(TypeError, match="not plain data"):
        DiscreteSVDD(reward=_ink).to_dict()
    svdd = get_discrete_sampler("svdd", base={"name": "ancestral", "steps": 5}, reward="ink", completion="sample")
    assert "svdd" in DISCRETE_SAMPLERS.names()
    assert DiscreteSVDD.from_dict(svdd.to_dict()) == svdd  # plain data round trip (a registered reward)


def _tiny_net(seed=0, classes=2) -> MaskedUNet:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=4, in_channels=3, out_channels=2, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=classes + 1,
    )  # fmt: skip
    return MaskedUNet(unet, 2, (4, 4)).eval()


def test_relaxed_step_tends_to_the_hard_step_as_tau_goes_to_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 16, 2, generator=gen, dtype=torch.float64)
    x = torch.where(torch.rand(8, 16, generator=gen) < 0.6, 2, torch.randint(0, 2, (8, 16), generator=gen))
    sampler = AncestralSampler(steps=4)
    hard = sampler.move(logits, x, 1, torch.Generator().manual_seed(5))
    u = uniform((8, 16, 3), torch.Generator().manual_seed(5))  # the draws the hard step made
    xs = torch.nn.functional.one_hot(x, 3).double()
    gaps = [float((relaxed_step(logits.log_softmax(-1), xs, sampler.unmask_probability(1), tau, u)
                   - torch.nn.functional.one_hot(hard, 3)).abs().max()) for tau in (1.0, 0.1, 1e-4)]  # fmt: skip
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6


def test_kl_is_zero_at_the_pretrained_model_and_positive_after_a_perturbation():
    pre = _tiny_net().requires_grad_(False)
    net = copy.deepcopy(pre)
    labels = torch.full((6,), 2)
    sampler = AncestralSampler(steps=4)
    _, kl = relaxed_trajectory(net, pre, 6, sampler, 2, 1.0, torch.Generator().manual_seed(0), labels)
    assert torch.equal(kl, torch.zeros(6))
    with torch.no_grad():
        net.unet.conv_out.bias.add_(torch.tensor([0.5, -0.5]))
    _, kl = relaxed_trajectory(net, pre, 6, sampler, 2, 1.0, torch.Generator().manual_seed(0), labels)
    assert bool((kl > 1e-3).all())


def test_kl_on_unmasked_positions_is_identically_zero_under_subs():
    """The pitfall: weighting the KL by the copy flag (unmasked positions), where SUBS makes both models one-hot on
    the observed token, gives 0 whatever the models; the still-masked weighting does not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(4, 16, generator=gen) < 0.5, 2, torch.randint(0, 2, (4, 16), generator=gen))
    xs = torch.nn.functional.one_hot(x, 3).double()
    logp, logp_pre = (torch.randn(4, 16, 2, generator=gen, dtype=torch.float64).log_softmax(-1) for _ in range(2))
    observed = torch.nn.functional.one_hot(x.clamp_max(1), 2).bool() & (x != 2)[..., None]
    subs = lambda lp: torch.where((x != 2)[..., None], torch.where(observed, 0.0, -1e9), lp)  # noqa: E731
    copy_flag = 1 - xs[..., -1]
    upstream = (copy_flag * (subs(logp).exp() * (subs(logp) - subs(logp_pre))).sum(-1)).sum(-1)
    assert torch.allclose(upstream, torch.zeros(4, dtype=torch.float64))
    assert bool((still_masked_kl(subs(logp), subs(logp_pre), xs, 0.5) > 0).all())


def test_truncate_zero_gives_no_reward_gradient_and_truncate_one_does():
    net = _tiny_net().train().requires_grad_(True)
    sampler = AncestralSampler(steps=3)
    labels = torch.full((4,), 2)
    x0, _ = relaxed_trajectory(net, None, 4, sampler, 0, 1.0, torch.Generator().manual_seed(0), labels)
    assert not x0.requires_grad
    x0, _ = relaxed_trajectory(net, None, 4, sampler, 1, 1.0, torch.Generator().manual_seed(0), labels)
    _ink(token_images(x0, (4, 4))).sum().backward()
    assert net.unet.conv_out.weight.grad is not None and float(net.unet.conv_out.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="truncate"):
        DrakesConfig(reward="ink", steps=4, truncate=0)
    with pytest.raises(ValueError, match="tau"):
        DrakesConfig(reward="ink", tau=0)


def test_drakes_trains_resumes_exactly_and_saves_a_masked_folder(tmp_path):
    from hasten.discrete import load_masked
    from hasten.models.zoo import ModelInfo, save_model

    base = tmp_path / "base"
    net = _tiny_net()
    save_model(net.unet, ModelInfo(name="base", arch="unet", objective="mdlm", image_shape=(1, 4, 4), num_classes=2,
                                   data="toy", training={"vocab": 2}), base)  # fmt: skip
    config = DrakesConfig(base=str(base), reward="ink-soft", steps=3, truncate=2, batch_size=3, max_steps=4,
                          lr=1e-2, checkpoint_minutes=60)  # fmt: skip
    straight = fine_tune(tmp_path / "straight", config, _ink, progress=False)
    fine_tune(tmp_path / "resumed", dataclasses.replace(config, max_steps=2), _ink, progress=False)
    (tmp_path / "resumed" / "hasten.json").unlink()  # continue the run
    resumed = fine_tune(tmp_path / "resumed", config, _ink, progress=False)
    assert straight["steps"] == resumed["steps"] == 4 and resumed["resumed_from"] == 2
    a, b, pre = load_masked(tmp_path / "straight"), load_masked(tmp_path / "resumed"), load_masked(base)
    for (name, p), q in zip(a.network.state_dict().items(), b.network.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(a.network.parameters(), pre.network.parameters(), strict=True))
    record = a.info.training["drakes"]
    assert (
        a.info.objective == "mdlm" and record["reward"] == "ink-soft" and record["base_fingerprint"] == pre.fingerprint
    )
    assert record["label"] == "null class" and record["alpha"] == config.alpha
    # the tuned folder samples, and discrete SVDD runs through generate_masked (which binds the model's images)
    from hasten.discrete import generate_masked

    base_sampler = {"name": "ancestral", "steps": 3}
    plain = generate_masked(a, 3, "ancestral", steps=3, label=1)
    one = generate_masked(a, 3, "svdd", base=base_sampler, reward=_ink, particles=1, label=1)
    two = generate_masked(a, 3, "svdd", base=base_sampler, reward=_ink, particles=2, label=1)
    assert torch.equal(plain.tokens, one.tokens) and torch.equal(plain.calls, one.calls)
    assert two.images01.shape == (3, 1, 4, 4) and int(two.calls.max()) <= 1 + 2 * 2
    with pytest.raises(ValueError, match="no gradient"):
        fine_tune(tmp_path / "step", dataclasses.replace(config, reward="ink"), progress=False)
    with pytest.raises(ValueError, match="label 5"):
        fine_tune(tmp_path / "label", dataclasses.replace(config, label=5), _ink, progress=False)
    with pytest.raises(FileExistsError):
        fine_tune(tmp_path / "straight", config, _ink, progress=False)

"""Early exit (DeeDiff): exactness at threshold 0, the heads' loss by hand, refusal of foreign heads, monotone
exits, config round trip, removal, training resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hasten
from hasten.accel import AccelConfig, EarlyExitConfig, ExitHeads, accelerate_, accelerator_of
from hasten.accel.early_exit import (
    capture_blocks,
    exit_loss,
    load_exit_heads,
    network_fingerprint,
    read_exit_heads,
    save_exit_heads,
)
from test_accel import denoiser_for, run, tiny_dit, tiny_unet

labels = {"class_labels": torch.tensor([0, 1])}


def tiny_dit_seeded(seed: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
                                 num_attention_heads=2, attention_head_dim=4, num_embeds_ada_norm=2).eval()  # fmt: skip


def varied_heads(net: nn.Module, seed: int = 0) -> ExitHeads:
    """Heads whose estimators differ per layer and input (the initial ones say 0.5 everywhere)."""
    heads = ExitHeads.from_network(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for out in heads.uem_out:
            out.weight.copy_(torch.randn(out.weight.shape, generator=gen) * 2.0)
            out.bias.copy_(torch.randn(out.bias.shape, generator=gen))
    return heads


@pytest.fixture
def dit_and_heads(tmp_path):
    net = tiny_dit()
    path = save_exit_heads(varied_heads(net), tmp_path / "heads.safetensors", net, {"model": "tiny"})
    return net, str(path)


def test_threshold_zero_is_bitwise_the_full_network(dit_and_heads):
    net, path = dit_and_heads
    den = denoiser_for(net, dit=True)
    ref = run(den, **labels)
    with accelerate_(net, EarlyExitConfig(heads=path, threshold=0.0)) as acc:
        out = run(den, **labels)
        assert acc.stats.reused == 0 and acc.stats.nfe_saved == 0.0 and acc.exits == {}
    assert torch.equal(out, ref)


def test_an_exit_returns_the_heads_output_and_saves_the_skipped_blocks(dit_and_heads):
    net, path = dit_and_heads
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    _, hidden, cond = capture_blocks(net, x, t, labels["class_labels"])
    heads = load_exit_heads(path, net)
    with accelerate_(net, EarlyExitConfig(heads=path, threshold=1.0)) as acc:  # u < 1 always: exits at block 0
        net(x, t, **labels)  # the first call counts FLOPs and never exits
        acc.reset()
        out = net(x, t, **labels).sample
        tuple_out = net(x, t, return_dict=False, **labels)
        stats = acc.stats
        assert acc.exits == {0: 2}
    assert torch.equal(out, heads.output(0, hidden[0], cond))
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], out)
    assert stats.reused == 2 and stats.computed == 0
    assert 0.5 < stats.nfe_saved / 2 < 1.0  # three of four blocks and the final layer, less the estimator and head


def exit_block(net, path, threshold, x, t):
    """The block a call exits after (None: no exit), for one input, on a fresh install."""
    with accelerate_(net, EarlyExitConfig(heads=path, threshold=threshold)) as acc:
        net(x, t, **labels)
        acc.reset()
        net(x, t, **labels)
        return next(iter(acc.exits), None)


def test_exits_come_earlier_as_the_threshold_grows(dit_and_heads):
    net, path = dit_and_heads
    heads = load_exit_heads(path, net)
    depth = len(net.transformer_blocks)
    seen = set()
    for k, time in enumerate((50.0, 400.0, 900.0)):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(k))
        t = torch.full((2,), time)
        _, hidden, cond = capture_blocks(net, x, t, labels["class_labels"])
        u = [float(heads.uncertainty(i, hidden[i], cond).mean()) for i in range(depth - 1)]
        previous = depth
        for threshold in (0.0, *sorted(u), 1.0):
            block = exit_block(net, path, threshold, x, t)
            exited = depth if block is None else block
            # the first block whose estimate is below the threshold, by hand
            expected = next((i for i, value in enumerate(u) if value < threshold), depth)
            assert exited == expected <= previous
            previous = exited
            seen.add(exited)
    assert len(seen) >= 3  # the sweep really moved the exit


def test_a_ramp_changes_the_threshold_over_the_steps():
    config = EarlyExitConfig(heads="h", threshold=0.1, final_threshold=0.3)
    assert config.threshold_at(0, 11) == pytest.approx(0.1) and config.threshold_at(10, 11) == pytest.approx(0.3)
    assert config.threshold_at(5, 11) == pytest.approx(0.2)
    windowed = EarlyExitConfig(heads="h", threshold=0.2, start=0.5)
    assert windowed.threshold_at(4, 10) == 0.0 and windowed.threshold_at(5, 10) == 0.2
    with pytest.raises(ValueError, match="number of steps"):
        config.threshold_at(0, None)
    assert EarlyExitConfig(heads="h", threshold=0.2).threshold_at(3, None) == 0.2


def test_exit_loss_on_a_toy_batch_by_hand():
    # width 2, one 2x2-pixel patch per image (one token), two exits; hidden [1, -1] normalises to [1, -1]
    heads = ExitHeads(inner_dim=2, patch_size=2, out_channels=1, num_exits=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        heads.projection[0].bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
        heads.projection[1].weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # pixel 0 gets LN(h)[0] ~ 1
        heads.uem_out[0].bias.fill_(0.0)  # u = 0.5
        heads.uem_out[1].bias.fill_(math.log(3.0))  # u = 0.75
    hidden = [torch.tensor([[[1.0, -1.0]]]), torch.tensor([[[1.0, -1.0]]])]
    target = torch.zeros(1, 1, 2, 2)
    cond = torch.zeros(1, 2)
    parts = exit_loss(heads, hidden, cond, target)
    ln = 1.0 / math.sqrt(1.0 + 1e-6)  # layer_norm of [1, -1] with eps 1e-6
    errors = [[0.5, -0.5, 1.0, 0.0], [ln, 0.0, 0.0, 0.0]]  # pixel order (0,0), (0,1), (1,0), (1,1)
    us = [0.5, 0.75]
    uncertainty = sum((u - sum(math.tanh(abs(e)) for e in err) / 4) ** 2 for u, err in zip(us, errors)) / 2
    ual = sum((1 - u) * sum(e * e for e in err) / 4 for u, err in zip(us, errors)) / 2
    layer = sum(sum(e * e for e in err) / 4 for err in errors) / 2
    assert float(parts["uncertainty"].detach()) == pytest.approx(uncertainty, rel=1e-6)
    assert float(parts["ual"].detach()) == pytest.approx(ual, rel=1e-6)
    assert float(parts["layer"].detach()) == pytest.approx(layer, rel=1e-6)
    assert float(parts["total"].detach()) == pytest.approx(uncertainty + ual + layer, rel=1e-6)


def test_the_heads_start_as_the_final_layer():
    net = tiny_dit()
    heads = ExitHeads.from_network(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0])
    target, hidden, cond = capture_blocks(net, x, t, labels["class_labels"])
    with torch.no_grad():
        last = heads.output(0, hidden[-1], cond)  # head 0 applied to the last block's tokens = the final layer
        u = heads.uncertainty(2, hidden[2], cond)
    torch.testing.assert_close(last, target)
    assert torch.equal(u, torch.full_like(u, 0.5))


def test_heads_of_another_network_are_refused_naming_both(tmp_path):
    net, other = tiny_dit_seeded(0), tiny_dit_seeded(1)
    path = save_exit_heads(ExitHeads.from_network(other), tmp_path / "other.safetensors", other, {"model": "other"})
    with pytest.raises(ValueError) as err:
        accelerate_(net, EarlyExitConfig(heads=str(path), threshold=0.1))
    message = str(err.value)
    assert network_fingerprint(other) in message and network_fingerprint(net) in message and "other" in message
    assert accelerator_of(net) is None  # nothing left installed


def test_install_and_remove_leave_the_network_exact(dit_and_heads):
    net, path = dit_and_heads
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 300.0])
    before = net(x, t, **labels).sample
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    patched_before = {name for name, m in net.named_modules() if "forward" in m.__dict__}
    acc = accelerate_(net, EarlyExitConfig(heads=path, threshold=1.0))
    net(x, t, **labels)
    acc.reset()
    assert not torch.equal(net(x, t, **labels).sample, before)  # it exits
    acc.remove()
    assert {name for name, m in net.named_modules() if "forward" in m.__dict__} == patched_before
    assert torch.equal(net(x, t, **labels).sample, before)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())


def test_config_save_load_round_trip(tmp_path):
    config = EarlyExitConfig(heads="caches/h.safetensors", threshold=0.05, final_threshold=0.1, start=0.1)
    path = config.save(tmp_path / "exit.json", calibration={"note": 1})
    assert AccelConfig.load(path) == config
    assert EarlyExitConfig.load(path) == config


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"heads": ""}, "heads must name"),
        ({"heads": "h", "threshold": -0.1}, "threshold must be in"),
        ({"heads": "h", "threshold": 0.1, "final_threshold": 1.5}, "final_threshold must be in"),
        ({"heads": "h", "start": 0.6, "stop": 0.5}, "start <= stop"),
    ],
)
def test_bad_settings_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        EarlyExitConfig(**options)


def test_networks_without_exits_and_missing_heads_are_refused(tmp_path):
    with pytest.raises(TypeError, match="UNet2DModel is not one"):
        accelerate_(tiny_unet(), EarlyExitConfig(heads=str(tmp_path / "h.safetensors"), threshold=0.1))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        accelerate_(tiny_dit(), EarlyExitConfig(heads=str(tmp_path / "h.safetensors"), threshold=0.1))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_exit_heads(tmp_path / "bad.safetensors")


def test_training_resumes_exactly_and_refuses_an_existing_output(tmp_path, monkeypatch):
    from hasten.accel import early_exit

    model = hasten.load("mnist-dit")
    options = {"minutes": 10.0, "batch_size": 4, "progress": False}
    straight = tmp_path / "straight.safetensors"
    early_exit.train_exit_heads(model, straight, max_steps=4, **options)
    with pytest.raises(FileExistsError, match="already exists"):
        early_exit.train_exit_heads(model, straight, max_steps=4, **options)

    resumed = tmp_path / "resumed.safetensors"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # interrupted after step 2: the checkpoint stays, the heads file is not written
    with monkeypatch.context() as patch:
        patch.setattr(early_exit, "save_exit_heads", killed)
        with pytest.raises(KeyboardInterrupt):
            early_exit.train_exit_heads(model, resumed, max_steps=2, **options)
    assert not resumed.exists() and early_exit.checkpoint_folder(resumed).is_dir()
    record = early_exit.train_exit_heads(model, resumed, max_steps=4, **options)
    assert record["resumed_from"] == 2 and record["steps"] == 4
    assert not early_exit.checkpoint_folder(resumed).exists()
    a, meta = read_exit_heads(straight)
    b, _ = read_exit_heads(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta["network_fingerprint"] == network_fingerprint(model.network) and meta["record"]["model"] == "mnist-dit"


def test_cli_trains_calibrates_and_refuses_bad_input(tiny_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hasten.accel import calibrate
    from hasten.cli.app import app

    monkeypatch.setattr(calibrate, "EXIT_THRESHOLDS", (0.6,))  # one rung per ladder: heads after 2 steps say 0.5

    runner = CliRunner()
    heads = tmp_path / "heads.safetensors"
    train = ["accelerate", "train-exits", "--model", tiny_model, "--out", str(heads), "--max-steps", "2",
             "--batch-size", "4", "--format", "json"]  # fmt: skip
    made = runner.invoke(app, train)
    assert made.exit_code == 0, made.output
    assert heads.exists() and '"steps": 2' in made.output
    again = runner.invoke(app, train)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, [*train[:-2], "--minutes", "0", "--force"])
    assert bad.exit_code == 2 and "--minutes must be > 0, got 0" in bad.output
    out = tmp_path / "exit.json"
    calib = ["accelerate", "calibrate", "--model", tiny_model, "--technique", "early-exit", "--solver", "euler",
             "--steps", "4", "--n", "10", "--out", str(out), "--max-quality-loss", "5"]  # fmt: skip
    missing = runner.invoke(app, calib)
    assert missing.exit_code == 2 and "--exit-heads" in missing.output
    ok = runner.invoke(app, [*calib, "--exit-heads", str(heads)])
    assert ok.exit_code == 0, ok.output
    config = AccelConfig.load(out)
    assert isinstance(config, EarlyExitConfig) and config.heads == str(heads) and config.threshold_at(3, 4) > 0
    sampled = runner.invoke(app, ["sample", "--model", tiny_model, "--n", "2", "--solver", "euler", "--steps", "4",
                                  "--accel", str(out), "--out", str(tmp_path / "grid.png")])  # fmt: skip
    assert sampled.exit_code == 0, sampled.output


def test_the_shipped_heads_fit_the_bundled_dit():
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "caches" / "mnist-dit-exit-heads.safetensors"
    heads = load_exit_heads(path, hasten.load("mnist-dit").network)
    assert heads.num_exits == 5

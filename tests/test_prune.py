"""Structured pruning: Torch-Pruning's surgery on both architectures, importance by hand, the folder format, the
fine-tune's losses and resume, and every refusal."""

import math

import pytest
import torch
from torch import nn

import hasten
from hasten.models.zoo import load
from hasten.prune import importance as imp
from hasten.prune import select, spectral_error, surgery
from hasten.prune.method import PruneOptions

tp = pytest.importorskip("torch_pruning")

_DATASETS: dict[str, object] = {}


@pytest.fixture
def parsed_once(monkeypatch):
    """Parse MNIST once for this module's fine-tunes (the CSV parse takes seconds; the driver reloads it)."""
    import hasten.data

    load_dataset = hasten.data.load_dataset

    def cached(name, *args, **kwargs):
        if name not in _DATASETS:
            _DATASETS[name] = load_dataset(name, *args, **kwargs)
        return _DATASETS[name]

    monkeypatch.setattr(hasten.data, "load_dataset", cached)


def test_taylor_importance_of_a_toy_network_is_the_hand_computed_sum():
    """Diff-Pruning's score of an output channel of conv1: sum |w * g| over conv1's filter and conv2's slice."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    x = torch.randn(3, 1, 6, 6)
    net(x).pow(2).mean().backward()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    group = graph.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    a, b = net[0], net[2]
    hand = (a.weight * a.weight.grad).abs().flatten(1).sum(1)
    hand += (b.weight * b.weight.grad).abs().transpose(0, 1).flatten(1).sum(1)
    torch.testing.assert_close(imp.channel_importance("taylor")(group), hand.detach())
    magnitude = a.weight.pow(2).flatten(1).sum(1) + b.weight.pow(2).transpose(0, 1).flatten(1).sum(1)
    torch.testing.assert_close(imp.channel_importance("magnitude")(group), magnitude.detach())


def test_taylor_gradients_accumulate_until_the_loss_falls_below_the_threshold(tiny_model):
    model = load(tiny_model)
    x0, labels = torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4)
    net = surgery.copy_with_gradients(model.network)
    every = imp.taylor_gradients(net, model, x0, labels, levels=6, threshold=0.0)
    first = imp.taylor_gradients(net, model, x0, labels, levels=6, threshold=1.0)
    assert len(every["levels"]) == 6 and every["levels"] == sorted(every["levels"])  # clean -> noisy
    assert len(first["levels"]) == 1 and first["levels"][0] == every["levels"][0]
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["mnist-dit", "mnist-unet"])
def test_pruned_networks_keep_their_shapes_and_a_zero_ratio_changes_nothing(name):
    model = load(name)
    base = model.network
    small = surgery.example_inputs(base, model.info.image_shape, 2, {"class_labels": torch.arange(2)})
    untouched = surgery.copy_with_gradients(base)
    surgery.prune_channels(untouched, small, 0.0, imp.channel_importance("magnitude"))
    pruned = surgery.copy_with_gradients(base)
    surgery.prune_channels(pruned, small, 0.5, imp.channel_importance("magnitude"))
    with torch.no_grad():
        reference = surgery._call(base, small)
        assert torch.equal(surgery._call(untouched, small), reference)
        assert surgery._call(pruned, small).shape == reference.shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    if name == "mnist-dit":  # the residual stream keeps its width; the bottleneck shrinks
        block = pruned.transformer_blocks[0]
        assert block.attn1.to_out[0].out_features == 128 and block.attn1.to_q.out_features == 64
    else:  # every GroupNorm still divides its channels into its groups
        norms = [m for m in pruned.modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)


@pytest.mark.parametrize("ratio", [0.25, 0.375])
def test_a_unet_loses_whole_groupnorm_groups_and_the_groups_it_keeps_normalise_as_before(ratio):
    """Torch-Pruning alone removes the same positions from every GroupNorm group (32 channels in 16 groups can
    only become 16 groups of one, which changes every group's statistics); hasten removes whole groups, so a
    kept group's normalised output is the unpruned norm's, exactly."""
    model = load("mnist-unet")
    base = model.network
    small = surgery.example_inputs(base, model.info.image_shape, 2, {"class_labels": torch.arange(2)})
    pruned = surgery.copy_with_gradients(base)
    surgery.prune_channels(pruned, small, ratio, imp.channel_importance("magnitude"))
    checked = 0
    for name, module in base.named_modules():
        if not (name.endswith("resnets.0") and hasattr(module, "norm2")):
            continue
        theirs, ours = module, pruned.get_submodule(name)
        size = theirs.norm2.num_channels // theirs.norm2.num_groups
        # the conv before norm2 keeps whole output filters: find each kept one by its bias (unique per filter)
        kept = [int((theirs.conv1.bias - b).abs().argmin()) for b in ours.conv1.bias]
        assert len(kept) == round(theirs.norm2.num_channels * (1 - ratio))
        groups = sorted({k // size for k in kept})
        assert sorted(kept) == [g * size + j for g in groups for j in range(size)]  # whole groups
        assert ours.norm2.num_groups == len(groups)
        h = torch.randn(3, theirs.norm2.num_channels, 7, 7)
        kept_t = torch.tensor(sorted(kept))
        with torch.no_grad():
            order = torch.tensor(kept).argsort()
            expected = theirs.norm2(h)[:, kept_t]
            got = ours.norm2(h[:, torch.tensor(kept)])[:, order]
        torch.testing.assert_close(got, expected)
        checked += 1
    assert checked >= 4


def test_levels_prune_only_the_named_unet_resolution_levels():
    model = load("mnist-unet")
    base = model.network
    small = surgery.example_inputs(base, model.info.image_shape, 2, {"class_labels": torch.arange(2)})
    pruned = surgery.copy_with_gradients(base)
    surgery.prune_channels(pruned, small, 0.5, imp.channel_importance("magnitude"), levels=[1, 2])
    assert pruned.conv_in.out_channels == 32 and pruned.down_blocks[0].resnets[0].conv2.out_channels == 32
    assert pruned.up_blocks[2].resnets[-1].conv2.out_channels == 32  # level 0 kept
    assert pruned.down_blocks[1].resnets[0].conv2.out_channels == 32  # level 1: 64 -> 32
    assert pruned.mid_block.resnets[0].conv2.out_channels == 32  # level 2 (the mid block): 64 -> 32
    with torch.no_grad():
        assert surgery._call(pruned, small).shape == surgery._call(base, small).shape
    with pytest.raises(ValueError, match=r"levels \[3\]: this UNet has levels 0..2"):
        surgery.prune_channels(surgery.copy_with_gradients(base), small, 0.5, imp.channel_importance("magnitude"),
                               levels=[3])  # fmt: skip
    dit = load("mnist-dit")
    dit_inputs = surgery.example_inputs(dit.network, dit.info.image_shape, 2, {"class_labels": torch.arange(2)})
    with pytest.raises(TypeError, match="levels are a UNet's resolution levels"):
        surgery.prune_channels(dit.network, dit_inputs, 0.5, imp.channel_importance("magnitude"), levels=[0])
    with pytest.raises(ValueError, match="levels"):
        PruneOptions.create(ratio=0.5, levels=[-1])
    assert PruneOptions.create(ratio=0.5, levels=[2, 1, 2]).levels == (1, 2)
    assert PruneOptions.create(ratio=0.5, levels="1,2").levels == (1, 2)  # as --option levels=1,2 passes it
    assert PruneOptions.create(ratio=0.5, levels=1).levels == (1,)  # --option levels=1 arrives as a number
    with pytest.raises(ValueError, match="levels must be UNet level numbers"):
        PruneOptions.create(ratio=0.5, levels="one")


@pytest.mark.parametrize("levels", [None, [1, 2]])
def test_pruning_records_which_teacher_channels_each_unet_block_output_keeps(levels):
    """The UNet feature loss compares a pruned block output with the teacher's same channels: the record must name
    them. Each kept filter of a block's last layer is a teacher filter, so its bias is the teacher's, exactly."""
    model = load("mnist-unet")
    base = model.network
    small = surgery.example_inputs(base, model.info.image_shape, 2, {"class_labels": torch.arange(2)})
    pruned = surgery.copy_with_gradients(base)
    kept = {layer: list(range(layer.out_channels)) for _, layer in surgery.unet_features(pruned)}
    surgery.prune_channels(pruned, small, 0.375, imp.channel_importance("magnitude"), levels=levels, kept=kept)
    features = list(zip(surgery.unet_features(base), surgery.unet_features(pruned), strict=True))
    assert len(features) == 7  # three down blocks, the mid block, three up blocks
    narrowed = 0
    for (_, theirs), (_, ours) in features:
        channels = kept[ours]
        assert len(channels) == ours.out_channels and len(set(channels)) == len(channels)
        torch.testing.assert_close(ours.bias, theirs.bias[channels], rtol=0, atol=0)
        narrowed += len(channels) < theirs.out_channels
    assert narrowed >= (5 if levels else 7)
    if levels:  # level 0 (the first down block and the last up block) keeps every channel, in order
        assert kept[features[0][1][1]] == list(range(32)) and kept[features[-1][1][1]] == list(range(32))
    # the recorded layer's width is the block output's width
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for (_, _), (blk, _) in features]  # fmt: skip
    with torch.no_grad():
        surgery._call(pruned, small)
    for h in hooks:
        h.remove()
    assert [o.shape[1] for o in outputs] == [layer.out_channels for (_, _), (_, layer) in features]


def test_a_unet_fine_tune_matches_block_features_and_resumes_exactly(tmp_path, parsed_once):
    settings = dict(ratio=0.375, batch_size=2, finetune_minutes=5, progress=False, steps=4, importance="magnitude",
                    feature_weight=1.0, levels=(1, 2))  # fmt: skip
    hasten.prune("mnist-unet", tmp_path / "a", max_steps=2, **settings)
    hasten.prune("mnist-unet", tmp_path / "b", max_steps=1, **settings)
    channels = (tmp_path / "b" / "method" / "feature_channels.json").read_text()
    hasten.prune("mnist-unet", tmp_path / "b", max_steps=2, resume=True, **settings)
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    for key, value in a.network.state_dict().items():
        assert torch.equal(value, b.network.state_dict()[key]), key
    assert channels.startswith("[[0, 1, 2")  # level 0's first block keeps its channels in order


def test_mlp_ratio_sets_the_transformer_mlp_width_apart_from_the_attention():
    model = load("mnist-dit")
    small = surgery.example_inputs(model.network, model.info.image_shape, 2, {"class_labels": torch.arange(2)})
    pruned = surgery.copy_with_gradients(model.network)
    surgery.prune_channels(pruned, small, 0.25, imp.channel_importance("magnitude"), mlp_ratio=0.5)
    for block in pruned.transformer_blocks:
        assert block.attn1.to_q.out_features == 96  # 4 heads x 32 -> 4 x 24
        assert surgery._mlp_inputs(pruned)[0].out_features == 256  # 512 -> 256
    with torch.no_grad():
        assert surgery._call(pruned, small).shape == surgery._call(model.network, small).shape
    unet = load("mnist-unet")
    inputs = surgery.example_inputs(unet.network, unet.info.image_shape, 2, {"class_labels": torch.arange(2)})
    with pytest.raises(TypeError, match="mlp_ratio is for a transformer"):
        surgery.prune_channels(unet.network, inputs, 0.25, imp.channel_importance("magnitude"), mlp_ratio=0.5)
    with pytest.raises(ValueError, match="mlp_ratio must be in"):
        PruneOptions.create(ratio=0.25, mlp_ratio=1.0)


def test_min_snr_weighting_caps_the_noise_loss_weight_at_gamma():
    from hasten.distill.guidance import level_weight

    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 157.0])
    torch.testing.assert_close(level_weight(sigma, "min_snr"), torch.tensor([5.0, 4.0, 1.0, 1 / 9, 1 / 157**2]))
    torch.testing.assert_close(level_weight(sigma, "snr_trunc"), torch.tensor([100.0, 4.0, 1.0, 1.0, 1.0]))
    assert PruneOptions.create(ratio=0.5).weighting == "auto"
    with pytest.raises(ValueError, match="weighting must be one of"):
        PruneOptions.create(ratio=0.5, weighting="min-snr")


def test_lr_decay_linear_anneals_the_rate_to_a_tenth_over_the_time_budget(tiny_model, tmp_path, monkeypatch):
    import types

    import hasten.train as train_module
    from hasten.distill._base import DistillMethod

    now = [0.0]  # the training loop's clock, moved only by updates: each update "takes" 5 s
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    rates = []
    real_update = DistillMethod.update

    def update(self, loss, index, **kwargs):
        rates.append(kwargs["lr"])
        now[0] += 5.0
        return real_update(self, loss, index, **kwargs)

    monkeypatch.setattr(DistillMethod, "update", update)
    settings = dict(ratio=0.5, batch_size=4, progress=False, steps=4, importance="magnitude", lr=1e-3)
    hasten.prune(tiny_model, tmp_path / "a", finetune_minutes=0.5, max_steps=4, lr_decay="linear", **settings)
    # 30 s budget, 5 s per update: 0, 1/6, 2/6, 3/6 of the way, times the 100-update warm-up
    expected = [1e-3 * (i + 1) / 100 * (1 - 0.9 * i / 6) for i in range(4)]
    assert rates == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        PruneOptions.create(ratio=0.5, lr_decay="cosine")
    assert PruneOptions.create(ratio=0.5).lr_decay == "none"


def test_a_pruned_folder_loads_quantises_and_resumes_exactly(tiny_model, tmp_path, parsed_once):
    settings = dict(ratio=0.5, batch_size=4, finetune_minutes=5, progress=False, steps=4, importance="magnitude")
    hasten.prune(tiny_model, tmp_path / "a", max_steps=4, **settings)
    hasten.prune(tiny_model, tmp_path / "b", max_steps=2, **settings)
    again = hasten.prune(tiny_model, tmp_path / "b", max_steps=4, resume=True, **settings)
    assert again.steps == 4
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    for key, value in a.network.state_dict().items():
        assert torch.equal(value, b.network.state_dict()[key]), key
    record = a.info.pruning
    assert record["structure_kind"] == "channels" and record["ratio"] == 0.5 and record["importance"] == "magnitude"
    assert record["parameters_after"] < record["parameters_before"] and record["macs_after"] < record["macs_before"]
    assert a.info.distillation["method"] == "prune" and a.info.sampler["steps"] == 4
    # config.json is the base architecture's: diffusers builds it, the record narrows it
    from diffusers import DiTTransformer2DModel

    base = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(tmp_path / "a"))
    assert sum(p.numel() for p in base.parameters()) == record["parameters_before"]
    assert sum(p.numel() for p in a.network.parameters()) == record["parameters_after"]
    teacher = load(tiny_model)
    x, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 300.0), torch.arange(2)
    assert a.network(x, t, class_labels=y).sample.shape == teacher.network(x, t, class_labels=y).sample.shape
    assert hasten.generate(a, 2).nfe == 4  # its own sampler
    # prune, then quantise: the quantised folder keeps the pruned widths
    from hasten.quant.storage import quantize_to_folder

    quantize_to_folder(a, hasten.QuantConfig(weights=8, activations=None), tmp_path / "q", n=32, steps=2)
    quantised = load(tmp_path / "q")
    assert quantised.info.pruning and quantised.network(x, t, class_labels=y).sample.shape == (2, 1, 28, 28)


def test_removing_blocks_writes_a_plain_diffusers_folder(tiny_model, tmp_path, parsed_once):
    from diffusers import DiTTransformer2DModel

    hasten.prune(tiny_model, tmp_path / "p", structure="blocks", blocks=(1, 3), batch_size=4, max_steps=1,
                 progress=False)  # fmt: skip
    pruned = load(tmp_path / "p")
    assert len(pruned.network.transformer_blocks) == len(load(tiny_model).network.transformer_blocks) - 2
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "p")  # the config says num_layers
    for key, value in plain.state_dict().items():
        assert torch.equal(value, pruned.network.state_dict()[key])


def test_block_scores_are_deterministic_and_rank_every_block(tiny_model):
    model = load(tiny_model)
    first = imp.block_scores(model, n=4, steps=2)
    assert first == imp.block_scores(model, n=4, steps=2)
    assert len(first) == len(model.network.transformer_blocks) and all(s > 0 for s in first)
    assert not any(model.network.transformer_blocks[0]._forward_hooks)  # hooks gone


def test_spectral_error():
    pred, target = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(spectral_error(pred, target, 0.0), (pred - target).pow(2).flatten(1).mean(1))
    # a target with most energy at low frequency: with alpha > 0 an error at high frequency costs more
    xx = torch.arange(8.0).expand(8, 8)
    target = (torch.cos(2 * math.pi * xx / 8) * 4 + torch.cos(6 * math.pi * xx / 8) * 0.1 + 1).expand(1, 1, 8, 8)
    low = target + 0.1 * torch.cos(2 * math.pi * xx / 8)
    high = target + 0.1 * torch.cos(6 * math.pi * xx / 8)
    assert torch.allclose(spectral_error(low, target, 0.0), spectral_error(high, target, 0.0))
    assert spectral_error(high, target, 1.0) > spectral_error(low, target, 1.0)


def test_refusals(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="already holds files"):
        hasten.prune(tiny_model, tmp_path / "full", ratio=0.5)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="structure 'blocks' removes transformer blocks"):
        hasten.prune("mnist-unet", tmp_path / "u", structure="blocks", blocks=(0,), progress=False)
    with pytest.raises(ValueError, match="ratio must be in"):
        PruneOptions(ratio=1.5)
    with pytest.raises(ValueError, match="importance"):
        PruneOptions(ratio=0.5, importance="output_change")
    monkeypatch.setattr("hasten.prune.RATIOS", (0.1, 0.2))  # two candidates are enough to show the refusal
    with pytest.raises(ValueError, match=r"no channels pruning of .* reaches a 100x .* best measured was"):
        select(load("mnist-dit"), target_speedup=100.0, importance="magnitude", timing_batch=2)


def test_a_quantised_model_is_refused(tmp_path):
    from hasten.quant.storage import quantize_to_folder

    config = hasten.QuantConfig(weights=8, activations=None)
    quantize_to_folder(load("mnist-unet"), config, tmp_path / "q", n=32, steps=2)
    with pytest.raises(ValueError, match="prune the float model it came from, then quantise"):
        hasten.prune(tmp_path / "q", tmp_path / "out", ratio=0.3, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_input_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from hasten.cli.app import app

    runner = CliRunner()
    out = tmp_path / "o"
    for args, message in [
        (["--option", "nonsense=1"], "not a pruning option"),
        (["--blocks", "1,x", "--structure", "blocks"], "--blocks"),
        (["--ratio", "0.3", "--structure", "blocks"], "needs --structure channels"),
        (["--target-speedup", "0.5"], "--target-speedup must be > 1"),
        (["--structure", "rows"], "structure must be one of"),
        (["--ratio", "0.3", "--option", "levels=1"], "levels are a UNet's resolution levels"),
        (["--ratio", "0.3", "--option", "weighting=p2"], "weighting must be one of"),
        (["--model", "mnist-unet", "--ratio", "0.3", "--option", "mlp_ratio=0.5"], "mlp_ratio is for a transformer"),
        (["--model", "mnist-unet", "--ratio", "0.3", "--option", "levels=3"], "has levels 0..2"),
    ]:
        result = runner.invoke(app, ["prune", "--model", "mnist-dit", "--out", str(out), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not out.exists()


@pytest.mark.parametrize("name", ["mnist-dit-pruned", "mnist-unet-pruned"])
def test_bundled_pruned_models_load_by_name_and_are_students_of_the_bundled_teacher(name):
    from hasten.recipe import student_recipe

    pruned = hasten.load(name)
    record = pruned.info.distillation
    teacher = hasten.load(record["teacher"])
    assert record["method"] == "prune" and record["teacher_fingerprint"] == teacher.fingerprint
    assert sum(p.numel() for p in pruned.network.parameters()) == pruned.info.pruning["parameters_after"]
    assert pruned.info.pruning["parameters_after"] < sum(p.numel() for p in teacher.network.parameters())
    folder = pruned.folder
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20
    assert not (folder / "checkpoint").exists() and not (folder / "method").exists()
    card = (folder / "MODEL_CARD.md").read_text()
    assert "Measured network speed-up" in card and "FD change vs teacher" in card
    recipe = student_recipe(name, teacher_fingerprint=teacher.fingerprint)
    assert recipe.kind == "student" and recipe.student["method"] == "prune"
    assert hasten.generate(pruned, 2, steps=2).images01.shape == (2, *teacher.info.image_shape)

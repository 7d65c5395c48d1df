"""Post-training quantisation: arithmetic, calibration coverage, layers, storage, kernels, CLI and bench rows."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from torch import nn

import hasten
from hasten.quant import (
    MIN_SAMPLES,
    CalibrationSet,
    QuantConfig,
    QuantizedLayer,
    collect_calibration,
    int8_kernels_available,
    modules,
    quantize_,
    save_quantized,
    shortcut_splits,
)
from hasten.quant.quantizers import (
    act_qparams,
    act_range_search,
    adaround,
    fake_quant_act,
    pack_int4,
    quantize_weight,
    sqnr_db,
    unpack_int4,
)

# -- arithmetic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_quantisation_is_per_channel_and_in_range(bits):
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16)[:, None, None, None]  # channels 1000x apart
    w_int, scale = quantize_weight(w, bits)
    assert w_int.dtype == torch.int8 and scale.shape == (16,)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(w_int.min()) >= lo and int(w_int.max()) <= hi
    deq = w_int.float() * scale[:, None, None, None]
    # per-channel scales keep every channel accurate, the small ones included
    per_channel = [sqnr_db(w[c], deq[c]) for c in range(16)]
    assert min(per_channel) > (35 if bits == 8 else 12)


def _lp_error(x, scale, zp):
    return float((fake_quant_act(x, scale, zp) - x).abs().pow(2.4).mean())


@pytest.mark.parametrize("dist", ["student_t", "gauss", "laplace", "relu"])
def test_range_search_is_never_worse_than_min_max(dist):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen)
    x = {"student_t": x / torch.rand(50_000, generator=gen).clamp_min(0.05), "gauss": x, "laplace": x.sign()
         * torch.empty(50_000).exponential_(generator=gen), "relu": x.relu()}[dist]  # fmt: skip
    assert _lp_error(x, *act_range_search(x)) <= _lp_error(x, *act_range_search(x, search=False)) * (1 + 1e-6)


def test_range_search_clips_a_lone_outlier():
    x = torch.cat([torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.tensor([1.6])])
    scale, zp = act_range_search(x)
    hi = (255 - zp) * scale
    assert hi < 1.5  # the outlier is clipped: every other value gets a finer grid
    assert _lp_error(x, scale, zp) < 0.8 * _lp_error(x, *act_range_search(x, search=False))


def test_activation_grid_contains_zero_exactly():
    scale, zp = act_qparams(0.3, 5.0)  # widened to include 0
    assert fake_quant_act(torch.zeros(3), scale, zp).abs().max() == 0
    assert 0 <= zp <= 255


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 3, 3)])
def test_int4_packing_round_trips(shape):
    values = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == (values.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, shape), values)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_int4(packed[:-1], shape)


def test_adaround_beats_rounding_to_nearest():
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(32, 16)
    # correlated inputs, as a layer's real inputs are: rounding each weight to nearest is then not optimal
    x = torch.randn(512, 32, generator=gen) @ torch.randn(32, 32, generator=gen) + torch.randn(32, generator=gen)
    target = layer(x).detach()
    w = layer.weight.detach()
    w_near, scale = quantize_weight(w, 4)

    def forward(inp, weight):
        return nn.functional.linear(inp, weight, layer.bias.detach())

    learned = adaround(w, scale, 4, forward, x, target, iters=400, generator=gen)
    assert int(learned.min()) >= -8 and int(learned.max()) <= 7
    err_near = float((forward(x, w_near.float() * scale[:, None]) - target).pow(2).mean())
    err_learned = float((forward(x, learned.float() * scale[:, None]) - target).pow(2).mean())
    assert err_learned < 0.85 * err_near
    # AdaRound only chooses between floor and ceil of w / s
    assert ((learned.float() - w / scale[:, None]).abs() < 1.0 + 1e-5).all()


# -- calibration -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return hasten.load("mnist-unet")


@pytest.fixture(scope="module")
def unet_calibration(unet):
    return collect_calibration(unet, n=MIN_SAMPLES, steps=6)


def test_trajectory_calibration_covers_every_step(unet, unet_calibration):
    cal = unet_calibration
    assert len(cal) == MIN_SAMPLES * 6
    steps = sorted({c.step for c in cal.calls})
    assert steps == list(range(6))
    assert len(cal.times) == 6 and cal.times[-1] > 900 and cal.times[0] < 200  # noise to the last step (t = 166)
    assert cal.fingerprint == unet.fingerprint and cal.setting["mode"] == "trajectory"


def test_guided_calibration_covers_both_branches(unet):
    cal = collect_calibration(unet, n=MIN_SAMPLES, steps=3, guidance=2.0)
    labels = torch.cat([c.kwargs["class_labels"] for c in cal.calls])
    assert (labels == unet.info.null_class).any() and (labels < unet.info.num_classes).any()  # uncond and cond


def test_single_and_normal_modes(unet):
    single = collect_calibration(unet, n=MIN_SAMPLES, steps=6, mode="single")
    assert len(single.times) == 1 and len(single) == MIN_SAMPLES
    normal = collect_calibration(unet, n=64, steps=10, mode="normal")
    assert len(normal) == 64
    weights = torch.tensor([c.batch_size for c in normal.calls], dtype=torch.float)
    mean_t = float((torch.tensor([c.t for c in normal.calls]) * weights).sum() / weights.sum())
    assert 0.2 * 1000 < mean_t < 0.65 * 1000  # PTQ4DM: centred near 0.4 T, clipped to [0, T]


def test_calibration_bad_input(unet):
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES}"):
        collect_calibration(unet, n=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        collect_calibration(unet, n=MIN_SAMPLES, mode="random")


def test_calibration_set_round_trips(tmp_path, unet_calibration):
    path = unet_calibration.save(tmp_path / "cal.safetensors")
    back = CalibrationSet.load(path)
    assert back.setting == unet_calibration.setting and back.fingerprint == unet_calibration.fingerprint
    assert len(back) == len(unet_calibration) and back.times == unet_calibration.times
    assert torch.equal(back.calls[2].args[0], unet_calibration.calls[2].args[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match=r"cannot read calibration set|not a hasten calibration"):
        CalibrationSet.load(tmp_path / "bad.safetensors")


# -- quantize_ -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w8a8(unet_calibration):
    model = hasten.load("mnist-unet")
    report = quantize_(model, QuantConfig(weights=8, activations=8), calibration=unet_calibration)
    return model, report


def test_w8a8_every_layer_keeps_its_signal(w8a8):
    model, report = w8a8
    assert report.layers and all(row["sqnr_db"] > 28 for row in report.layers)
    assert report.network_sqnr_db > 25
    quantized = [m for m in model.network.modules() if isinstance(m, QuantizedLayer)]
    assert len(quantized) == len(report.layers)
    left = [name for name, m in model.network.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert left == ["conv_out"]  # keep_output_float: the prediction layer stays float


def test_temporal_layers_are_found_and_keep_float_activations(w8a8):
    _, report = w8a8
    temporal = {row["name"] for row in report.layers if row["temporal"]}
    assert "time_embedding.linear_1" in temporal and "time_embedding.linear_2" in temporal
    assert "down_blocks.0.resnets.0.time_emb_proj" in temporal
    assert not any(name.endswith(("conv1", "conv2", "to_q")) for name in temporal)
    assert all(row["activations"] == "float" for row in report.layers if row["temporal"])


def test_activation_ranges_follow_the_time_input(w8a8, unet_calibration):
    model, _ = w8a8
    layer = model.network.get_submodule("down_blocks.1.resnets.0.conv1")
    assert layer.act_t.numel() == 1 + len(unet_calibration.times)  # row 0: all times
    for row, t in enumerate(unet_calibration.times, start=1):
        assert layer.row_for(t + 0.01) == row
    assert layer.row_for(None) == 0
    # the network's pre-hook publishes each call's timestep to its quantised layers
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.row_for(modules._TIME.get())))
    try:
        with torch.no_grad():
            t = unet_calibration.times[2]
            model.network(torch.randn(1, 1, 28, 28), torch.tensor([t]), class_labels=torch.tensor([3]))
    finally:
        handle.remove()
    assert seen == [3]
    assert len(set(layer.act_scale[1:, 0].tolist())) > 1  # ranges differ over the trajectory


def test_four_bit_keeps_first_and_last_layers_at_eight(unet, unet_calibration):
    model = hasten.load("mnist-unet")
    report = quantize_(model, QuantConfig(weights=4, activations=8), calibration=unet_calibration)
    bits = {row["name"]: row["bits"] for row in report.layers}
    assert bits["conv_in"] == 8 and bits["down_blocks.0.resnets.0.conv1"] == 4
    last = [row["name"] for row in report.layers if not row["temporal"]][-1]
    assert bits[last] == 8 and "conv_out" not in bits  # the output layer itself stays float
    assert all(row["sqnr_db"] > 10 for row in report.layers)


def test_excluded_layers_are_untouched(unet_calibration, unet):
    model = hasten.load("mnist-unet")
    quantize_(model, QuantConfig(exclude=("conv_out", "up_blocks.2.*")), calibration=unet_calibration)
    conv_out = model.network.conv_out
    assert type(conv_out) is nn.Conv2d and torch.equal(conv_out.weight, unet.network.conv_out.weight)
    assert type(model.network.get_submodule("up_blocks.2.resnets.0.conv1")) is nn.Conv2d
    assert isinstance(model.network.get_submodule("up_blocks.1.resnets.0.conv1"), QuantizedLayer)


def test_split_shortcut_beats_plain_quantisation(unet, unet_calibration):
    splits = shortcut_splits(unet.network)
    assert splits["up_blocks.0.resnets.0.conv_shortcut"] == (64,)
    # channels of the concatenation: deep part then skip part, as diffusers builds its up blocks
    for name, (deep,) in splits.items():
        assert 0 < deep < unet.network.get_submodule(name).in_channels
    sqnr = {}
    for split in (True, False):
        model = hasten.load("mnist-unet")
        report = quantize_(model, QuantConfig(weights=8, activations=8, split_shortcut=split),
                           calibration=unet_calibration)  # fmt: skip
        sqnr[split] = {r["name"]: r["sqnr_db"] for r in report.layers if r["name"] in splits}
    assert sum(sqnr[True].values()) > sum(sqnr[False].values())


def test_refuses_bad_input(w8a8, unet_calibration, tiny_model):
    model, _ = w8a8
    with pytest.raises(ValueError, match="already quantised"):
        quantize_(model, calibration=unet_calibration)
    with pytest.raises(ValueError, match="weights must be one of 4, 8; got 3"):
        QuantConfig(weights=3)
    with pytest.raises(ValueError, match="activations must be one of"):
        QuantConfig(activations=4)
    other = hasten.load(tiny_model)
    with pytest.raises(ValueError, match="another model"):
        quantize_(other, calibration=unet_calibration)
    small = CalibrationSet(unet_calibration.calls[:1], unet_calibration.setting, unet_calibration.fingerprint)
    small.calls = [small.calls[0].select(torch.arange(4))]
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES}"):
        quantize_(hasten.load("mnist-unet"), calibration=small)


# -- execution and storage -------------------------------------------------------------------------


@pytest.mark.skipif(not int8_kernels_available(), reason="needs PyTorch's oneDNN int8 kernels (x86 CPU)")
@pytest.mark.parametrize("name", ["down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut",
                                  "mid_block.attentions.0.to_q"])  # fmt: skip
def test_int8_kernels_agree_with_simulation(w8a8, name):
    model, _ = w8a8
    layer = model.network.get_submodule(name)
    x = torch.randn(4, layer.in_channels, 14, 14) if layer.kind == "conv2d" else torch.randn(4, 49, layer.in_channels)
    x = x * 2
    try:
        layer.execution = "kernel"
        kernel = layer(x)
        layer.execution = "simulated"
        simulated = layer(x)
    finally:
        layer.execution = "kernel"
    assert sqnr_db(simulated, kernel) > 40  # equal up to float rounding (and rare ties rounded apart)
    assert kernel.is_contiguous()


def test_save_load_reproduces_outputs_exactly(tmp_path, unet, unet_calibration):
    for weights in (8, 4):
        model = hasten.load("mnist-unet")
        report = quantize_(model, QuantConfig(weights=weights), calibration=unet_calibration)
        folder = save_quantized(model, tmp_path / f"w{weights}", record={"label": "x", "source": {}, "calibration": {}},
                                report=report.to_dict())  # fmt: skip
        back = hasten.load(folder)
        assert back.info.quantization["format"] == 1
        x, t, labels = torch.randn(3, 1, 28, 28), torch.full((3,), 420.0), torch.tensor([1, 2, 3])
        with torch.no_grad():
            assert torch.equal(model.network(x, t, class_labels=labels).sample,
                               back.network(x, t, class_labels=labels).sample)  # fmt: skip
        size = (folder / "quantized.safetensors").stat().st_size
        assert size / unet.bytes_on_disk() < (0.30 if weights == 8 else 0.17)
        assert back.bytes_on_disk() == size


def test_corrupt_quantised_checkpoints_are_refused(tmp_path, w8a8):
    from safetensors.torch import load_file, save_file

    model, _ = w8a8
    folder = save_quantized(model, tmp_path / "q", record={"label": "x", "source": {}, "calibration": {}})
    path = folder / "quantized.safetensors"
    meta = {"hasten_quant": "1", "layers": json.dumps(json.loads(_metadata(path)["layers"]))}
    tensors = load_file(str(path))
    broken = dict(tensors)
    del broken["conv_in.weight_scale"]
    save_file(broken, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"lacks 'conv_in\.weight_scale'"):
        hasten.load(folder)
    broken = dict(tensors)
    broken["conv_in.weight_scale"] = torch.ones(1, 7)
    save_file(broken, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"conv_in\.weight_scale has shape"):
        hasten.load(folder)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_failed_save_keeps_the_previous_folder(tmp_path, w8a8, monkeypatch):
    model, _ = w8a8
    folder = save_quantized(model, tmp_path / "q", record={"label": "x", "source": {}, "calibration": {}})
    before = (folder / "quantized.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, folder, record={"label": "y", "source": {}, "calibration": {}})
    assert (folder / "quantized.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".save-") for p in folder.iterdir())


# -- CLI and bench -------------------------------------------------------------------------------------


def test_cli_quantize_then_sample_and_bench(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from hasten.bench.report import quant_comparison
    from hasten.bench.runner import read_results
    from hasten.cli.app import app

    runner = CliRunner()
    out = tmp_path / "tiny-w8a8"
    result = runner.invoke(app, ["quantize", "--model", tiny_model, "--n", "32", "--steps", "3", "--out", str(out),
                                 "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["label"] == "W8A8" and record["size_ratio"] < 0.30 and math.isfinite(record["network_sqnr_db"])
    assert hasten.load(out).info.quantization["calibration"]["steps"] == 3
    from hasten.recipe import load_recipe

    recipe = load_recipe(record["recipe"])  # inside the folder: the quantised weights at the calibration setting
    assert recipe.kind == "quant" and recipe.steps == 3 and pathlib.Path(recipe.quant).resolve() == out.resolve()
    assert recipe.fingerprint == hasten.load(tiny_model).fingerprint
    replay = runner.invoke(app, ["sample", "--recipe", record["recipe"], "--n", "2", "--out", str(tmp_path / "q.png")])
    assert replay.exit_code == 0, replay.output
    again = runner.invoke(app, ["quantize", "--model", str(out), "--out", str(tmp_path / "x")])
    assert again.exit_code == 2 and "already quantised" in again.output
    result = runner.invoke(app, ["sample", "--model", str(out), "--n", "4", "--steps", "3",
                                 "--out", str(tmp_path / "grid.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["sample", "--model", str(out), "--n", "4", "--execution", "int4"])
    assert bad.exit_code == 2 and "--execution must be one of" in bad.output
    on_float = runner.invoke(app, ["sample", "--model", tiny_model, "--n", "4", "--execution", "float8"])
    assert on_float.exit_code == 2 and "applies to quantised models" in on_float.output
    if hasten.quant.float8_available("cpu"):
        result = runner.invoke(app, ["sample", "--model", str(out), "--n", "4", "--steps", "3", "--execution",
                                     "float8", "--out", str(tmp_path / "grid8.png")])  # fmt: skip
        assert result.exit_code == 0, result.output
    bench = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--model", tiny_model, "--preset", "quantization", "--quant", str(out),
                                 "--n", "10", "--out", str(bench)])  # fmt: skip
    assert result.exit_code == 0, result.output
    table = quant_comparison(read_results(bench))
    labels = [c["label"] for c in table]
    assert any("quant[tiny-w8a8]" in label for label in labels)
    peers = [c for c in table if c["library"] == "torchao"]
    pytest.importorskip("torchao")
    assert {c["label"].split(" + ")[1] for c in peers} == {"int8_weight_only", "int8_dynamic"}
    ours = next(c for c in table if c["library"] == "hasten")
    assert ours["size_ratio"] < 0.30 and ours["execution"]
    assert "Quantisation: against the float model" in (bench / "report.html").read_text()


def test_bench_refuses_a_float_folder_as_quantised(tiny_model):
    from hasten.bench.matrix import BenchConfig

    with pytest.raises(ValueError, match="holds a float model"):
        BenchConfig(model=tiny_model, quants=(tiny_model,))

"""Training (resumable), the model folder format (diffusers-loadable), hasten.load and the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.cli.app import app
from hasten.models.zoo import ModelInfo, build_network, load, save_model
from hasten.train import TrainConfig, train

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    config = TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=8, checkpoint_minutes=5)
    result = train(config, out, max_steps=3, progress=False, name="tiny-dit")
    return out, result


def test_train_writes_model_and_resumes(tiny_dit):
    out, result = tiny_dit
    assert result.steps == 3 and result.resumed_from_step == 0
    assert (out / "checkpoint" / "state.safetensors").exists()
    info = json.loads((out / "hasten.json").read_text())
    assert info["objective"] == "flow" and info["training"]["steps"] == 3 and info["num_classes"] == 10
    # Rerunning continues from the checkpoint (the step budget grows from 3 to 5).
    again = train(TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=8), out, max_steps=5, progress=False)
    assert again.resumed_from_step == 3 and again.steps == 5


def test_resume_refuses_other_settings(tiny_dit):
    out, _ = tiny_dit
    with pytest.raises(ValueError, match="other settings"):
        train(TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=16), out, max_steps=1, progress=False)


def test_resume_is_exact(tmp_path):
    """Training 4 steps straight equals 2 steps, a kill, and 2 more (same RNG stream, same optimizer state)."""
    config = TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=4)
    train(config, tmp_path / "a", max_steps=4, progress=False)
    train(config, tmp_path / "b", max_steps=2, progress=False)
    train(config, tmp_path / "b", max_steps=4, progress=False)
    a, b = load(tmp_path / "a").network.state_dict(), load(tmp_path / "b").network.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_model_folder_loads_in_diffusers_and_hasten(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = build_network("unet", (1, 28, 28), 10).eval()
    info = ModelInfo(
        name="rand-unet", arch="unet", objective="eps", image_shape=(1, 28, 28), num_classes=10, data="mnist"
    )
    save_model(net, info, tmp_path)
    again = UNet2DModel.from_pretrained(tmp_path)  # diffusers' own loader
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 500]), torch.tensor([3, 10])
    torch.testing.assert_close(again(x, t, class_labels=y).sample, net(x, t, class_labels=y).sample)
    loaded = load(tmp_path)
    assert isinstance(loaded.denoiser, hasten.EpsDenoiser) and loaded.info.null_class == 10
    assert len(loaded.fingerprint) == 16 and loaded.bytes_on_disk() > 1e6
    out = hasten.sample(
        loaded.denoiser, torch.randn(2, 1, 28, 28) * 80, hasten.karras(2, 0.1, 80.0), "euler", cond={"class_labels": y}
    )
    assert out.shape == (2, 1, 28, 28)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled models"):
        load("no-such-model")


def test_cli_sample_smoke(tiny_dit, tmp_path):
    out, _ = tiny_dit
    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    res = RUNNER.invoke(
        app,
        [
            "sample",
            "--model",
            str(out),
            "--n",
            "6",
            "--steps",
            "3",
            "--out",
            str(grid),
            "--save",
            str(npz),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["nfe"] == 3 and data["seconds"] > 0 and data["n"] == 6
    samples = np.load(npz)["samples"]
    assert samples.shape == (6, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    from PIL import Image

    assert Image.open(grid).size[0] > 28
    res = RUNNER.invoke(
        app,
        [
            "sample",
            "--model",
            str(out),
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            str(grid),
            "--guidance",
            "2",
            "--label",
            "3",
        ],
    )
    assert res.exit_code == 0 and "NFE" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--solver", "nope"], "unknown solver 'nope'"),
        (["--label", "12"], "label must be in 0..9"),
        (["--schedule", "cubic"], "unknown discretisation"),
        (["--model", "no-such-model"], "no hasten model"),
        (["--solver", "unipc:order=9"], "order must be one of 1, 2, 3; got 9"),
        (["--solver", "unipc:order"], "must look like key=value"),
        (["--solver", "euler:eta=1"], "solver 'euler'"),
    ],
)
def test_cli_sample_errors(tiny_dit, tmp_path, args, message):
    out, _ = tiny_dit
    base = ["sample", "--model", str(out), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]
    res = RUNNER.invoke(app, base + args)
    assert res.exit_code == 2 and message in res.output


def test_cli_sample_solver_options_reach_the_solver(tiny_dit, tmp_path):
    out, _ = tiny_dit
    saved = {}
    for spec in ("unipc:order=1", "unipc:order=3,variant=bh1"):
        npz = tmp_path / f"{spec}.npz"
        res = RUNNER.invoke(app, ["sample", "--model", str(out), "--n", "2", "--steps", "4", "--solver", spec,
                                  "--out", str(tmp_path / "g.png"), "--save", str(npz)])  # fmt: skip
        assert res.exit_code == 0, res.output
        saved[spec] = np.load(npz)["samples"]
    direct = hasten.generate(load(out), 2, solver="unipc", steps=4, order=3, variant="bh1").images01.numpy()
    np.testing.assert_allclose(saved["unipc:order=3,variant=bh1"], direct, atol=1e-6)
    assert not np.allclose(saved["unipc:order=1"], direct, atol=1e-4)


def test_cli_train_json(tmp_path):
    res = RUNNER.invoke(
        app,
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--arch",
            "dit",
            "--objective",
            "flow",
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["steps"] == 1


def test_cli_evaluate_json(tiny_dit, tmp_path):
    out, _ = tiny_dit
    res = RUNNER.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(out),
            "--n",
            "12",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "e.png"),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for key in (
        "fd",
        "fd_real_vs_real",
        "precision",
        "recall",
        "confidence",
        "memorised_share",
        "rmse_ref",
        "psnr_ref",
        "nfe",
        "seconds",
    ):
        assert key in data, key
    assert data["nfe"] == 2 and data["rmse_ref"] > 0 and (tmp_path / "e.png").exists()
    # the reference solve is cached: a second run reuses it and gives the same error
    again = json.loads(
        RUNNER.invoke(app, ["evaluate", "--model", str(out), "--n", "12", "--steps", "2", "--format", "json"]).output
    )
    assert again["rmse_ref"] == pytest.approx(data["rmse_ref"])


def test_generate_integrates_flow_models_in_flow_space(tiny_dit):
    """Heun/PLMS on a flow model step in flow time (the VE grid starts near sigma = 1e4); explicit choices stay."""
    from hasten.generate import options_for_schedule
    from hasten.schedules import FlowMatching, VPDiscrete

    flow, vp = FlowMatching(), VPDiscrete.from_betas("linear")
    assert options_for_schedule("heun", flow, {}) == {"space": "flow"}
    assert options_for_schedule("plms", flow, {"warmup": "heun"}) == {"warmup": "heun", "space": "flow"}
    assert options_for_schedule("heun", flow, {"space": "ve"}) == {"space": "ve"}
    assert options_for_schedule("heun", vp, {}) == {} and options_for_schedule("dpmpp_2m", flow, {}) == {}
    model = load(tiny_dit[0])
    auto = hasten.generate(model, 2, solver="heun", steps=4)
    explicit = hasten.generate(model, 2, solver="heun", steps=4, space="flow")
    torch.testing.assert_close(auto.images01, explicit.images01)

"""The joint early-exit fine-tune (``hasten distill --method early_exit``): the loss by hand, the folder and its
heads (threshold 0 is the folder's plain network, bit for bit; other weights are refused), exact resume and
every refusal."""

from __future__ import annotations

import math

import pytest
import torch

import hasten
from hasten.accel import EarlyExitConfig, ExitHeads
from hasten.accel.early_exit import capture_blocks, exit_loss, load_exit_heads, network_fingerprint, read_exit_heads
from hasten.distill.early_exit import EXIT_HEADS_FILE, EarlyExitOptions, EarlyExitStudent, joint_exit_loss
from hasten.models.zoo import load
from test_early_exit import tiny_dit_seeded, varied_heads

SETTINGS = {"method": "early_exit", "nfe": 4, "batch_size": 4, "progress": False}


def test_weighted_exit_loss_on_a_toy_batch_by_hand():
    # one token per image (a 2x2 patch), two exits, two images; every weight zero but the projection bias, so
    # exit i's output is the same constant for both images and only the targets differ
    heads = ExitHeads(inner_dim=2, patch_size=2, out_channels=1, num_exits=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        heads.projection[0].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        heads.projection[1].bias.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))
        heads.uem_out[1].bias.fill_(math.log(3.0))  # exit 1 says u = 0.75, exit 0 says 0.5
    hidden = [torch.ones(2, 1, 2), torch.ones(2, 1, 2)]
    target = torch.zeros(2, 1, 2, 2)
    target[1, 0, 0, 0] = 1.0  # image 1's first pixel
    cond = torch.zeros(2, 2)
    parts = exit_loss(heads, hidden, cond, target, layer_weights=torch.tensor([1.0, 3.0]),
                      sample_weights=torch.tensor([1.0, 2.0]))  # fmt: skip
    outputs = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]  # pixel order (0,0), (0,1), (1,0), (1,1)
    targets = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    us, lw, sw = [0.5, 0.75], [0.25, 0.75], [2 / 3, 4 / 3]  # weights normalised: sum 1 over exits, mean 1 over rows

    def term(f) -> float:
        return sum(
            lw[i] * sum(sw[b] * f(us[i], [o - t for o, t in zip(outputs[i], targets[b])]) for b in range(2)) / 2
            for i in range(2)
        )

    uncertainty = term(lambda u, err: (u - sum(math.tanh(abs(e)) for e in err) / 4) ** 2)
    ual = term(lambda u, err: (1 - u) * sum(e * e for e in err) / 4)
    layer = term(lambda u, err: sum(e * e for e in err) / 4)
    for name, value in (("uncertainty", uncertainty), ("ual", ual), ("layer", layer)):
        assert float(parts[name].detach()) == pytest.approx(value, rel=1e-6), name
    assert float(parts["total"].detach()) == pytest.approx(uncertainty + ual + layer, rel=1e-6)
    # no weights: the plain means (the frozen training's loss, unchanged)
    plain = exit_loss(heads, hidden, cond, target)
    even = exit_loss(heads, hidden, cond, target, layer_weights=torch.ones(2), sample_weights=torch.ones(2))
    assert float(plain["total"].detach()) == pytest.approx(float(even["total"].detach()), rel=1e-6)


def test_the_joint_loss_is_the_output_error_plus_the_weighted_exits():
    teacher, net = tiny_dit_seeded(0), tiny_dit_seeded(1)
    heads = varied_heads(net)
    student = EarlyExitStudent(net, heads)
    options = EarlyExitOptions(output_weight=2.0, exit_weight=0.5, noisy_weight=3.0, exit_weighting="depth")
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 1, 0])
    fraction = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    teacher_out = teacher(x, t, class_labels=y).sample
    parts = joint_exit_loss(student, teacher_out, x, t, y, fraction, options)
    own, hidden, cond = capture_blocks(net, x, t, y)
    output = (own - teacher_out).pow(2).mean()
    # depth weighting over 3 exits: 1, 2, 3; rows weighted 1 + 3 s
    exits = exit_loss(heads, hidden, cond, teacher_out, layer_weights=torch.tensor([1.0, 2.0, 3.0]),
                      sample_weights=1 + 3.0 * fraction)["total"]  # fmt: skip
    assert parts["output"].item() == pytest.approx(output.item(), rel=1e-5)
    assert parts["exits"].item() == pytest.approx(exits.item(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(2.0 * output.item() + 0.5 * exits.item(), rel=1e-5)
    squared = EarlyExitOptions(exit_weighting="depth_squared").layer_weights(3)
    assert squared.tolist() == [1.0, 4.0, 9.0] and EarlyExitOptions(exit_weighting="uniform").layer_weights(
        2
    ).tolist() == [1.0, 1.0]
    # the exits' loss trains the backbone too (DeeDiff's joint training): block 0 gets its gradient
    parts["exits"].backward()
    assert net.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert teacher.transformer_blocks[0].attn1.to_q.weight.grad is None


def test_the_data_weight_adds_the_data_loss_and_the_heads_learn_its_blend_while_the_estimators_track_the_teacher():
    teacher, net = tiny_dit_seeded(0), tiny_dit_seeded(1)
    heads = varied_heads(net)
    student = EarlyExitStudent(net, heads)
    options = EarlyExitOptions(output_weight=3.0, data_weight=1.0, exit_weight=0.5, noisy_weight=0.0)
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 1, 0])
    fraction = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    teacher_out = teacher(x, t, class_labels=y).sample
    data_target = torch.randn(teacher_out.shape, generator=gen)
    parts = joint_exit_loss(student, teacher_out, x, t, y, fraction, options, data_target)
    own, hidden, cond = capture_blocks(net, x, t, y)
    blend = (3.0 * teacher_out + 1.0 * data_target) / 4.0
    weights = torch.tensor([1.0, 4.0, 9.0])
    exits = exit_loss(heads, hidden, cond, blend, layer_weights=weights, estimator_target=teacher_out)
    assert parts["data"].item() == pytest.approx((own - data_target).pow(2).mean().item(), rel=1e-5)
    assert parts["exits"].item() == pytest.approx(exits["total"].item(), rel=1e-5)
    expected = 3.0 * (own - teacher_out).pow(2).mean().item() + parts["data"].item() + 0.5 * exits["total"].item()
    assert parts["total"].item() == pytest.approx(expected, rel=1e-5)
    # the estimators' pseudo-labels measure the error to the teacher, not to the blend: the same regression as
    # plain distillation's, while the heads' layer loss is the blend's
    to_teacher = exit_loss(heads, hidden, cond, teacher_out, layer_weights=weights)
    assert parts["uncertainty"].item() == pytest.approx(to_teacher["uncertainty"].item(), rel=1e-5)
    assert parts["layer"].item() != pytest.approx(to_teacher["layer"].item(), rel=1e-3)
    # with no data weight, the blend is the teacher's output and the data loss is reported as 0
    plain = joint_exit_loss(student, teacher_out, x, t, y, fraction, EarlyExitOptions(noisy_weight=0.0))
    assert plain["data"].item() == 0.0 and plain["layer"].item() == pytest.approx(to_teacher["layer"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="data_weight > 0 needs the data's target"):
        joint_exit_loss(student, teacher_out, x, t, y, fraction, options)


def test_the_data_target_is_what_each_objective_trains_on():
    from hasten.accel.early_exit import network_input, network_target

    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    fraction = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    flow = load("mnist-dit")
    x_t, _ = network_input(flow, x0, fraction, noise, torch.float64)
    target = network_target(flow, x0, fraction, noise)
    torch.testing.assert_close(target, noise - x0)  # the flow's velocity, whatever the time
    # x_t moves along the target: d x_t / dt = noise - x0 for the flow's x_t = (1 - t) x0 + t noise
    t = flow.schedule.t_min + (flow.schedule.t_max - flow.schedule.t_min) * fraction
    torch.testing.assert_close(x_t, (1 - t).view(-1, 1, 1, 1) * x0.double() + t.view(-1, 1, 1, 1) * noise.double())
    from hasten.train import objective_target

    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    torch.testing.assert_close(objective_target("eps", x0, noise, alpha, sigma), noise)
    torch.testing.assert_close(objective_target("v", x0, noise, alpha, sigma), 0.6 * noise - 0.8 * x0)
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_target("x0", x0, noise, alpha, sigma)


def test_a_joint_folder_carries_its_heads_and_threshold_zero_is_its_plain_network(tiny_model, tmp_path):
    hasten.distill(teacher=tiny_model, out=tmp_path / "s", max_steps=2, **SETTINGS)
    student = load(tmp_path / "s")
    heads_path = str(tmp_path / "s" / EXIT_HEADS_FILE)
    _, meta = read_exit_heads(heads_path)
    assert meta["network_fingerprint"] == network_fingerprint(student.network)
    assert meta["record"]["method"] == "early_exit" and student.info.distillation["method"] == "early_exit"
    assert EXIT_HEADS_FILE in (tmp_path / "s" / "MODEL_CARD.md").read_text()
    plain = hasten.generate(student, 4, seed=0)
    zero = hasten.generate(student, 4, seed=0, accel=EarlyExitConfig(heads=heads_path, threshold=0.0))
    assert torch.equal(plain.images01, zero.images01)
    exiting = hasten.generate(student, 4, seed=0, accel=EarlyExitConfig(heads=heads_path, threshold=1.0))
    assert exiting.accel_stats["reused"] > 0 and not torch.equal(plain.images01, exiting.images01)
    # the student's weights moved: its heads are refused on the teacher it came from, naming both
    teacher = load(tiny_model)
    assert network_fingerprint(teacher.network) != meta["network_fingerprint"]
    with pytest.raises(ValueError, match="were trained for network weights"):
        load_exit_heads(heads_path, teacher.network)


def test_the_joint_fine_tune_resumes_exactly(tiny_model, tmp_path):
    hasten.distill(teacher=tiny_model, out=tmp_path / "a", max_steps=4, **SETTINGS)
    hasten.distill(teacher=tiny_model, out=tmp_path / "b", max_steps=2, **SETTINGS)
    again = hasten.distill(teacher=tiny_model, out=tmp_path / "b", max_steps=4, resume=True, **SETTINGS)
    assert again.steps == 4 and again.resumed_from_step == 2
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    for key, value in a.network.state_dict().items():
        assert torch.equal(value, b.network.state_dict()[key]), key
    heads_a, _ = read_exit_heads(tmp_path / "a" / EXIT_HEADS_FILE)
    heads_b, _ = read_exit_heads(tmp_path / "b" / EXIT_HEADS_FILE)
    assert heads_a.keys() == heads_b.keys() and all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"exit_weight": 0}, "exit_weight 0 trains no exits"),
        ({"output_weight": 0}, "output_weight 0"),
        ({"noisy_weight": -1}, "noisy_weight must be a finite number >= 0"),
        ({"data_weight": float("nan")}, "data_weight must be a finite number >= 0"),
        ({"heads_lr_scale": 0}, "heads_lr_scale must be a finite number > 0"),
        ({"exit_weighting": "late"}, "exit_weighting must be one of 'depth', 'depth_squared', 'uniform'; got 'late'"),
        ({"solver": "heun"}, "solver"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        EarlyExitOptions(**options)


def test_refusals(tiny_model, tmp_path):
    with pytest.raises(TypeError, match=r"does not take option.*'threshold'"):
        hasten.distill(teacher=tiny_model, out=tmp_path / "o", options={"threshold": 0.1}, **SETTINGS)
    with pytest.raises(ValueError, match="early exit needs a DiT"):
        hasten.distill(teacher="mnist-unet", out=tmp_path / "u", **SETTINGS)
    with pytest.raises(ValueError, match="takes no guidance"):
        hasten.distill(teacher=tiny_model, out=tmp_path / "g", guidance=2.0, **SETTINGS)
    # starting heads must be the teacher's: the bundled DiT's heads are refused on the tiny one
    with pytest.raises(ValueError, match="were trained for network weights"):
        hasten.distill(teacher=tiny_model, out=tmp_path / "h", options={"init_heads": _shipped_heads()}, **SETTINGS)
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "ough")


def test_cli_refuses_bad_options_with_exit_2(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from hasten.cli.app import app

    runner = CliRunner()
    base = ["distill", "--teacher", tiny_model, "--method", "early_exit", "--nfe", "4", "--out", str(tmp_path / "o")]
    for args, message in [
        (["--option", "exit_weighting=late"], "exit_weighting must be one of"),
        (["--option", "ratio=0.5"], "does not take option(s) 'ratio'"),
        (["--guidance", "3"], "takes no guidance"),
    ]:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def _shipped_heads() -> str:
    import pathlib

    return str(pathlib.Path(__file__).parents[1] / "caches" / "mnist-dit-exit-heads.safetensors")

"""Masked diffusion (hasten.discrete): the MDLM weight and carry-over, the exact categorical draw, and the samplers'
laws and call counts on an exact joint table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy import stats

from hasten.discrete import (
    DISCRETE_SAMPLERS,
    JointTable,
    LogLinearMask,
    categorical,
    mdlm_loss,
    sample_discrete,
)


def _table(vocab=2, length=3, seed=0) -> JointTable:
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand((vocab,) * length, generator=gen, dtype=torch.float64) ** 3  # far from a product of marginals
    return JointTable(table / table.sum())


def _frequencies(model: JointTable, tokens: torch.Tensor) -> torch.Tensor:
    index = (tokens * model.vocab ** torch.arange(model.length - 1, -1, -1)).sum(dim=1)
    return torch.bincount(index, minlength=model.vocab**model.length).double()


def _total_variation(model: JointTable, tokens: torch.Tensor) -> float:
    return 0.5 * float((_frequencies(model, tokens) / len(tokens) - model.table.flatten()).abs().sum())


def test_mdlm_weight_is_one_over_t_and_unmasked_positions_cost_nothing():
    schedule = LogLinearMask()
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    torch.testing.assert_close(schedule.loss_weight(t), 1 / t)
    x0 = torch.tensor([[0, 1, 1]])
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.2], [-3.0, 1.0]]])
    none_masked = mdlm_loss(logits, x0, x0, torch.tensor([0.5]), 2, schedule)
    assert float(none_masked) == 0.0
    x_t = torch.tensor([[2, 1, 2]])  # positions 0 and 2 masked
    nll = -torch.log_softmax(logits[0], dim=-1)
    expected = (nll[0, 0] + nll[2, 1]) / 0.5
    torch.testing.assert_close(mdlm_loss(logits, x0, x_t, torch.tensor([0.5]), 2, schedule), expected.view(1))
    masked = schedule.mask(torch.zeros(1, 20000, dtype=torch.long), torch.tensor([0.25]), 2,
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(float((masked == 2).double().mean()) - (1 - 1e-3) * 0.25) < 0.01


def test_float64_gumbel_draws_match_their_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    draws = categorical(probs.log().expand(40000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double()
    assert stats.chisquare(counts.numpy(), (probs * 40000).numpy()).pvalue > 1e-3
    with pytest.raises(ValueError, match="float16"):
        categorical(probs.log(), dtype="float16")


def test_first_hitting_sampler_reproduces_the_joint_in_length_calls():
    model = _table()
    out = sample_discrete(model, 20000, 3, 2, "first_hitting", generator=torch.Generator().manual_seed(1))
    expected = (model.table.flatten() * 20000).numpy()
    assert stats.chisquare(_frequencies(model, out.tokens).numpy(), expected).pvalue > 1e-3
    assert out.nfe == 3 and bool((out.calls == 3).all())  # one call per unmasked token, exactly
    assert model.calls == 3


def test_parallel_first_hitting_is_cheaper_and_no_longer_exact():
    model = _table()
    out = sample_discrete(
        model, 20000, 3, 2, "first_hitting", tokens_per_call=2, generator=torch.Generator().manual_seed(1)
    )
    assert out.nfe == 2  # ceil(3 / 2)
    assert _total_variation(model, out.tokens) > 0.05


def test_every_unmasking_order_is_exact_with_exact_conditionals():
    """One token per call: left to right and most-confident-first (an order that depends on the tokens drawn so far)
    both reproduce the joint, by the chain rule; with two tokens per call left to right is no longer exact."""
    model = _table()
    expected = (model.table.flatten() * 20000).numpy()
    ordered = sample_discrete(model, 20000, 3, 2, "first_hitting", order="left_to_right",
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert stats.chisquare(_frequencies(model, ordered.tokens).numpy(), expected).pvalue > 1e-3
    assert ordered.nfe == 3
    confident = sample_discrete(model, 20000, 3, 2, "first_hitting", order="confidence",
                                generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert stats.chisquare(_frequencies(model, confident.tokens).numpy(), expected).pvalue > 1e-3
    pairs = sample_discrete(model, 20000, 3, 2, "first_hitting", order="left_to_right", tokens_per_call=2,
                            generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert pairs.nfe == 2 and _total_variation(model, pairs.tokens) > 0.05
    with pytest.raises(ValueError, match="order must be one of"):
        sample_discrete(model, 2, 3, 2, "first_hitting", order="entropy")


def test_ancestral_sampler_converges_as_steps_grow_and_counts_its_calls():
    model = _table()
    distances = []
    for steps in (1, 4, 256):
        model.calls = 0
        out = sample_discrete(model, 20000, 3, 2, "ancestral", steps=steps, generator=torch.Generator().manual_seed(2))
        distances.append(_total_variation(model, out.tokens))
        assert out.nfe <= min(steps, 3)  # a sequence is evaluated again only after a change, at most L times
        assert model.calls >= out.nfe
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.015


def test_every_sampler_is_registered_and_bad_input_is_refused():
    assert set(DISCRETE_SAMPLERS.names()) >= {"ancestral", "first_hitting"}
    model = _table()
    with pytest.raises(KeyError, match="tau"):
        sample_discrete(model, 2, 3, 2, "tau")
    with pytest.raises(ValueError, match="steps"):
        sample_discrete(model, 2, 3, 2, "ancestral", steps=0)
    with pytest.raises(ValueError, match="tokens_per_call"):
        sample_discrete(model, 2, 3, 2, "first_hitting", tokens_per_call=0)
    with pytest.raises(ValueError, match="length 3"):
        sample_discrete(model, 2, 4, 2, "first_hitting")  # the model knows 3 positions
    with pytest.raises(ValueError, match=r"expected \[B, L, 3\]"):
        sample_discrete(model, 2, 3, 3, "first_hitting")  # a vocabulary mismatch
    with pytest.raises(ValueError, match="n, length and vocab"):
        sample_discrete(model, 0, 3, 2)
    with pytest.raises(ValueError, match="summing to 1"):
        JointTable(torch.ones(2, 2))
    assert math.isclose(float(model.probability(torch.tensor([[0, 1, 1]]))), float(model.table[0, 1, 1]))


def test_masked_training_resumes_exactly_and_the_folder_samples(tmp_path):
    """train_masked on binarised MNIST: a run stopped at step 2 and resumed to 4 equals a straight 4-step run bit for
    bit; the folder loads (hasten.load refuses it by name) and samples with every discrete sampler."""
    import hasten
    from hasten.discrete import MaskedTrainConfig, load_masked, train_masked

    config = MaskedTrainConfig(batch_size=4, max_steps=4, warmup_steps=2, checkpoint_minutes=60)
    straight = train_masked(tmp_path / "straight", config, progress=False)
    train_masked(tmp_path / "resumed", dataclasses.replace(config, max_steps=2), progress=False)
    (tmp_path / "resumed" / "hasten.json").unlink()  # the first half's end: continue the run
    resumed = train_masked(tmp_path / "resumed", config, progress=False)
    assert straight["steps"] == resumed["steps"] == 4 and resumed["resumed_from"] == 2
    a = load_masked(tmp_path / "straight")
    b = load_masked(tmp_path / "resumed")
    info = a.info
    for (name, p), q in zip(a.network.state_dict().items(), b.network.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert info.objective == "mdlm" and info.training["vocab"] == 2
    with pytest.raises(ValueError, match="load_masked"):
        hasten.load(tmp_path / "straight")
    labels = torch.tensor([3, 7])
    out = sample_discrete(a.model(labels), 2, 784, 2, "ancestral", steps=4, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 784) and int(out.tokens.max()) <= 1 and out.nfe <= 4
    with pytest.raises(ValueError, match="not a masked diffusion model"):
        load_masked(hasten.models.zoo.BUNDLED / "mnist-unet")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        MaskedTrainConfig(batch_size=0)


# --- the loaded model, generate_masked, the CLI and bench -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_masked(tmp_path_factory):
    """A masked model folder after two training steps on binarised MNIST (random-ish, but the real architecture)."""
    from typer.testing import CliRunner

    from hasten.cli.app import app

    folder = tmp_path_factory.mktemp("masked") / "mdm"
    argv = ["train", "--objective", "mdlm", "--out", str(folder), "--batch-size", "4", "--max-steps", "2"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    return folder


def test_generate_masked_is_batch_independent_and_counts_calls(tiny_masked):
    """Sample j depends on (seed, j) alone: batches of 1, 2 and 3 give the same tokens; calls are exact."""
    from hasten.discrete import generate_masked, load_masked

    model = load_masked(tiny_masked)
    a = generate_masked(model, 3, "first_hitting", calls=3, seed=5, batch_size=3)
    b = generate_masked(model, 3, "first_hitting", calls=3, seed=5, batch_size=1)
    assert torch.equal(a.tokens, b.tokens) and a.calls.tolist() == [3, 3, 3]
    c = generate_masked(model, 2, "ancestral", steps=3, seed=5, batch_size=2, guidance=2.0, label=4)
    assert c.labels.tolist() == [4, 4] and c.nfe <= 3 and set(c.images01.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(generate_masked(model, 3, "first_hitting", calls=3, seed=6).tokens, a.tokens)
    from hasten.discrete import EnergyCorrectedSampler

    def flat(x0, x_t, rows, proposal):  # a constant energy: the corrected sampler's cost is still counted
        return torch.zeros(x0.shape[0], dtype=torch.float64)

    corrected = generate_masked(model, 2, EnergyCorrectedSampler(energy=flat, k=2, calls=2, window=(0.0, 1.0)))
    assert a.energy_calls is None and corrected.energy_calls.shape == (2,) and int(corrected.energy_calls.min()) > 0
    with pytest.raises(ValueError, match="call budget of 800 cannot be met on 784 tokens"):
        generate_masked(model, 1, "first_hitting", calls=800)
    with pytest.raises(ValueError, match=r"label must be an integer in 0\.\.10"):
        generate_masked(model, 1, label=11)
    null = generate_masked(model, 1, "first_hitting", label=10, calls=2)  # the null class: unconditional
    assert null.labels.tolist() == [10]
    with pytest.raises(ValueError, match="null class 10 is the unconditional model"):
        generate_masked(model, 1, "first_hitting", label=10, calls=2, guidance=2.0)
    with pytest.raises(ValueError, match="continuous images"):
        model.from_images(torch.full((1, 1, 28, 28), 0.3))
    assert torch.equal(model.from_images(torch.full((1, 1, 28, 28), 0.6), threshold=0.5), torch.ones(1, 784).long())
    with pytest.raises(ValueError, match=r"takes images \[N, 1, 28, 28\]"):
        model.from_images(torch.zeros(1, 3, 28, 28), threshold=0.5)
    with pytest.raises(ValueError, match="continuous\\) model, not a masked"):
        load_masked("mnist-unet")
    import hasten

    with pytest.raises(TypeError, match="generate_masked"):  # the reverse: a masked model on the continuous path
        hasten.generate(model, 1)


def test_sample_and_bench_a_masked_model_from_the_cli(tiny_masked, tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from hasten.cli.app import app

    runner = CliRunner()
    grid, saved = tmp_path / "grid.png", tmp_path / "s.npz"
    argv = ["sample", "--model", str(tiny_masked), "--solver", "first_hitting:order=confidence", "--steps", "2",
            "--n", "3", "--out", str(grid), "--save", str(saved), "--format", "json"]  # fmt: skip
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert data["nfe"] == 2 and data["solver"] == "first_hitting(order='confidence', calls=2)" and grid.exists()
    with np.load(saved) as arrays:
        assert arrays["tokens"].shape == (3, 784) and arrays["labels"].tolist() == [0, 1, 2]
    argv = ["sample", "--model", str(tiny_masked), "--steps", "2", "--n", "2", "--reward", "symmetry", "--particles",
            "2", "--out", str(grid), "--format", "json"]  # fmt: skip
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert data["solver"] == "svdd(base=first_hitting(calls=2), reward='symmetry', particles=2)"
    assert data["nfe"] <= 1 + 2 * (2 - 1) and data["reward_mean"] <= 0  # SVDD's calls: 1 + K (events - 1)
    for extra, words in (
        (["--solver", "dpmpp_2m"], "unknown discrete sampler 'dpmpp_2m'"),
        (["--particles", "3"], "give --reward too"),
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--schedule", "karras", "--oms", "mnist"], "--schedule, --oms apply to continuous models only"),
        (["--solver", "first_hitting", "--steps", "785"], "cannot be met on 784 tokens"),
        (["--solver", "ancestral:steps=4", "--steps", "2"], "both set the budget"),
        (["--guidance", "2", "--label", "12"], "label must be an integer in 0..10"),
    ):
        res = runner.invoke(app, ["sample", "--model", str(tiny_masked), "--out", str(tmp_path / "x.png"), *extra])
        assert res.exit_code == 2 and words in res.output, (extra, res.output)
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_masked), "--n", "10", "--steps", "2", "--solver", "ancestral",
            "--solver", "first_hitting", "--out", str(out)]  # fmt: skip
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["solver"] for r in rows] == ["ancestral(steps=2)", "first_hitting(calls=2)"]
    assert all(r["fd"] > 0 and r["reference_data"] == "mnist-binary" and r["nfe"] <= 2 for r in rows)
    assert (out / "report.html").exists()
    res = runner.invoke(
        app, ["bench", "--model", str(tiny_masked), "--preset", "caching", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 2 and "measures continuous samplers" in res.output
    res = runner.invoke(app, ["bench", "--model", str(tiny_masked), "--peer", "ddim", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--peer rows apply to continuous models only" in res.output, res.output

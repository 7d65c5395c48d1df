"""EDLM's energy-corrected first-hitting sampler (hasten.discrete.energy) on the exact joint table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hasten.discrete import JointTable, RowGenerators, get_discrete_sampler, sample_discrete
from hasten.discrete.energy import (
    ARTrainConfig,
    AutoregressiveEnergy,
    EnergyCorrectedSampler,
    PixelCNN,
    load_autoregressive,
    train_autoregressive,
)

V, L = 3, 4


def correlated_table(seed: int = 0) -> torch.Tensor:
    """A joint over 3^4 sequences with strong dependence between positions (the factorised step is far off)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn((V,) * L, generator=g, dtype=torch.float64)
    return torch.softmax(logits.flatten(), 0).reshape((V,) * L)


class TableChain:
    """The table's own chain-rule conditionals ``p(x^l | x^{<l})`` as next-token logits: the exact AR model."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, x0: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = []
        for pos in range(L):
            prefix = self.table.sum(dim=tuple(range(pos + 1, L))) if pos + 1 < L else self.table  # [V]*(pos+1)
            joint = prefix[tuple(x0[:, :pos].T)].expand(len(x0), V)  # [B, V]
            out.append(torch.log(joint / joint.sum(-1, keepdim=True)))
        return torch.stack(out, dim=1)


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    index = (tokens * (V ** torch.arange(L - 1, -1, -1))).sum(dim=1)
    return torch.bincount(index, minlength=V**L).double() / len(tokens)


def total_variation(tokens: torch.Tensor, table: torch.Tensor) -> float:
    return 0.5 * float((empirical(tokens) - table.flatten()).abs().sum())


def test_chain_fixture_is_the_table():
    table = correlated_table()
    x = JointTable(table).sequences
    energy = AutoregressiveEnergy(TableChain(table))
    assert torch.allclose(energy.log_prob(x, torch.arange(len(x))).exp(), table.flatten(), atol=1e-12)


def test_k1_is_the_plain_sampler_draw_for_draw():
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    for options in ({"tokens_per_call": 2}, {"calls": 1}, {"tokens_per_call": 1, "order": "confidence"}):
        plain = sample_discrete(
            model, 200, L, V, "first_hitting", generator=torch.Generator().manual_seed(3), **options
        )
        edlm = sample_discrete(model, 200, L, V, "edlm", generator=torch.Generator().manual_seed(3), k=1,
                               energy=energy, window=(0.0, 1.0), **options)  # fmt: skip
        assert torch.equal(plain.tokens, edlm.tokens) and torch.equal(plain.calls, edlm.calls)
        assert int(edlm.energy_calls.sum()) == 0


def test_window_outside_the_run_is_the_plain_sampler():
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    # calls=2 on 4 tokens: the shares still masked at the two events are 1.0 and 0.5
    plain = sample_discrete(model, 100, L, V, "first_hitting", generator=torch.Generator().manual_seed(1), calls=2)
    edlm = sample_discrete(model, 100, L, V, "edlm", generator=torch.Generator().manual_seed(1), calls=2, k=4,
                           energy=energy, window=(0.6, 0.9))  # fmt: skip
    assert torch.equal(plain.tokens, edlm.tokens) and int(edlm.energy_calls.sum()) == 0
    inside = sample_discrete(model, 100, L, V, "edlm", generator=torch.Generator().manual_seed(1), calls=2, k=4,
                             energy=energy, window=(0.4, 0.6))  # fmt: skip
    assert torch.equal(inside.energy_calls, torch.full((100,), 4)) and torch.equal(inside.calls, plain.calls)


def test_constant_energy_leaves_the_law_unchanged():
    """Equal weights pick a uniformly random candidate: each is a factorised draw, so the law is the plain one."""
    table = correlated_table()
    model = JointTable(table)
    n = 20000
    plain = sample_discrete(model, n, L, V, "first_hitting", generator=torch.Generator().manual_seed(5), calls=1)

    def constant(x0, x_t, rows, proposal):
        return torch.full((len(x0),), 7.0, dtype=torch.float64)

    edlm = sample_discrete(model, n, L, V, "edlm", generator=torch.Generator().manual_seed(6), calls=1, k=4,
                           energy=constant, window=(0.0, 1.0))  # fmt: skip
    assert not torch.equal(plain.tokens, edlm.tokens)  # other draws ...
    # ... of the same law: total variation between the two empirical laws at sampling-noise level
    assert 0.5 * float((empirical(plain.tokens) - empirical(edlm.tokens)).abs().sum()) < 0.04
    assert int(edlm.energy_calls.sum()) == 4 * n


def test_exact_ar_energy_moves_the_parallel_sampler_to_the_joint_as_k_grows():
    """All 4 tokens in one call: the plain step draws the product of marginals (TV ~0.5 here); importance
    resampling towards the exact AR joint closes the gap as k grows (self-normalised IS: bias O(1/k))."""
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    n = 20000
    tv = {}
    for k in (1, 2, 8, 64):
        out = sample_discrete(model, n, L, V, "edlm", generator=torch.Generator().manual_seed(11), calls=1, k=k,
                              energy=energy, window=(0.0, 1.0))  # fmt: skip
        tv[k] = total_variation(out.tokens, table)
        assert torch.equal(out.calls, torch.ones(n, dtype=torch.long))
        assert torch.equal(out.energy_calls, torch.full((n,), k if k > 1 else 0))
    # seen: 0.53, 0.31, 0.145, 0.051 (sampling noise of 20,000 exact draws: ~0.01)
    assert tv[1] > 0.4, tv
    assert tv[2] < tv[1] - 0.1 and tv[8] < tv[2] - 0.1 and tv[64] < tv[8] - 0.05, tv
    assert tv[64] < 0.08, tv


def test_finite_k_bias_where_the_plain_step_is_exact():
    """At one token per call the plain first-hitting step is exact, and self-normalised importance resampling with
    a finite k is biased (the picked candidate's law is not the target's): the correction can only cost there,
    and its bias vanishes only as k grows (seen: TV 0.010, 0.097, 0.056, 0.016 at k = 1, 2, 64, 512; the large k
    are too slow for a unit test)."""
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    n = 20000
    tv = {}
    for k in (1, 2):
        out = sample_discrete(model, n, L, V, "edlm", generator=torch.Generator().manual_seed(12), calls=L, k=k,
                              energy=energy, window=(0.0, 1.0))  # fmt: skip
        tv[k] = total_variation(out.tokens, table)
    assert tv[1] < 0.03 and tv[2] > tv[1] + 0.05, tv


def test_two_tokens_per_call_corrected_inside_the_window_only():
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    n = 20000
    plain = sample_discrete(model, n, L, V, "first_hitting", generator=torch.Generator().manual_seed(2), calls=2)
    full = sample_discrete(model, n, L, V, "edlm", generator=torch.Generator().manual_seed(2), calls=2, k=32,
                           energy=energy, window=(0.0, 1.0))  # fmt: skip
    assert total_variation(full.tokens, table) < 0.5 * total_variation(plain.tokens, table)
    assert torch.equal(full.energy_calls, torch.full((n,), 64))  # 2 corrected events x 32 candidates


def test_row_generators_make_each_row_independent_of_its_batch():
    table = correlated_table()
    model = JointTable(table)
    energy = AutoregressiveEnergy(TableChain(table))
    sampler = get_discrete_sampler("edlm", calls=2, k=3, energy=energy, window=(0.0, 1.0))
    gens = lambda idx: RowGenerators([torch.Generator().manual_seed(100 + i) for i in idx])  # noqa: E731
    full = sampler.run(model, torch.full((6, L), V), V, gens(range(6)))
    part = sampler.run(model, torch.full((2, L), V), V, gens([4, 5]))
    assert torch.equal(full.tokens[4:], part.tokens)


def test_sign_low_energy_is_preferred():
    """A candidate with lower energy must be picked more often (EDLM#3: the released sampler has the sign flipped)."""
    table = correlated_table()
    model = JointTable(table)

    def favour_zeros(x0, x_t, rows, proposal):
        return 5.0 * (x0 != 0).sum(dim=1).double()  # sequences of zeros have the lowest energy

    base = sample_discrete(model, 4000, L, V, "first_hitting", generator=torch.Generator().manual_seed(0), calls=1)
    edlm = sample_discrete(model, 4000, L, V, "edlm", generator=torch.Generator().manual_seed(0), calls=1, k=8,
                           energy=favour_zeros, window=(0.0, 1.0))  # fmt: skip
    assert float((edlm.tokens == 0).double().mean()) > float((base.tokens == 0).double().mean()) + 0.2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0}, "k"), ({"k": 2.5}, "k"), ({"window": (0.6, 0.4)}, "window"), ({"window": (-0.1, 0.5)}, "window"),
        ({"window": (0.5, 1.2)}, "window"), ({"window": (0.5,)}, "window"), ({"temperature": 0}, "temperature"),
        ({"temperature": math.inf}, "temperature"), ({"energy": 3}, "energy"),
    ],
)  # fmt: skip
def test_bad_options_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EnergyCorrectedSampler(**options)


def test_bad_energies_refused():
    table = correlated_table()
    model = JointTable(table)
    x = torch.full((5, L), V)
    nan = lambda x0, x_t, rows, p: torch.full((len(x0),), math.nan)  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        EnergyCorrectedSampler(energy=nan, k=2, calls=1).run(model, x, V, torch.Generator().manual_seed(0))
    inf = lambda x0, x_t, rows, p: torch.full((len(x0),), math.inf)  # noqa: E731
    with pytest.raises(ValueError, match=r"\+inf for all"):
        EnergyCorrectedSampler(energy=inf, k=2, calls=1).run(model, x, V, torch.Generator().manual_seed(0))
    wrong = lambda x0, x_t, rows, p: torch.zeros(len(x0), 2)  # noqa: E731
    with pytest.raises(ValueError, match="one energy per candidate"):
        EnergyCorrectedSampler(energy=wrong, k=2, calls=1).run(model, x, V, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs an energy"):
        EnergyCorrectedSampler(k=2, calls=1).run(model, x, V, torch.Generator().manual_seed(0))
    with pytest.raises(FileNotFoundError, match="no autoregressive energy"):
        EnergyCorrectedSampler(energy="/nonexistent/ar", k=2, calls=1).run(model, x, V, None)


def test_config_round_trip():
    sampler = get_discrete_sampler("edlm", calls=16, k=4, window=[0.2, 0.8], energy="some/folder", temperature=0.5)
    assert sampler.window == (0.2, 0.8)
    again = type(sampler).from_dict(sampler.to_dict())
    assert again == sampler
    described = EnergyCorrectedSampler(energy=lambda *a: None).to_dict()
    assert described["energy"] == "<function>"


def test_pixelcnn_is_causal_and_trains_and_resumes(tmp_path):
    """Each position's logits depend on earlier tokens only; training lowers the NLL of a toy with strong
    left-to-right structure (copies) and resumes from its checkpoint."""
    net = PixelCNN(2, (4, 4), 0, channels=8, blocks=2)
    x = torch.randint(0, 2, (1, 16), generator=torch.Generator().manual_seed(0))
    base = net(x)
    for pos in (0, 5, 15):
        flipped = x.clone()
        flipped[0, pos] = 1 - flipped[0, pos]
        moved = (net(flipped) - base).abs().sum(-1)[0] > 1e-6
        assert not moved[: pos + 1].any()
    # a toy: each grid row is one random bit repeated (4 bits of entropy per 16 tokens)
    bits = torch.randint(0, 2, (512, 4, 1), generator=torch.Generator().manual_seed(1))
    tokens = bits.expand(512, 4, 4).reshape(512, 16)
    config = ARTrainConfig(channels=8, blocks=2, max_steps=150, batch_size=32, lr=1e-2, warmup_steps=5, minutes=5)
    first = train_autoregressive(tmp_path / "ar", config, tokens=tokens, grid=(4, 4), progress=False)
    assert first["steps"] == 150 and first["resumed_from"] == 0
    # a run killed before its end leaves only the checkpoint: a rerun continues from it
    for name in ("autoregressive.json", "autoregressive.safetensors"):
        (tmp_path / "ar" / name).unlink()
    longer = dataclasses.replace(config, max_steps=200)
    record = train_autoregressive(tmp_path / "ar", longer, tokens=tokens, grid=(4, 4), progress=False)
    assert record["resumed_from"] == 150 and record["steps"] == 200
    for name in ("autoregressive.json", "autoregressive.safetensors"):
        (tmp_path / "ar" / name).unlink()
    with pytest.raises(ValueError, match="other settings"):  # another run's settings: refused on resume
        train_autoregressive(tmp_path / "ar", dataclasses.replace(config, lr=0.5), tokens=tokens, grid=(4, 4),
                             progress=False)  # fmt: skip
    train_autoregressive(tmp_path / "ar", longer, tokens=tokens, grid=(4, 4), progress=False)  # budget spent: ends
    trained = load_autoregressive(tmp_path / "ar")
    nll = -float(trained.log_prob(tokens[:64]).mean())
    assert nll < 0.6 * 16 * math.log(2), nll  # well below the 11.1 nats of independent fair bits
    with pytest.raises(FileExistsError):
        train_autoregressive(tmp_path / "ar", config, tokens=tokens, grid=(4, 4), progress=False)


def test_conditional_energy_gets_the_labels_of_the_masked_model():
    """A masked-model callable carries its batch's labels (MaskedDiffusionModel.model sets ``.labels``); the
    sampler rebinds a conditional energy to them, and the energy sees batch rows, as the masked model does."""
    table = correlated_table()
    joint = JointTable(table)

    def model(x, rows):
        return joint(x, rows)

    model.labels = torch.tensor([3, 1, 4, 1, 5])
    seen = {}

    class Conditional(AutoregressiveEnergy):
        def for_labels(self, labels):
            seen["labels"] = labels
            return super().for_labels(labels)

        def log_prob(self, x0, rows):
            seen.setdefault("rows", set()).update(rows.tolist())
            return super().log_prob(x0, rows)

    sampler = EnergyCorrectedSampler(energy=Conditional(TableChain(table)), k=2, calls=2, window=(0.0, 1.0))
    sampler.run(model, torch.full((5, L), V), V, torch.Generator().manual_seed(0))
    assert torch.equal(seen["labels"], model.labels) and seen["rows"] == set(range(5))

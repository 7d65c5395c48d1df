"""Scale-out: the index noise convention, sharding helpers, and commands under ``torchrun`` (gloo on the CPU).

The multi-process tests launch ``python -m torch.distributed.run --standalone`` as users do and compare its files
with one process's: identical bytes, not close numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import hasten
from hasten import distributed
from hasten.seeds import LEGACY_CONVENTION, NOISE_CONVENTION, initial_noise, row_seed, step_seeds
from hasten.solvers.brownian import BrownianNoise

# fields that say how and when a run went, not what it computed
TIMING = {"seconds", "seconds_all", "images_per_second", "peak_memory_bytes", "peak_memory_scope", "finished",
          "environment"}  # fmt: skip


# -- one process --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (10, 3, 3), (7, 7, 3), (1000, 256, 2), (5, 2, 8)])
def test_shards_are_contiguous_blocks_of_whole_batches(n, batch, world):
    shards = [distributed.shard_batches(n, batch, rank=r, world_size=world) for r in range(world)]
    flat = [b for shard in shards for b in shard]
    assert flat == [range(i, min(i + batch, n)) for i in range(0, n, batch)]  # the one-process batches, in order
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # rank 0 holds the first samples
    indices = [distributed.shard_indices(n, batch_size=batch, rank=r, world_size=world) for r in range(world)]
    assert [i for r in indices for i in r] == list(range(n))


def test_even_batches():
    assert [distributed.even_batch_size(n) for n in (1000, 1001, 256, 257, 10)] == [250, 251, 256, 129, 10]
    with pytest.raises(ValueError, match="n >= 1"):
        distributed.even_batch_size(0)


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        distributed.shard_batches(10, 0)
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1"):
        distributed.shard_batches(10, 2, rank=2, world_size=2)


def test_a_samples_noise_depends_on_its_index_alone():
    shape = (1, 4, 4)
    whole = initial_noise(3, range(10), shape)
    assert torch.equal(initial_noise(3, range(6, 10), shape), whole[6:])
    assert torch.equal(initial_noise(3, [7, 2], shape), whole[[7, 2]])
    assert not torch.equal(initial_noise(4, range(10), shape), whole)
    assert len({row_seed(3, j, "initial") for j in range(100)} | {row_seed(3, j, "steps") for j in range(100)}) == 200
    assert step_seeds(3, range(2, 4)) == [row_seed(3, 2, "steps"), row_seed(3, 3, "steps")]
    legacy = torch.randn((10, *shape), generator=torch.Generator().manual_seed(3))  # what v1 drew
    assert torch.equal(initial_noise(3, range(4, 8), shape, convention=LEGACY_CONVENTION, total=10), legacy[4:8])
    with pytest.raises(ValueError, match="unknown"):
        initial_noise(3, range(2), shape, convention="mine")


def test_a_row_seeded_brownian_path_is_each_rows_own_path():
    seeds = [11, 12, 13]
    rows = BrownianNoise(seeds, (3, 5), torch.float64, torch.device("cpu"))
    alone = [BrownianNoise(s, (1, 5), torch.float64, torch.device("cpu")) for s in seeds]
    for sigma, sigma_next in [(10.0, 5.0), (5.0, 1.0), (1.0, 0.3)]:
        got = rows(sigma, sigma_next)
        for k, path in enumerate(alone):
            assert torch.equal(got[k], path(sigma, sigma_next)[0])
    with pytest.raises(ValueError, match="2 row seeds for 3 rows"):
        BrownianNoise([1, 2], (3, 5), torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2m", "ddpm"])
def test_images_do_not_depend_on_the_batch_size(tiny_model, solver):
    """Each sample's initial and step noise come from its index, so batching changes nothing (v1: it did)."""
    model = hasten.load(tiny_model)
    whole = hasten.generate(model, 6, solver=solver, steps=4, seed=5, batch_size=6)
    split = hasten.generate(model, 6, solver=solver, steps=4, seed=5, batch_size=4)
    torch.testing.assert_close(split.images01, whole.images01, rtol=0, atol=1e-6)
    assert split.rows == range(6)
    legacy = hasten.generate(model, 6, solver=solver, steps=4, seed=5, batch_size=6, noise=LEGACY_CONVENTION)
    assert not torch.equal(legacy.images01, whole.images01)  # the other convention is honoured, not ignored


def test_helpers_are_plain_functions_in_one_process():
    x = torch.arange(6.0).view(3, 2)
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.gather_rows(x) is x and distributed.gather_features(x) is x and distributed.from_main(x) is x
    assert distributed.map_tasks(lambda v: v * 2, [1, 2, 3]) == [2, 4, 6]
    assert torch.equal(distributed.map_rows(lambda rows: rows * 2, x, 2), x * 2)
    assert distributed.gather_json({"a": 1}) == [{"a": 1}] and distributed.broadcast_json(3) == 3
    assert distributed.row_slice(8) == slice(0, 8) and distributed.all_sum(2.5) == 2.5
    distributed.agree({"steps": 4})  # nothing to compare with
    with pytest.raises(ValueError, match="no rows"):
        distributed.gather_rows(None)


def test_a_recipe_samples_on_its_own_noise_convention(tiny_model):
    """A recipe written before the index convention still reproduces its images (in one process)."""
    model = hasten.load(tiny_model)
    recipe = hasten.Recipe(model=tiny_model, steps=2)
    old = hasten.Recipe(model=tiny_model, steps=2, noise=LEGACY_CONVENTION)
    assert recipe.noise == NOISE_CONVENTION
    legacy = hasten.generate(model, 3, steps=2, noise=LEGACY_CONVENTION).images01
    assert torch.equal(hasten.generate(model, 3, recipe=old).images01, legacy)
    assert torch.equal(hasten.generate(model, 3, recipe=recipe).images01, hasten.generate(model, 3, steps=2).images01)
    with pytest.raises(ValueError, match="noise convention 'mine' is unknown"):
        hasten.Recipe(model=tiny_model, noise="mine")


# -- several processes (torchrun, gloo) ---------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    src = str(pathlib.Path(__file__).parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return {**env, **(extra or {})}


def _hasten(nproc: int, *args: str, cwd: pathlib.Path, env: dict | None = None, check: bool = True):
    """``hasten args`` in one process (nproc 0) or under ``torchrun --nproc-per-node nproc``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    launcher = [sys.executable, "-m", "hasten"] if nproc == 0 else [*torchrun, "-m", "hasten"]
    done = subprocess.run([*launcher, *args], cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"hasten {' '.join(args)} on {nproc} processes failed:\n{done.stderr[-3000:]}")
    return done


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_sample_writes_the_same_files_in_any_number_of_processes(tmp_path):
    """3 processes (the third idle: 2 batches) write one process's bytes; rank 0 alone writes."""
    args = ["sample", "--num-samples", "6", "--batch-size", "4", "--steps", "3", "--solver", "euler_ancestral"]
    for nproc in (0, 3):
        folder = tmp_path / f"p{nproc}"
        folder.mkdir()
        out = _hasten(nproc, *args, "--out", "grid.png", "--save", "x.npz", "--format", "json", cwd=folder).stdout
        assert json.loads(out.strip().splitlines()[-1])["n"] == 6  # one JSON line: rank 0's
        assert _files(folder) == ["grid.png", "x.npz"]  # no temporary or per-rank file left behind
    for name in ("grid.png", "x.npz"):
        one = (tmp_path / "p0" / name).read_bytes()
        assert (tmp_path / "p3" / name).read_bytes() == one
    assert np.load(tmp_path / "p0" / "x.npz")["samples"].shape == (6, 1, 28, 28)
    # a recipe on the legacy noise (one stream for the whole set) samples in one process, and is refused here
    hasten.save_recipe(hasten.Recipe(model="mnist-dit", steps=2, noise=LEGACY_CONVENTION), tmp_path / "old.json")
    _hasten(0, "sample", "--recipe", "old.json", "--num-samples", "4", "--out", "old.png", cwd=tmp_path)
    refused = _hasten(2, "sample", "--recipe", "old.json", "--num-samples", "4", "--out", "old2.png", cwd=tmp_path,
                      check=False)  # fmt: skip
    assert refused.returncode != 0 and "cannot be sharded over processes" in refused.stderr
    assert not (tmp_path / "old2.png").exists()


@pytest.mark.slow  # a torchrun launch of a long command; `pytest -m slow` runs it (make test stays < 15 min)
def test_evaluate_gives_the_one_process_numbers(tmp_path):
    args = ["evaluate", "--num-samples", "20", "--batch-size", "8", "--steps", "3", "--solver", "dpmpp_2m_sde",
            "--format", "json"]  # fmt: skip
    results = {}
    for nproc in (0, 2):
        out = _hasten(nproc, *args, "--out", f"grid{nproc}.png", cwd=tmp_path).stdout
        results[nproc] = {k: v for k, v in json.loads(out.strip().splitlines()[-1]).items() if k not in TIMING}
    assert results[2] == results[0] and results[0]["n"] == 20 and results[0]["rmse_ref"] > 0
    assert (tmp_path / "grid2.png").read_bytes() == (tmp_path / "grid0.png").read_bytes()


def _rows(folder: pathlib.Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "results.jsonl").read_text().splitlines()]  # fmt: skip


@pytest.mark.slow  # a torchrun launch of a long command; `pytest -m slow` runs it (make test stays < 15 min)
def test_bench_rows_match_one_process_sharded_by_rows_or_samples_and_resume_across_world_sizes(tmp_path):
    args = ["bench", "--num-samples", "10", "--solver", "euler_ancestral", "--solver", "dpmpp_2m", "--steps", "3",
            "--peer", "euler", "--format", "json"]  # fmt: skip
    _hasten(0, *args, "--out", "one", cwd=tmp_path)
    one = _rows(tmp_path / "one")
    assert [row["kind"] for row in one] == ["reference", "stock", "stock", "peer"]  # 3 rows: one rank idles at the end
    _hasten(2, *args, "--out", "rows", "--shard", "rows", cwd=tmp_path)
    _hasten(2, *args, "--out", "samples", "--shard", "samples", cwd=tmp_path)
    for name in ("rows", "samples"):
        assert _rows(tmp_path / name) == one, name
        assert sorted(_files(tmp_path / name)) == sorted(_files(tmp_path / "one"))  # rank 0 wrote every grid
        environment = json.loads((tmp_path / name / "results.jsonl").read_text().splitlines()[-1])["environment"]
        assert environment["processes"] == 2 and environment["shard"] == name
    # a run of 2 processes stopped after 2 rows (as a kill leaves it), continued by 1 process, and the reverse
    for first, then in ((2, 0), (0, 2)):
        folder = tmp_path / f"resume{first}{then}"
        folder.mkdir()
        (folder / "matrix.json").write_bytes((tmp_path / ("rows" if first else "one") / "matrix.json").read_bytes())
        lines = (tmp_path / ("rows" if first else "one") / "results.jsonl").read_text().splitlines(keepends=True)
        (folder / "results.jsonl").write_text("".join(lines[:2]))
        _hasten(then, *args, "--out", folder.name, "--resume", cwd=tmp_path)
        assert _rows(folder) == one


def test_a_rank_that_dies_fails_the_run_and_leaves_no_file(tmp_path):
    """SIGKILL rank 1 mid-run (a sitecustomize on its path): torchrun stops rank 0 and reports the dead rank; the
    output is never written, so nothing partial passes for a result."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os, signal, threading
        if os.environ.get("RANK") == "1" and os.environ.get("HASTEN_TEST_KILL_AFTER"):
            delay = float(os.environ["HASTEN_TEST_KILL_AFTER"])
            threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    """)
    )
    src = str(pathlib.Path(__file__).parents[1] / "src")
    env = {"HASTEN_TEST_KILL_AFTER": "8", "PYTHONPATH": os.pathsep.join([str(hook), src])}
    start = time.perf_counter()
    done = _hasten(2, "sample", "--num-samples", "2000", "--batch-size", "50", "--steps", "50", "--out", "grid.png",
                   "--save", "x.npz", cwd=tmp_path, env=env, check=False)  # fmt: skip
    assert done.returncode != 0 and time.perf_counter() - start < 200
    assert "SIGKILL" in done.stderr or f"Signals.{signal.SIGKILL.name}" in done.stderr or "-9" in done.stderr
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "x.npz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left either


def test_ranks_with_different_settings_are_refused_naming_the_difference(tmp_path):
    """Two 'nodes' launched apart (static rendezvous on this machine) with different --steps: both refuse."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launches = []
    for node, steps in ((0, "3"), (1, "4")):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "hasten",
                   "sample", "--num-samples", "4", "--steps", steps, "--out", f"grid{node}.png"]  # fmt: skip
        launches.append(subprocess.Popen(command, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=240)[1] for p in launches]
    assert all(p.returncode != 0 for p in launches)
    assert any("do not share the same settings" in e and "recipe.steps (rank 0: 3; rank 1: 4)" in e for e in errors)
    assert not list(tmp_path.glob("grid*.png"))


def test_training_is_data_parallel_and_resumes_on_another_number_of_processes(tmp_path):
    """DDP over 2 processes trains the one-process weights (float tolerance: the gradient sum's order differs):
    a 2-process run continued by 1 process ends where an uninterrupted one-process run does."""
    from safetensors.torch import load_file

    common = ["train", "--arch", "dit", "--batch-size", "6", "--format", "json"]
    _hasten(0, *common, "--max-steps", "4", "--out", "one", cwd=tmp_path)
    _hasten(2, *common, "--max-steps", "2", "--out", "mixed", cwd=tmp_path)
    _hasten(0, *common, "--max-steps", "4", "--out", "mixed", cwd=tmp_path)

    def weights(name):
        return load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors"))

    one = weights("one")
    mixed = weights("mixed")
    assert max(float((one[k] - mixed[k]).abs().max()) for k in one) < 1e-5
    assert json.loads((tmp_path / "mixed" / "hasten.json").read_text())["training"]["steps"] == 4


@pytest.mark.slow  # a torchrun launch of a long command; `pytest -m slow` runs it (make test stays < 15 min)
def test_distillation_runs_data_parallel_on_the_teachers_one_process_couplings(tmp_path):
    """Reflow under 2 processes: its teacher couplings are made one chunk per process and written by rank 0, the
    same tensors as one process makes; then data-parallel updates and a working student folder."""
    from safetensors.torch import load_file

    args = ["distill", "--teacher", "mnist-dit", "--method", "reflow", "--nfe", "2", "--max-steps", "2",
            "--batch-size", "4", "--option", "couplings=12", "--option", "chunk_size=4", "--option", "teacher_steps=4",
            "--format", "json"]  # fmt: skip
    _hasten(0, *args, "--out", "one", cwd=tmp_path)
    done = _hasten(2, *args, "--out", "two", cwd=tmp_path)
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    for k in range(3):  # 3 chunks over 2 processes: the second round has one idle process
        one = load_file(str(tmp_path / "one" / "method" / "couplings" / f"chunk_{k:05d}.safetensors"))
        two = load_file(str(tmp_path / "two" / "method" / "couplings" / f"chunk_{k:05d}.safetensors"))
        assert sorted(one) == sorted(two) == ["labels", "x", "z"]
        assert all(torch.equal(one[name], two[name]) for name in one)
    assert (tmp_path / "two" / "hasten.json").exists() and (tmp_path / "two" / "MODEL_CARD.md").exists()
    hasten.generate(hasten.load(str(tmp_path / "two")), 2)  # a working student


TUNE_SCRIPT = """
import json, sys
import hasten
from hasten import distributed
from hasten.tune import TuneConfig, tune

distributed.init_from_env()
config = TuneConfig(nfe=4, minutes=30, n_search=8, n_heldout=10, fd_candidates=0, use_v3=False, max_evaluations=24,
                    reference_steps=20)
tune(hasten.load("mnist-dit"), config, sys.argv[1], progress=False)
distributed.destroy()
"""


@pytest.mark.slow  # a torchrun launch of a long command; `pytest -m slow` runs it (make test stays < 15 min)
def test_a_tuning_search_takes_one_process_path_with_its_candidates_scored_in_parallel(tmp_path):
    """At an evaluation cap the search is the same on 1 and 2 processes: the plan, its scores and its path."""
    (tmp_path / "tune.py").write_text(TUNE_SCRIPT)
    plans = {}
    for nproc in (0, 2):
        (tmp_path / f"p{nproc}").mkdir()
        launcher = [sys.executable] if nproc == 0 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # fmt: skip
        subprocess.run([*launcher, "tune.py", f"p{nproc}/plan.json"], cwd=tmp_path, env=_env(), check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        plans[nproc] = json.loads((tmp_path / f"p{nproc}" / "plan.json").read_text())
        plans[nproc]["search"].pop("evaluation_seconds")  # how long it took, not what it found
    assert plans[2] == plans[0] and plans[0]["search"]["evaluations"] == 24

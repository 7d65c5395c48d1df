"""The runnable examples the docs quote must run and print what the docs say."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_analytic_mixture_example_matches_the_guide():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "analytic_mixture.py")], capture_output=True, text=True, check=True
    ).stdout
    guide = (ROOT / "docs" / "guide" / "solvers.md").read_text()
    for line in out.strip().splitlines():
        assert line in guide, f"docs/guide/solvers.md does not show the example's output line {line!r}"


def test_the_distributed_example_writes_one_file_in_any_number_of_processes(tmp_path):
    """docs/guide/scale-out.md's pattern: 1 and 2 processes write the same features."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "examples" / "distributed_features.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for launcher, name in (([sys.executable], "one"), (torchrun, "two")):
        subprocess.run([*launcher, script, str(tmp_path / f"{name}.safetensors")], env=env, check=True,
                       capture_output=True)  # fmt: skip
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()

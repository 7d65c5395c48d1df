"""The runnable examples the docs quote must run and print what the docs say."""

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

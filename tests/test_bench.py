"""hasten bench: matrix expansion, JSONL rows, resume after a kill, refusal of another matrix, the report."""

import dataclasses
import itertools
import json

import pytest
from typer.testing import CliRunner

from hasten.bench.matrix import PRESETS, BenchConfig, expand
from hasten.bench.report import pareto_front, render
from hasten.bench.runner import ROW_KEYS, BenchError, read_results, run_bench
from hasten.cli.app import app
from hasten.solvers import parse_solver


def _config(model, **kw):
    base = dict(model=model, solvers=("euler", "dpmpp_2m"), steps=(2, 3), peers=("euler",), n=10)
    return BenchConfig(**{**base, **kw})


def test_matrix_expansion():
    cfg = BenchConfig(solvers=("euler", "unipc:variant=bh2"), steps=(5, 10), schedules=("karras", "logsnr"),
                      guidance=(1.0, 2.0), peers=("ddim", "euler", "flow_euler"))  # fmt: skip
    eps = expand(cfg, objective="eps", conditional=True)
    # 2 guidance x (2 solvers x 2 schedules x 2 steps + 2 eps peers x 2 steps)
    assert len(eps) == 2 * (8 + 4) and len({e.key for e in eps}) == len(eps)
    assert {e.solver for e in eps if e.library == "diffusers"} == {"ddim", "euler"}
    assert next(e.options for e in eps if e.solver == "unipc") == {"variant": "bh2"}
    flow = expand(cfg, objective="flow", conditional=False)  # peers map to their flow variants, no guidance axis
    assert {e.solver for e in flow if e.library == "diffusers"} == {"flow_euler"} and {e.guidance for e in flow} == {
        1.0
    }
    assert set(PRESETS) == {"quick", "tuning", "standard", "full", "caching", "quantization"}


def test_parse_solver_validates_early():
    assert parse_solver("unipc:order=3,variant=bh2") == ("unipc", {"order": 3, "variant": "bh2"})
    with pytest.raises(KeyError, match="available"):
        parse_solver("nope")
    with pytest.raises(TypeError, match="does not take"):
        parse_solver("euler:eta=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_solver("unipc:bh2")
    with pytest.raises(ValueError, match="peer"):
        BenchConfig(peers=("nope",))


def test_bench_rows_resume_and_report(tiny_model, tmp_path):
    cfg = _config(tiny_model)
    out = tmp_path / "bench"

    class Killed(Exception):
        pass

    def kill_after_two(row, i, total):
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        run_bench(cfg, out, on_row=kill_after_two)
    partial = read_results(out)
    assert len(partial) == 1 + 2  # the reference row and two configurations survived the kill
    with pytest.raises(BenchError, match="--resume"):
        run_bench(cfg, out)
    with pytest.raises(BenchError, match="different matrix"):
        run_bench(dataclasses.replace(cfg, steps=(2, 4)), out, resume=True)
    rows = run_bench(cfg, out, resume=True)
    entries = expand(cfg, objective="flow", conditional=True)
    assert len(rows) == len(entries) + 1 and len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        for key in ROW_KEYS:
            assert key in row, key
        json.dumps(row)
    hasten_rows = [r for r in rows if r["library"] == "hasten"]
    assert all(r["nfe"] == r["steps"] for r in hasten_rows) and all(r["seconds"] > 0 for r in hasten_rows)
    assert {r["library"] for r in rows} == {"hasten", "diffusers", "reference"}
    runs = json.loads((out / "runs.json").read_text())  # the interrupted run and the resumed one
    assert [r["rows_measured"] for r in runs] == [2, len(entries) - 2] and all(r["wall_seconds"] > 0 for r in runs)
    html = render(out).read_text()
    assert "Bench wall time" in html
    assert html.count("data:image/png;base64,") >= 3 + len(rows)  # three plots and one grid per row
    assert "<table>" in html and (out / "pareto_nfe.png").exists()


def test_pareto_front():
    rows = [
        {"nfe": 5, "fd": 10},
        {"nfe": 10, "fd": 5},
        {"nfe": 10, "fd": 8},
        {"nfe": 20, "fd": 6},
        {"nfe": 20, "fd": 1},
    ]
    assert [(r["nfe"], r["fd"]) for r in pareto_front(rows, "nfe", "fd")] == [(5, 10), (10, 5), (20, 1)]


def test_cli_bench_and_report_errors(tiny_model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--model", tiny_model, "--preset", "huge", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "unknown preset 'huge'" in res.output
    res = runner.invoke(app, ["bench", "--model", "no-such-model", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "no hasten model" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no results" in res.output


def test_gmm_bench_exact_errors_fall_with_nfe(tmp_path):
    # From 12 steps on; below that, the karras grid's last jump (to sigma_min = 0.002) dominates the error.
    cfg = BenchConfig(model="gmm", solvers=("heun", "dpmpp_2m", "dpmpp_3m", "unipc"), steps=(12, 20, 40, 80), n=64)
    rows = run_bench(cfg, tmp_path / "gmm")
    assert len(rows) == 16 and all(r["fd"] is None and r["exact_error"] > 0 for r in rows)
    for solver in cfg.solvers:
        errs = [r["exact_error"] for r in sorted((r for r in rows if r["solver"] == solver), key=lambda r: r["nfe"])]
        assert all(a > b for a, b in itertools.pairwise(errs)), (solver, errs)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "gmm"), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.output)["rows"] == 16


def test_results_of_an_older_matrix_resume_after_new_options_appear():
    """A folder written before BenchConfig gained an option (absent there, at its default now) still resumes."""
    from hasten.bench.runner import _same_matrix

    config = BenchConfig(model="mnist-dit").to_dict()
    new = {"config": config, "model_fingerprint": "f", "entries": ["a"]}
    old = {"config": {k: v for k, v in config.items() if k not in ("quants", "quant_peers")},
           "model_fingerprint": "f", "entries": ["a"]}  # fmt: skip
    assert _same_matrix(old, new)
    changed = {**new, "config": {**config, "quants": ["somewhere"]}}
    assert not _same_matrix(old, changed)
    assert not _same_matrix({**old, "entries": ["b"]}, new)
    assert not _same_matrix(None, new)

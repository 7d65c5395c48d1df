"""No command loses work or answers with a traceback (issue 24, part 3).

One table: each row is a command line, the exit code it must give, words its message must contain, and the
files it must leave byte-identical. A refused command exits 2 with ``error: ...`` before any work; nothing
here may end in a Python traceback (exit 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import hasten
from hasten.bench.matrix import MATRIX_VERSION
from hasten.cli.app import app

RUNNER = CliRunner()
TRAIN = ["train", "--arch", "dit", "--objective", "flow", "--batch-size", "8", "--minutes", "5"]  # tiny_model's run


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """The inputs of the table: damaged copies of the tiny model, foreign folders, files where folders go."""
    from hasten.accel import BlockCacheConfig

    root = tmp_path_factory.mktemp("trust")
    model = pathlib.Path(tiny_model)
    paths = {"model": model, "root": root}

    def copy(name: str, *, checkpoint: bool = False) -> pathlib.Path:
        ignore = None if checkpoint else shutil.ignore_patterns("checkpoint*")
        return pathlib.Path(shutil.copytree(model, root / name, ignore=ignore))

    paths["copy"] = copy("copy")  # a model folder of another run (no training checkpoint)
    paths["other"] = root / "other"  # a folder holding someone's files
    paths["other"].mkdir()
    (paths["other"] / "keep.txt").write_text("mine")
    paths["afile"] = root / "afile.txt"
    paths["afile"].write_text("a file, not a folder")
    paths["badjson"] = copy("badjson")
    (paths["badjson"] / "hasten.json").write_text("{oops")
    paths["trunc"] = copy("trunc")
    weights = paths["trunc"] / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["ckpt"] = copy("ckpt", checkpoint=True)  # a training run whose checkpoint was damaged
    state = paths["ckpt"] / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    paths["run"] = copy("run", checkpoint=True)  # an intact training run
    paths["bench"] = root / "bench"  # a bench folder whose results.jsonl was damaged on line 3
    paths["bench"].mkdir()
    (paths["bench"] / "results.jsonl").write_text('{"key": "a"}\n\n{"key": "b"\n')
    paths["accel"] = root / "accel.json"  # a cache config with a typo in its type
    BlockCacheConfig(interval=2).save(paths["accel"])
    paths["accel50"] = root / "accel50.json"  # a cache calibrated for 50 steps
    BlockCacheConfig(interval=2).save(paths["accel50"], calibration={"setting": {"solver": "dpmpp_2m", "steps": 50}})
    data = json.loads(paths["accel"].read_text())
    data["config"]["_type"] = "BlockCacheConfg"
    paths["accel"].write_text(json.dumps(data))
    loaded = hasten.load(model)
    sigmas = tuple(hasten.get_sigmas("auto", 3, loaded.schedule).tolist())
    paths["plan"] = root / "foreign-plan.json"  # a plan tuned for other weights
    hasten.tune.save_plan(hasten.Plan(sigmas, "dpmpp_2m", nfe=3, fingerprint="0" * 16, model="elsewhere"),
                          paths["plan"])  # fmt: skip
    paths["tuned"] = root / "tuned.json"  # a search saved with other settings
    (root / "tuned.json.search.json").write_text(json.dumps({"config": {"n_search": 999}, "model": "x",
                                                             "fingerprint": loaded.fingerprint}))  # fmt: skip
    paths["resumed"] = root / "resumed"  # a bench folder of a matrix at another n
    paths["resumed"].mkdir()
    (paths["resumed"] / "matrix.json").write_text(json.dumps({"version": MATRIX_VERSION, "config": {"n": 20}}))
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import tiny_pipelines

    pipe, _ = tiny_pipelines.ddpm()
    paths["pickled"] = root / "pickled-pipeline"  # a diffusers folder with .bin weights only
    pipe.save_pretrained(paths["pickled"], safe_serialization=False)
    return paths


NO_CUDA = not torch.cuda.is_available()
S = ["sample", "--model", "{model}", "--n", "2", "--steps", "2"]
Q = ["quantize", "--model", "{model}", "--n", "32", "--steps", "2"]
T = ["tune", "--model", "{model}", "--nfe", "3", "--minutes", "0.1", "--no-v3", "--n-search", "4"]
C = ["accelerate", "calibrate", "--model", "{model}", "--technique", "block_cache", "--steps", "3", "--n", "10"]
B = ["bench", "--model", "{model}", "--n", "10"]

# (id, args, exit code, words the output must contain, files that must stay byte-identical)
CASES = [
    # outputs that exist are refused unless --force / --resume, before any work
    ("quantize-over-a-folder", [*Q, "--out", "{other}"], 2, ["already holds files", "--force"], ["{other}"]),
    ("quantize-in-place", [*Q, "--model", "{copy}", "--out", "{copy}"], 2, ["model folder being read"], ["{copy}"]),
    ("quantize-out-is-a-file", [*Q, "--out", "{afile}"], 2, ["is a file"], ["{afile}"]),
    ("train-over-another-model", [*TRAIN, "--out", "{copy}", "--max-steps", "1"], 2,
     ["holds a model but no training checkpoint", "--force"], ["{copy}"]),
    ("train-over-a-folder", [*TRAIN, "--out", "{other}", "--max-steps", "1"], 2, ["already holds files"], ["{other}"]),
    ("train-out-is-a-file", [*TRAIN, "--out", "{afile}", "--max-steps", "1"], 2, ["is a file"], ["{afile}"]),
    # output paths checked before the work
    ("sample-out-is-a-folder", [*S, "--out", "{root}"], 2, ["is a folder"], []),
    ("evaluate-out-is-a-folder", ["evaluate", "--model", "{model}", "--n", "10", "--out", "{root}"], 2, ["is a folder"],
     []),
    ("tune-out-is-a-folder", [*T, "--out", "{root}"], 2, ["is a folder"], []),
    ("calibrate-out-is-a-folder", [*C, "--out", "{root}"], 2, ["is a folder"], []),
    ("sample-out-under-a-file", [*S, "--out", "{afile}/g.png"], 2, ["does not exist"], ["{afile}"]),
    # errors, not tracebacks
    ("non-finite-guidance", [*S, "--guidance", "1e30", "--out", "{root}/g.png"], 2,
     ["non-finite", "guidance scale 1e+30 is the likely cause"], []),
    ("quantize-unknown-solver", [*Q, "--solver", "nope", "--out", "{root}/q"], 2, ["unknown solver 'nope'"], []),
    ("quantize-solver-options", [*Q, "--solver", "unipc:order=9", "--out", "{root}/q"], 2,
     ["order must be one of 1, 2, 3; got 9"], []),
    ("calibrate-unknown-solver", [*C, "--solver", "nope", "--out", "{root}/a.json"], 2, ["unknown solver 'nope'"], []),
    ("tune-guidance-nan", [*T, "--guidance", "nan", "--out", "{root}/p.json"], 2, ["--guidance must be a finite"], []),
    ("report-corrupt-results", ["report", "{bench}"], 2, ["results.jsonl, line 3, is not valid JSON"], ["{bench}"]),
    ("train-corrupt-checkpoint", [*TRAIN, "--out", "{ckpt}", "--max-steps", "3"], 2,
     ["checkpoint/state.safetensors", "damaged"], ["{ckpt}"]),
    ("sample-cuda-without-cuda", [*S, "--device", "cuda", "--out", "{root}/g.png"], 2, ["sees no CUDA"], []),
    ("train-cuda-without-cuda", [*TRAIN, "--out", "{root}/t", "--device", "cuda"], 2, ["sees no CUDA"], []),
    ("truncated-weights", [*S, "--model", "{trunc}", "--out", "{root}/g.png"], 2,
     ["trunc/diffusion_pytorch_model.safetensors"], ["{trunc}"]),
    # accepted without a word before
    ("train-zero-steps", [*TRAIN, "--out", "{root}/t0", "--max-steps", "0"], 2, ["max-steps"], []),
    ("tune-infinite-minutes", [*T, "--minutes", "inf", "--out", "{root}/p.json"], 2, ["minutes must be a finite"], []),
    ("tune-negative-fd-candidates", [*T, "--fd-candidates", "-2", "--out", "{root}/p.json"], 2,
     ["fd_candidates must be >= 0"], []),
    ("cache-for-50-steps-at-4", [*S, "--steps", "4", "--accel", "{accel50}", "--out", "{root}/g.png"], 2,
     ["calibrated for 50 steps (this recipe runs 4)"], ["{accel50}"]),
    ("sample-negative-guidance", [*S, "--guidance", "-3", "--out", "{root}/g.png"], 2, ["--guidance must be"], []),
    ("quantize-negative-guidance", [*Q, "--guidance", "-1", "--out", "{root}/q"], 2, ["--guidance must be"], []),
    # messages that say what is wrong
    ("corrupt-hasten-json", [*S, "--model", "{badjson}", "--out", "{root}/g.png"], 2,
     ["badjson/hasten.json is not valid JSON"], ["{badjson}"]),
    ("quantize-activation-bits", [*Q, "--activations", "5", "--out", "{root}/q"], 2,
     ["--activations must be 8", "16 (float activations"], []),
    ("accel-type-typo", [*S, "--accel", "{accel}", "--out", "{root}/g.png"], 2,
     ["did you mean 'block_cache'", "unknown AccelConfig type"], ["{accel}"]),
    ("bench-foreign-plan-before-any-row", [*B, "--plan", "{plan}", "--out", "{root}/b1"], 2,
     ["--plan foreign-plan.json", "tune one for these weights"], ["{plan}"]),
    ("bench-out-is-a-file", [*B, "--out", "{afile}"], 2, ["is a file"], ["{afile}"]),
    ("bench-resume-names-the-setting", [*B, "--resume", "--out", "{resumed}"], 2, ["n 20 -> 10"], ["{resumed}"]),
    ("tune-resume-names-the-setting", [*T, "--resume", "--out", "{tuned}"], 2, ["n_search 999 -> 4"], []),
    ("train-resume-names-the-setting", [*TRAIN[:-4], "--batch-size", "4", "--out", "{run}", "--max-steps", "5"], 2,
     ["batch_size 8 -> 4"], ["{run}"]),
    # pipelines load safetensors; pickled weights only when asked
    ("pipeline-pickled-refused", ["sample", "--pipeline", "{pickled}", "--n", "2", "--steps", "2", "--out",
                                  "{root}/p.png"], 2, ["pickled weights", "--allow-pickle"], ["{pickled}"]),
    ("pipeline-pickled-allowed", ["sample", "--pipeline", "{pickled}", "--n", "2", "--steps", "2", "--out",
                                  "{root}/p.png", "--allow-pickle"], 0, ["NFE"], ["{pickled}"]),
]  # fmt: skip


def _digest(paths: list[pathlib.Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for path in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.exists():
                out[str(path)] = "folder"
    return out


@pytest.mark.parametrize(("args", "code", "words", "unchanged"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_case(files, args, code, words, unchanged):
    if "cuda" in args and not NO_CUDA:
        pytest.skip("the machine has CUDA")
    fill = {k: str(v) for k, v in files.items()}
    argv = [a.format(**fill) for a in args]
    kept = [pathlib.Path(p.format(**fill)) for p in unchanged]
    before = _digest(kept)
    res = RUNNER.invoke(app, argv)
    assert res.exit_code == code, f"{argv}\n{res.output}\n{res.exception!r}"
    if code == 2:  # hasten's "error: ..." or typer's usage error for a value out of an option's range
        assert "error: " in res.output or "Invalid value" in res.output, res.output
    for word in words:
        assert word in res.output, res.output
    assert _digest(kept) == before, "the command changed files it must leave alone"


def test_no_case_leaves_a_bench_folder(files):
    """A bench refused for a bad input writes nothing (a corrected rerun starts clean)."""
    assert not (files["root"] / "b1").exists()


def test_damaged_checkpoint_falls_back_to_the_previous_one(files, tmp_path):
    from hasten.train import TrainConfig, train

    run = pathlib.Path(shutil.copytree(files["run"], tmp_path / "run"))
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    (run / "checkpoint" / "state.json").write_text("{")
    with pytest.warns(UserWarning, match=r"checkpoint/state.json.*resuming from .*checkpoint.old"):
        result = train(TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=8), run, max_steps=3,
                       progress=False)  # fmt: skip
    assert result.resumed_from_step == 2 and result.steps == 3


def test_api_refusals(files):
    """The library refuses what the CLI's table refuses, with the same words."""
    from hasten.quant.calibrate import CalibrationSet

    model = hasten.load(files["model"])
    with pytest.raises(ValueError, match=r"sigmas must be 1-D .* shape \(2, 3\)"):
        hasten.sample(model.denoiser, torch.randn(2, 1, 28, 28), torch.tensor([[1.0, 0.5, 0.0]] * 2), "euler")
    anonymous = CalibrationSet([], {}, None)
    with pytest.raises(ValueError, match="does not say which model"):
        hasten.quantize_(model, calibration=anonymous)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        from hasten.train import TrainConfig, train

        train(TrainConfig(arch="dit", objective="flow"), files["root"] / "t", max_steps=0, progress=False)


def test_cli_stderr_is_clean(files, tmp_path):
    """A plain command prints no peer's import warnings (torchao's libraries, torch's pytree, diffusers')."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(hasten.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    argv = [sys.executable, "-m", "hasten.cli.app", "sample", "--model", str(files["model"]), "--n", "2", "--steps",
            "2", "--out", str(tmp_path / "g.png")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr

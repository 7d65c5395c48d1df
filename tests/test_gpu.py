"""CUDA smoke tests: sampling and pipeline models on a GPU agree with the CPU (run on a GPU machine with
``pytest -m gpu``; skipped elsewhere). The quantised kernels' CUDA test lives in test_quant_kernels.py."""

from __future__ import annotations

import pytest
import torch

import hasten

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["mnist-unet", "mnist-dit"])
def test_bundled_models_sample_on_cuda_as_on_cpu(name):
    cpu = hasten.generate(hasten.load(name), 8, steps=5, seed=0)
    gpu = hasten.generate(hasten.load(name, device="cuda"), 8, steps=5, seed=0)
    difference = (cpu.images01 - gpu.images01.cpu()).abs()
    assert difference.mean() < 5e-3 and difference.max() < 0.1  # cuDNN/TF32 rounding, not a different sampler


def test_pipeline_model_samples_on_cuda():
    from tiny_pipelines import dit

    pipe, kwargs = dit()
    cpu = hasten.generate(hasten.from_pipeline(pipe, **kwargs), 2, steps=4, seed=0)
    gpu = hasten.generate(hasten.from_pipeline(pipe, device="cuda", **kwargs), 2, steps=4, seed=0)
    assert (cpu.samples - gpu.samples.cpu()).abs().max() < 1e-2


def test_torchrun_places_each_process_on_its_own_gpu_and_matches_one_gpu(tmp_path):
    """Under torchrun `--device cuda` is cuda:LOCAL_RANK; NCCL carries CUDA tensors, gloo CPU ones; the images
    agree with one GPU's within float tolerance (GPU kernels are not bitwise reproducible across layouts)."""
    import os
    import pathlib
    import subprocess
    import sys

    import numpy as np

    nproc = min(2, torch.cuda.device_count())
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1] / "src")}
    args = ["-m", "hasten", "sample", "--device", "cuda", "--num-samples", "16", "--batch-size", "4", "--steps", "4"]
    subprocess.run([sys.executable, *args, "--out", "one.png", "--save", "one.npz"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    subprocess.run([*torchrun, *args, "--out", "many.png", "--save", "many.npz"], cwd=tmp_path,
                   env=env, check=True, capture_output=True)  # fmt: skip
    one, many = np.load(tmp_path / "one.npz")["samples"], np.load(tmp_path / "many.npz")["samples"]
    assert one.shape == many.shape and float(np.abs(one - many).max()) < 0.05

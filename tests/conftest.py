import os
import tempfile

import pytest
import torch

# The suite runs many tiny tensor ops; one intra-op thread is faster on 2-core machines and deterministic.
torch.set_num_threads(1)
# Keep derived-data caches (reference statistics, reference solves) out of the user's cache.
os.environ["HASTEN_CACHE"] = tempfile.mkdtemp(prefix="hasten-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A hasten-trained flow DiT after two training steps: a real model folder, in seconds."""
    from hasten.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-dit")
    train(TrainConfig(arch="dit", objective="flow", minutes=5, batch_size=8), out, max_steps=2, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_student(tiny_model, tmp_path_factory):
    """A 2-step progressive student of ``tiny_model`` after one update: a real student folder, in seconds."""
    import hasten

    out = tmp_path_factory.mktemp("tiny-student") / "student"
    hasten.distill(teacher=tiny_model, method="progressive", nfe=2, out=out, batch_size=4, options={"start_steps": 4},
                   max_steps=1, progress=False)  # fmt: skip
    return str(out)

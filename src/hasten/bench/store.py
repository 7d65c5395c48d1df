"""A bench folder's files: ``results.jsonl`` (one JSON row per configuration, rewritten atomically), ``matrix.json``
(what the rows are; a folder of another matrix is refused), ``runs.json`` (each invocation's wall time), and what every
row records about the machine. Shared by the continuous bench (:mod:`hasten.bench.runner`) and a masked model's
(:mod:`hasten.bench.masked`).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import torch

from .. import distributed
from .._io import write_text_atomic
from ..train import machine_description
from .matrix import BenchConfig

__all__ = ["BenchError", "read_results"]


class BenchError(ValueError):
    """A bench that cannot start as asked (its message says what to do)."""


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(folder) / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}, is not valid JSON ({err.msg} at column {err.colno}); fix or remove that "
                "line (a bench rerun with --resume measures its row again)"
            ) from None
    return rows


def _environment() -> dict[str, Any]:
    import diffusers

    from .. import __version__

    return {
        "machine": machine_description(torch.device("cpu")),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "hasten": __version__,
    }


def _same_matrix(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a folder's matrix is this one; options added to BenchConfig since the folder was written
    count as equal when the new matrix has them at their defaults (an upgrade must not orphan results)."""
    if old is None:
        return False
    defaults = BenchConfig().to_dict()
    old_config, new_config = dict(old.get("config", {})), dict(new["config"])
    for key in [k for k in new_config if k not in old_config and new_config[k] == defaults.get(k)]:
        del new_config[key]
    return {**old, "config": old_config} == {**new, "config": new_config}


def _matrix_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between a folder's matrix and this run's, in words (``n 10 -> 20, the model's weights``)."""
    if old is None:
        return "the folder has no matrix.json"
    old_config, new_config = old.get("config", {}), new["config"]
    changed = [f"{k} {old_config.get(k)!r} -> {new_config.get(k)!r}" for k in sorted({*old_config, *new_config})
               if old_config.get(k) != new_config.get(k)]  # fmt: skip
    if old.get("model_fingerprint") != new.get("model_fingerprint"):
        changed.append("the model's weights")
    if old.get("condition") != new.get("condition"):
        changed.append("the prompts")
    if not changed and old.get("entries") != new.get("entries"):
        changed.append("the rows (another hasten version or installed peers)")
    return ", ".join(changed) or "settings changed"


class _Results:
    """The folder's ``results.jsonl`` and ``matrix.json``: refuses a foreign matrix, rewrites atomically."""

    def __init__(self, folder: pathlib.Path, matrix: dict[str, Any], resume: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        matrix_path = folder / "matrix.json"
        found = None
        if distributed.is_main():  # rank 0 reads the folder; every rank of a torchrun job decides on what it read
            old = json.loads(matrix_path.read_text()) if matrix_path.exists() else None
            found = {"rows": read_results(folder), "matrix_file": matrix_path.exists(), "matrix": old}
        found = distributed.broadcast_json(found)
        self.rows = found["rows"]
        if self.rows or found["matrix_file"]:
            if not resume:
                raise BenchError(
                    f"{folder} already holds bench results; pass --resume to continue them, or use another --out"
                )
            old = found["matrix"]
            if old is not None and old.get("version", 1) != matrix.get("version", 1):
                raise BenchError(
                    f"{folder} was written by an older hasten (bench matrix version {old.get('version', 1)}, rows "
                    f"keyed another way; this hasten writes version {matrix.get('version', 1)}): its rows would all "
                    "run again; use another --out (`hasten report` still renders the folder)"
                )
            if not _same_matrix(old, matrix):
                raise BenchError(
                    f"{folder} holds results of a different matrix ({_matrix_differences(old, matrix)}); run with "
                    "those settings to continue it, or use another --out"
                )
        write_text_atomic(matrix_path, json.dumps(matrix, indent=2) + "\n")
        self.done = {row["key"] for row in self.rows}

    def log_run(self, started: float, measured: int) -> None:
        """Append this invocation's wall time (loading, reference, every row and its metrics) to ``runs.json``."""
        if not distributed.is_main():
            return
        path = self.folder / "runs.json"
        runs = json.loads(path.read_text()) if path.exists() else []
        runs.append({
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - started, "rows_measured": measured,
            "processes": distributed.world_size(),
        })  # fmt: skip
        write_text_atomic(path, json.dumps(runs, indent=2) + "\n")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.done.add(row["key"])
        write_text_atomic(self.folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))


def _stamp(model: str, fingerprint: str, config: BenchConfig, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model, "fingerprint": fingerprint, "n": config.n, "seed": config.seed, "repeats": config.repeats,
        "environment": env, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip

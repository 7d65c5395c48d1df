"""Atomic file writes: a kill mid-write never leaves a half-written result, plan, cache entry or image.

Under ``torchrun`` only rank 0 writes: on the other ranks the writer gets a throw-away path in a private
temporary folder, so a library function that writes (a cache entry, a results line) needs no rank test of its
own and two processes never race on one file (:mod:`hasten.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "cache_dir", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format work) and move
    it onto ``path`` when the block succeeds; on an error the temporary file is removed."""
    path = pathlib.Path(path)
    from . import distributed

    if not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="hasten-rank-") as folder:
            yield pathlib.Path(folder) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return pathlib.Path(path)


def cache_dir() -> pathlib.Path:
    """Where hasten caches derived data (``$HASTEN_CACHE``, default ``~/.cache/hasten``)."""
    path = pathlib.Path(os.environ.get("HASTEN_CACHE", pathlib.Path.home() / ".cache" / "hasten"))
    path.mkdir(parents=True, exist_ok=True)
    return path

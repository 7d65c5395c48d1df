"""Atomic file writes: a kill mid-write never leaves a half-written result, plan, cache entry or image."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

__all__ = ["atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format work) and move
    it onto ``path`` when the block succeeds; on an error the temporary file is removed."""
    path = pathlib.Path(path)
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

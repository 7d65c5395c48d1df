"""One progress bar for long work (training and tuning budgets, statistics estimation): rich, throttled."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["BudgetProgress"]


class BudgetProgress:
    """A rich bar from ``done`` to ``budget`` (seconds, or any unit of work) with a status; silent when disabled.

    Where the stream is not a terminal (a run under ``nohup`` writing to a log), a live bar would only be drawn once,
    at the end: a plain line is written instead, at most every ``line_seconds``, and one when the work ends."""

    def __init__(
        self,
        enabled: bool,
        label: str,
        budget: float,
        done: float = 0.0,
        *,
        stream: TextIO | None = None,
        line_seconds: float = 60.0,
    ) -> None:
        self.bar = None
        self.lines: TextIO | None = None
        self.label, self.budget, self.done, self.info = label, budget, done, ""
        self._last = 0.0
        self._line_seconds = line_seconds
        if not enabled:
            return
        stream = sys.stderr if stream is None else stream
        if not stream.isatty():
            self.lines, self._last = stream, time.perf_counter()
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(file=stream),
        )
        self.task = self.bar.add_task(label, total=budget, completed=done, info="")
        self.bar.start()

    def update(self, seconds: float, info: str) -> None:
        """Move to ``seconds`` of the budget (redrawn at most twice a second; a plain line at most once a minute)."""
        self.done, self.info = seconds, info
        if self.lines is not None:
            if time.perf_counter() - self._last >= self._line_seconds:
                self._last = time.perf_counter()
                self._write_line()
            return
        if self.bar is None or time.perf_counter() - self._last < 0.5:
            return
        self._last = time.perf_counter()
        self.bar.update(self.task, completed=seconds, info=info)

    def _write_line(self) -> None:
        share = self.done / self.budget if self.budget else 1.0
        info = f" {self.info}" if self.info else ""
        self.lines.write(f"{self.label}: {share:.0%}{info}\n")
        self.lines.flush()

    def close(self) -> None:
        if self.lines is not None:
            self._write_line()
            self.lines = None
        if self.bar is not None:
            self.bar.stop()

"""One progress bar for long work (training and tuning budgets, statistics estimation): rich, throttled."""

from __future__ import annotations

import time

__all__ = ["BudgetProgress"]


class BudgetProgress:
    """A rich bar from ``done`` to ``budget`` (seconds, or any unit of work) with a status; silent when disabled."""

    def __init__(self, enabled: bool, label: str, budget: float, done: float = 0.0) -> None:
        self.bar = None
        self._last = 0.0
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()
        )
        self.task = self.bar.add_task(label, total=budget, completed=done, info="")
        self.bar.start()

    def update(self, seconds: float, info: str) -> None:
        """Move to ``seconds`` of the budget (redrawn at most twice a second)."""
        if self.bar is None or time.perf_counter() - self._last < 0.5:
            return
        self._last = time.perf_counter()
        self.bar.update(self.task, completed=seconds, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

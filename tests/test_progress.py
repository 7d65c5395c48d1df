"""The progress bar: a live bar on a terminal, plain throttled lines in a log, nothing when disabled."""

import io

from hasten.progress import BudgetProgress


def test_a_log_gets_plain_lines_at_most_once_per_interval_and_one_at_the_end(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("hasten.progress.time.perf_counter", lambda: now[0])
    log = io.StringIO()  # not a terminal, as under nohup
    bar = BudgetProgress(True, "prune", 1800.0, stream=log, line_seconds=60.0)
    for seconds in (10.0, 59.0):
        now[0] = 100.0 + seconds
        bar.update(seconds, "loss 0.1")
    assert log.getvalue() == ""  # under a minute: nothing yet
    now[0] = 100.0 + 600.0
    bar.update(600.0, "loss 0.05")
    now[0] += 1.0
    bar.update(601.0, "loss 0.04")  # throttled
    bar.close()
    assert log.getvalue() == "prune: 33% loss 0.05\nprune: 33% loss 0.04\n"


def test_disabled_is_silent():
    log = io.StringIO()
    bar = BudgetProgress(False, "prune", 10.0, stream=log, line_seconds=0.0)
    bar.update(5.0, "x")
    bar.close()
    assert log.getvalue() == ""

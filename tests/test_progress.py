"""Rank 0's progress display, in process: epoch, elapsed time and ETA; the rate counts
the steps this process took (not a resumed run's earlier ones)."""

from __future__ import annotations

import io
import logging

import pytest

from mpisplit import runlog
from mpisplit.runlog import Progress


def test_bar_shows_epoch_elapsed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 130.0, 160.0, 190.0])  # start, then three updates 30 s apart
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = Progress(300, "bar", 100, logging.getLogger("test"), stream, epochs=3)
    progress.update(100, 0.5)
    assert stream.getvalue().endswith(
        "100/300 epoch 1/3 loss 0.5000 3.3 steps/s 0:30 elapsed, ETA 1:00"
    )
    progress.update(101, None)  # not a display step
    progress.update(200, None)
    assert "200/300 epoch 2/3 3.3 steps/s 1:00 elapsed, ETA 0:30" in stream.getvalue()
    progress.update(300, None)
    assert stream.getvalue().endswith("epoch 3/3 3.3 steps/s 1:30 elapsed, ETA 0:00\n")


def test_lines_without_epochs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = iter([0.0, 4000.0])
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: next(clock))
    logger = logging.getLogger("test-progress")
    progress = Progress(20, "lines", 10, logger)
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.update(10, 1.25)
    assert caplog.messages == ["step 10/20 loss 1.2500 (0.0 steps/s, 1:06:40 elapsed, ETA 1:06:40)"]


@pytest.mark.parametrize(("done", "rate"), [(0, "15.0"), (100, "5.0")])
def test_rate_counts_only_the_steps_since_start(
    done: int, rate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([1000.0, 1010.0])
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    logger = logging.getLogger("test_progress")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    progress = runlog.Progress(300, "lines", 50, logger, done=done)
    progress.update(150, 0.5)  # 10 s after the start
    assert stream.getvalue().strip().startswith(f"step 150/300 loss 0.5000 ({rate} steps/s")

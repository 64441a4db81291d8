"""Rank 0's progress lines: the rate counts the steps this process took (not a resumed run's
earlier ones). In-process, no MPI."""

from __future__ import annotations

import io
import logging

import pytest

from mpisplit import runlog


@pytest.mark.parametrize(("done", "rate"), [(0, "15.0"), (100, "5.0")])
def test_rate_counts_only_the_steps_since_start(done: int, rate: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1000.0, 1010.0])
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    logger = logging.getLogger("test_progress")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    progress = runlog.Progress(300, "lines", 50, logger, done=done)
    progress.update(150, 0.5)  # 10 s after the start
    assert stream.getvalue().strip() == f"step 150/300 loss 0.5000 ({rate} steps/s)"

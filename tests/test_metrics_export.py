"""``mpisplit metrics``: a run's summary and metrics as CSV and TensorBoard scalars, from the
files the engine's own writers leave (in process, seconds)."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mpisplit.runlog import MetricsLog, write_summary

logging.getLogger("tensorboard").setLevel(logging.ERROR)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Two ranks' metrics and a summary, written by the engine's writers."""
    for rank in (0, 1):
        log = MetricsLog(tmp_path, rank, {"rank": rank, "role": "r"}, flush_every=1)
        for step in (1, 2, 3):
            log.write(
                {
                    "step": step,
                    "bytes_sent": 100 * step,
                    "bytes_received": 10 * step,
                    **({"loss": 1.0 / step} if rank == 0 else {}),
                }
            )
        log.write(
            {
                "event": "eval",
                "step": 3,
                "client": 0,
                "loss": 0.25,
                "accuracy": 0.9,
                "count": 10,
                "task": 0,
            }
        )
        log.close()
    write_summary(
        tmp_path, {"scheme": "vanilla", "test_accuracy": 0.9, "bytes_sent_by_rank": [600, 60]}
    )
    return tmp_path


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpisplit", "metrics", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_csv_of_summary_and_metrics(run_dir: Path, tmp_path: Path) -> None:
    result = _export(str(run_dir), "--out", str(tmp_path / "csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "csv" / "summary.csv") as file:
        summary = {row["key"]: row["value"] for row in csv.DictReader(file)}
    assert summary["test_accuracy"] == "0.9" and summary["bytes_sent_by_rank.1"] == "60"
    with open(tmp_path / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    steps = [row for row in rows if row["step"] and not row["event"]]
    assert [(row["rank"], row["step"], row["bytes_sent"]) for row in steps][:3] == [
        ("0", "1", "100"),
        ("0", "2", "200"),
        ("0", "3", "300"),
    ]
    assert len(steps) == 6 and sum(row["event"] == "eval" for row in rows) == 2


def test_tensorboard_scalars_per_rank(run_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _export(str(run_dir), "--tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb" / "rank0")).Reload()
    assert set(events.Tags()["scalars"]) == {
        "loss",
        "bytes_sent",
        "bytes_received",
        "step_time_s",
        "eval/client0/accuracy",
        "eval/client0/loss",
    }
    assert [(e.step, e.value) for e in events.Scalars("bytes_sent")] == [
        (1, 100),
        (2, 200),
        (3, 300),
    ]
    rank1 = EventAccumulator(str(tmp_path / "tb" / "rank1")).Reload()
    assert "loss" not in rank1.Tags()["scalars"]  # rank 1 computes no loss


def test_nothing_to_export_is_one_line(tmp_path: Path) -> None:
    for directory in (tmp_path, tmp_path / "missing"):
        result = _export(str(directory))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and str(directory) in result.stderr

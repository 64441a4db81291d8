"""Bad input and failing ranks end the whole job quickly with one clear message."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import run_mpi

CONFIG = "configs/vanilla-breast-cancer.yaml"
LIMIT_S = 30


def _timed(ranks: int, *args: str):
    start = time.monotonic()
    result = run_mpi(ranks, "train", CONFIG, "run.progress=none", *args, timeout=LIMIT_S + 30)
    return result, time.monotonic() - start


def test_bad_config_fails_on_every_rank_with_one_message(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, elapsed = _timed(4, f"data.path={data}", f"run.dir={tmp_path}", "train.lr=-1")
    assert result.returncode == 2
    assert result.stderr.count("train.lr: must be > 0") == 1
    assert elapsed < LIMIT_S
    assert not (tmp_path / "summary.json").exists()


def test_wrong_world_size_shows_the_arithmetic(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, elapsed = _timed(3, f"data.path={data}", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "1 server + 3 clients = 4 MPI ranks, but the job has 3" in result.stderr
    assert elapsed < LIMIT_S


def test_missing_dataset_is_reported_before_training(tmp_path: Path) -> None:
    result, _ = _timed(4, f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "mpisplit data prepare" in result.stderr


def test_rank_failing_mid_training_ends_the_job(dataset, tmp_path: Path) -> None:
    """A NaN deep inside client 1's shard makes that rank raise at that step."""
    data = tmp_path / "data"
    shutil.copytree(dataset("breast_cancer", clients=3), data)
    with h5py.File(data / "client-1.h5", "r+") as shard:
        shard["features"][100, 3] = np.nan
    result, elapsed = _timed(4, f"data.path={data}", f"run.dir={tmp_path / 'run'}",
                             "data.shuffle=false", "train.epochs=3")
    assert result.returncode != 0
    assert elapsed < LIMIT_S
    assert "rank 2 (client1)" in result.stderr and "failed: DataError" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()

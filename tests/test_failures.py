"""Bad input and failing ranks end the whole job quickly with one clear message."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, mpiexec, run_mpi

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_bad_input(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, elapsed = _timed(4, f"data.path={data}", f"run.dir={tmp_path}",
                             "transport.device=cuda")
    assert result.returncode == 2
    assert result.stderr.count("transport.device: cuda, but torch sees no CUDA device") == 1
    assert elapsed < LIMIT_S


def test_missing_dataset_is_reported_before_training(tmp_path: Path) -> None:
    result, _ = _timed(4, f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "mpisplit data prepare" in result.stderr


@pytest.mark.parametrize(("case", "message"), [
    ("vertical_scheme", "is a horizontal partition (iid: every client holds whole rows); "
                        "scheme vertical needs"),
    ("missing_test", "test.h5: shard file not found"),
])
def test_data_mismatch_is_one_line_before_launch(case: str, message: str, dataset,
                                                 tmp_path: Path) -> None:
    """Before: found after launch, printed by every rank (lines run together), never saying
    what was wrong with the dataset; a missing test.h5 was reported three times. (A vertical
    dataset given to vanilla: tests/test_fuzz.py.)"""
    data = dataset("breast_cancer", clients=3)
    if case == "missing_test":
        shutil.copytree(data, tmp_path / "data")
        data = tmp_path / "data"
        (data / "test.h5").unlink()
    config = "configs/vertical-breast-cancer.yaml" if case == "vertical_scheme" else CONFIG
    result = run_mpi(4, "train", config, "run.progress=none", f"data.path={data}",
                     f"run.dir={tmp_path / 'run'}", timeout=LIMIT_S + 30)
    assert result.returncode == 2, result.stderr[-1500:]
    assert result.stderr.count("mpisplit:") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "metrics-rank0.jsonl").exists()


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
    assert result.stderr.count("mpisplit:") == 1, result.stderr  # said once, by that rank
    assert not (tmp_path / "run" / "summary.json").exists()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["failure"]["rank"] == 2


@pytest.mark.parametrize("config", [CONFIG, "configs/ushaped-breast-cancer.yaml"])
def test_diverging_loss_stops_at_its_step(config: str, dataset, tmp_path: Path) -> None:
    """A learning rate of 1e30 makes the loss NaN within a few steps; whoever computes the
    loss (the server; the client in U-shaped) stops the job there, naming the step."""
    data = dataset("breast_cancer", clients=3)
    start = time.monotonic()
    result = run_mpi(4, "train", config, "run.progress=none", f"data.path={data}",
                     f"run.dir={tmp_path}", "train.lr=1e30", timeout=LIMIT_S + 30)
    assert result.returncode == 3
    assert time.monotonic() - start < LIMIT_S
    assert "failed: NonFiniteLoss: the loss is nan at step" in result.stderr, result.stderr[-1500:]
    assert not (tmp_path / "summary.json").exists()


def _start_long_run(dataset, run_dir: Path, *extra: str, config: str = CONFIG,
                    partition: str | None = None) -> subprocess.Popen:
    data = dataset("breast_cancer", clients=3, **({"partition": partition} if partition else {}))
    command = [mpiexec(), "-n", "4", sys.executable, "-m", "mpisplit", "train", config,
               f"data.path={data}", f"run.dir={run_dir}", "run.progress=none",
               "train.epochs=500", "run.log_every=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def _pid_once_training(run_dir: Path, rank: int, process: subprocess.Popen) -> int:
    """Waits until ``rank`` has trained a few steps and returns its process id."""
    metrics = run_dir / f"metrics-rank{rank}.jsonl"
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) > 5:
            return json.loads(lines[0])["pid"]
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"rank {rank} never started training: {process.communicate()[1][-2000:]}")


def _signal_rank_2_and_wait_for_the_end(process: subprocess.Popen, run_dir: Path,
                                        signum: int) -> str:
    """Sends ``signum`` to rank 2 once it trains; the job must fail within ``LIMIT_S``.
    Returns its stderr."""
    pid = _pid_once_training(run_dir, 2, process)
    try:
        os.kill(pid, signum)
        start = time.monotonic()
        _, stderr = process.communicate(timeout=LIMIT_S)
        elapsed = time.monotonic() - start
    finally:
        process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert process.returncode != 0
    assert elapsed < LIMIT_S
    return stderr


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_killed_or_stalled_client_ends_the_job(signal_name: str, dataset, tmp_path: Path) -> None:
    """SIGKILL: the launcher takes the job down. SIGSTOP (a stall): the server's deadline
    fires, names the silent peer, and the abort takes every rank down."""
    process = _start_long_run(dataset, tmp_path, "transport.timeout_s=3")
    stderr = _signal_rank_2_and_wait_for_the_end(process, tmp_path, getattr(signal, signal_name))
    if signal_name == "SIGSTOP":
        assert "rank 0 (server)" in stderr and "failed: PeerTimeout" in stderr, stderr[-1500:]
        assert "with rank 2 (client)" in stderr  # the silent one, named


def test_stalled_party_ends_a_vertical_job(dataset, tmp_path: Path) -> None:
    """Vertical steps are collectives: the others wait for the stalled party under the
    deadline instead of blocking in MPI, and the job ends."""
    process = _start_long_run(dataset, tmp_path, "transport.timeout_s=3",
                              config="configs/vertical-breast-cancer.yaml", partition="vertical")
    stderr = _signal_rank_2_and_wait_for_the_end(process, tmp_path, signal.SIGSTOP)
    assert "failed: PeerTimeout" in stderr and "in the cut exchange" in stderr, stderr[-1500:]


def test_preemption_signal_stops_every_rank_cleanly(dataset, tmp_path: Path) -> None:
    """Slurm's --signal reaches the launcher, which forwards it: every rank writes its
    metrics, rank 0 a summary marked preempted, and the job exits with status 4."""
    process = _start_long_run(dataset, tmp_path)
    try:
        _pid_once_training(tmp_path, 2, process)
        process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=LIMIT_S)
    finally:
        process.kill()
    assert process.returncode == 4, stderr[-2000:]
    assert stderr.count("stopped by SIGUSR1; metrics written") == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preempted"] and summary["signal"] == "SIGUSR1" and summary["steps"] > 0
    for rank in range(4):
        last = (tmp_path / f"metrics-rank{rank}.jsonl").read_text().splitlines()[-1]
        assert json.loads(last)["event"] == "preempted"

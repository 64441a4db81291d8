"""Bad input and failing ranks end the whole job quickly with one clear message.

Times are measured from the fault (the failing rank's line, the signal) to the job's end:
ranks that start slowly on a loaded machine are waited for by their progress (a metrics
file, a line), under the hard timeout of every MPI job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import MPIEXEC_TIMEOUT_S, ROOT, run_mpi, start_mpi

CONFIG = "configs/vanilla-breast-cancer.yaml"
LIMIT_S = 30
"""From the fault to the end of the job (measured: 1-4 s)."""
STALL_S = 8
"""The transport deadline of the stall tests: short, yet above the start-up skew between
ranks on a loaded machine (the server waits for the first cut activation under it)."""


def _timed(ranks: int, *args: str):
    start = time.monotonic()
    result = run_mpi(ranks, "train", CONFIG, "run.progress=none", *args)
    return result, time.monotonic() - start


def _run_to_failure(ranks: int, *args: str, config: str = CONFIG) -> tuple[int, str, float]:
    """Runs a job that should fail; returns its exit status, its stderr and the seconds from
    the first rank's failure line to the end of the job."""
    process = start_mpi(ranks, "train", config, "run.progress=none", *args)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), line) for line in process.stderr),
        daemon=True,
    )
    reader.start()
    try:
        process.wait(timeout=MPIEXEC_TIMEOUT_S)
    finally:
        process.kill()
    ended = time.monotonic()
    reader.join(timeout=10)
    stderr = "".join(line for _, line in lines)
    failed = [at for at, line in lines if " failed: " in line]
    assert failed, f"no rank reported a failure: {stderr[-2000:]}"
    return process.returncode, stderr, ended - failed[0]


def _no_clean_stop_recorded(run_dir: Path) -> None:
    """A failed run leaves no summary and no rank's metrics end in a pre-emption (Open MPI's
    abort reaches the surviving ranks as SIGTERM, the pre-emption signal)."""
    assert not (run_dir / "summary.json").exists()
    for metrics in run_dir.glob("metrics-rank*.jsonl"):
        assert '"event": "preempted"' not in metrics.read_text(), metrics.name


def test_bad_config_fails_on_every_rank_with_one_message(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, _ = _timed(4, f"data.path={data}", f"run.dir={tmp_path}", "train.lr=-1")
    assert result.returncode == 2
    assert result.stderr.count("train.lr: must be > 0") == 1
    assert not (tmp_path / "summary.json").exists()


def test_wrong_world_size_shows_the_arithmetic(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, _ = _timed(3, f"data.path={data}", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "1 server + 3 clients = 4 MPI ranks, but the job has 3" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_bad_input(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result, _ = _timed(4, f"data.path={data}", f"run.dir={tmp_path}", "transport.device=cuda")
    assert result.returncode == 2
    assert result.stderr.count("transport.device: cuda, but torch sees no CUDA device") == 1


def test_missing_dataset_is_reported_before_training(tmp_path: Path) -> None:
    result, _ = _timed(4, f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "mpisplit data prepare" in result.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "vertical_scheme",
            "is a horizontal partition (iid: every client holds whole rows); scheme vertical needs",
        ),
        ("missing_test", "test.h5: shard file not found"),
    ],
)
def test_data_mismatch_is_one_line_before_launch(
    case: str, message: str, dataset, tmp_path: Path
) -> None:
    """Before: found after launch, printed by every rank (lines run together), never saying
    what was wrong with the dataset; a missing test.h5 was reported three times. (A vertical
    dataset given to vanilla: tests/test_fuzz.py.)"""
    data = dataset("breast_cancer", clients=3)
    if case == "missing_test":
        shutil.copytree(data, tmp_path / "data")
        data = tmp_path / "data"
        (data / "test.h5").unlink()
    config = "configs/vertical-breast-cancer.yaml" if case == "vertical_scheme" else CONFIG
    result = run_mpi(
        4,
        "train",
        config,
        "run.progress=none",
        f"data.path={data}",
        f"run.dir={tmp_path / 'run'}",
        timeout=LIMIT_S + 30,
    )
    assert result.returncode == 2, result.stderr[-1500:]
    assert result.stderr.count("mpisplit:") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "metrics-rank0.jsonl").exists()


def test_rank_failing_mid_training_ends_the_job(dataset, tmp_path: Path) -> None:
    """A NaN deep inside client 1's shard makes that rank raise at that step."""
    data = tmp_path / "data"
    shutil.copytree(dataset("breast_cancer", clients=3), data)
    with h5py.File(data / "client-1.h5", "r+") as shard:
        shard["features"][100, 3] = np.nan
    status, stderr, elapsed = _run_to_failure(
        4,
        f"data.path={data}",
        f"run.dir={tmp_path / 'run'}",
        "data.shuffle=false",
        "train.epochs=3",
    )
    assert status not in (0, 4)
    assert elapsed < LIMIT_S
    assert "rank 2 (client1)" in stderr and "failed: DataError" in stderr
    assert stderr.count("failed:") == 1, stderr  # said once, by that rank
    _no_clean_stop_recorded(tmp_path / "run")
    state = json.loads((tmp_path / "run" / "status.json").read_text())
    assert state["state"] == "failed" and state["failure"]["rank"] == 2


@pytest.mark.parametrize("config", [CONFIG, "configs/ushaped-breast-cancer.yaml"])
def test_diverging_loss_stops_at_its_step(config: str, dataset, tmp_path: Path) -> None:
    """A learning rate of 1e30 makes the loss NaN within a few steps; whoever computes the
    loss (the server; the client in U-shaped) stops the job there, naming the step."""
    data = dataset("breast_cancer", clients=3)
    status, stderr, elapsed = _run_to_failure(
        4, f"data.path={data}", f"run.dir={tmp_path}", "train.lr=1e30", config=config
    )
    assert status == 3
    assert elapsed < LIMIT_S
    assert "failed: NonFiniteLoss: the loss is nan at step" in stderr, stderr[-1500:]
    _no_clean_stop_recorded(tmp_path)


def _start_long_run(
    dataset, run_dir: Path, *extra: str, config: str = CONFIG, partition: str | None = None
) -> subprocess.Popen:
    data = dataset("breast_cancer", clients=3, **({"partition": partition} if partition else {}))
    return start_mpi(
        4,
        "train",
        config,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        "train.epochs=500",
        "run.log_every=1",
        *extra,
    )


def _pid_once_training(run_dir: Path, rank: int, process: subprocess.Popen) -> int:
    """Waits until ``rank`` has trained a few steps (however long its start takes, up to
    the job's hard timeout) and returns its process id."""
    metrics = run_dir / f"metrics-rank{rank}.jsonl"
    deadline = time.monotonic() + MPIEXEC_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) > 5:
            return json.loads(lines[0])["pid"]
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"rank {rank} never started training: {process.communicate()[1][-2000:]}")


def _signal_rank_2_and_wait_for_the_end(
    process: subprocess.Popen, run_dir: Path, signum: int
) -> tuple[str, int]:
    """Sends ``signum`` to rank 2 once it trains; the job must fail within ``LIMIT_S``.
    Returns its stderr and rank 2's pid."""
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
    assert process.returncode not in (0, 4)
    assert elapsed < LIMIT_S
    _no_clean_stop_recorded(run_dir)
    return stderr, pid


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_killed_or_stalled_client_ends_the_job(signal_name: str, dataset, tmp_path: Path) -> None:
    """SIGKILL: the launcher takes the job down, and the rank's supervisor names it
    (mpisplit.supervise). SIGSTOP (a stall): the server's deadline fires, names the silent
    peer, and the abort takes every rank down."""
    process = _start_long_run(dataset, tmp_path, f"transport.timeout_s={STALL_S}")
    stderr, pid = _signal_rank_2_and_wait_for_the_end(
        process, tmp_path, getattr(signal, signal_name)
    )
    if signal_name == "SIGKILL":
        assert stderr.count("was killed by signal") == 1, stderr[-1500:]
        assert (
            f"mpisplit: rank 2 (client1, host {socket.gethostname()}, pid {pid}) "
            "was killed by signal 9 (SIGKILL)\n"
        ) in stderr, stderr[-1500:]
    if signal_name == "SIGSTOP":
        assert "rank 0 (server)" in stderr and "failed: PeerTimeout" in stderr, stderr[-1500:]
        assert "with rank 2 (client)" in stderr  # the silent one, named


def test_stalled_party_ends_a_vertical_job(dataset, tmp_path: Path) -> None:
    """Vertical steps are collectives: the others wait for the stalled party under the
    deadline instead of blocking in MPI, and the job ends."""
    process = _start_long_run(
        dataset,
        tmp_path,
        f"transport.timeout_s={STALL_S}",
        config="configs/vertical-breast-cancer.yaml",
        partition="vertical",
    )
    stderr, _ = _signal_rank_2_and_wait_for_the_end(process, tmp_path, signal.SIGSTOP)
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


STALLED_MPI = "import time\ntime.sleep(120)  # an MPI_Init whose launcher exchange never ends\n"


API_TRAIN = "import mpisplit\nmpisplit.train('configs/vanilla-breast-cancer.yaml')\n"


@pytest.mark.parametrize(
    "command",
    [["-m", "mpisplit", "train", "configs/vanilla-breast-cancer.yaml"], ["-c", API_TRAIN]],
    ids=["cli", "python-api"],
)
def test_a_rank_stuck_in_mpi_start_up_exits_at_its_deadline(
    tmp_path: Path, command: list[str]
) -> None:
    """``mpisplit train`` and ``mpisplit.train`` initialise MPI under
    ``MPISPLIT_START_TIMEOUT_S``: a rank whose start-up never finishes (here an
    ``mpi4py.MPI`` whose import blocks, as MPI_Init does when the PMI exchange stalls)
    prints where it waited and exits 1, so the launcher ends the job instead of hanging."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("")
    (tmp_path / "mpi4py" / "MPI.py").write_text(STALLED_MPI)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MPISPLIT_START_TIMEOUT_S": "2"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - start < 30
    assert "Timeout (0:00:02)" in done.stderr and "start_mpi" in done.stderr, done.stderr


def test_a_start_timeout_that_is_no_number_is_one_line() -> None:
    env = {**os.environ, "MPISPLIT_START_TIMEOUT_S": "soon"}
    done = subprocess.run(
        [sys.executable, "-m", "mpisplit", "train", "configs/vanilla-breast-cancer.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "MPISPLIT_START_TIMEOUT_S: expected seconds above 0, got 'soon'" in done.stderr

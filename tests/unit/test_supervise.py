"""The rank supervisor without MPI: a killed child named in one line, signals passed on once.

Each child writes a marker once its signal handlers are set; the tests wait for that marker
(never a fixed sleep), under a hard deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEADLINE_S = 60
CHILD = """
import os, signal, sys, time
from mpisplit import supervise
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
supervise.tell(5, "client4")
open(sys.argv[1], "w").write(str(os.getpid()))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a second copy of the signal would arrive in this time
open(sys.argv[1] + ".got", "w").write(str(len(got)))
supervise.exit_now(4)
"""


def _start(tmp_path: Path, *, tell: bool = True) -> tuple[subprocess.Popen[str], int]:
    """The supervisor and its child's pid, once the child is ready."""
    marker = tmp_path / "ready"
    source = CHILD if tell else CHILD.replace('supervise.tell(5, "client4")', "")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mpisplit.supervise",
            "--",
            sys.executable,
            "-c",
            source,
            str(marker),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PMI_RANK": "5"},
        start_new_session=True,
    )
    deadline = time.monotonic() + DEADLINE_S
    while not (marker.exists() and marker.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the child never started: {process.communicate()[1]}")
        time.sleep(0.05)
    return process, int(marker.read_text())


@pytest.mark.parametrize("tell", [True, False])
def test_a_killed_rank_is_named_once(tell: bool, tmp_path: Path) -> None:
    process, pid = _start(tmp_path, tell=tell)
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=DEADLINE_S)
    role = "client4" if tell else "role not known yet"
    assert process.returncode == 128 + signal.SIGKILL
    assert stderr == (
        f"mpisplit: rank 5 ({role}, host {socket.gethostname()}, pid {pid}) "
        f"was killed by signal 9 (SIGKILL)\n"
    )


@pytest.mark.parametrize("target", ["pid", "group"])
def test_a_signal_reaches_the_rank_once(target: str, tmp_path: Path) -> None:
    """Sent to the supervisor alone (hydra) or to its process group (a launcher that
    signals groups): the rank handles it once and its exit status passes through."""
    process, _ = _start(tmp_path)
    if target == "pid":
        process.send_signal(signal.SIGUSR1)
    else:
        os.killpg(process.pid, signal.SIGUSR1)
    _, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 4, stderr
    assert (tmp_path / "ready.got").read_text() == "1"
    assert stderr == ""


def test_a_rank_killed_by_a_forwarded_signal_is_not_reported(tmp_path: Path) -> None:
    """SIGTERM from the launcher (an abort) is the launcher's news, not the rank's."""
    process, _ = _start(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr == ""


def test_the_rank_dies_with_its_supervisor(tmp_path: Path) -> None:
    process, pid = _start(tmp_path)
    process.kill()
    process.wait(timeout=DEADLINE_S)
    deadline = time.monotonic() + DEADLINE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"

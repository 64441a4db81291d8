"""A rank's supervisor: says which rank a signal killed (``python -m mpisplit.supervise CMD``).

``mpiexec`` starts each rank through this small process (plain Python: no torch, no MPI),
which runs the real rank as its child and, when the child dies of a signal that nobody
asked the rank to take (``kill -9``, the OOM killer, a segfault), prints one line naming
rank, role, host and pid, and exits with 128 + the signal's number. The launcher alone only
prints its banner ("BAD TERMINATION ... signal 9"), naming no rank's role.

Signals stay exactly as they were for the rank: the child runs in its own process group, so
a launcher that signals the supervisor's group (or just its pid) reaches the child once, by
the forward; the child dies with the supervisor (``PR_SET_PDEATHSIG``), so an abort that
kills the supervisor never leaves a rank behind. A signal the supervisor forwarded (a
pre-emption's SIGUSR1/SIGTERM, an abort's SIGTERM, Ctrl-C) is the sender's news, not ours:
a child dying of it is not reported. The child inherits every file descriptor (hydra's
``PMI_FD``) and the environment (PMI, PMIx); on the pipe named in
``MPISPLIT_SUPERVISOR_FD`` it tells its role once topology is known (``tell``) and, when it
leaves without ``MPI_Finalize`` (a pre-emption), its exit status (``exit_now``).

Under ``srun`` ranks start without it: Slurm signals every process of a job step (the child
would get each signal twice) and already names the task and node of one that was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NoReturn

ROLE_FD = "MPISPLIT_SUPERVISOR_FD"
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGCONT,
    signal.SIGTSTP,
    signal.SIGXCPU,
)
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_PR_SET_PDEATHSIG = 1
_EXIT_WAIT_S = 5.0
_LINGER_S = 0.5


_pipe: int | None = None
"""The rank's end of the pipe to its supervisor, once ``tell`` has taken it."""


def tell(rank: int, role: str) -> None:
    """Called by the rank once it knows its role: hands (rank, role) to its supervisor, if
    it has one (a job started by ``mpisplit launch`` or the tests, not by hand)."""
    global _pipe
    fd = os.environ.pop(ROLE_FD, None)
    if fd is not None and _say(int(fd), f"role\t{rank}\t{role}"):
        _pipe = int(fd)


def exit_now(status: int) -> NoReturn:
    """``os._exit(status)`` for a rank that skips ``MPI_Finalize`` (a pre-emption).

    A rank whose PMI connection closes unfinalized makes hydra kill every other process of
    the job at once: a supervisor still waiting for its own rank's end would then leave with
    SIGKILL's status instead of ``status``. So the supervisor leaves first, with ``status``,
    and this rank keeps its PMI connection open ``_LINGER_S`` longer, while the other ranks'
    supervisors do the same."""
    parent = os.getppid()
    if _pipe is not None:
        _die_with_parent(False)
        if _say(_pipe, f"exit\t{status}"):
            deadline = time.monotonic() + _EXIT_WAIT_S
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(_LINGER_S)
    os._exit(status)


def _say(fd: int, message: str) -> bool:
    try:
        os.write(fd, f"{message}\n".encode())
    except (OSError, ValueError):
        return False  # not our pipe (a variable inherited from elsewhere)
    return True


def main(argv: list[str]) -> int:
    """Runs ``argv`` as the rank; returns its exit status (128 + N after signal N)."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.stderr.write("usage: python -m mpisplit.supervise COMMAND...\n")
        return 2
    forwarded: set[int] = set()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    # Signals wait until the child exists (blocked; the child unblocks them itself).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    for signum in FORWARDED:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored
            signal.signal(signum, forward)
    try:
        child = subprocess.Popen(
            argv,
            close_fds=False,
            process_group=0,
            env={**os.environ, ROLE_FD: str(write_end)},
            preexec_fn=_as_child(os.getpid()),
        )
    except OSError as err:
        sys.stderr.write(f"mpisplit: cannot start {argv[0]}: {err}\n")
        return 127
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.close(write_end)
    told = _Told(read_end)
    told.start()
    status = child.wait()
    if status < 0 and -status not in forwarded:
        _report(-status, child.pid, told.rank_and_role())
    return status if status >= 0 else 128 - status


class _Told(threading.Thread):
    """Reads the rank's messages: its role, and an exit status to leave with at once."""

    def __init__(self, read_end: int) -> None:
        super().__init__(daemon=True)
        self._read_end = read_end
        self.rank = next((os.environ[name] for name in _RANK_VARIABLES if name in os.environ), "?")
        self.role = ""

    def run(self) -> None:
        with os.fdopen(self._read_end, "rb") as pipe:
            for line in pipe:
                kind, *fields = line.decode(errors="replace").rstrip("\n").split("\t")
                if kind == "role" and len(fields) == 2:
                    self.rank, self.role = fields
                elif kind == "exit" and fields and fields[0].isdigit():
                    os._exit(int(fields[0]))

    def rank_and_role(self) -> tuple[str, str]:
        self.join(timeout=0.2)  # the rank's last words, if it wrote any
        return self.rank, self.role or "role not known yet"


def _as_child(parent: int):
    """In the child before exec: signals unblocked, death with the supervisor."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        _die_with_parent(True)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(128 + signal.SIGKILL)

    return setup


def _die_with_parent(die: bool) -> None:
    """SIGKILL when the parent process ends (``PR_SET_PDEATHSIG``, Linux), or no longer."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL) if die else 0)


def _report(signum: int, pid: int, told: tuple[str, str]) -> None:
    rank, role = told
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    sys.stderr.write(
        f"mpisplit: rank {rank} ({role}, host {socket.gethostname()}, pid {pid}) "
        f"was killed by signal {signum} ({name})\n"
    )
    sys.stderr.flush()


if __name__ == "__main__":
    # At once, with the rank: a launcher that sees one rank end kills the others, and a
    # supervisor still tidying up then would turn its rank's exit status into SIGKILL's.
    os._exit(main(sys.argv[1:]))

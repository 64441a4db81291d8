"""MPI start-up under a deadline.

``MPI_Init`` waits for the launcher's process-management exchange (PMI, PMIx). When that
exchange breaks -- a request garbled under load, a peer that never starts -- every rank
waits there forever, before any of mpisplit's own deadlines exists. ``start_mpi`` imports
mpi4py (which initialises MPI) under a watchdog that runs outside Python
(``faulthandler``: the blocked call holds the interpreter), so a rank that has not started
within ``MPISPLIT_START_TIMEOUT_S`` seconds (default 180) prints where it waits and exits
with status 1, and the launcher ends the job.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from types import ModuleType

from mpisplit.config import ConfigError

START_TIMEOUT = "MPISPLIT_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 180.0


def start_timeout_s() -> float:
    """The start-up deadline from ``MPISPLIT_START_TIMEOUT_S`` (``ConfigError`` when it is
    no number of seconds above 0)."""
    text = os.environ.get(START_TIMEOUT, str(DEFAULT_START_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ConfigError(f"{START_TIMEOUT}: expected seconds above 0, got {text!r}")
    return seconds


def _stderr_fd() -> int:
    """The descriptor the watchdog writes to: the process's standard error, also where
    ``sys.stderr`` is a Python object without one (a caller capturing output in-process)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 2


def start_mpi() -> ModuleType:
    """mpi4py's ``MPI`` module, MPI initialised within the start-up deadline (none where
    the caller has imported it already: MPI has started, and a watchdog of the caller's
    own stays as it is)."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"]
    timeout = start_timeout_s()
    faulthandler.dump_traceback_later(timeout, exit=True, file=_stderr_fd())
    try:
        from mpi4py import MPI
    finally:
        faulthandler.cancel_dump_traceback_later()
    return MPI

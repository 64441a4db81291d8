"""A failure on any rank ends the whole job quickly, with one clear message.

Expected errors (bad config or data, a stalled peer, a forbidden send) print one line naming
rank, host, role and cause; anything else prints its traceback first. Only the first rank to
fail says so (it claims the run directory's failed state; a rank failing after it stays
silent), in one write, so lines from several ranks never run together. Then the rank calls
``Abort`` on the job's communicator, which takes every other rank down with it: nobody is
left blocked in MPI waiting for a peer that will never answer. A job of one rank simply exits
with the same status.

Bad input found before launch is agreed on instead (``agree_on_input``): the lowest rank
that found a problem prints it, and every rank exits with status 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from mpi4py import MPI

from mpisplit import rundir
from mpisplit.config import ConfigError
from mpisplit.data import DataError
from mpisplit.transport import PeerTimeout, PolicyViolation

T = TypeVar("T")
EXIT_FAILURE = 3
EXIT_PREEMPTED = 4
_IO_GRACE_S = 0.3
"""Lets the launcher forward the failure line before Abort tears its I/O down."""
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops before it reaches any weights."""


def check_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Returns ``loss`` if finite; otherwise stops the run, naming the step."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLoss(
            f"the loss is {float(loss.detach())} at step {step}; stopped before "
            f"it reached any weights (lower train.lr, or check the data)"
        )
    return loss


EXPECTED = (ConfigError, DataError, PeerTimeout, PolicyViolation, NonFiniteLoss)


class Preempted(BaseException):
    """The scheduler asked this rank to stop (Slurm's ``--signal`` or a time limit);
    ``checkpoint`` is the step of the checkpoint committed on the way out, if any; ``clean``
    turns false when not every rank stopped with this one (a failure, not a pre-emption)."""

    def __init__(self, signum: int, checkpoint: int | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.checkpoint = checkpoint
        self.clean = True

    @property
    def exit_status(self) -> int:
        return EXIT_PREEMPTED if self.clean else EXIT_FAILURE


@contextlib.contextmanager
def preemptible(defer: Callable[[int], None] | None = None) -> Iterator[None]:
    """For the duration, SIGUSR1 and SIGTERM either raise ``Preempted`` in the main thread at
    once, so the run can write what it has and exit instead of being killed mid-write, or,
    with ``defer``, are handed to it (the checkpointer stops at its next checkpoint).

    When the body ends normally the training is over, and from then on, for the rest of the
    process, the two signals are ignored with one line: the rank only reports and exits, and
    dying of a late time-limit warning (Slurm's ``--signal``) would make a job script
    requeue a run that has finished."""

    def handler(signum: int, _frame: object) -> None:
        if defer is None:
            raise Preempted(signum)
        defer(signum)

    previous = {sig: signal.signal(sig, handler) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    except BaseException:
        for sig, old in previous.items():
            signal.signal(sig, old)
        raise
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _ignore_after_training)


@contextlib.contextmanager
def callers_signal_handlers() -> Iterator[None]:
    """The caller's SIGUSR1 and SIGTERM handlers back when the body ends: a script that
    calls ``mpisplit.train`` goes on after it, and decides itself what those signals do
    then (``preemptible`` leaves them ignored for the CLI, which only reports and exits)."""
    previous = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, not ours to restore
                signal.signal(sig, handler)


def _ignore_after_training(signum: int, _frame: object) -> None:
    logging.getLogger("mpisplit").warning(
        "%s after training had finished: ignored", signal.Signals(signum).name
    )


def say(line: str) -> None:
    """One ``mpisplit:`` line on stderr in a single write: with unbuffered output (as under
    many launchers) ``print`` writes the text and the newline separately, and lines from
    several ranks then run together."""
    sys.stderr.write(f"mpisplit: {line}\n")
    sys.stderr.flush()


def agree_on_input(comm: MPI.Comm, error: Exception | None) -> bool:
    """Collective, before any other traffic: whether every rank found its input sound. If
    not, the lowest rank that found a problem prints it (once, however many found it)."""
    failed = np.zeros(comm.Get_size(), np.int8)
    comm.Allgather(np.array([error is not None], np.int8), failed)
    if error is not None and int(np.argmax(failed)) == comm.Get_rank():
        say(str(error))
    return not failed.any()


def abort_on_failure(
    comm: MPI.Comm, label: str, body: Callable[[], T], run_dir: Path | None = None
) -> T:
    """Runs ``body``; on any exception reports it and aborts the job with exit status 3.
    With ``run_dir``, the first failing rank marks the run failed there and reports; a rank
    failing after it does not repeat the news."""
    try:
        return body()
    except Preempted:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure must end the whole job
        rank, host = comm.Get_rank(), socket.gethostname()
        cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        first = run_dir is None or rundir.mark_failed(
            run_dir, rank=rank, role=label, host=host, error=cause
        )
        if first:
            if not isinstance(err, EXPECTED):
                traceback.print_exc()
            say(f"rank {rank} ({label}) on {host} failed: {cause}")
        if comm.Get_size() == 1:
            raise SystemExit(EXIT_FAILURE) from None
        time.sleep(_IO_GRACE_S)
        comm.Abort(EXIT_FAILURE)
        os._exit(EXIT_FAILURE)  # Abort may return before the launcher kills this process

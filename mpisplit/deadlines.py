"""Waiting on MPI under a deadline: a stalled peer raises ``PeerTimeout`` naming it.

Every wait polls a nonblocking request (``Request.Test``, a matched probe) instead of
blocking inside MPI, so no rank can hang on another; the error says who was waited for, how
long and for what.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from mpi4py import MPI

T = TypeVar("T")

ANY_SOURCE = MPI.ANY_SOURCE
_TIGHT_POLLS = 200
"""Attempts made back to back before the first yield on a shared core (some tens of
microseconds): a reply that is microseconds away is seen at once, as MPI's own blocking
calls see it."""
_SPIN_S = 0.05
"""How long a wait polls without sleeping."""
_MAX_SLEEP_S = 1e-3


class PeerTimeout(RuntimeError):
    """A peer did not answer within the transport deadline."""

    def __init__(self, message: str, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.peers = tuple(peers)
        """The ranks waited on (one rank when the wait was for a message under way)."""


def poll(
    attempt: Callable[[], T],
    timeout_s: float | None,
    timed_out: Callable[[], Exception],
    clock: Callable[[], float] = time.monotonic,
    *,
    shared_cores: bool = True,
) -> T:
    """Polls ``attempt`` until it returns a true value (``Request.Test`` itself, so no Python
    frame per attempt, or a matched probe) and returns it; after ``timeout_s`` (None: never)
    raises ``timed_out()``. Never blocks inside MPI, so a stalled peer cannot hang the caller.

    For up to ``_SPIN_S`` seconds it polls without sleeping; then it sleeps up to 1 ms per
    poll. With ``shared_cores`` (more ranks than cores on the node) it yields the core
    between polls after the first ``_TIGHT_POLLS``, so the rank it waits for can run. Without,
    it polls back to back: a large message's copy needs the sender's progress calls too, and a
    yield (a system call) between them cost 5-8 % of the bandwidth at 1-4 MiB.
    """
    for _ in range(_TIGHT_POLLS):
        if result := attempt():
            return result
    start = clock()
    while not (result := attempt()):
        waited = clock() - start
        if waited < _SPIN_S:
            if shared_cores:
                os.sched_yield()
            continue
        if timeout_s is not None and waited > timeout_s:
            raise timed_out()
        time.sleep(_MAX_SLEEP_S)
    return result


def node_oversubscribed(comm: MPI.Comm) -> bool:
    """Whether the ranks of ``comm`` on this node outnumber the cores they may run on (the
    union of their affinity masks): then waiting ranks must share their cores. Collective;
    raw buffers, like every message of the transport."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = os.sched_getaffinity(0)
        cores = np.zeros(max(mine) + 1, np.uint8)
        cores[list(mine)] = 1
        width = np.array([cores.size])
        node.Allreduce(MPI.IN_PLACE, width, MPI.MAX)
        union = np.zeros(int(width[0]), np.uint8)
        union[: cores.size] = cores
        node.Allreduce(MPI.IN_PLACE, union, MPI.MAX)
        return node.Get_size() > int(union.sum())
    finally:
        node.Free()


class Deadlines:
    """The deadline of one rank's waits, and the errors that name who did not answer.

    ``before_block`` runs before any wait that may block (the send queue posts its staged
    sends then: a peer may need them before it can answer)."""

    def __init__(
        self,
        rank: int,
        roles: Sequence[str],
        timeout_s: float,
        before_block: Callable[[], None] = lambda: None,
        *,
        shared_cores: bool = True,
    ) -> None:
        self.rank = rank
        self.roles = tuple(roles)
        self.timeout_s = timeout_s
        self.before_block = before_block
        self.shared_cores = shared_cores
        """Whether this rank's node runs more ranks than cores (``node_oversubscribed``)."""

    def wait(
        self,
        attempt: Callable[[], T],
        peers: Sequence[int],
        label: str,
        what: str,
        bounded: bool = True,
    ) -> T:
        """Polls ``attempt`` under the deadline (``bounded=False``: none); on timeout raises
        the error naming ``peers`` and what was being done (``what`` ``label``)."""
        self.before_block()
        return poll(
            attempt,
            self.timeout_s if bounded else None,
            lambda: self.timed_out(peers, label, what),
            shared_cores=self.shared_cores,
        )

    def wait_all(self, requests: list[MPI.Request], peer: int, label: str, what: str) -> None:
        """Completes ``requests`` (one message's) under the deadline."""
        self.wait(lambda: MPI.Request.Testall(requests), [peer], label, what)

    def collective(
        self, request: MPI.Request | list[MPI.Request], what: str, bounded: bool = True
    ) -> None:
        """Completes a nonblocking collective (or its rounds) under the deadline."""
        requests = request if isinstance(request, list) else [request]
        attempt = (
            requests[0].Test if len(requests) == 1 else (lambda: MPI.Request.Testall(requests))
        )
        self.before_block()
        poll(
            attempt,
            self.timeout_s if bounded else None,
            lambda: PeerTimeout(
                f"{self.me} waited {self.timeout_s:g} s in the {what}: not "
                f"every rank arrived (transport.timeout_s)"
            ),
            shared_cores=self.shared_cores,
        )

    @property
    def me(self) -> str:
        return f"rank {self.rank} ({self.roles[self.rank]})"

    def timed_out(self, peers: Sequence[int], label: str, what: str) -> PeerTimeout:
        """The error for ``peers`` that did not answer within the deadline."""
        who = ", ".join(
            "any rank" if peer == ANY_SOURCE else f"rank {peer} ({self.roles[peer]})"
            for peer in peers
        )
        return PeerTimeout(
            f"{self.me} waited {self.timeout_s:g} s to {what} {label} with {who}: no answer "
            f"(transport.timeout_s)",
            peers,
        )

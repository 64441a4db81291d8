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

from mpi4py import MPI

T = TypeVar("T")

ANY_SOURCE = MPI.ANY_SOURCE
_TIGHT_POLLS = 200
"""Attempts made back to back before the first yield (some tens of microseconds): a reply
that is microseconds away is seen at once, as MPI's own blocking calls see it."""
_SPIN_S = 0.05
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
) -> T:
    """Polls ``attempt`` until it returns a true value (``Request.Test`` itself, so no Python
    frame per attempt, or a matched probe) and returns it; after ``timeout_s`` (None: never)
    raises ``timed_out()``. Never blocks inside MPI, so a stalled peer cannot hang the caller.

    The first ``_TIGHT_POLLS`` attempts run back to back; then, up to ``_SPIN_S`` seconds,
    with a yield between attempts (low latency, and oversubscribed ranks still get the
    core); longer waits sleep up to 1 ms per poll.
    """
    for _ in range(_TIGHT_POLLS):
        if result := attempt():
            return result
    start = clock()
    while not (result := attempt()):
        waited = clock() - start
        if waited < _SPIN_S:
            os.sched_yield()
            continue
        if timeout_s is not None and waited > timeout_s:
            raise timed_out()
        time.sleep(_MAX_SLEEP_S)
    return result


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
    ) -> None:
        self.rank = rank
        self.roles = tuple(roles)
        self.timeout_s = timeout_s
        self.before_block = before_block

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
            attempt, self.timeout_s if bounded else None, lambda: self.timed_out(peers, label, what)
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

"""Whether the clients a server waits for are still there: silence, and dropping."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpisplit.protocol import Kind
from mpisplit.transport import PeerTimeout, Transport


class SilenceWatch:
    """Parallel clients talk to the server all the time, so one that stays silent for
    ``limit_s`` while the others talk has stalled: a receive from any client would never
    time out while the others keep it busy."""

    CHECKS_PER_TIMEOUT = 4
    """The scan over all clients runs this often per limit, not per message."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.last: dict[int, float] = {}
        self.restart()

    def restart(self) -> None:
        self.last.clear()
        self.start = self.next_check = time.monotonic()

    def heard(self, source: int, feeders: Sequence[int]) -> list[int]:
        """Records a message from ``source``; returns the feeders silent for longer than
        the limit (empty between scans)."""
        now = time.monotonic()
        self.last[source] = now
        if now < self.next_check:
            return []
        self.next_check = now + self.limit_s / self.CHECKS_PER_TIMEOUT
        return [rank for rank in feeders if now - self.last.get(rank, self.start) > self.limit_s]


@dataclass
class Dropping:
    """A server that goes on without clients that fall silent (spatio-temporal sites).

    A client silent for ``after_s`` while others talk, or for ``transport.timeout_s`` when
    none talks, is handed to ``drop(rank)`` once and is no longer waited for; what it sends
    later is received and ignored (``dropped(rank)``). One that stops in the middle of what
    belongs together (a step's microbatches, a payload too large to travel eagerly) holds
    the server for ``transport.timeout_s`` before it is dropped and its step discarded; the
    other clients wait as long, so that can still end the job. Clients send so that the
    common cases cannot happen: labels before the activation, a hand-over's outputs in one
    message after its labels."""

    after_s: float
    drop: Callable[[int], None]
    dropped: Callable[[int], bool]


class Liveness:
    """A server's rule for clients that stop talking: it notices the silent ones
    (``SilenceWatch``, for parallel clients it hears directly) and, with ``dropping``, lets
    them go; without, a lost client ends the job with the transport's timeout."""

    def __init__(
        self, transport: Transport, dropping: Dropping | None, watch: SilenceWatch | None
    ) -> None:
        self.transport, self.dropping, self.watch = transport, dropping, watch

    @classmethod
    def of(cls, transport: Transport, dropping: Dropping | None, *, watched: bool) -> Liveness:
        """``watched``: the clients talk to this server directly and all the time."""
        limit = dropping.after_s if dropping else transport.timeout_s
        return cls(transport, dropping, SilenceWatch(limit) if watched else None)

    def silent(self, source: int, feeders: Sequence[int]) -> list[int]:
        """Records a message from ``source``; the feeders silent for too long."""
        return [] if self.watch is None else self.watch.heard(source, feeders)

    def restart(self) -> None:
        """The clients were busy elsewhere (a checkpoint), not stalled."""
        if self.watch is not None:
            self.watch.restart()

    def dropped(self, rank: int) -> bool:
        return self.dropping is not None and self.dropping.dropped(rank)

    def lose(self, ranks: Sequence[int], timeout: PeerTimeout | None = None) -> None:
        """``ranks`` stopped answering (``timeout``: the wait on them that ran out): dropped
        from the run, or, without ``dropping``, the end of the job."""
        if self.dropping is None:
            raise timeout or self.transport.timed_out(ranks, Kind.ACTIVATION, "receive")
        for rank in ranks:
            self.transport.abandon(rank)
            self.dropping.drop(rank)

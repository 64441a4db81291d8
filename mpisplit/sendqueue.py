"""Nonblocking sends in flight, owned by one queue: staged, detached, orphaned, completed.

A send is posted as MPI requests plus the memory MPI reads until they end. The queue keeps
that memory alive, posts staged device sends (copied to pinned host memory for an MPI that
cannot read the device) once their copy has ended and in the order they were staged, lets a
rank leave sends to complete in the background (``detach``/``flush``), and keeps the memory
of a send that timed out or whose receiver left (an orphan) until the transport closes, so a
peer that resumes later cannot make MPI touch freed memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial

import torch
from mpi4py import MPI

from mpisplit.codec import MessageBuffer
from mpisplit.deadlines import Deadlines, PeerTimeout
from mpisplit.protocol import Kind
from mpisplit.staging import PinnedStaging

PostPayload = Callable[[MessageBuffer, torch.Tensor, int, Kind], list[MPI.Request]]
"""Posts a packed header and its separate payload to a rank (the transport's)."""
Span = Callable[[str, Kind, int], AbstractContextManager[object]]
"""A trace span for one message phase (the transport's; free when tracing is off)."""


class PendingSend:
    """A nonblocking send in flight: holds its buffers until ``wait`` completes it.

    A staged send is posted to MPI only once its copy has ended: by ``done``, ``wait``, the
    queue's next send to the same rank, or any wait of the transport's."""

    def __init__(
        self,
        queue: SendQueue,
        requests: list[MPI.Request],
        keep: object,
        message: MessageBuffer | None,
        dest: int,
        kind: Kind,
        ready: torch.cuda.Event | None = None,
    ) -> None:
        self.queue = queue
        self.requests = requests
        self.keep = keep
        """The tensor whose memory MPI reads (alive until the send completes)."""
        self.message = message
        """The pooled header buffer, returned to the pool on completion."""
        self.dest = dest
        self.kind = kind
        self.ready = ready
        """The staging copy's event; set while the send is not yet posted to MPI."""
        self.pinned = ready is not None
        """Whether ``keep`` is a pinned staging buffer (given back once the send ends)."""

    def post_when_copied(self, *, block: bool) -> bool:
        """Posts a staged send once its copy has ended (waiting for it if ``block``);
        whether the send is posted. Only ``SendQueue.start_staged`` calls it, which keeps
        the order of the sends to one rank."""
        if self.ready is None:
            return True
        if not block and not self.ready.query():
            return False
        self.ready.synchronize()
        self.ready = None
        assert self.message is not None and isinstance(self.keep, torch.Tensor)
        self.requests = self.queue.post_payload(self.message, self.keep, self.dest, self.kind)
        return True

    def done(self) -> bool:
        """Whether the send has completed (completing it if so); never blocks."""
        if self.ready is not None:
            self.queue.start_staged()
            if self.ready is not None:
                return False
        if self.requests and MPI.Request.Testall(self.requests):
            self.wait()
        return not self.requests

    def wait(self) -> None:
        if self.ready is not None:
            self.queue.start_staged(self.dest)
        if self.requests:
            with self.queue.span("wait", self.kind, self.dest):
                self.queue.wait(
                    self.requests, self.dest, self.kind, "send", keep=(self.keep, self.message)
                )
            if self.pinned:
                self.queue.release_staged(self.keep)
            self.requests, self.keep = [], None
            if self.message is not None:
                self.queue.pool.append(self.message)
                self.message = None


class SendQueue:
    """The sends of one transport that have not completed, and the memory they hold."""

    def __init__(
        self,
        deadlines: Deadlines,
        staging: PinnedStaging | None,
        post_payload: PostPayload,
        span: Span,
    ) -> None:
        self.deadlines = deadlines
        self.staging = staging
        """Pinned host staging of device payloads, for an MPI that cannot read the device."""
        self.post_payload = post_payload
        self.span = span
        self.staged: list[PendingSend] = []
        """Staged sends not yet posted to MPI (their copy to host memory is under way)."""
        self.detached: list[PendingSend] = []
        """Sends left to complete in the background (``detach``)."""
        self.orphans: list[tuple[list[MPI.Request], object]] = []
        """Timed-out messages and their memory, kept until the transport closes."""
        self.pool: list[MessageBuffer] = []
        """Header buffers of completed nonblocking sends, reused by the next ones."""

    def message_buffer(self) -> MessageBuffer:
        """A header buffer no send is using."""
        return self.pool.pop() if self.pool else MessageBuffer()

    def pending(
        self,
        requests: list[MPI.Request],
        keep: object,
        message: MessageBuffer,
        dest: int,
        kind: Kind,
        ready: torch.cuda.Event | None,
    ) -> PendingSend:
        """A send just posted (or, with ``ready``, staged: posted once its copy ends)."""
        send = PendingSend(self, requests, keep, message, dest, kind, ready)
        if ready is not None:
            self.staged.append(send)
        return send

    def start_staged(self, dest: int | None = None, *, everything: bool = False) -> None:
        """Posts the staged sends whose copies have ended, waiting for the copies of those
        to ``dest`` (of all, if ``everything``: before this rank blocks, since a peer may
        need them to answer). In the order they were staged: their copies run on one
        stream, so a later one is never ready before an earlier one."""
        self.staged = [
            send
            for send in self.staged
            if not send.post_when_copied(block=everything or send.dest == dest)
        ]

    def before_block(self) -> None:
        """Posts every staged send (the rank is about to wait on a peer)."""
        if self.staged:
            self.start_staged(everything=True)

    def release_staged(self, host: object) -> None:
        assert self.staging is not None and isinstance(host, torch.Tensor)
        self.staging.release(host)

    def wait(
        self, requests: list[MPI.Request], peer: int, kind: Kind, what: str, *, keep: object = None
    ) -> None:
        """Waits for a message under way; if it times out, the requests and ``keep`` (the
        memory MPI still reads or writes) become orphans, alive until the transport closes."""
        try:
            self.deadlines.wait(partial(MPI.Request.Testall, requests), [peer], kind.name, what)
        except PeerTimeout:
            self.orphans.append((requests, keep))
            raise

    def detach(self, pending: Sequence[PendingSend]) -> None:
        """Leaves ``pending`` sends to complete in the background; ``flush`` ends them.
        Completed sends are dropped here, so only sends still in flight are held."""
        if self.staged:
            self.start_staged()
        self.detached = [send for send in self.detached if not send.done()]
        self.detached.extend(pending)

    def abandon(self, peer: int) -> None:
        """Stops waiting for the detached sends to ``peer``, a rank that left the run: they
        stay in flight with their memory, like timed-out messages, and ``flush`` skips them."""
        for send in self.detached:
            if send.dest == peer:
                self.orphans.append((send.requests, send))
        self.detached = [send for send in self.detached if send.dest != peer]
        self.staged = [send for send in self.staged if send.dest != peer]

    def flush(self) -> None:
        """Completes every detached send (under the deadline)."""
        for send in self.detached:
            send.wait()
        self.detached.clear()

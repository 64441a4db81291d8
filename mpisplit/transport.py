"""Tensor transport over MPI: the façade the schemes use for point-to-point messages.

It puts ``mpisplit.codec``'s messages on two communicators: the header (with a payload up to
``INLINE_LIMIT`` inline: one message, one latency) on a header communicator tagged with the
message kind, a larger payload as raw bytes on a second one, received straight into the
destination tensor (no copy), in parts below 2 GiB on an MPI library without large counts.
Shapes and dtypes may change from message to message; nothing on this path is pickled.
Waits run under ``mpisplit.deadlines`` (a stalled peer raises ``PeerTimeout`` naming it; a
header receive that times out is cancelled, so it cannot take a later message meant for the
next receive); sends in flight belong to ``mpisplit.sendqueue``.

Progress. No helper thread drives MPI: a large payload moves when the receiver posts its
receive (MPICH and Open MPI on shared memory copy it receiver-side, by CMA), and the
pipelined loops make MPI calls between microbatches anyway. A thread that poked MPI while
sends were in flight cost up to a quarter of the step time (GIL hand-offs in the middle of
every forward and backward), measured by ``tools/bench_training.py pipeline``.

Devices. A CUDA-aware MPI (``cuda_aware_mpi``) reads and writes device payloads directly;
otherwise they are staged through pinned host memory (``mpisplit.staging``): the copy to the
host runs on a side stream while the rank queues its next kernels, and the MPI send is posted
once it has ended; a received payload goes to the device by an asynchronous copy.

Policy. A transport built with ``allowed`` refuses any (sender role, receiver role, kind) the
scheme did not declare, so raw inputs or labels cannot leave a rank by accident.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpisplit.codec import (
    HEADER_BYTES,
    INLINE_LIMIT,
    PART_BYTES,
    CodecError,
    MessageBuffer,
    Round,
    buffer_parts,
    collective_rounds,
    default_part_bytes,
    pack_header,
    unpack_header,
)
from mpisplit.compression import Compressor
from mpisplit.deadlines import ANY_SOURCE, Deadlines, PeerTimeout, node_oversubscribed, poll
from mpisplit.mpilib import cuda_aware_mpi, large_counts, mpix_query_cuda_support
from mpisplit.protocol import Flag, Kind
from mpisplit.sendqueue import PendingSend, SendQueue
from mpisplit.staging import PinnedStaging
from mpisplit.tracing import Tracer

__all__ = [
    "ANY_SOURCE",
    "HEADER_BYTES",
    "INLINE_LIMIT",
    "PART_BYTES",
    "Kind",
    "Message",
    "PeerTimeout",
    "PendingSend",
    "PolicyViolation",
    "Traffic",
    "Transport",
    "cuda_aware_mpi",
    "large_counts",
    "mpix_query_cuda_support",
    "poll",
]

_MAX_PERSISTENT = 256
"""Persistent inline sends cached before the cache starts afresh (one per destination, kind
and inline size: a run uses a handful). Header receives need no cap: one per source and kind."""

_NO_SPAN = nullcontext()

_CUT_KINDS = (Kind.ACTIVATION, Kind.GRADIENT)
"""Kinds whose large payloads a device transport delivers on the device; the others (labels,
weights, control) arrive in host memory, where their users read them."""
# Every flag combination, built once: an ``IntFlag`` constructed per message would cost as
# much as the rest of a small receive.
_FLAGS = tuple(Flag(value) for value in range(2 * max(Flag)))


class PolicyViolation(RuntimeError):
    """A send the scheme does not allow (e.g. labels towards a server in U-shaped learning)."""


class Message(NamedTuple):
    tensor: torch.Tensor
    source: int
    kind: Kind
    step: int
    flags: Flag
    aux: int
    """Scheme-defined integer (e.g. the full batch size a microbatch belongs to)."""
    microbatch: int
    """Index of the microbatch within its step (0 when the batch is not split)."""
    client: int = 0
    """The logical client the sender sent for (``Transport.client``)."""


class Traffic:
    """Bytes (header included: what MPI really moves) per peer and kind.

    Counted in plain Python lists (``[peer][kind]``): a numpy element update costs several
    times as much, on the path of every message; the properties give numpy copies."""

    def __init__(self, size: int) -> None:
        self.sent = [[0] * (len(Kind) + 1) for _ in range(size)]
        self.received = [[0] * (len(Kind) + 1) for _ in range(size)]

    def count_sent(self, peer: int, kind: Kind, nbytes: int) -> None:
        self.sent[peer][kind] += nbytes

    def count_received(self, peer: int, kind: Kind, nbytes: int) -> None:
        self.received[peer][kind] += nbytes

    @property
    def sent_bytes(self) -> np.ndarray:
        return np.array(self.sent, np.int64)

    @property
    def recv_bytes(self) -> np.ndarray:
        return np.array(self.received, np.int64)

    def sent_routes(self) -> dict[int, dict[str, int]]:
        """Bytes sent per destination and kind (non-zero only): the evidence for audits."""
        return {
            peer: {Kind(kind).name: row[kind] for kind in Kind if row[kind]}
            for peer, row in enumerate(self.sent)
            if any(row)
        }

    @property
    def total_sent(self) -> int:
        return sum(map(sum, self.sent))

    @property
    def total_received(self) -> int:
        return sum(map(sum, self.received))


class Transport:
    """Point-to-point tensor messages among the ranks of one communicator."""

    def __init__(
        self,
        comm: MPI.Comm,
        *,
        roles: Sequence[str],
        timeout_s: float,
        tracer: Tracer,
        allowed: frozenset[tuple[str, str, Kind]] | None = None,
        device: torch.device | None = None,
        compressor: Compressor | None = None,
        part_bytes: int | None = None,
    ) -> None:
        """``part_bytes``: the largest payload one MPI message carries (larger payloads go as
        several); default ``PART_BYTES`` on an MPI library without large counts, else none."""
        self.part_bytes = part_bytes or default_part_bytes()
        self.device = device or torch.device("cpu")
        self.compressor = compressor or Compressor()
        """How cut activations and gradients are encoded on the wire (``mpisplit.cut``)."""
        self.cuda_aware = self.device.type == "cuda" and cuda_aware_mpi()
        self._headers = comm.Dup()
        self._payloads = comm.Dup()
        self.rank = comm.Get_rank()
        self.roles = tuple(roles)
        self.tracer = tracer
        self.allowed = allowed
        self.traffic = Traffic(comm.Get_size())
        # The counters, bound once: the per-message updates skip a lookup and a call.
        self._sent, self._received = self.traffic.sent, self.traffic.received
        self.deadlines = Deadlines(
            self.rank, self.roles, timeout_s, shared_cores=node_oversubscribed(comm)
        )
        staging = (
            PinnedStaging(self.device)
            if self.device.type == "cuda" and not self.cuda_aware
            else None
        )
        self.sends = SendQueue(self.deadlines, staging, self._post_payload, self._span)
        """Every send not yet completed, and the memory MPI still reads for it."""
        self.deadlines.before_block = self.sends.before_block
        self._send_buffer = MessageBuffer()
        self._recv_buffer = MessageBuffer()
        self._status = MPI.Status()
        self._inline_sends: dict[tuple[int, int, int], MPI.Prequest] = {}
        """Persistent sends of ``_send_buffer`` per (destination, kind, message size):
        starting one costs half of posting an ``Isend`` (no buffer or argument parsing)."""
        self._header_receives: dict[tuple[int, int], MPI.Prequest] = {}
        """Persistent header receives into ``_recv_buffer`` per (source, kind)."""
        self.client = 0
        """The logical client this rank sends for, carried in every header: a client rank
        that hosts several sets it before each one's turn (``scheme.clients_per_rank``)."""

    @property
    def timeout_s(self) -> float:
        """How long any wait lasts before its peer is declared stalled (transport.timeout_s)."""
        return self.deadlines.timeout_s

    def close(self) -> None:
        for request in self._header_receives.values():
            if not request.Test():  # still posted (a wait interrupted by a signal)
                request.Cancel()
                request.Wait()
        for request in [*self._inline_sends.values(), *self._header_receives.values()]:
            request.Free()
        self._headers.Free()
        self._payloads.Free()

    def send(
        self,
        tensor: torch.Tensor,
        dest: int,
        kind: Kind,
        *,
        step: int = 0,
        flags: Flag = Flag.NONE,
        aux: int = 0,
        microbatch: int = 0,
    ) -> None:
        """Sends ``tensor`` to ``dest``; returns once its buffer may be reused.

        The steady-state path (no tracing, a small host tensor) is one header message built
        in a reused buffer: no allocation, no torch-to-numpy conversion, and a persistent
        send started."""
        if self.tracer.enabled:
            with self._span(
                "send", kind, dest, tensor.nbytes, step, tensor.shape, tensor.dtype, microbatch
            ):
                self._send(tensor, dest, kind, step, flags, aux, microbatch)
        else:
            self._send(tensor, dest, kind, step, flags, aux, microbatch)

    def _send(
        self,
        tensor: torch.Tensor,
        dest: int,
        kind: Kind,
        step: int,
        flags: Flag,
        aux: int,
        microbatch: int,
    ) -> None:
        requests, keep, ready = self._post(
            tensor, dest, kind, step, flags, aux, microbatch, self._send_buffer
        )
        if ready is not None:  # a staged device payload: post it once its copy has ended
            ready.synchronize()
            requests = self._post_payload(self._send_buffer, keep, dest, kind)
        # An inline message is one request; ``Test`` costs a third of ``Testall`` on a list.
        if not (requests[0].Test() if len(requests) == 1 else MPI.Request.Testall(requests)):
            try:
                self.sends.wait(requests, dest, kind, "send", keep=(keep, self._send_buffer))
            except PeerTimeout:
                # The old buffer and its persistent sends are MPI's now (kept as orphans).
                self.sends.orphans.append((list(self._inline_sends.values()), self._send_buffer))
                self._send_buffer = MessageBuffer()
                self._inline_sends = {}
                raise
        if ready is not None:
            self.sends.release_staged(keep)

    def isend(
        self,
        tensor: torch.Tensor,
        dest: int,
        kind: Kind,
        *,
        step: int = 0,
        flags: Flag = Flag.NONE,
        aux: int = 0,
        microbatch: int = 0,
    ) -> PendingSend:
        """Starts sending ``tensor``; the caller overlaps work and calls ``wait`` later.

        The tensor must not be modified until then (the pending send keeps it alive)."""
        with self._span(
            "send", kind, dest, tensor.nbytes, step, tensor.shape, tensor.dtype, microbatch
        ):
            message = self.sends.message_buffer()
            requests, keep, ready = self._post(
                tensor, dest, kind, step, flags, aux, microbatch, message
            )
            return self.sends.pending(requests, keep, message, dest, kind, ready)

    def detach(self, pending: Sequence[PendingSend]) -> None:
        """Leaves ``pending`` sends to complete in the background; ``flush`` ends them.

        A rank that has nothing to wait for after a send (the server's cut gradients: the
        client takes them only after its remaining forwards) goes on computing instead of
        idling until the receiver is ready."""
        self.sends.detach(pending)

    def abandon(self, peer: int) -> None:
        """Stops waiting for the detached sends to ``peer``, a rank that left the run: they
        stay in flight with their memory, like timed-out messages, and ``flush`` skips them."""
        self.sends.abandon(peer)

    def flush(self) -> None:
        """Completes every detached send (under the deadline)."""
        self.sends.flush()

    def _post(
        self,
        tensor: torch.Tensor,
        dest: int,
        kind: Kind,
        step: int,
        flags: Flag,
        aux: int,
        microbatch: int,
        message: MessageBuffer,
    ) -> tuple[list[MPI.Request], object, torch.cuda.Event | None]:
        """Posts the header (with a small payload inline) and a large payload as
        nonblocking sends; returns the requests, what must stay alive until they end, and
        for a staged device payload the event of its copy (then nothing is posted yet: the
        caller posts it with ``_post_payload`` once the event has fired)."""
        if self.allowed is not None:
            self._check_policy(dest, kind)
        if self.sends.staged:  # messages to one rank leave in order: staged ones first
            self.sends.start_staged(dest)
        nbytes, inline = pack_header(
            message.view, tensor, kind, step, flags, aux, microbatch, self.client
        )
        if inline:
            keep = tensor if not tensor.is_cuda and tensor.is_contiguous() else _host(tensor)
            if nbytes:
                message.view[HEADER_BYTES : HEADER_BYTES + nbytes] = MPI.buffer.fromaddress(
                    keep.data_ptr(), nbytes
                )
            if message is self._send_buffer:
                request = self._inline_sends.get(
                    (dest, kind, HEADER_BYTES + nbytes)
                ) or self._inline_send(dest, kind, HEADER_BYTES + nbytes)
                request.Start()
            else:
                request = self._headers.Isend(
                    [message.array, HEADER_BYTES + nbytes, MPI.BYTE], dest, kind
                )
            requests = [request]
        elif self.sends.staging is not None and tensor.is_cuda:
            keep, ready = self.sends.staging.to_host(tensor)
            self._sent[dest][kind] += HEADER_BYTES + nbytes
            return [], keep, ready
        else:
            keep = _device_bytes(tensor) if self.cuda_aware else _host(tensor)
            requests = self._post_payload(message, keep, dest, kind)
        self._sent[dest][kind] += HEADER_BYTES + nbytes
        return requests, keep, None

    def _post_payload(
        self, message: MessageBuffer, payload: torch.Tensor, dest: int, kind: Kind
    ) -> list[MPI.Request]:
        """Posts a packed header and its separate payload (host memory, or device memory
        for a CUDA-aware MPI)."""
        header = self._headers.Isend([message.array, HEADER_BYTES, MPI.BYTE], dest, kind)
        return [
            header,
            *(
                self._payloads.Isend(part, dest, kind)
                for part in buffer_parts(payload, payload.nbytes, self.part_bytes)
            ),
        ]

    def _inline_send(self, dest: int, kind: Kind, size: int) -> MPI.Prequest:
        """A new persistent send of the first ``size`` bytes of ``_send_buffer``."""
        if len(self._inline_sends) >= _MAX_PERSISTENT:  # all inactive: sends complete
            for stale in self._inline_sends.values():
                stale.Free()
            self._inline_sends.clear()
        request = self._inline_sends[(dest, kind, size)] = self._headers.Send_init(
            [self._send_buffer.array, size, MPI.BYTE], dest, kind
        )
        return request

    def recv(
        self,
        kind: Kind,
        source: int = ANY_SOURCE,
        *,
        deadline: bool = True,
        out: torch.Tensor | None = None,
        senders: Sequence[int] = (),
    ) -> Message:
        """Receives the next ``kind`` message from ``source`` (any source by default).

        With ``deadline=False`` the wait is unbounded; use it only where another rank is
        already waiting on the same peer with a deadline (so a stall is still detected).
        ``out`` is a buffer to receive into when the message has its shape and dtype (the
        steady state of a fixed-shape exchange); otherwise a new tensor is allocated.
        ``senders`` names the ranks an any-source receive is waiting on, for the timeout error.
        On a device transport, large activations and gradients arrive on the device; small
        (inline) payloads and the other kinds arrive in host memory.

        (Long on purpose: the per-message path -- probe, header, payload, counters -- reads
        top to bottom in one body.)
        """
        status, waited, scratch = self._status, None, self._recv_buffer
        if source == ANY_SOURCE:
            # A matched probe, then its receive: MPICH posts an any-source receive to shared
            # memory and to the network, and across Slurm nodes a message was lost between
            # the two (the job hung). A probe takes exactly one message.
            probe = self._headers.Improbe(source, kind, status)
            if probe is None or self.tracer.enabled:  # one already here needs no wait
                with self._span("wait", kind, source) as waited:
                    if probe is None:
                        probe = self.deadlines.wait(
                            lambda: self._headers.Improbe(source, kind, status),
                            senders or [source],
                            kind.name,
                            "receive",
                            deadline,
                        )
            source = status.Get_source()
            probe.Recv(scratch.view)
        else:
            # Every header fits the scratch buffer: receiving straight into it costs two MPI
            # calls where a probe, its status and a matched receive cost four; the receive
            # is persistent (started, not posted anew: a third of the cost).
            request = self._header_receives.get((source, kind))
            if request is None:
                request = self._header_receives[(source, kind)] = self._headers.Recv_init(
                    scratch.view, source, kind
                )
            request.Start()
            arrived = request.Test(status)
            if not arrived or self.tracer.enabled:
                with self._span("wait", kind, source) as waited:
                    if not arrived:
                        self._await_header(request, status, [source], kind, deadline)
        try:
            _, dtype, shape, flags, step, nbytes, inline, aux, microbatch, client = unpack_header(
                scratch.view
            )
        except CodecError as err:
            raise RuntimeError(f"rank {self.rank}: {err} from rank {source}") from None
        if waited is not None:  # tracing: the wait span learns what it waited for
            waited.update(
                peer=source,
                bytes=nbytes,
                step=step,
                shape=list(shape),
                dtype=str(dtype).removeprefix("torch."),
                microbatch=microbatch,
                client=client,
            )
        tensor, staged = self._receive_buffer(kind, dtype, shape, nbytes, inline, out)
        if self.tracer.enabled:
            with self._span("recv", kind, source, nbytes, step, shape, dtype, microbatch, client):
                self._take_payload(tensor, source, kind, nbytes, inline)
        elif inline and nbytes:  # the common small message: one copy, no call
            MPI.buffer.fromaddress(tensor.data_ptr(), nbytes, False)[:] = scratch.view[
                HEADER_BYTES : HEADER_BYTES + nbytes
            ]
        else:
            self._take_payload(tensor, source, kind, nbytes, inline)
        if staged:
            tensor = self.sends.staging.to_device(tensor)
        self._received[source][kind] += HEADER_BYTES + nbytes
        # ``_make`` skips the generated ``__new__`` (a keyword-capable call: 0.2 us more)
        return Message._make((tensor, source, kind, step, _FLAGS[flags], aux, microbatch, client))

    def _receive_buffer(
        self,
        kind: Kind,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        nbytes: int,
        inline: int,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """Where a payload goes, and whether it is staged (then it goes on to the device
        once it has arrived)."""
        on_device = not inline and kind in _CUT_KINDS
        if self.cuda_aware and on_device:  # straight into device memory
            return torch.empty(shape, dtype=dtype, device=self.device), False
        staging = self.sends.staging
        if on_device and staging is not None:  # pinned memory, then an asynchronous copy
            return staging.host_buffer(nbytes).view(dtype).view(shape), True
        if (
            out is not None
            and out.dtype is dtype
            and out.shape == shape
            and not out.is_cuda
            and out.is_contiguous()
        ):
            return out, False
        return torch.empty(shape, dtype=dtype), False

    def _take_payload(
        self, tensor: torch.Tensor, source: int, kind: Kind, nbytes: int, inline: int
    ) -> None:
        """Fills ``tensor`` with the payload of the header just received: from the scratch
        buffer when it came inline, else by receiving the payload message into it."""
        if inline:
            if nbytes:
                MPI.buffer.fromaddress(tensor.data_ptr(), nbytes, False)[:] = (
                    self._recv_buffer.view[HEADER_BYTES : HEADER_BYTES + nbytes]
                )
        else:
            target = _device_bytes(tensor) if tensor.is_cuda else tensor
            requests = [
                self._payloads.Irecv(part, source, kind)
                for part in buffer_parts(target, nbytes, self.part_bytes)
            ]
            if not MPI.Request.Testall(requests):
                self.sends.wait(requests, source, kind, "receive", keep=tensor)

    def _await_header(
        self,
        request: MPI.Request,
        status: MPI.Status,
        peers: Sequence[int],
        kind: Kind,
        deadline: bool,
    ) -> None:
        """Waits for a posted header receive; on timeout it is cancelled, unless the message
        arrived meanwhile (then it is taken: nothing is lost for a caller that goes on)."""
        try:
            self.deadlines.wait(
                partial(request.Test, status), peers, kind.name, "receive", deadline
            )
        except PeerTimeout:
            request.Cancel()
            request.Wait(status)
            if status.Is_cancelled():
                raise

    def _span(
        self,
        what: str,
        kind: Kind,
        peer: int,
        nbytes: int = 0,
        step: int = 0,
        shape: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        microbatch: int = 0,
        client: int | None = None,
    ) -> AbstractContextManager[object]:
        """A trace span for one message phase (its tag is the kind) and the logical client it
        belongs to (a send's: ``client``); free when tracing is off."""
        if not self.tracer.enabled:
            return _NO_SPAN
        category = "wait" if what == "wait" else "comm"
        return self.tracer.span(
            f"{what} {kind.name.lower()}",
            category,
            peer=peer,
            bytes=nbytes,
            step=step,
            shape=list(shape),
            kind=kind.name,
            tag=int(kind),
            dtype=str(dtype).removeprefix("torch."),
            microbatch=microbatch,
            client=self.client if client is None else client,
        )

    def _check_policy(self, dest: int, kind: Kind) -> None:
        if self.allowed is None:
            return
        route = (self.roles[self.rank], self.roles[dest], kind)
        if route not in self.allowed:
            raise PolicyViolation(
                f"rank {self.rank} ({route[0]}) may not send {kind.name} to rank {dest} "
                f"({route[1]}) under this scheme"
            )

    def barrier(self) -> None:
        """Every rank of the communicator meets here, under the transport deadline (a
        blocking ``Barrier`` would hang on a stalled rank)."""
        self.complete(self._headers.Ibarrier(), "barrier")

    def complete(
        self,
        request: MPI.Request | list[MPI.Request],
        what: str,
        *,
        deadline: bool = True,
        kind: Kind = Kind.CONTROL,
        sent: int = 0,
        received: int = 0,
        step: int = 0,
    ) -> None:
        """Completes a nonblocking collective (or the requests of its rounds), under the
        deadline unless ``deadline=False`` (a blocking collective would hang every rank on
        one stalled rank).

        ``sent`` and ``received`` are the bytes this rank contributes to and gets from the
        collective (its buffers, not the MPI library's wire traffic, which depends on its
        algorithm); with ``kind`` and ``step`` they label the trace span."""
        span = (
            self.tracer.span(
                f"collective {what}",
                "collective",
                kind=kind.name,
                tag=int(kind),
                bytes_sent=sent,
                bytes_received=received,
                step=step,
            )
            if self.tracer.enabled
            else _NO_SPAN
        )
        with span:
            self.deadlines.collective(request, what, deadline)

    def iallreduce(
        self, comm: MPI.Comm, buffer: np.ndarray, op: MPI.Op = MPI.SUM
    ) -> list[MPI.Request]:
        """Posts an in-place Allreduce of ``buffer`` (1-D, contiguous) over ``comm``, in
        rounds below ``part_bytes`` on an MPI without large counts; ``complete`` ends it."""
        return [
            comm.Iallreduce(MPI.IN_PLACE, buffer[r.start : r.start + r.size], op)
            for r in collective_rounds([buffer.size], [0], buffer.itemsize, self.part_bytes)
        ]

    def igatherv(
        self,
        comm: MPI.Comm,
        part: np.ndarray,
        out: np.ndarray | None,
        counts: Sequence[int],
        displs: Sequence[int],
        root: int,
    ) -> list[MPI.Request]:
        """Posts a Gatherv of every rank's ``part`` (``counts[rank]`` elements) into the
        root's ``out`` at ``displs`` (``out`` None elsewhere), in rounds as ``iallreduce``.
        Every rank passes the whole layout (it tells each its piece of every round)."""
        rounds = collective_rounds(counts, displs, part.itemsize, self.part_bytes)
        rank, kind = comm.Get_rank(), from_numpy_dtype(part.dtype)
        return [
            comm.Igatherv(
                part[r.pieces[rank][0] : r.pieces[rank][0] + r.pieces[rank][1]],
                _window(out, r, kind) if out is not None else None,
                root,
            )
            for r in rounds
        ]

    def iscatterv(
        self,
        comm: MPI.Comm,
        whole: np.ndarray | None,
        part: np.ndarray,
        counts: Sequence[int],
        displs: Sequence[int],
        root: int,
    ) -> list[MPI.Request]:
        """Posts a Scatterv of the root's ``whole`` (None elsewhere) at ``displs`` into every
        rank's ``part`` (``counts[rank]`` elements), in rounds as ``iallreduce``."""
        rounds = collective_rounds(counts, displs, part.itemsize, self.part_bytes)
        rank, kind = comm.Get_rank(), from_numpy_dtype(part.dtype)
        return [
            comm.Iscatterv(
                _window(whole, r, kind) if whole is not None else None,
                part[r.pieces[rank][0] : r.pieces[rank][0] + r.pieces[rank][1]],
                root,
            )
            for r in rounds
        ]

    def timed_out(self, peers: Sequence[int], kind: Kind, what: str) -> PeerTimeout:
        """The error for ``peers`` that did not answer within the deadline."""
        return self.deadlines.timed_out(peers, kind.name, what)


def _window(buffer: np.ndarray, round_: Round, kind: MPI.Datatype) -> list:
    """The root's buffer specification of one round of a Gatherv or Scatterv."""
    return [
        buffer[round_.start : round_.start + round_.size],
        [n for _, n, _ in round_.pieces],
        [d for _, _, d in round_.pieces],
        kind,
    ]


def _device_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's bytes for a CUDA-aware MPI (which reads them through the CUDA array
    interface); the stream is synchronised first so MPI never sees unfinished kernels."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    torch.cuda.current_stream(tensor.device).synchronize()
    return flat


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s memory, contiguous and on the host; copies only if it is on a device or
    strided (MPI reads the memory: the autograd graph does not matter, and a ``detach``
    costs a microsecond on every message)."""
    if tensor.is_cuda:
        tensor = tensor.detach().to("cpu")
    return tensor if tensor.is_contiguous() else tensor.detach().contiguous()

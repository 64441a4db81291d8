"""Tensor transport over MPI: raw buffers, self-describing headers, deadlines, a send policy.

Wire format. Every message starts with a 16-word int64 header (kind, dtype, shape, step,
flags, payload size) sent on a dedicated header communicator, tagged with the message kind.
Payloads up to ``INLINE_LIMIT`` bytes travel inside the header message (one message, one
latency); larger payloads follow as one raw message on a second communicator, received
straight into the destination tensor (no copy). Shapes and dtypes may change from message to
message without pickling; nothing on this path is ever pickled. An MPI library without large
counts (MPI < 4: counts are C ints, so one message carries less than 2 GiB) gets a larger
payload as consecutive messages of at most ``part_bytes`` each (MPI keeps their order).

Progress. No helper thread drives MPI: a large payload moves when the receiver posts its
receive (MPICH and Open MPI on shared memory copy it receiver-side, by CMA), and the
pipelined loops make MPI calls between microbatches anyway. A thread that poked MPI while
sends were in flight cost up to a quarter of the step time (GIL hand-offs in the middle of
every forward and backward), measured by ``tools/bench_training.py pipeline``.

Devices. A CUDA-aware MPI (``cuda_aware_mpi``) reads and writes device payloads directly;
otherwise they are staged through pinned host memory (``mpisplit.staging``): the copy to the
host runs on a side stream while the rank queues its next kernels, and the MPI send is posted
once it has ended; a received payload goes to the device by an asynchronous copy.

Deadlines. Every wait polls a nonblocking request against a deadline, so a peer that stalls
raises ``PeerTimeout`` naming it instead of hanging the job; a header receive that times out
is cancelled, so it cannot take a later message meant for the next receive.

Policy. A transport built with ``allowed`` refuses any (sender role, receiver role, kind) the
scheme did not declare, so raw inputs or labels cannot leave a rank by accident.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from mpi4py import MPI

from mpisplit.compression import Compressor
from mpisplit.protocol import Flag, Kind
from mpisplit.staging import PinnedStaging
from mpisplit.tracing import Tracer

ANY_SOURCE = MPI.ANY_SOURCE
HEADER_WORDS = 16
HEADER_BYTES = HEADER_WORDS * 8
_META_WORDS = 10
MAX_DIMS = HEADER_WORDS - _META_WORDS
INLINE_LIMIT = 16 * 1024
"""Above it two messages (header, then the payload straight into the tensor) beat copying the
payload through the header buffer at each end: 64 KiB one-way 15.4 vs 20.8 us on 2 cores."""
_MAGIC = 0x5EC7
_TIGHT_POLLS = 200
"""Attempts made back to back before the first yield (some tens of microseconds): a reply
that is microseconds away is seen at once, as MPI's own blocking calls see it."""
_MAX_PERSISTENT = 256
"""Persistent inline sends cached before the cache starts afresh (one per destination, kind
and inline size: a run uses a handful). Header receives need no cap: one per source and kind."""
PART_BYTES = 2**30
"""Largest payload message on an MPI library without large counts (below 2**31 - 1)."""
_SPIN_S = 0.05
_MAX_SLEEP_S = 1e-3

T = TypeVar("T")
_NO_SPAN = nullcontext()

_CUT_KINDS = (Kind.ACTIVATION, Kind.GRADIENT)
"""Kinds whose large payloads a device transport delivers on the device; the others (labels,
weights, control) arrive in host memory, where their users read them."""

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
)
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_META = struct.Struct(f"={_META_WORDS}q")
_SHAPE = tuple(struct.Struct(f"={ndim}q") for ndim in range(MAX_DIMS + 1))
"""The header read in two unpacks, its meta words then the shape (no slicing of tuples)."""
_HEADER = tuple(struct.Struct(f"={_META_WORDS + ndim}q") for ndim in range(MAX_DIMS + 1))
"""The whole header (meta words, then the shape) per number of dimensions: one pack."""
# Every flag combination, built once: an ``IntFlag`` constructed per message would cost as
# much as the rest of a small receive.
_FLAGS = tuple(Flag(value) for value in range(2 * max(Flag)))


class PeerTimeout(RuntimeError):
    """A peer did not answer within the transport deadline."""

    def __init__(self, message: str, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.peers = tuple(peers)
        """The ranks waited on (one rank when the wait was for a message under way)."""


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


class PendingSend:
    """A nonblocking send in flight: holds its buffers until ``wait`` completes it.

    A staged send (a device tensor copied to pinned host memory for an MPI that cannot read
    the device) is posted to MPI only once its copy has ended: by ``done``, ``wait``, the
    transport's next send to the same rank, or any wait of the transport's."""

    def __init__(self, transport: Transport, requests: list[MPI.Request], keep: object,
                 message: _MessageBuffer | None, dest: int, kind: Kind,
                 ready: torch.cuda.Event | None = None) -> None:
        self._transport = transport
        self._requests = requests
        self._keep = keep
        """The tensor whose memory MPI reads (alive until the send completes)."""
        self._message = message
        """The pooled header buffer, returned to the pool on completion."""
        self._dest = dest
        self._kind = kind
        self._ready = ready
        """The staging copy's event; set while the send is not yet posted to MPI."""
        self._pinned = ready is not None
        """Whether ``keep`` is a pinned staging buffer (given back once the send ends)."""

    def post_when_copied(self, *, block: bool) -> bool:
        """Posts a staged send once its copy has ended (waiting for it if ``block``);
        whether the send is posted. Only ``Transport._start_staged`` calls it, which keeps
        the order of the sends to one rank."""
        if self._ready is None:
            return True
        if not block and not self._ready.query():
            return False
        self._ready.synchronize()
        self._ready = None
        assert self._message is not None and isinstance(self._keep, torch.Tensor)
        self._requests = self._transport._post_payload(self._message, self._keep, self._dest,
                                                       self._kind)
        return True

    def done(self) -> bool:
        """Whether the send has completed (completing it if so); never blocks."""
        if self._ready is not None:
            self._transport._start_staged()
            if self._ready is not None:
                return False
        if self._requests and MPI.Request.Testall(self._requests):
            self.wait()
        return not self._requests

    def wait(self) -> None:
        if self._ready is not None:
            self._transport._start_staged(self._dest)
        if self._requests:
            with self._transport._span("wait", self._kind, self._dest):
                self._transport._wait_request(self._requests, self._dest, self._kind, "send",
                                              keep=(self._keep, self._message))
            if self._pinned:
                self._transport._release_staged(self._keep)
            self._requests, self._keep = [], None
            if self._message is not None:
                self._transport._pool.append(self._message)
                self._message = None


class _MessageBuffer:
    """A reusable header (+ inline payload) buffer and a memoryview of it, for copies."""

    __slots__ = ("array", "view")

    def __init__(self, size: int) -> None:
        self.array = np.empty(size, np.uint8)
        self.view = memoryview(self.array)
        """Slices of it take or give an inline payload in one C-level copy."""


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
        return {peer: {Kind(kind).name: row[kind] for kind in Kind if row[kind]}
                for peer, row in enumerate(self.sent) if any(row)}

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
        self.part_bytes = part_bytes or (None if large_counts() else PART_BYTES)
        self.device = device or torch.device("cpu")
        self.compressor = compressor or Compressor()
        """How cut activations and gradients are encoded on the wire (``mpisplit.cut``)."""
        self.cuda_aware = self.device.type == "cuda" and cuda_aware_mpi()
        self._staging = (PinnedStaging(self.device)
                         if self.device.type == "cuda" and not self.cuda_aware else None)
        """Pinned host staging of device payloads, for an MPI that cannot read the device."""
        self._staged: list[PendingSend] = []
        """Staged sends not yet posted to MPI (their copy to host memory is under way)."""
        self._headers = comm.Dup()
        self._payloads = comm.Dup()
        self.rank = comm.Get_rank()
        self.roles = tuple(roles)
        self.timeout_s = timeout_s
        self.tracer = tracer
        self.allowed = allowed
        self.traffic = Traffic(comm.Get_size())
        # The counters, bound once: the per-message updates skip a lookup and a call.
        self._sent, self._received = self.traffic.sent, self.traffic.received
        self._message_size = HEADER_BYTES + INLINE_LIMIT
        self._send_buffer = _MessageBuffer(self._message_size)
        self._recv_buffer = _MessageBuffer(self._message_size)
        self._pool: list[_MessageBuffer] = []
        """Header buffers of completed nonblocking sends, reused by the next ones."""
        self._orphans: list[tuple[list[MPI.Request], object]] = []
        """Timed-out messages and their memory, kept until the transport closes."""
        self._detached: list[PendingSend] = []
        """Sends left to complete in the background (``detach``)."""
        self._status = MPI.Status()
        self._inline_sends: dict[tuple[int, int, int], MPI.Prequest] = {}
        """Persistent sends of ``_send_buffer`` per (destination, kind, message size):
        starting one costs half of posting an ``Isend`` (no buffer or argument parsing)."""
        self._header_receives: dict[tuple[int, int], MPI.Prequest] = {}
        """Persistent header receives into ``_recv_buffer`` per (source, kind)."""

    def close(self) -> None:
        for request in self._header_receives.values():
            if not request.Test():  # still posted (a wait interrupted by a signal)
                request.Cancel()
                request.Wait()
        for request in [*self._inline_sends.values(), *self._header_receives.values()]:
            request.Free()
        self._headers.Free()
        self._payloads.Free()

    def send(self, tensor: torch.Tensor, dest: int, kind: Kind, *, step: int = 0,
             flags: Flag = Flag.NONE, aux: int = 0, microbatch: int = 0) -> None:
        """Sends ``tensor`` to ``dest``; returns once its buffer may be reused.

        The steady-state path (no tracing, a small host tensor) is one header message built
        in a reused buffer: no allocation, no torch-to-numpy conversion, and a persistent
        send started."""
        if self.tracer.enabled:
            with self._span("send", kind, dest, tensor.nbytes, step, tensor.shape,
                            tensor.dtype, microbatch):
                self._send(tensor, dest, kind, step, flags, aux, microbatch)
        else:
            self._send(tensor, dest, kind, step, flags, aux, microbatch)

    def _send(self, tensor: torch.Tensor, dest: int, kind: Kind, step: int, flags: Flag,
              aux: int, microbatch: int) -> None:
        requests, keep, ready = self._post(tensor, dest, kind, step, flags, aux, microbatch,
                                           self._send_buffer)
        if ready is not None:  # a staged device payload: post it once its copy has ended
            ready.synchronize()
            requests = self._post_payload(self._send_buffer, keep, dest, kind)
        # An inline message is one request; ``Test`` costs a third of ``Testall`` on a list.
        if not (requests[0].Test() if len(requests) == 1 else MPI.Request.Testall(requests)):
            try:
                self._wait_request(requests, dest, kind, "send",
                                   keep=(keep, self._send_buffer))
            except PeerTimeout:
                # The old buffer and its persistent sends are MPI's now (kept as orphans).
                self._orphans.append((list(self._inline_sends.values()), self._send_buffer))
                self._send_buffer = _MessageBuffer(self._message_size)
                self._inline_sends = {}
                raise
        if ready is not None:
            self._release_staged(keep)

    def isend(self, tensor: torch.Tensor, dest: int, kind: Kind, *, step: int = 0,
              flags: Flag = Flag.NONE, aux: int = 0, microbatch: int = 0) -> PendingSend:
        """Starts sending ``tensor``; the caller overlaps work and calls ``wait`` later.

        The tensor must not be modified until then (the pending send keeps it alive)."""
        with self._span("send", kind, dest, tensor.nbytes, step, tensor.shape, tensor.dtype,
                        microbatch):
            message = self._pool.pop() if self._pool else _MessageBuffer(self._message_size)
            requests, keep, ready = self._post(tensor, dest, kind, step, flags, aux,
                                               microbatch, message)
            pending = PendingSend(self, requests, keep, message, dest, kind, ready)
            if ready is not None:
                self._staged.append(pending)
            return pending

    def detach(self, pending: Sequence[PendingSend]) -> None:
        """Leaves ``pending`` sends to complete in the background; ``flush`` ends them.

        A rank that has nothing to wait for after a send (the server's cut gradients: the
        client takes them only after its remaining forwards) goes on computing instead of
        idling until the receiver is ready. Completed sends are dropped here, so only
        sends still in flight are held."""
        if self._staged:
            self._start_staged()
        self._detached = [send for send in self._detached if not send.done()]
        self._detached.extend(pending)

    def abandon(self, peer: int) -> None:
        """Stops waiting for the detached sends to ``peer``, a rank that left the run: they
        stay in flight with their memory, like timed-out messages, and ``flush`` skips them."""
        for send in self._detached:
            if send._dest == peer:
                self._orphans.append((send._requests, send))
        self._detached = [send for send in self._detached if send._dest != peer]
        self._staged = [send for send in self._staged if send._dest != peer]

    def flush(self) -> None:
        """Completes every detached send (under the deadline)."""
        for send in self._detached:
            send.wait()
        self._detached.clear()

    def _post(self, tensor: torch.Tensor, dest: int, kind: Kind, step: int, flags: Flag,
              aux: int, microbatch: int,
              message: _MessageBuffer
              ) -> tuple[list[MPI.Request], object, torch.cuda.Event | None]:
        """Posts the header (with a small payload inline) and a large payload as
        nonblocking sends; returns the requests, what must stay alive until they end, and
        for a staged device payload the event of its copy (then nothing is posted yet: the
        caller posts it with ``_post_payload`` once the event has fired)."""
        if self.allowed is not None:
            self._check_policy(dest, kind)
        if self._staged:  # messages to one rank leave in order: staged ones first
            self._start_staged(dest)
        ndim = tensor.dim()
        if ndim > MAX_DIMS:
            raise ValueError(f"transport: tensors of at most {MAX_DIMS} dimensions, got "
                             f"shape {tuple(tensor.shape)}")
        nbytes = tensor.nbytes
        inline = nbytes <= INLINE_LIMIT
        buffer = message.array
        _HEADER[ndim].pack_into(message.view, 0, _MAGIC, kind, _DTYPE_CODE[tensor.dtype], ndim,
                                flags, step, nbytes, inline, aux, microbatch, *tensor.shape)
        if inline:
            keep = tensor if not tensor.is_cuda and tensor.is_contiguous() else _host(tensor)
            if nbytes:
                message.view[HEADER_BYTES:HEADER_BYTES + nbytes] = \
                    MPI.buffer.fromaddress(keep.data_ptr(), nbytes)
            if message is self._send_buffer:
                request = (self._inline_sends.get((dest, kind, HEADER_BYTES + nbytes))
                           or self._inline_send(dest, kind, HEADER_BYTES + nbytes))
                request.Start()
            else:
                request = self._headers.Isend([buffer, HEADER_BYTES + nbytes, MPI.BYTE], dest,
                                              kind)
            requests = [request]
        elif self._staging is not None and tensor.is_cuda:
            keep, ready = self._staging.to_host(tensor)
            self._sent[dest][kind] += HEADER_BYTES + nbytes
            return [], keep, ready
        else:
            keep = _device_bytes(tensor) if self.cuda_aware else _host(tensor)
            requests = self._post_payload(message, keep, dest, kind)
        self._sent[dest][kind] += HEADER_BYTES + nbytes
        return requests, keep, None

    def _post_payload(self, message: _MessageBuffer, payload: torch.Tensor, dest: int,
                      kind: Kind) -> list[MPI.Request]:
        """Posts a packed header and its separate payload (host memory, or device memory
        for a CUDA-aware MPI)."""
        header = self._headers.Isend([message.array, HEADER_BYTES, MPI.BYTE], dest, kind)
        return [header, *(self._payloads.Isend(part, dest, kind)
                          for part in self._parts(payload, payload.nbytes))]

    def _parts(self, data: torch.Tensor, nbytes: int) -> list[list]:
        """MPI buffer specifications covering the ``nbytes`` of contiguous ``data`` (host
        memory, or device memory for a CUDA-aware MPI): one, or several of ``part_bytes``
        at most."""
        limit = self.part_bytes or nbytes
        spans = [(at, min(limit, nbytes - at)) for at in range(0, nbytes, limit)]
        if data.is_cuda:  # read through the CUDA array interface
            flat = data.reshape(-1).view(torch.uint8)
            return [[flat[at:at + size], size, MPI.BYTE] for at, size in spans]
        address = data.data_ptr()
        return [[MPI.buffer.fromaddress(address + at, size), size, MPI.BYTE]
                for at, size in spans]

    def _start_staged(self, dest: int | None = None, *, everything: bool = False) -> None:
        """Posts the staged sends whose copies have ended, waiting for the copies of those
        to ``dest`` (of all, if ``everything``: before this rank blocks, since a peer may
        need them to answer). In the order they were staged: their copies run on one
        stream, so a later one is never ready before an earlier one."""
        self._staged = [send for send in self._staged if not send.post_when_copied(
            block=everything or send._dest == dest)]

    def _release_staged(self, host: object) -> None:
        assert self._staging is not None and isinstance(host, torch.Tensor)
        self._staging.release(host)

    def _inline_send(self, dest: int, kind: Kind, size: int) -> MPI.Prequest:
        """A new persistent send of the first ``size`` bytes of ``_send_buffer``."""
        if len(self._inline_sends) >= _MAX_PERSISTENT:  # all inactive: sends complete
            for stale in self._inline_sends.values():
                stale.Free()
            self._inline_sends.clear()
        request = self._inline_sends[(dest, kind, size)] = self._headers.Send_init(
            [self._send_buffer.array, size, MPI.BYTE], dest, kind)
        return request

    def recv(self, kind: Kind, source: int = ANY_SOURCE, *, deadline: bool = True,
             out: torch.Tensor | None = None, senders: Sequence[int] = ()) -> Message:
        """Receives the next ``kind`` message from ``source`` (any source by default).

        With ``deadline=False`` the wait is unbounded; use it only where another rank is
        already waiting on the same peer with a deadline (so a stall is still detected).
        ``out`` is a buffer to receive into when the message has its shape and dtype (the
        steady state of a fixed-shape exchange); otherwise a new tensor is allocated.
        ``senders`` names the ranks an any-source receive is waiting on, for the timeout error.
        On a device transport, large activations and gradients arrive on the device; small
        (inline) payloads and the other kinds arrive in host memory.
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
                        probe = self._poll(lambda: self._headers.Improbe(source, kind, status),
                                           senders or [source], kind, "receive", deadline)
            source = status.Get_source()
            probe.Recv(scratch.view)
        else:
            # Every header fits the scratch buffer: receiving straight into it costs two MPI
            # calls where a probe, its status and a matched receive cost four; the receive
            # is persistent (started, not posted anew: a third of the cost).
            request = self._header_receives.get((source, kind))
            if request is None:
                request = self._header_receives[(source, kind)] = self._headers.Recv_init(
                    scratch.view, source, kind)
            request.Start()
            arrived = request.Test(status)
            if not arrived or self.tracer.enabled:
                with self._span("wait", kind, source) as waited:
                    if not arrived:
                        self._await_header(request, status, [source], kind, deadline)
        magic, _kind, dtype_code, ndim, flags, step, nbytes, inline, aux, microbatch = \
            _META.unpack_from(scratch.view)
        if magic != _MAGIC:
            raise RuntimeError(f"rank {self.rank}: corrupt message header from rank {source}")
        shape = _SHAPE[ndim].unpack_from(scratch.view, _META.size)
        dtype = _DTYPES[dtype_code]
        if waited is not None:  # tracing: the wait span learns what it waited for
            waited.update(peer=source, bytes=nbytes, step=step, shape=list(shape),
                          dtype=str(dtype).removeprefix("torch."), microbatch=microbatch)
        on_device = not inline and kind in _CUT_KINDS
        staged = on_device and self._staging is not None
        if self.cuda_aware and on_device:  # straight into device memory
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        elif staged:  # into pinned memory, then an asynchronous copy to the device
            tensor = self._staging.host_buffer(nbytes).view(dtype).view(shape)
        elif (out is not None and out.dtype is dtype and out.shape == shape
              and not out.is_cuda and out.is_contiguous()):
            tensor = out
        else:
            tensor = torch.empty(shape, dtype=dtype)
        if self.tracer.enabled:
            with self._span("recv", kind, source, nbytes, step, shape, dtype, microbatch):
                self._take_payload(tensor, source, kind, nbytes, inline)
        elif inline and nbytes:  # the common small message: one copy, no call
            MPI.buffer.fromaddress(tensor.data_ptr(), nbytes, False)[:] = \
                scratch.view[HEADER_BYTES:HEADER_BYTES + nbytes]
        else:
            self._take_payload(tensor, source, kind, nbytes, inline)
        if staged:
            tensor = self._staging.to_device(tensor)
        self._received[source][kind] += HEADER_BYTES + nbytes
        # ``_make`` skips the generated ``__new__`` (a keyword-capable call: 0.2 us more)
        return Message._make((tensor, source, kind, step, _FLAGS[flags], aux, microbatch))

    def _take_payload(self, tensor: torch.Tensor, source: int, kind: Kind, nbytes: int,
                      inline: int) -> None:
        """Fills ``tensor`` with the payload of the header just received: from the scratch
        buffer when it came inline, else by receiving the payload message into it."""
        if inline:
            if nbytes:
                MPI.buffer.fromaddress(tensor.data_ptr(), nbytes, False)[:] = \
                    self._recv_buffer.view[HEADER_BYTES:HEADER_BYTES + nbytes]
        else:
            target = _device_bytes(tensor) if tensor.is_cuda else tensor
            requests = [self._payloads.Irecv(part, source, kind)
                        for part in self._parts(target, nbytes)]
            if not MPI.Request.Testall(requests):
                self._wait_request(requests, source, kind, "receive", keep=tensor)

    def _await_header(self, request: MPI.Request, status: MPI.Status, peers: Sequence[int],
                      kind: Kind, deadline: bool) -> None:
        """Waits for a posted header receive; on timeout it is cancelled, unless the message
        arrived meanwhile (then it is taken: nothing is lost for a caller that goes on)."""
        try:
            self._poll(partial(request.Test, status), peers, kind, "receive",
                       deadline)
        except PeerTimeout:
            request.Cancel()
            request.Wait(status)
            if status.Is_cancelled():
                raise

    def _span(self, what: str, kind: Kind, peer: int, nbytes: int = 0, step: int = 0,
              shape: Sequence[int] = (), dtype: torch.dtype | None = None,
              microbatch: int = 0) -> AbstractContextManager[object]:
        """A trace span for one message phase (its tag is the kind); free when tracing is off."""
        if not self.tracer.enabled:
            return _NO_SPAN
        category = "wait" if what == "wait" else "comm"
        return self.tracer.span(f"{what} {kind.name.lower()}", category, peer=peer,
                                bytes=nbytes, step=step, shape=list(shape), kind=kind.name,
                                tag=int(kind), dtype=str(dtype).removeprefix("torch."),
                                microbatch=microbatch)

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

    def complete(self, request: MPI.Request, what: str, *, deadline: bool = True,
                 kind: Kind = Kind.CONTROL, sent: int = 0, received: int = 0,
                 step: int = 0) -> None:
        """Completes a nonblocking collective, under the deadline unless ``deadline=False``
        (a blocking collective would hang every rank on one stalled rank).

        ``sent`` and ``received`` are the bytes this rank contributes to and gets from the
        collective (its buffers, not the MPI library's wire traffic, which depends on its
        algorithm); with ``kind`` and ``step`` they label the trace span."""
        def timed_out() -> PeerTimeout:
            return PeerTimeout(f"rank {self.rank} ({self.roles[self.rank]}) waited "
                               f"{self.timeout_s:g} s in the {what}: not every rank arrived "
                               f"(transport.timeout_s)")

        if self._staged:  # about to block: a peer may need them before it can answer
            self._start_staged(everything=True)
        span = (self.tracer.span(f"collective {what}", "collective", kind=kind.name,
                                 tag=int(kind), bytes_sent=sent, bytes_received=received,
                                 step=step)
                if self.tracer.enabled else _NO_SPAN)
        with span:
            poll(request.Test, self.timeout_s if deadline else None,
                 timed_out)

    def _wait_request(self, requests: MPI.Request | list[MPI.Request], peer: int, kind: Kind,
                      what: str, *, keep: object = None) -> None:
        """Waits for a message under way; if it times out, the requests and ``keep`` (the
        memory MPI still reads or writes) stay alive with the transport, so a peer that
        resumes later cannot make MPI touch freed memory."""
        pending = requests if isinstance(requests, list) else [requests]
        try:
            self._poll(partial(MPI.Request.Testall, pending), [peer], kind,
                       what, True)
        except PeerTimeout:
            self._orphans.append((pending, keep))
            raise

    def _poll(self, attempt: Callable[[], T], peers: Sequence[int], kind: Kind,
              what: str, deadline: bool) -> T:
        if self._staged:  # about to block: a peer may need them before it can answer
            self._start_staged(everything=True)
        return poll(attempt, self.timeout_s if deadline else None,
                    lambda: self.timed_out(peers, kind, what))

    def timed_out(self, peers: Sequence[int], kind: Kind, what: str) -> PeerTimeout:
        """The error for ``peers`` that did not answer within the deadline."""
        who = ", ".join("any rank" if peer == ANY_SOURCE else
                        f"rank {peer} ({self.roles[peer]})" for peer in peers)
        return PeerTimeout(
            f"rank {self.rank} ({self.roles[self.rank]}) waited {self.timeout_s:g} s "
            f"to {what} {kind.name} with {who}: no answer (transport.timeout_s)", peers)


def poll(attempt: Callable[[], T], timeout_s: float | None,
         timed_out: Callable[[], Exception]) -> T:
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
    start = time.monotonic()
    while not (result := attempt()):
        waited = time.monotonic() - start
        if waited < _SPIN_S:
            os.sched_yield()
            continue
        if timeout_s is not None and waited > timeout_s:
            raise timed_out()
        time.sleep(_MAX_SLEEP_S)
    return result


def _device_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's bytes for a CUDA-aware MPI (which reads them through the CUDA array
    interface); the stream is synchronised first so MPI never sees unfinished kernels."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    torch.cuda.current_stream(tensor.device).synchronize()
    return flat


def large_counts() -> bool:
    """Whether one MPI message may carry 2 GiB or more (MPI 4's large-count calls, which
    mpi4py uses where the library has them; Open MPI 5.0 reports MPI 3.1)."""
    return MPI.Get_version() >= (4, 0)


def cuda_aware_mpi() -> bool:
    """Whether the MPI library can read and write CUDA device memory.

    ``MPISPLIT_CUDA_AWARE=1`` or ``0`` decides where the library cannot be asked; otherwise
    the library's ``MPIX_Query_cuda_support`` (Open MPI, MPICH) is asked, and a library
    without it stages through host memory (always correct, slower)."""
    forced = os.environ.get("MPISPLIT_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    query = mpix_query_cuda_support()
    return query is not None and bool(query())


def mpix_query_cuda_support() -> Callable[[], int] | None:
    """The loaded MPI library's ``MPIX_Query_cuda_support``, if it has one.

    mpi4py loads libmpi without making its symbols global, so the process-wide lookup
    (``CDLL(None)``) never finds it: the library is opened again by the path it was loaded
    from (the same handle; found in ``/proc/self/maps`` on Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "/libmpi" in line and ".so" in line})
    except OSError:
        paths = []
    for library in [*(ctypes.CDLL(path) for path in paths), ctypes.CDLL(None)]:
        query = getattr(library, "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return query
    return None


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in contiguous host memory; copies only if it is on a device or strided."""
    host = tensor.detach()
    if host.is_cuda:
        host = host.to("cpu")
    return host if host.is_contiguous() else host.contiguous()

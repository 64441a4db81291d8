"""The cut layer as collectives, wired into autograd like ``mpisplit.cut``'s point-to-point pair.

Several parties send one server their cut outputs for the same samples (vertical split
learning). On a communicator of the server (its root) and the parties, one ``Igatherv``
brings every party's cut output to the server and one ``Iscatterv`` returns each party its
slice of the gradient; a compressed cut (``transport.compression``) takes one collective per
wire part of the transport's compressor, so both cuts travel in the same encoding.

Party: ``cut.send_forward(sent)`` posts the gather and returns an *anchor*; ``.backward()``
on it completes the gather, receives this party's gradient slice and continues back-
propagation through the party's layers. Server: ``cut.receive(batch)`` posts the gather;
``.wait()`` on what it returns gives the parties' cut outputs, in training as leaves whose
gradient goes back in one scatter when back-propagation reaches them; ``cut.flush()``
completes those scatters. Collectives must be posted in the same order on every rank, so
both sides post in the order of the same schedule's actions.

The bytes each rank contributes or gets are counted in the transport's traffic as ACTIVATION
and GRADIENT routes, so the summary and ``mpisplit audit`` see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpisplit.transport import Kind, Transport

ROOT = 0
"""The server's rank in the cut's communicator (the root of every collective)."""


@dataclass(frozen=True)
class _Part:
    """One wire part of one party's encoded cut tensor (``Compressor.encode``)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


@dataclass
class _Posted:
    """A posted collective and its buffer (which must live until it completes)."""

    transport: Transport
    request: list[MPI.Request]
    """The collective's rounds (one where the MPI library takes large counts)."""
    buffer: np.ndarray
    kind: Kind
    sent: int = 0
    received: int = 0

    def wait(self) -> np.ndarray:
        self.transport.complete(
            self.request, "cut exchange", kind=self.kind, sent=self.sent, received=self.received
        )
        return self.buffer


class CollectiveCut:
    """One cut between a server and its parties; see the module docstring.

    ``shapes``: each party's per-sample cut-output shape (party p is rank p + 1 of ``comm``);
    ``server`` and ``parties``: their ranks in the transport (for the traffic counters)."""

    def __init__(
        self,
        transport: Transport,
        comm: MPI.Comm,
        shapes: Sequence[tuple[int, ...]],
        server: int,
        parties: Sequence[int],
        *,
        device: torch.device | None = None,
    ) -> None:
        self.transport, self.comm = transport, comm
        self.shapes, self.server, self.parties = [tuple(s) for s in shapes], server, parties
        self.device = device
        self._scatters: list[_Posted] = []
        self._layouts: dict[tuple[int, int], tuple[_Part, ...]] = {}

    # --- the wire layout: parts and byte counts, from the compressor on the meta device ---

    def _parts(self, party: int, batch: int) -> tuple[_Part, ...]:
        """The wire parts of ``batch`` samples from ``party``: encoded on the meta device,
        so every rank knows every size without a message."""
        if (party, batch) not in self._layouts:
            encoded = self.transport.compressor.encode(
                torch.zeros((batch, *self.shapes[party]), device="meta")
            )
            self._layouts[party, batch] = tuple(
                _Part(part.dtype, tuple(part.shape)) for part in encoded
            )
        return self._layouts[party, batch]

    def _counts(self, part: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Bytes per rank of ``comm`` (the root's own: 0) and their displacements."""
        counts = np.array(
            [0] + [self._parts(p, batch)[part].nbytes for p in range(len(self.shapes))], np.int64
        )
        return counts, np.concatenate([[0], np.cumsum(counts)[:-1]])

    def _encode(self, tensor: torch.Tensor) -> list[np.ndarray]:
        return [
            part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            for part in self.transport.compressor.encode(tensor.detach())
        ]

    def _decode(
        self, buffers: Sequence[np.ndarray], party: int, batch: int, offsets: Sequence[int]
    ) -> torch.Tensor:
        parts = []
        for buffer, offset, part in zip(buffers, offsets, self._parts(party, batch), strict=True):
            raw = torch.from_numpy(buffer[offset : offset + part.nbytes])
            parts.append(raw.view(part.dtype).reshape(part.shape))
        return self.transport.compressor.decode(parts).reshape(batch, *self.shapes[party])

    def _count(self, sent: bool, kind: Kind, nbytes: Sequence[int]) -> None:
        count = self.transport.traffic.count_sent if sent else self.transport.traffic.count_received
        for party, n in zip(self.parties, nbytes, strict=True):
            count(party, kind, int(n))

    # --- party ---------------------------------------------------------------------------

    def send_forward(self, sent: torch.Tensor) -> torch.Tensor:
        """Posts this party's cut output (already defended) and returns the anchor whose
        ``.backward()`` brings its gradient slice back through the party's layers."""
        return _GatherActivation.apply(sent, self)

    def send_eval(self, sent: torch.Tensor) -> None:
        """Forward-only (evaluation): the gather, completed; no gradient comes back."""
        for posted in self._post_gather(sent):
            posted.wait()

    def _post_gather(self, sent: torch.Tensor) -> list[_Posted]:
        buffers = self._encode(sent)
        total = sum(buffer.nbytes for buffer in buffers)
        self.transport.traffic.count_sent(self.server, Kind.ACTIVATION, total)
        return [
            _Posted(
                self.transport,
                self.transport.igatherv(
                    self.comm, buffer, None, *self._counts(part, len(sent)), ROOT
                ),
                buffer,
                Kind.ACTIVATION,
                sent=buffer.nbytes,
            )
            for part, buffer in enumerate(buffers)
        ]

    def _receive_gradient(self, party: int, batch: int) -> torch.Tensor:
        posted = []
        for index, part in enumerate(self._parts(party, batch)):
            out = np.empty(part.nbytes, np.uint8)
            request = self.transport.iscatterv(
                self.comm, None, out, *self._counts(index, batch), ROOT
            )
            posted.append(_Posted(self.transport, request, out, Kind.GRADIENT, received=out.nbytes))
        self.transport.traffic.count_received(
            self.server, Kind.GRADIENT, sum(p.buffer.nbytes for p in posted)
        )
        return self._decode([p.wait() for p in posted], party, batch, [0] * len(posted))

    # --- server --------------------------------------------------------------------------

    def receive(self, batch: int) -> Gathered:
        """Posts the gather of every party's cut output for ``batch`` samples."""
        posted = []
        for part in range(len(self._parts(0, batch))):
            counts, displs = self._counts(part, batch)
            out = np.empty(int(counts.sum()), np.uint8)
            request = self.transport.igatherv(
                self.comm, np.empty(0, np.uint8), out, counts, displs, ROOT
            )
            self._count(False, Kind.ACTIVATION, counts[1:])
            posted.append(
                _Posted(self.transport, request, out, Kind.ACTIVATION, received=out.nbytes)
            )
        return Gathered(self, batch, posted)

    def _scatter(self, gradients: Sequence[torch.Tensor]) -> None:
        """Posts each party its gradient slice; ``flush`` completes them."""
        encoded = [self._encode(gradient) for gradient in gradients]
        for part in range(len(encoded[0])):
            sent = np.concatenate([np.zeros(0, np.uint8), *(e[part] for e in encoded)])
            counts, displs = self._counts(part, len(gradients[0]))
            request = self.transport.iscatterv(
                self.comm, sent, np.empty(0, np.uint8), counts, displs, ROOT
            )
            self._count(True, Kind.GRADIENT, counts[1:])
            self._scatters.append(
                _Posted(self.transport, request, sent, Kind.GRADIENT, sent=sent.nbytes)
            )

    def flush(self) -> None:
        """Completes the gradient scatters posted so far (before the optimizer step)."""
        scatters, self._scatters = self._scatters, []
        for posted in scatters:
            posted.wait()


@dataclass
class Gathered:
    """The server's posted gather of one microbatch's cut outputs."""

    cut: CollectiveCut
    batch: int
    posted: list[_Posted] = field(default_factory=list)

    def wait(self, *, train: bool = True) -> list[torch.Tensor]:
        """Every party's cut output (party order); in training, their gradients go back to
        the parties in one scatter as soon as back-propagation has computed them all."""
        cut, batch = self.cut, self.batch
        buffers = [posted.wait() for posted in self.posted]
        offsets = [cut._counts(part, batch)[1][1:] for part in range(len(buffers))]
        parts = [
            cut._decode(buffers, party, batch, [o[party] for o in offsets])
            for party in range(len(cut.shapes))
        ]
        if not train:
            return [part.to(cut.device) for part in parts]
        flat = torch.cat([part.reshape(-1) for part in parts]).to(cut.device)
        flat.requires_grad_(True)
        sizes = [part.numel() for part in parts]
        flat.register_hook(
            lambda grad: cut._scatter(
                [g.view(part.shape) for g, part in zip(grad.split(sizes), parts, strict=True)]
            )
        )
        return [
            piece.view(part.shape) for piece, part in zip(flat.split(sizes), parts, strict=True)
        ]


class _GatherActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, sent: torch.Tensor, cut: CollectiveCut) -> torch.Tensor:
        ctx.cut, ctx.batch, ctx.device = cut, len(sent), sent.device
        ctx.posted = cut._post_gather(sent)
        return sent.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        for posted in ctx.posted:
            posted.wait()
        party = ctx.cut.comm.Get_rank() - 1
        gradient = ctx.cut._receive_gradient(party, ctx.batch)
        return gradient.to(ctx.device), None

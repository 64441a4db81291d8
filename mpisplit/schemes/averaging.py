"""FedAvg-style averages of the clients' parameters: when, with what weight, how."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisplit.engine import RankContext
from mpisplit.protocol import Kind
from mpisplit.topology import Role


def client_comm(ctx: RankContext) -> MPI.Comm | None:
    """A clients-only communicator (None on other ranks); collective over ``ctx.comm``."""
    is_client = ctx.me.role == Role.CLIENT
    comm = ctx.comm.Split(0 if is_client else MPI.UNDEFINED, ctx.me.rank)
    return comm if is_client else None


def sample_weights(ctx: RankContext, comm: MPI.Comm, samples: Sequence[int]) -> list[float]:
    """The share of all samples on ``comm`` of each of this member's clients (``samples``:
    theirs): their FedAvg weights."""
    total = np.array([sum(samples)], np.float64)
    ctx.transport.complete(
        comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM),
        "sample count sum",
        kind=Kind.WEIGHTS,
        sent=total.nbytes,
        received=total.nbytes,
    )
    return [n / total[0] for n in samples]


Member = tuple[nn.Module, float]
"""A module in a federated average and its weight (its client's share of the samples)."""


def average_parameters(
    ctx: RankContext,
    comm: MPI.Comm,
    members: Sequence[Member],
    points: AveragingPoints,
    step: int = 0,
) -> None:
    """Replaces the parameters (and, with ``scheme.average_buffers``, the floating-point
    buffers) of this rank's ``members`` (each a module and its weight: one per logical
    client it hosts) by the weighted sum over every member on ``comm`` (the rank's members
    summed first, then one raw Allreduce in the parameters' own dtype: one model's bytes in
    and out per rank). ``step`` (the index of the step it follows) labels the trace span."""
    buffers = ctx.config.scheme.options.average_buffers
    tensors = [averaged_tensors(module, buffers) for module, _ in members]
    with torch.no_grad():
        flat = torch.stack(
            [
                torch.cat([t.reshape(-1) for t in own]) * weight
                for own, (_, weight) in zip(tensors, members, strict=True)
            ]
        ).sum(0)
        buffer = flat.to("cpu").numpy()
        ctx.transport.complete(
            ctx.transport.iallreduce(comm, buffer),
            "weight average",
            deadline=points.lockstep,
            kind=Kind.WEIGHTS,
            sent=buffer.nbytes,
            received=buffer.nbytes,
            step=step,
        )
        averaged = torch.from_numpy(buffer)
        for own in tensors:
            for tensor, part in zip(own, averaged.split([t.numel() for t in own]), strict=True):
                tensor.copy_(part.view_as(tensor))


def averaged_tensors(module: nn.Module, buffers: bool) -> list[torch.Tensor]:
    """What a federated average replaces: the parameters, and with ``buffers`` the
    floating-point buffers (BatchNorm running statistics; FedBN keeps them local). Integer
    buffers (BatchNorm's batch count) always stay local."""
    tensors = list(module.parameters())
    if buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


@dataclass(frozen=True)
class AveragingPoints:
    """When FedAvg-style averages happen, agreed by every member from the same step budgets:
    after every ``every``-th step that all members reach, then once more after each member's
    last step unless that point already was the last one for everybody."""

    every: int
    common: int
    at_end: bool
    lockstep: bool
    """Every member has the same steps, so members reach each average together (it is
    then waited for under the deadline; otherwise the ones that finish first wait for the
    others' remaining steps)."""

    @classmethod
    def of(cls, steps: Sequence[int], every: int) -> AveragingPoints:
        common = min(steps)
        return cls(every, common, max(steps) != common or common % every != 0, max(steps) == common)

    def due(self, step: int, last: int) -> int:
        """How many averages follow ``step`` for a member whose last step is ``last``."""
        periodic = step <= self.common and step % self.every == 0
        return int(periodic) + int(self.at_end and step == last)

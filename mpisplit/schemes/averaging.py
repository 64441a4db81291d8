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
    summed first, then one Allreduce: ``sum_over_ranks``). ``step`` (the index of the step
    it follows) labels the trace span."""
    buffers = ctx.config.scheme.options.average_buffers
    tensors = [averaged_tensors(module, buffers) for module, _ in members]
    with torch.no_grad():
        flat = torch.stack(
            [flatten(own) * weight for own, (_, weight) in zip(tensors, members, strict=True)]
        ).sum(0)
        sum_over_ranks(
            ctx,
            comm,
            flat,
            "weight average",
            kind=Kind.WEIGHTS,
            step=step,
            deadline=points.lockstep,
        )
        for own in tensors:
            unflatten(flat, own)


def sum_over_ranks(
    ctx: RankContext,
    comm: MPI.Comm,
    flat: torch.Tensor,
    what: str,
    *,
    kind: Kind,
    step: int,
    deadline: bool = True,
) -> None:
    """``flat`` (this rank's sum) replaced by the sum over every rank on ``comm``: one raw
    Allreduce in its own dtype, ``flat``'s bytes in and out per rank."""
    buffer = flat.to("cpu").numpy()
    ctx.transport.complete(
        ctx.transport.iallreduce(comm, buffer),
        what,
        deadline=deadline,
        kind=kind,
        sent=buffer.nbytes,
        received=buffer.nbytes,
        step=step,
    )
    if flat.device.type != "cpu":
        flat.copy_(torch.from_numpy(buffer))


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One new 1-D tensor of ``tensors``' values, in order."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """``tensors`` set from ``flat`` (as ``flatten`` laid them out)."""
    with torch.no_grad():
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
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

    def periods(self, last: int) -> list[tuple[int, int]]:
        """The steps ``(first, last)`` a member whose last step is ``last`` takes before each
        average, in order (``first > last``: it joins that average with no step since the
        one before)."""
        ends = list(range(self.every, self.common + 1, self.every)) + [last] * self.at_end
        return [(start + 1, end) for start, end in zip([0, *ends], ends, strict=False)]

    def due(self, step: int, last: int) -> int:
        """How many averages follow ``step`` for a member whose last step is ``last``."""
        periodic = step <= self.common and step % self.every == 0
        return int(periodic) + int(self.at_end and step == last)

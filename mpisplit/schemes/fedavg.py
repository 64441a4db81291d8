"""Federated averaging baseline: every client trains the whole model on its own shard,
and every ``scheme.fedavg_every`` local steps the weights are averaged, weighted by the
clients' sample counts (one raw-buffer Allreduce). There is no server: the client ranks are
the clients (or host several each: ``scheme.clients_per_rank``), and client 0 (on rank 0)
reports the test metrics of the averaged model.

A rank trains its clients on one shared model, period by period: in each period between two
averages every hosted client in turn starts from the last average, takes its steps of the
period and adds its weighted parameters to the rank's sum, and the rank joins the Allreduce
once all of them have. Each client keeps its own optimizer state and schedule (and the
buffers no average replaces), so the result is that of one rank per client; with
``scheme.local_optimizer: reset`` every period starts with a fresh optimizer instead, and
the rank keeps none per client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack

import torch
from mpi4py import MPI

from mpisplit.driver import step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.protocol import Kind
from mpisplit.schemes.averaging import (
    AveragingPoints,
    averaged_tensors,
    client_comm,
    flatten,
    sample_weights,
    sum_over_ranks,
    unflatten,
)
from mpisplit.schemes.hosting import hosted_contexts
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import client_budgets
from mpisplit.schemes.wholemodel import (
    Block,
    SharedModel,
    WholeModel,
    evaluator_last,
    train_whole_models,
)
from mpisplit.segment import make_scheduler


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    contexts = hosted_contexts(ctx)
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        steps = [step_budget(len(r), cfg.train) for r in readers]
        budgets = client_budgets(ctx, [(n, len(r)) for n, r in zip(steps, readers, strict=True)])
        comm = client_comm(ctx)
        weights = sample_weights(ctx, comm, [r.num_samples for r in readers])
        segment = ctx.build_segment(0, max(steps), through=ctx.run.parts - 1)
        first = ctx.me.clients[0]
        options = cfg.scheme.options
        averaged = averaged_tensors(segment.module, options.average_buffers)
        shared = SharedModel(
            segment,
            [b for b in segment.module.buffers() if all(b is not t for t in averaged)],
            schedules=lambda k: make_scheduler(segment.optimizer, cfg.train, steps[k - first]),
            keep_optimizer=options.local_optimizer == "keep",
        )
        periods = Periods(
            ctx,
            comm,
            averaged,
            AveragingPoints.of(budgets[:, 0].tolist(), options.fedavg_every),
            dict(zip(ctx.me.clients, zip(weights, steps, strict=True), strict=True)),
        )
        models = [
            WholeModel(c, segment, tests, after_step=lambda s, k=c.me.index: periods.ended(k, s))
            for c in contexts
        ]
        batches = [training_batches(r, cfg.train) for r in readers]
        result = train_whole_models(ctx, shared, models, batches, steps, periods.blocks())
        comm.Free()
    return result


class Periods:
    """A rank's FedAvg turns on its shared model: the blocks of steps its hosted clients take
    between the averages (``blocks``), and the rank's part in each average.

    ``tensors``: what the averages replace (the shared model's); ``clients``: each hosted
    client's (weight, last step). A block is one client's steps of one period, so a turn
    on the shared model (``SharedModel.use``) never spans an average."""

    def __init__(
        self,
        ctx: RankContext,
        comm: MPI.Comm,
        tensors: Sequence[torch.Tensor],
        points: AveragingPoints,
        clients: Mapping[int, tuple[float, int]],
    ) -> None:
        self.ctx, self.comm, self.tensors, self.points = ctx, comm, list(tensors), points
        self.clients = clients
        self.average = flatten(self.tensors)
        """The last average (at first, the model every client starts from)."""
        self.sum = torch.zeros_like(self.average)
        self.joined = 0
        self.block_ends: dict[int, int] = {}

    def blocks(self) -> Iterator[Block]:
        """Each hosted client's steps of each period, client 0 last: a block starts from the
        last average; one without steps (a client whose steps ended at the previous
        average) joins the next average with it."""
        plans = {k: self.points.periods(last) for k, (_, last) in self.clients.items()}
        for period in range(len(next(iter(plans.values())))):
            for client in evaluator_last(self.clients):
                unflatten(self.average, self.tensors)
                first, last = plans[client][period]
                self.block_ends[client] = last
                if first > last:
                    self._join(client, last)
                else:
                    yield client, first, last

    def ended(self, client: int, step: int) -> None:
        """After ``client``'s ``step``: at the end of its block it joins the average."""
        if step == self.block_ends[client]:
            self._join(client, step)

    def _join(self, client: int, step: int) -> None:
        """Adds ``client``'s weighted parameters to the rank's sum; the last of the rank's
        clients takes the rank into the Allreduce and loads the average."""
        with torch.no_grad():
            self.sum.add_(flatten(self.tensors), alpha=self.clients[client][0])
        self.joined += 1
        if self.joined == len(self.clients):
            sum_over_ranks(
                self.ctx,
                self.comm,
                self.sum,
                "weight average",
                kind=Kind.WEIGHTS,
                step=max(step - 1, 0),
                deadline=self.points.lockstep,
            )
            self.average, self.sum, self.joined = self.sum, self.average.zero_(), 0
            unflatten(self.average, self.tensors)

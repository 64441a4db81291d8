"""Large-batch synchronous SGD baseline: every client holds the whole model; each step
the gradients are averaged over all clients weighted by batch size (one raw-buffer
Allreduce), which equals the gradient of the union batch, and every client takes the same
step. There is no server: the client ranks are the clients (or host several each:
``scheme.clients_per_rank``, whose gradients a rank sums before the Allreduce), client 0
reports the test metrics. A client whose shard is used up joins the remaining steps with a
zero-weight contribution.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack

import torch

from mpisplit.driver import step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.protocol import Kind
from mpisplit.schemes.averaging import sum_over_ranks
from mpisplit.schemes.hosting import hosted_contexts
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import client_budgets
from mpisplit.schemes.wholemodel import (
    SharedModel,
    WholeModel,
    evaluator_last,
    train_whole_models,
)
from mpisplit.segment import Segment


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    contexts = hosted_contexts(ctx)
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        plans = [(step_budget(len(r), cfg.train), len(r)) for r in readers]
        rounds = int(client_budgets(ctx, plans)[:, 0].max())
        segment = ctx.build_segment(0, rounds, through=ctx.run.parts - 1)
        shared = SharedModel(segment, list(segment.module.buffers()))
        gradients = GradientSum(ctx, segment, len(contexts))
        models = [WholeModel(c, segment, tests, update=gradients.add) for c in contexts]
        # after its shard is used up, a client joins the remaining rounds without data
        batches = [
            itertools.chain(training_batches(r, cfg.train), itertools.repeat(None)) for r in readers
        ]
        order = evaluator_last(ctx.me.clients)
        blocks = ((k, step, step) for step in range(1, rounds + 1) for k in order)
        return train_whole_models(ctx, shared, models, batches, [rounds] * len(models), blocks)


class GradientSum:
    """A rank's share of each step's gradient average: its ``hosted`` clients' gradients on
    the shared ``segment``, weighted by batch size, are added up one client at a time; after
    the last, one raw Allreduce (in the parameters' dtype, the batch sizes as its last
    element) sums them over all clients, and the shared model steps once on the mean."""

    def __init__(self, ctx: RankContext, segment: Segment, hosted: int) -> None:
        self.ctx, self.segment, self.hosted = ctx, segment, hosted
        self.params = list(segment.module.parameters())
        self.sizes = [p.numel() for p in self.params]
        self.sum = torch.zeros(
            sum(self.sizes) + 1,
            dtype=self.params[0].dtype,
            device=self.params[0].device,
        )
        self.added = 0

    def add(self, model: WholeModel, size: int, index: int) -> None:
        """Client ``model``'s gradients of step ``index`` on a batch of ``size`` (0: none)."""
        for part, param in zip(self.sum[:-1].split(self.sizes), self.params, strict=True):
            if size and param.grad is not None:
                part.add_(param.grad.reshape(-1), alpha=size)
        self.sum[-1] += size
        self.segment.optimizer.zero_grad(set_to_none=True)
        self.added += 1
        if self.added < self.hosted:
            return
        sum_over_ranks(
            self.ctx, self.ctx.comm, self.sum, "gradient average", kind=Kind.GRADIENT, step=index
        )
        mean = self.sum[:-1] / self.sum[-1]
        for part, param in zip(mean.split(self.sizes), self.params, strict=True):
            param.grad = part.view_as(param).to(param)
        model.step(index)
        self.sum.zero_()
        self.added = 0

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
from mpisplit.schemes.hosting import HostedCollective, hosted_contexts
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import client_budgets
from mpisplit.schemes.wholemodel import WholeModel, train_whole_models

Contribution = tuple[WholeModel, int, int]
"""A client's model holding its gradients, its batch size and the step index."""


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    contexts = hosted_contexts(ctx)
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        plans = [(step_budget(len(r), cfg.train), len(r)) for r in readers]
        rounds = int(client_budgets(ctx, plans)[:, 0].max())
        gradients = HostedCollective[Contribution](
            ctx.me.clients, lambda members: _average_gradients(ctx, members)
        )
        models = [
            WholeModel(
                c,
                c.build_segment(0, rounds, through=ctx.run.parts - 1),
                tests,
                update=lambda model, size, index: gradients.join(
                    model.ctx.me.index, (model, size, index)
                ),
            )
            for c in contexts
        ]
        # after its shard is used up, a client joins the remaining rounds without data
        batches = [
            itertools.chain(training_batches(r, cfg.train), itertools.repeat(None)) for r in readers
        ]
        return train_whole_models(ctx, models, batches, [rounds] * len(models))


def _average_gradients(ctx: RankContext, members: list[Contribution]) -> None:
    """Batch-size-weighted mean of every client's gradients (this rank's ``members`` summed,
    then one raw Allreduce in the parameters' dtype, the batch size as its last element),
    set as each member's gradients; then each member steps."""
    flats = []
    for model, size, _ in members:
        params = list(model.segment.module.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flats.append(torch.cat([*(g.reshape(-1) for g in grads), grads[0].new_ones(1)]) * size)
    flat = torch.stack(flats).sum(0).cpu()
    buffer = flat.numpy()
    index = members[-1][2]
    ctx.transport.complete(
        ctx.transport.iallreduce(ctx.comm, buffer),
        "gradient average",
        kind=Kind.GRADIENT,
        sent=buffer.nbytes,
        received=buffer.nbytes,
        step=index,
    )
    mean = flat[:-1] / flat[-1]
    for model, _, _ in members:
        offset = 0
        for param in model.segment.module.parameters():
            count = param.numel()
            param.grad = mean[offset : offset + count].view_as(param).to(param)
            offset += count
        model.step(index)

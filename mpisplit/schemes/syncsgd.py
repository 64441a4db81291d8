"""Large-batch synchronous SGD baseline: every client rank holds the whole model; each step
the gradients are averaged over all clients weighted by batch size (one raw-buffer
Allreduce), which equals the gradient of the union batch, and every rank takes the same
step. There is no server: the K ranks are the K clients, client 0 reports the test metrics.
A client whose shard is used up joins the remaining steps with a zero-weight contribution.
"""

from __future__ import annotations

import itertools

import torch
from mpi4py import MPI
from torch import nn

from mpisplit.driver import step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.protocol import Kind
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import exchange_step_budgets
from mpisplit.schemes.wholemodel import WholeModel, train_whole_model
from mpisplit.transport import Transport


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with client_reader(ctx) as reader, test_reader(ctx) as tests:
        mine = step_budget(len(reader), cfg.train)
        rounds = int(exchange_step_budgets(ctx, mine, len(reader))[:, 0].max())
        segment = ctx.build_segment(0, rounds, through=ctx.run.parts - 1)

        def exchange(size: int, index: int) -> None:
            _average_gradients(ctx.transport, ctx.comm, segment.module, size, index)

        model = WholeModel(ctx, segment, tests, exchange=exchange)
        # after its shard is used up, a client joins the remaining rounds without data
        batches = itertools.chain(training_batches(reader, cfg.train), itertools.repeat(None))
        samples, finals = train_whole_model(ctx, model, batches, rounds)
    return RankResult(steps=rounds, samples=samples, final_evals=finals, segment=segment)


def _average_gradients(
    transport: Transport, comm: MPI.Comm, module: nn.Module, batch_size: int, step: int
) -> None:
    """Batch-size-weighted mean of every rank's gradients, in place (one raw Allreduce in
    the parameters' dtype, the batch size as its last element)."""
    params = list(module.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([*(g.reshape(-1) for g in grads), grads[0].new_ones(1)]).cpu() * batch_size
    buffer = flat.numpy()
    transport.complete(
        transport.iallreduce(comm, buffer),
        "gradient average",
        kind=Kind.GRADIENT,
        sent=buffer.nbytes,
        received=buffer.nbytes,
        step=step,
    )
    mean = flat[:-1] / flat[-1]
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = mean[offset : offset + count].view_as(param).to(param)
        offset += count

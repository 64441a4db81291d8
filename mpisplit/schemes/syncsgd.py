"""Large-batch synchronous SGD baseline: every client rank holds the whole model; each step
the gradients are averaged over all clients weighted by batch size (one raw-buffer
Allreduce), which equals the gradient of the union batch, and every rank takes the same
step. There is no server: the K ranks are the K clients, client 0 reports the test metrics.
A client whose shard is used up joins the remaining steps with a zero-weight contribution.
"""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mpisplit.engine import RankContext, RankResult
from mpisplit.protocol import Kind
from mpisplit.schemes.common import (
    client_reader,
    evaluate_locally,
    exchange_step_plans,
    finish_local_step,
    make_progress,
    next_batch,
    planned_steps,
    test_reader,
    training_batches,
    whole_model_gradients,
)
from mpisplit.transport import Transport


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with client_reader(ctx) as reader, test_reader(ctx) as tests:
        mine = planned_steps(len(reader), cfg.train)
        rounds = int(exchange_step_plans(ctx, mine, len(reader))[:, 0].max())
        segment = ctx.build_segment(0, rounds, through=ctx.run.parts - 1)
        batches = training_batches(reader, cfg.train)
        progress = make_progress(ctx, rounds)
        samples = 0
        for step in range(1, rounds + 1):
            if step <= mine:
                batch = next_batch(ctx, batches, step - 1)
                size = len(batch.labels)
                loss = whole_model_gradients(ctx, segment, batch, step - 1)
            else:  # shard used up: a zero-weight contribution
                size, loss = 0, float("nan")
                for param in segment.module.parameters():
                    param.grad = torch.zeros_like(param)
            _average_gradients(ctx.transport, ctx.comm, segment.module, size, step - 1)
            with ctx.tracer.span("optimizer", step=step - 1):
                segment.step()
            samples += size
            finish_local_step(ctx, tests, segment.module, progress, step, rounds, loss)
        finals = [evaluate_locally(ctx, segment.module, tests, rounds, 0)] \
            if ctx.me.index == 0 else []
    return RankResult(steps=rounds, samples=samples, final_evals=finals, segment=segment)


def _average_gradients(transport: Transport, comm: MPI.Comm, module: nn.Module,
                       batch_size: int, step: int) -> None:
    """Batch-size-weighted mean of every rank's gradients, in place (one raw Allreduce in
    the parameters' dtype, the batch size as its last element)."""
    params = list(module.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([*(g.reshape(-1) for g in grads), grads[0].new_ones(1)]).cpu() * batch_size
    buffer = flat.numpy()
    transport.complete(transport.iallreduce(comm, buffer), "gradient average",
                       kind=Kind.GRADIENT, sent=buffer.nbytes, received=buffer.nbytes, step=step)
    mean = flat[:-1] / flat[-1]
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = mean[offset:offset + count].view_as(param).to(param)
        offset += count

"""Large-batch synchronous SGD baseline: every client rank holds the whole model; each step
the gradients are averaged over all clients weighted by batch size (one raw-buffer
Allreduce), which equals the gradient of the union batch, and every rank takes the same
step. There is no server: the K ranks are the K clients, client 0 reports the test metrics.
A client whose shard is used up joins the remaining steps with a zero-weight contribution.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisplit.data import Batch
from mpisplit.engine import RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.schemes.common import (
    client_reader,
    evaluate_locally,
    exchange_step_plans,
    finish_local_step,
    make_progress,
    planned_steps,
    test_reader,
    training_batches,
)
from mpisplit.segment import Segment
from mpisplit.transport import Transport

CUTS = None
ALLOWED: frozenset = frozenset()


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with client_reader(ctx) as reader, test_reader(ctx) as tests:
        mine = planned_steps(len(reader), cfg.train)
        rounds = int(exchange_step_plans(ctx, mine, len(reader))[:, 0].max())
        segment = ctx.build_segment(0, rounds, through=len(ctx.run.bounds) - 1)
        batches = training_batches(reader, cfg.train)
        progress = make_progress(ctx, rounds)
        samples = 0
        for step in range(1, rounds + 1):
            batch = next(batches, None)
            size = 0 if batch is None else len(batch.labels)
            with ctx.tracer.span("step", step=step):
                loss = _local_gradients(ctx, segment, batch, step)
                _average_gradients(ctx.transport, ctx.comm, segment.module, size)
                segment.step()
            samples += size
            finish_local_step(ctx, tests, segment.module, progress, step, rounds, loss)
        finals = [evaluate_locally(ctx, segment.module, tests, rounds, 0)] \
            if ctx.me.index == 0 else []
    return RankResult(steps=rounds, samples=samples, final_evals=finals, segment=segment)


def _local_gradients(ctx: RankContext, segment: Segment, batch: Batch | None,
                     step: int) -> float:
    """Mean-loss gradients of this rank's batch (zero without a batch); returns the loss."""
    if batch is None:
        for param in segment.module.parameters():
            param.grad = torch.zeros_like(param)
        return float("nan")
    logits = segment.module(batch.features.to(ctx.device))
    loss = check_loss(nn.functional.cross_entropy(logits, batch.labels.to(ctx.device)), step)
    loss.backward()
    return float(loss.detach())


def _average_gradients(transport: Transport, comm: MPI.Comm, module: nn.Module,
                       batch_size: int) -> None:
    """Batch-size-weighted mean of every rank's gradients, in place (one raw Allreduce)."""
    params = list(module.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to("cpu", torch.float64) * batch_size
    buffer = np.append(flat.numpy(), float(batch_size))
    transport.complete(comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM), "gradient average")
    mean = torch.from_numpy(buffer[:-1] / buffer[-1])
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = mean[offset:offset + count].view_as(param).to(param)
        offset += count

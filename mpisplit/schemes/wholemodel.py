"""Local training of a whole model on one rank: the baselines' step."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mpisplit.data import Batch, ShardReader
from mpisplit.driver import make_progress, next_batch, step_budget, training_batches
from mpisplit.engine import RankContext
from mpisplit.failure import check_loss
from mpisplit.runlog import Progress
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.instrumentation import compute_span, record_client_step
from mpisplit.segment import Segment


def whole_model_gradients(ctx: RankContext, segment: Segment, batch: Batch, step: int) -> float:
    """Mean-loss gradients of the whole model on one batch (the baselines), as "forward"
    and "backward" spans of step index ``step``; returns the loss."""
    with compute_span(ctx, "forward", step=step):
        logits = segment.module(batch.features.to(ctx.device))
        loss = check_loss(nn.functional.cross_entropy(logits, batch.labels.to(ctx.device)),
                          step + 1)
    with compute_span(ctx, "backward", step=step):
        loss.backward()
    return float(loss.detach())


def train_whole_model(ctx: RankContext, segment: Segment, reader: ShardReader,
                      tests: ShardReader, after_step: Callable[[int], None]) -> int:
    """Local training of a whole model on this client's shard (federated baselines);
    ``after_step(step)`` runs after each optimizer step. Returns the samples trained on."""
    cfg = ctx.config
    total = step_budget(len(reader), cfg.train)
    progress = make_progress(ctx, total)
    batches = training_batches(reader, cfg.train)
    samples = 0
    for step in range(1, total + 1):
        batch = next_batch(ctx, batches, step - 1)
        loss = whole_model_gradients(ctx, segment, batch, step - 1)
        with ctx.tracer.span("optimizer", step=step - 1):
            segment.step()
        after_step(step)
        samples += len(batch.labels)
        finish_local_step(ctx, tests, segment.module, progress, step, total, loss)
    return samples


def finish_local_step(ctx: RankContext, tests: ShardReader, module: nn.Module,
                      progress: Progress, step: int, total: int, loss: float) -> None:
    """Metrics, and on client 0 progress and the periodic test evaluation."""
    record_client_step(ctx, step, loss)
    if ctx.me.index != 0:
        return
    progress.update(step, loss)
    every = ctx.config.train.eval_every
    if every and step % every == 0 and step != total:
        evaluate_locally(ctx, module, tests, step, client=0)

"""Local training of a whole model on one rank: the baselines' role on the step driver."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from mpisplit.data import Batch, ShardReader
from mpisplit.driver import EvalSchedule, StepDriver
from mpisplit.engine import EvalResult, RankContext
from mpisplit.failure import check_loss
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.instrumentation import compute_span
from mpisplit.segment import Segment


def whole_model_gradients(ctx: RankContext, segment: Segment, batch: Batch, step: int) -> float:
    """Mean-loss gradients of the whole model on one batch (the baselines), as "forward"
    and "backward" spans of step index ``step``; returns the loss."""
    with compute_span(ctx, "forward", step=step):
        logits = segment.module(batch.features.to(ctx.device))
        loss = check_loss(
            nn.functional.cross_entropy(logits, batch.labels.to(ctx.device)), step + 1
        )
    with compute_span(ctx, "backward", step=step):
        loss.backward()
    return float(loss.detach())


class WholeModel:
    """A rank that holds the whole model: gradients on its batch, ``exchange(batch size,
    step index)`` before the update (a synchronous baseline's gradient average),
    ``after_step(step)`` after it (a federated average); evaluation on its test reader."""

    def __init__(
        self,
        ctx: RankContext,
        segment: Segment,
        tests: ShardReader,
        *,
        exchange: Callable[[int, int], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        self.ctx, self.segment, self.tests = ctx, segment, tests
        self.exchange, self.after_step = exchange, after_step
        self.segments = [segment]
        self.generators: list[torch.Generator] = []

    def train_step(self, batch: Batch | None, index: int) -> float:
        """``batch`` None: this rank's shard is used up; it contributes zero gradients."""
        if batch is None:
            size, loss = 0, float("nan")
            for param in self.segment.module.parameters():
                param.grad = torch.zeros_like(param)
        else:
            size, loss = (
                len(batch.labels),
                whole_model_gradients(self.ctx, self.segment, batch, index),
            )
        if self.exchange is not None:
            self.exchange(size, index)
        with self.ctx.tracer.span("optimizer", step=index):
            self.segment.step()
        if self.after_step is not None:
            self.after_step(index + 1)
        return loss

    def evaluate(self, step: int, final: bool) -> EvalResult:
        return evaluate_locally(self.ctx, self.segment.module, self.tests, step, client=0)


def train_whole_model(
    ctx: RankContext, model: WholeModel, batches: Iterator[Batch | None], steps: int
) -> tuple[int, list[EvalResult]]:
    """``steps`` steps of one of several whole-model ranks (the federated baselines);
    client 0 shows the progress and evaluates. Returns the samples trained on and the final
    evaluation (client 0's)."""
    first = ctx.me.index == 0
    driver = StepDriver(
        ctx, steps, evaluation=EvalSchedule.of(ctx.config.train, steps, first), progress=first
    )
    driver.train(model, batches, 1, steps)
    return driver.samples, [model.evaluate(steps, True)] if first else []

"""Local training of whole models on one rank (one per client it hosts): the baselines'
role on the step driver."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from mpisplit.data import Batch, ShardReader
from mpisplit.driver import EvalSchedule, StepDriver
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.hosting import parallel_steps
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


Update = Callable[["WholeModel", int, int], None]
"""``(model, batch size, step index)``: a synchronous baseline's update after the gradients
(the gradient average, which then steps the model: ``WholeModel.step``)."""


class WholeModel:
    """A client that holds the whole model: gradients on its batch, then the update (its
    optimizer step, or ``update``'s), ``after_step(step)`` after it (a federated average);
    evaluation on its test reader."""

    def __init__(
        self,
        ctx: RankContext,
        segment: Segment,
        tests: ShardReader,
        *,
        update: Update | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        self.ctx, self.segment, self.tests = ctx, segment, tests
        self.update, self.after_step = update, after_step
        self.segments = [segment]
        self.generators: list[torch.Generator] = []

    def train_step(self, batch: Batch | None, index: int) -> float:
        """``batch`` None: this client's shard is used up; it contributes zero gradients."""
        if batch is None:
            size, loss = 0, float("nan")
            for param in self.segment.module.parameters():
                param.grad = torch.zeros_like(param)
        else:
            size, loss = (
                len(batch.labels),
                whole_model_gradients(self.ctx, self.segment, batch, index),
            )
        if self.update is None:
            self.step(index)
        else:
            self.update(self, size, index)
        if self.after_step is not None:
            self.after_step(index + 1)
        return loss

    def step(self, index: int) -> None:
        """The optimizer step on the gradients the model holds."""
        with self.ctx.tracer.span("optimizer", step=index):
            self.segment.step()

    def evaluate(self, step: int, final: bool) -> EvalResult:
        return evaluate_locally(self.ctx, self.segment.module, self.tests, step, client=0)


def train_whole_models(
    ctx: RankContext,
    models: Sequence[WholeModel],
    batches: Sequence[Iterator[Batch | None]],
    steps: Sequence[int],
) -> RankResult:
    """``steps[i]`` steps of ``models[i]`` on ``batches[i]``: the clients this rank hosts
    (one, or several: ``scheme.clients_per_rank``), in parallel rounds. Client 0 shows the
    progress, evaluates and reports the final evaluation."""
    first = [m.ctx.me.index == 0 for m in models]
    drivers = [
        StepDriver(m.ctx, n, evaluation=EvalSchedule.of(ctx.config.train, n, shows), progress=shows)
        for m, n, shows in zip(models, steps, first, strict=True)
    ]
    hosted = dict(zip(ctx.me.clients, range(len(models)), strict=True))
    label = ctx.me.hosted > 1  # a hosting rank's records name their client
    for client, step, _ in parallel_steps(dict(zip(hosted, steps, strict=True))):
        mine = hosted[client]
        ctx.transport.client = client
        drivers[mine].train(
            models[mine], batches[mine], step, step, **({"client": client} if label else {})
        )
    return RankResult(
        steps=sum(steps),
        samples=sum(d.samples for d in drivers),
        final_evals=[
            m.evaluate(n, True) for m, n, f in zip(models, steps, first, strict=True) if f
        ],
        segment=None if label else models[0].segment,
        client_parts={m.ctx.me.index: m.segment for m in models} if label else {},
    )

"""Test metrics: eval mode, tallies, local evaluation and its record."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mpisplit.data import ShardReader
from mpisplit.driver import log
from mpisplit.engine import EvalResult, RankContext


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode without autograd, back to training mode afterwards."""
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train()


@dataclass
class EvalTally:
    loss: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.count += len(labels)

    def result(self, step: int, client: int, task: int = 0) -> EvalResult:
        count = max(self.count, 1)
        return EvalResult(step, client, self.loss / count, self.correct / count, self.count, task)


def evaluate_locally(
    ctx: RankContext, module: nn.Module, reader: ShardReader, step: int, client: int
) -> EvalResult:
    """Test metrics of a model that ends in logits, computed on this rank (labels local)."""
    tally = EvalTally()
    module.eval()
    with torch.no_grad(), ctx.tracer.span("eval"):
        for batch in reader.epoch(0):
            tally.add(module(batch.features.to(ctx.device)), batch.labels.to(ctx.device))
    module.train()
    return record_eval(ctx, tally.result(step, client))


def record_eval(ctx: RankContext, result: EvalResult) -> EvalResult:
    ctx.metrics.write({"event": "eval", **vars(result)})
    log.info(
        "eval client %d at step %d: accuracy %.4f, loss %.4f",
        result.client,
        result.step,
        result.accuracy,
        result.loss,
    )
    return result

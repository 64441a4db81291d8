"""Local training of whole models: the baselines' clients, on the step driver.

A rank keeps one whole model for all the clients it hosts (``SharedModel``): R clients cost
one model, not R (500 VGG-16 clients would need some 70 GB of weights). What differs between
the clients is swapped in for a client's turn: its buffers (BatchNorm statistics) and, where
clients step apart between averages (FedAvg), its optimizer state and schedule position.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mpisplit.data import Batch, ShardReader
from mpisplit.driver import EvalSchedule, StepDriver
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.instrumentation import compute_span
from mpisplit.segment import Segment

Block = tuple[int, int, int]
"""``(client, first, last)``: steps ``first..last`` (from 1) of one hosted client in a row."""


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


@dataclass
class _Own:
    """What one client keeps apart from the others on a shared model."""

    buffers: list[torch.Tensor]
    optimizer: dict[Any, Any] | None = None
    schedule: tuple[dict[str, Any], list[float]] | None = None


class SharedModel:
    """The one whole model (``segment``) a rank trains for every client it hosts.

    ``own_buffers``: the module's buffers whose values are each client's own (those no
    average replaces). ``schedules``: where clients step apart (FedAvg between averages),
    each client's fresh schedule (``schedules(client)``, on the segment's optimizer); they
    then also keep their own optimizer state, unless ``keep_optimizer`` is false: then
    every turn (``use``) starts with a fresh one. None: every client takes the same step
    (sync SGD), so they share both. ``use(client)`` swaps that client's values in; every
    client starts from the buffers the model has when this is made."""

    def __init__(
        self,
        segment: Segment,
        own_buffers: Sequence[torch.Tensor],
        *,
        schedules: Callable[[int], LRScheduler] | None = None,
        keep_optimizer: bool = True,
    ) -> None:
        self.segment, self.own_buffers, self.schedules = segment, list(own_buffers), schedules
        self.keep_optimizer = keep_optimizer
        self._initial = [b.clone() for b in self.own_buffers]
        self._saved: dict[int, _Own] = {}
        self.current: int | None = None

    @property
    def steps_apart(self) -> bool:
        return self.schedules is not None

    def use(self, client: int) -> None:
        """Makes the model client ``client``'s for a turn: the current client's own values
        are kept aside, ``client``'s loaded (its first time: the initial ones)."""
        if not self.keep_optimizer:
            self.segment.optimizer.state = defaultdict(dict)
        if client == self.current:
            return
        if self.current is not None:
            self._saved[self.current] = self._take()
        self._put(self._saved.pop(client, None) or self._start(client))
        self.current = client

    def state_of(self, client: int) -> dict[str, torch.Tensor]:
        """Client ``client``'s module state (its saved part); valid until the next ``use``."""
        self.use(client)
        return self.segment.module.state_dict()

    def _start(self, client: int) -> _Own:
        if self.schedules is None:
            return _Own(self._initial)
        for group in self.segment.optimizer.param_groups:
            # a schedule starts from the rate it finds (cosine, step): the configured one,
            # not the previous client's decayed rate
            group["lr"] = group.get("initial_lr", group["lr"])
        self.segment.scheduler = self.schedules(client)
        rates = [g["lr"] for g in self.segment.optimizer.param_groups]
        schedule = (self.segment.scheduler.state_dict(), rates)
        return _Own(self._initial, defaultdict(dict) if self.keep_optimizer else None, schedule)

    def _take(self) -> _Own:
        own = _Own([b.clone() for b in self.own_buffers])
        if self.steps_apart:
            optimizer = self.segment.optimizer
            if self.keep_optimizer:
                own.optimizer, optimizer.state = optimizer.state, defaultdict(dict)
            own.schedule = (
                self.segment.scheduler.state_dict(),
                [g["lr"] for g in optimizer.param_groups],
            )
        return own

    def _put(self, own: _Own) -> None:
        with torch.no_grad():
            for buffer, value in zip(self.own_buffers, own.buffers, strict=True):
                buffer.copy_(value)
        if own.schedule is not None:
            optimizer = self.segment.optimizer
            if own.optimizer is not None:
                optimizer.state = own.optimizer  # type: ignore[assignment]
            schedule, rates = own.schedule
            self.segment.scheduler.load_state_dict(schedule)
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate


Update = Callable[["WholeModel", int, int], None]
"""``(model, batch size, step index)``: a synchronous baseline's update after the gradients
(the gradient average, which then steps the shared model)."""


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


def evaluator_last(clients: Iterable[int]) -> list[int]:
    """The hosted clients in the order their turns take: client order, but client 0 (which
    evaluates) last, so that its evaluations follow the collectives its rank's other clients
    joined before it, as on a rank of its own."""
    return sorted(clients, key=lambda k: k == 0)


def train_whole_models(
    ctx: RankContext,
    shared: SharedModel,
    models: Sequence[WholeModel],
    batches: Sequence[Iterator[Batch | None]],
    steps: Sequence[int],
    blocks: Iterable[Block],
) -> RankResult:
    """``steps[i]`` steps of ``models[i]`` (the clients this rank hosts, on its ``shared``
    model) on ``batches[i]``, in the turns ``blocks`` gives. Client 0 shows the progress,
    evaluates and reports the final evaluation. A rank's ``steps`` are the optimizer steps
    its shared model takes (one per step of each client, unless they share every step)."""
    first = [m.ctx.me.index == 0 for m in models]
    drivers = [
        StepDriver(m.ctx, n, evaluation=EvalSchedule.of(ctx.config.train, n, shows), progress=shows)
        for m, n, shows in zip(models, steps, first, strict=True)
    ]
    hosted = dict(zip(ctx.me.clients, range(len(models)), strict=True))
    label = ctx.me.hosted > 1  # a hosting rank's records name their client
    for client, start, last in blocks:
        mine = hosted[client]
        ctx.transport.client = client
        shared.use(client)
        drivers[mine].train(
            models[mine], batches[mine], start, last, **({"client": client} if label else {})
        )
    final_evals = []
    for model, n, evaluates in zip(models, steps, first, strict=True):
        if evaluates:
            shared.use(model.ctx.me.index)
            final_evals.append(model.evaluate(n, True))
    return RankResult(
        steps=max(steps) if not shared.steps_apart else sum(steps),
        samples=sum(d.samples for d in drivers),
        final_evals=final_evals,
        segment=None if label else shared.segment,
        client_parts={k: lambda k=k: shared.state_of(k) for k in hosted} if label else {},
    )

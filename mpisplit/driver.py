"""The step driver: the one training loop of every role that takes optimizer steps.

A role supplies only what is its own (``StepRole``): ``train_step`` on one batch,
``evaluate``, and what its checkpoints keep (its segments and random generators).
``StepDriver`` owns the rest: the resume point, the batches (one iterator that skips the
ones a resumed run trained on before its checkpoint), step counting, the metrics record and
progress, the checkpoint meetings (and so pre-emption, which stops at one), and when a
periodic evaluation is due (``EvalSchedule``, derived once per role).

Roles that answer messages in arrival order (a server, a relay) keep their own receive loop
but count, record and meet through the same driver (``restore``, ``record``, ``meet``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from mpisplit.checkpoint import pack, unpack
from mpisplit.config import TrainConfig
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import EvalResult, RankContext
from mpisplit.runlog import Progress
from mpisplit.segment import Segment

log = logging.getLogger("mpisplit")

B = TypeVar("B")
B_in = TypeVar("B_in", contravariant=True)


def step_budget(batches_per_epoch: int, train: TrainConfig) -> int:
    """The steps a client with ``batches_per_epoch`` batches trains: ``train.epochs`` passes,
    cut to ``train.max_steps``."""
    steps = batches_per_epoch * train.epochs
    return min(steps, train.max_steps) if train.max_steps else steps


def training_batches(reader: ShardReader, train: TrainConfig, skip: int = 0) -> Iterator[Batch]:
    """The batches a client trains on, epoch after epoch, up to its step budget, after the
    first ``skip`` (those a resumed run trained on before its checkpoint)."""
    budget = step_budget(len(reader), train) - skip
    if budget > 0:
        yield from itertools.islice(reader.epochs(*divmod(skip, len(reader))), budget)


def labelled_rows(batch: Batch | None) -> int:
    """A batch's samples (0: a step without data)."""
    return 0 if batch is None or batch.labels is None else len(batch.labels)


@dataclass(frozen=True)
class EvalSchedule:
    """When a role evaluates between steps: after every ``every``-th step (0: never), except
    after ``final`` (the final evaluation follows it anyway), and only if it is an
    ``evaluator`` (a sampled client, client 0 of a baseline)."""

    every: int = 0
    final: int | None = None
    evaluator: bool = True

    @classmethod
    def of(cls, train: TrainConfig, final: int | None, evaluator: bool = True) -> EvalSchedule:
        return cls(train.eval_every, final, evaluator)

    def due(self, step: int) -> bool:
        return self.evaluator and bool(self.every) and step % self.every == 0 and step != self.final


class Checkpointable(Protocol):
    """What a role's checkpoint keeps (``checkpoint.pack``): its segments (weights,
    optimizer, schedule) and random generators; the driver adds its own counters."""

    segments: Sequence[Segment]
    generators: Sequence[torch.Generator]


class StepRole(Checkpointable, Protocol[B_in]):
    """A role the driver runs step by step, on batches of type ``B_in`` (``Batch | None``
    for most: None is a step without data, such as a synchronous baseline's client whose
    shard is used up)."""

    def train_step(self, batch: B_in, index: int) -> float | None:
        """One training step on ``batch``; ``index`` is the step's 0-based index, as trace
        spans count. Returns the loss where this rank computes it."""

    def evaluate(self, step: int, final: bool) -> EvalResult | None:
        """Evaluation after ``step``; returns the result where this rank computes it."""


@dataclass
class Parts:
    """What a role that is only its parts checkpoints (a server's or a relay's segments)."""

    segments: Sequence[Segment]
    generators: Sequence[torch.Generator] = ()


class StepDriver:
    """One rank's step loop: counting, metrics, progress, checkpoint meetings, evaluation.

    ``total``: the steps the progress shows; ``until``: the first step at which the ranks
    no longer all meet for checkpoints (default ``total``; 0: this loop never meets);
    ``evaluation``: when ``train`` evaluates; ``progress``: whether this rank shows progress
    (``done``: steps taken before this process started, default the resume point;
    ``epochs``: see ``make_progress``); ``traffic``: whether step records carry the byte
    counters; ``state``: what the rank's checkpoints hold, where the rank is more than this
    driver's role (a rank hosting several clients: ``hosting.HostedState``; default
    ``StepDriver.state``, after ``restore``); ``meets``: whether it takes the rank's
    checkpoint meetings at all (False: another driver of the rank takes them, and a stop
    signal waits for that one's next meeting).
    """

    def __init__(
        self,
        ctx: RankContext,
        total: int,
        *,
        until: int | None = None,
        evaluation: EvalSchedule = EvalSchedule(),
        progress: bool = True,
        done: int | None = None,
        epochs: int | None = None,
        traffic: bool = True,
        state: Callable[[], dict[str, Any]] | None = None,
        meets: bool = True,
    ) -> None:
        self.ctx = ctx
        self.until = total if until is None else until
        self.evaluation = evaluation
        self.resumed = ctx.checkpoints.resume_step
        self.samples = 0
        self.traffic = traffic
        self.progress = (
            make_progress(ctx, total, self.resumed if done is None else done, epochs=epochs)
            if progress
            else None
        )
        self._role: Checkpointable = Parts(())
        self._state = state or self.state
        self._meets = meets

    def restore(self, role: Checkpointable) -> None:
        """Loads ``role``'s state from the checkpoint a resumed run starts from (and
        torch's random state: call it where a fresh run would stand at that point)."""
        self._role = role
        saved = self.ctx.checkpoints.restore()
        if saved is not None:
            counters = unpack(saved, role.segments, role.generators)
            self.samples = counters.get("samples", 0)

    def state(self) -> dict[str, Any]:
        """What this rank's checkpoint holds."""
        return pack(self._role.segments, self._role.generators, samples=self.samples)

    def batches(self, reader: ShardReader, skip: int | None = None) -> Iterator[Batch]:
        """``reader``'s training batches after the first ``skip`` (default: the resume
        point's step, for a rank that trains every step)."""
        return training_batches(
            reader, self.ctx.config.train, self.resumed if skip is None else skip
        )

    def record(self, step: int, loss: float | None = None, **fields: Any) -> None:
        """The metrics record of ``step`` (with ``fields``), and the progress display."""
        record: dict[str, Any] = {"step": step}
        if loss is not None:
            record["loss"] = loss
        record |= fields
        if self.traffic:
            record |= traffic_fields(self.ctx)
        self.ctx.metrics.write(record)
        if self.progress is not None:
            self.progress.update(step, loss)

    def meet(self, step: int, *, idle: bool = False) -> bool:
        """The checkpoint meeting after ``step`` (if it is one); see ``Checkpointer.reached``.
        Raises ``Preempted`` after the checkpoint when a rank got a stop signal."""
        if not self._meets:
            return False
        return self.ctx.checkpoints.reached(step, self._state, self.until, idle=idle)

    def sit_out(self, first: int, last: int) -> None:
        """The meetings of steps ``first..last``, which other ranks take (a client waiting
        for its turn): this rank waits for them without a deadline."""
        for point in self.ctx.checkpoints.points(first, last, self.until):
            self.meet(point, idle=True)

    def train(
        self,
        role: StepRole[B],
        batches: Iterator[B],
        first: int,
        last: int,
        *,
        rows: Callable[[B], int] = labelled_rows,
        **fields: Any,
    ) -> None:
        """Steps ``first..last`` (counted from 1) of ``role``, those after the resume point:
        a batch, ``role.train_step``, the samples count (``rows`` of the batch), the record
        (with ``fields``), the meeting, and the periodic evaluation when due. A resumed run
        whose checkpoint came just before an evaluation that step's evaluation was due at
        runs it first."""
        if first <= self.resumed <= last and self.evaluation.due(self.resumed):
            role.evaluate(self.resumed, False)
        for step in range(max(first, self.resumed + 1), last + 1):
            batch = next_batch(self.ctx, batches, step - 1)
            loss = role.train_step(batch, step - 1)
            self.samples += rows(batch)
            self.record(step, loss, **fields)
            self.meet(step)
            if self.evaluation.due(step):
                role.evaluate(step, False)


def next_batch(ctx: RankContext, batches: Iterator[B], index: int) -> B:
    """The next training batch; the time it takes (the reader's prefetch fell behind) is the
    step's "data" span."""
    with ctx.tracer.span("data", step=index):
        return next(batches)


def traffic_fields(ctx: RankContext) -> dict[str, int]:
    """This rank's byte counters, as step records carry them."""
    traffic = ctx.transport.traffic
    return {"bytes_sent": traffic.total_sent, "bytes_received": traffic.total_received}


def make_progress(
    ctx: RankContext, total_steps: int, done: int = 0, *, epochs: int | None = None
) -> Progress:
    """``done``: the steps a resumed run starts from; ``epochs``: how many the steps span
    (default ``train.epochs``, unless ``max_steps`` cuts them short; 0 shows none)."""
    train = ctx.config.train
    if epochs is None:
        epochs = 0 if train.max_steps else train.epochs
    return Progress(
        total_steps,
        ctx.config.run.progress,
        ctx.config.run.log_every,
        log,
        epochs=epochs,
        done=done,
    )

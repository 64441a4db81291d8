"""Building blocks shared by the schemes: step plans, turn schedules, the serving loop.

Each scheme module composes these; none of them contains a scheme-specific branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mpisplit.config import TrainConfig
from mpisplit.cut import recv_forward, send_eval
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import EvalResult, RankContext
from mpisplit.runlog import Progress
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import Flag, Kind, Transport

log = logging.getLogger("mpisplit")


def planned_steps(batches_per_epoch: int, train: TrainConfig) -> int:
    steps = batches_per_epoch * train.epochs
    return min(steps, train.max_steps) if train.max_steps else steps


def training_batches(reader: ShardReader, train: TrainConfig) -> Iterator[Batch]:
    """The batches a client trains on, epoch after epoch, up to ``train.max_steps``."""
    budget = planned_steps(len(reader), train)
    epoch = 0
    while budget:
        for batch in reader.epoch(epoch):
            yield batch
            budget -= 1
            if not budget:
                return
        epoch += 1


def exchange_step_plans(ctx: RankContext, steps: int, epoch_length: int) -> np.ndarray:
    """Every rank's (planned steps, batches per epoch); raw-buffer Allgather, once per run."""
    mine = np.array([steps, epoch_length], np.int64)
    everyone = np.zeros((ctx.comm.Get_size(), 2), np.int64)
    ctx.comm.Allgather(mine, everyone)
    return everyone


def turn_schedule(steps: Sequence[int], turn_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Round-robin turns ``(client index, batches)`` until every client has used its steps.

    This is the original split-learning order: client k trains ``turn_lengths[k]`` batches,
    then hands the lower layers to the next client that still has steps left.
    """
    remaining = list(steps)
    turns: list[tuple[int, int]] = []
    while any(remaining):
        for k, length in enumerate(turn_lengths):
            n = min(remaining[k], length)
            if n:
                turns.append((k, n))
                remaining[k] -= n
    return turns


def test_reader(ctx: RankContext, kind: str = "client") -> ShardReader:
    return ShardReader(ctx.shard(kind, test=True), batch_size=ctx.config.data.batch_size,
                       shuffle=False, prefetch=0)


def send_eval_pass(ctx: RankContext, segment: Segment, reader: ShardReader, dest: int,
                   step: int, *, final: bool) -> None:
    """Forwards the whole test set through ``segment`` to ``dest``, then an end marker."""
    transport = ctx.transport
    segment.module.eval()
    with torch.no_grad(), ctx.tracer.span("eval"):
        for batch in reader.epoch(0):
            send_eval(segment.module(batch.features.to(ctx.device)), transport, dest, step)
            transport.send(batch.labels, dest, Kind.LABELS, step=step, flags=Flag.EVAL)
    segment.module.train()
    end = Flag.EVAL | Flag.LAST | (Flag.DONE if final else Flag.NONE)
    transport.send(torch.empty(0), dest, Kind.ACTIVATION, step=step, flags=end)


@dataclass
class EvalTally:
    loss: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.count += len(labels)

    def result(self, step: int, client: int) -> EvalResult:
        count = max(self.count, 1)
        return EvalResult(step, client, self.loss / count, self.correct / count, self.count)


def evaluate_locally(ctx: RankContext, module: nn.Module, reader: ShardReader, step: int,
                     client: int) -> EvalResult:
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
    log.info("eval client %d at step %d: accuracy %.4f, loss %.4f",
             result.client, result.step, result.accuracy, result.loss)
    return result


@dataclass
class ServeReport:
    steps: int = 0
    final_evals: list[EvalResult] = field(default_factory=list)


def serve_clients(
    ctx: RankContext,
    segment: Segment,
    total_steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> ServeReport:
    """The server's loop: serve cut activations from any client in arrival order.

    Training activations get a forward, loss and backward (the gradient goes back to the
    sender through the cut hook) and one optimizer step. Evaluation passes are tallied per
    client. The loop ends when every client has said it is done.
    """
    transport: Transport = ctx.transport
    clients = ctx.topology.ranks(Role.CLIENT)
    client_index = {rank: k for k, rank in enumerate(clients)}
    progress = Progress(total_steps, ctx.config.run.progress, ctx.config.run.log_every,
                        log)
    active, tallies, report = set(clients), {}, ServeReport()
    while active:
        activation, message = recv_forward(transport, device=ctx.device)
        source = message.source
        if message.flags & Flag.LAST:
            tally = tallies.pop(source, EvalTally())
            result = record_eval(ctx, tally.result(message.step, client_index[source]))
            if message.flags & Flag.DONE:
                report.final_evals.append(result)
        if message.flags & Flag.DONE:
            active.discard(source)
            continue
        if message.flags & Flag.LAST:
            continue
        labels = transport.recv(Kind.LABELS, source).tensor.to(ctx.device)
        if message.flags & Flag.EVAL:
            segment.module.eval()
            with torch.no_grad():
                tallies.setdefault(source, EvalTally()).add(segment.module(activation), labels)
            segment.module.train()
            continue
        with ctx.tracer.span("forward", step=report.steps):
            loss = loss_fn(segment.module(activation), labels)
        with ctx.tracer.span("backward", step=report.steps):
            loss.backward()
        with ctx.tracer.span("optimizer", step=report.steps):
            segment.step()
        report.steps += 1
        loss_value = float(loss.detach())
        ctx.metrics.write({"step": report.steps, "loss": loss_value,
                           "client": client_index[source], **_traffic(transport)})
        progress.update(report.steps, loss_value)
    return report


def _traffic(transport: Transport) -> dict[str, int]:
    return {"bytes_sent": transport.traffic.total_sent,
            "bytes_received": transport.traffic.total_received}


def record_client_step(ctx: RankContext, step: int) -> None:
    ctx.metrics.write({"step": step, **_traffic(ctx.transport)})

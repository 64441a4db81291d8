"""Building blocks shared by the schemes: step plans, turn schedules, the serving loop.

Each scheme module composes these; none of them contains a scheme-specific branch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpisplit import schedules
from mpisplit.checkpoint import pack, unpack
from mpisplit.config import TrainConfig
from mpisplit.cut import (
    CutValue,
    cut_features,
    map_floats,
    recv_forward,
    send_eval,
    send_forward,
)
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.privacy import EvaluationNoise, distance_correlation, nopeek_penalty, protect
from mpisplit.protocol import Flag, Kind
from mpisplit.runlog import Progress
from mpisplit.seeds import Stream, derive
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import ANY_SOURCE, Message, PeerTimeout, Transport

log = logging.getLogger("mpisplit")

def planned_steps(batches_per_epoch: int, train: TrainConfig) -> int:
    steps = batches_per_epoch * train.epochs
    return min(steps, train.max_steps) if train.max_steps else steps


def training_batches(reader: ShardReader, train: TrainConfig, skip: int = 0) -> Iterator[Batch]:
    """The batches a client trains on, epoch after epoch, up to ``train.max_steps``, after
    the first ``skip`` (those a resumed run trained on before its checkpoint)."""
    budget = planned_steps(len(reader), train) - skip
    if budget > 0:
        yield from itertools.islice(reader.epochs(*divmod(skip, len(reader))), budget)


def clients_total_steps(ctx: RankContext) -> int:
    """A non-client rank's side of the step-plan exchange: every client's steps, summed."""
    return int(exchange_step_plans(ctx, 0, 0)[:, 0].sum())


def exchange_step_plans(ctx: RankContext, steps: int, epoch_length: int) -> np.ndarray:
    """Every rank's (planned steps, batches per epoch); raw-buffer Allgather, once per run."""
    mine = np.array([steps, epoch_length], np.int64)
    everyone = np.zeros((ctx.comm.Get_size(), 2), np.int64)
    ctx.transport.complete(ctx.comm.Iallgather(mine, everyone), "exchange of step plans")
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


@dataclass(frozen=True)
class Microbatch:
    features: torch.Tensor
    labels: torch.Tensor
    flags: Flag
    """``Flag.MORE`` on all but the last microbatch of a step."""


def microbatches(batch: Batch, count: int) -> list[Microbatch]:
    """Splits a batch into up to ``count`` microbatches for the pipelined cut exchange.

    From three on, the first and the last are half the size of the others: the server waits
    for the first one's forward before it can start, the client for the last one's gradient
    before it can step, and halving them halves that fill and drain."""
    bounds = schedules.taper_bounds(len(batch.labels), count)
    pairs = list(zip(batch.features.tensor_split(bounds), batch.labels.tensor_split(bounds),
                     strict=True))
    pairs = [(x, y) for x, y in pairs if len(y)]
    return [Microbatch(x, y, Flag.MORE if i < len(pairs) - 1 else Flag.NONE)
            for i, (x, y) in enumerate(pairs)]


def microbatch_share(labels: torch.Tensor, message: Message) -> float:
    """Weight of a microbatch's mean loss, so that the accumulated gradient equals the
    gradient of the whole batch's mean loss (``message.aux`` = whole batch size)."""
    return len(labels) / message.aux if message.aux else 1.0


def test_reader(ctx: RankContext, kind: str = "client") -> ShardReader:
    return ShardReader(ctx.shard(kind, test=True), batch_size=ctx.config.data.batch_size,
                       shuffle=False, prefetch=0)


class CutSender:
    """Everything a client's cut activation goes through before it leaves: the configured
    defences (clipping, noise, NoPeek), and the leakage measure on test data."""

    LEAKAGE_SAMPLES = 1000

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.privacy = ctx.config.privacy
        self.noise = torch.Generator().manual_seed(
            derive(self.privacy.seed, Stream.NOISE, ctx.me.index))
        self.eval_noise = EvaluationNoise(self.privacy.seed, ctx.me.index)
        self.leakage: float | None = None
        self._sample: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sampled = 0

    def train(self, activation: CutValue, inputs: torch.Tensor, dest: int, step: int, *,
              flags: Flag = Flag.NONE, aux: int = 0, microbatch: int = 0) -> torch.Tensor:
        """Sends the defended activation; ``.backward()`` on the result completes this
        client's back-propagation (cut gradient plus the NoPeek penalty)."""
        return self.train_fanout(activation, inputs, [dest], step, flags=flags, aux=aux,
                                 microbatch=microbatch)[0]

    def train_fanout(self, activation: CutValue, inputs: torch.Tensor,
                     dests: Sequence[int], step: int, *, flags: Flag = Flag.NONE, aux: int = 0,
                     microbatch: int = 0) -> list[torch.Tensor]:
        """Sends one defended activation to every rank in ``dests`` (multi-task heads);
        ``torch.autograd.backward`` on the anchors sums their cut gradients. All receivers
        get the same noise draw, and the NoPeek penalty is counted once, not per receiver."""
        sent = map_floats(lambda t: protect(t, self.privacy, self.noise), activation)
        anchors = [send_forward(sent, self.ctx.transport, dest, step, flags=flags, aux=aux,
                                microbatch=microbatch) for dest in dests]
        penalty = nopeek_penalty(inputs, cut_features(activation), self.privacy)
        if penalty is not None:
            anchors[0] = anchors[0] + penalty
        return anchors

    def evaluate(self, activation: CutValue, inputs: torch.Tensor, dest: int, step: int, *,
                 final: bool) -> None:
        """Sends a forward-only activation (defended like training traffic); in the final
        evaluation, keeps the first ``LEAKAGE_SAMPLES`` (input, sent) pairs for the leakage
        measure, so memory does not grow with the test set."""
        noise = self.eval_noise.at(step)
        sent = map_floats(lambda t: protect(t, self.privacy, noise), activation)
        send_eval(sent, self.ctx.transport, dest, step)
        if final and self._sampled < self.LEAKAGE_SAMPLES:
            keep = self.LEAKAGE_SAMPLES - self._sampled
            self._sample.append((inputs[:keep].cpu(), cut_features(sent)[:keep].detach().cpu()))
            self._sampled += len(self._sample[-1][0])

    def measure_leakage(self) -> None:
        """Distance correlation between test inputs and what left for them."""
        x = torch.cat([x for x, _ in self._sample]).double()
        z = torch.cat([z for _, z in self._sample]).double()
        self.leakage = float(distance_correlation(x, z))
        self._sample, self._sampled = [], 0


def send_eval_pass(ctx: RankContext, sender: CutSender, segment: Segment, reader: ShardReader,
                   dest: int, step: int, *, final: bool,
                   labels: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Forwards the whole test set through ``segment`` to ``dest``, then an end marker; the
    final pass also measures leakage. ``labels`` maps the dataset's labels to what ``dest``
    scores (a multitask server's task labels)."""
    transport = ctx.transport
    with evaluating(segment.module), ctx.tracer.span("eval"):
        for batch in reader.epoch(0):
            features = batch.features.to(ctx.device)
            targets = batch.labels if labels is None else labels(batch.labels)
            # Labels first but not waited for until the activation is posted: the receiver
            # takes the activation first, and labels above MPI's eager limit (~1000
            # samples) would otherwise wait for it forever.
            labels_sent = transport.isend(targets, dest, Kind.LABELS, step=step,
                                          flags=Flag.EVAL)
            sender.evaluate(segment.module(features), features, dest, step, final=final)
            labels_sent.wait()
    if final:
        sender.measure_leakage()
    end = Flag.EVAL | Flag.LAST | (Flag.DONE if final else Flag.NONE)
    send_marker(ctx, dest, step, end)


def send_marker(ctx: RankContext, dest: int, step: int, flags: Flag) -> None:
    """An end-of-evaluation / done marker; it carries the client index, because behind a
    relay the receiver cannot tell the client from the message source. It is a float tensor
    like any activation (the cut code may mark it as requiring grad; no gradient flows)."""
    marker = torch.tensor([float(ctx.me.index)])
    ctx.transport.send(marker, dest, Kind.ACTIVATION, step=step, flags=flags)


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
        return EvalResult(step, client, self.loss / count, self.correct / count, self.count,
                          task)


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
    segment: Segment | Callable[[int], Segment],
    total_steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    *,
    order: Sequence[int] | None = None,
    after_step: Callable[[int], None] | None = None,
    task: int = 0,
    round_size: int = 1,
    until: int | None = None,
    after_done: Callable[[torch.Tensor, Message], None] | None = None,
    dropping: Dropping | None = None,
) -> ServeReport:
    """The server's loop: serve cut activations from any client in arrival order.

    Training activations get a forward, loss and backward (the gradient goes back to the
    sender through the cut hook) and one optimizer step. Evaluation passes are tallied per
    client. The loop ends when every client has said it is done.

    ``segment`` may be a function of the sender's rank (one upper model per client);
    ``order`` fixes the sender of each training step (arrival order after it runs out);
    ``after_step(source)`` runs after each training step; ``task`` labels the evaluations
    (a multitask server's task index).

    Checkpoints follow the clients' steps: one per ``round_size`` training steps (splitfed
    v2 serves every client once per round), before step ``until`` (default: the end).

    ``after_done(activation, message)`` takes the one message a client sends after its
    DONE marker (a spatio-temporal site's hand-over; it receives the rest from that source),
    and the loop also waits for those. With ``dropping``, a client that falls silent is
    dropped from the rest of the loop instead of ending the job (see ``Dropping``).
    """
    transport: Transport = ctx.transport
    clients = ctx.topology.ranks(Role.CLIENT)
    client_index = {rank: k for k, rank in enumerate(clients)}
    last_relay = ctx.topology.ranks(Role.RELAY)[-1:]
    segment_for = segment if callable(segment) else lambda _source: segment
    owned = [] if callable(segment) else [segment]
    checkpoints, until = ctx.checkpoints, total_steps if until is None else until
    report = ServeReport(steps=checkpoints.resume_step * round_size)
    if (saved := checkpoints.restore()) is not None:
        unpack(saved, owned)
    senders = iter((order or ())[report.steps:])
    expected = next(senders, ANY_SOURCE)
    progress = make_progress(ctx, total_steps, report.steps)
    active, tallies = set(range(len(clients))), {}
    finished: set[int] = set()  # past their DONE marker, their last message still to come
    silence = SilenceWatch(dropping.after_s if dropping else transport.timeout_s) \
        if ctx.config.scheme.client_order == "parallel" and not last_relay else None

    def drop(ranks: Sequence[int]) -> None:
        if dropping is None:
            raise transport.timed_out(ranks, Kind.ACTIVATION, "receive")
        for rank in ranks:
            active.discard(client_index[rank])
            finished.discard(client_index[rank])
            tallies.pop(rank, None)
            transport.abandon(rank)
            dropping.drop(rank)

    def stalled(err: PeerTimeout, ranks: Sequence[int], *, in_step: bool) -> None:
        """A wait on ``ranks`` timed out: with ``dropping`` they leave the run (``in_step``:
        the one whose step was under way, which is discarded); otherwise the job ends."""
        nonlocal expected
        if dropping is None:
            raise err
        drop(ranks)
        if in_step:
            segment_for(ranks[0]).module.zero_grad(set_to_none=True)
        expected = ANY_SOURCE

    while active:
        feeders = last_relay or sorted(clients[k] for k in active)
        try:
            activation, message = recv_forward(transport, expected, device=ctx.device,
                                               senders=feeders)
        except PeerTimeout as err:  # nobody, or the client mid-step or mid-message, spoke
            stalled(err, err.peers, in_step=expected != ANY_SOURCE)
            continue
        source = message.source
        if dropping is not None and dropping.dropped(source):
            continue  # a dropped client that came back: it is no longer served
        if silence is not None and (silent := silence.heard(source, feeders)):
            drop(silent)
        index = client_index.get(source)
        if index in finished:
            try:
                after_done(activation, message)
            except PeerTimeout as err:
                stalled(err, [source], in_step=False)
                continue
            finished.discard(index)
            active.discard(index)
            continue
        module = segment_for(source).module
        if message.flags & (Flag.LAST | Flag.DONE):
            if message.flags & Flag.LAST:
                tally = tallies.pop(source, EvalTally())
                result = record_eval(ctx, tally.result(message.step, int(activation[0]), task))
                if message.flags & Flag.DONE:
                    report.final_evals.append(result)
            if message.flags & Flag.DONE:
                if after_done is None:
                    active.discard(int(activation[0]))
                else:
                    finished.add(int(activation[0]))
            continue
        try:
            labels = transport.recv(Kind.LABELS, source).tensor.to(ctx.device)
        except PeerTimeout as err:
            stalled(err, [source], in_step=True)
            continue
        if message.flags & Flag.EVAL:
            with evaluating(module):
                tallies.setdefault(source, EvalTally()).add(module(activation), labels)
            continue
        with ctx.tracer.span("forward", step=report.steps):
            loss = check_loss(loss_fn(module(activation), labels), report.steps + 1) \
                * microbatch_share(labels, message)
        with ctx.tracer.span("backward", step=report.steps):
            loss.backward()
        if message.flags & Flag.MORE:  # accumulate the step's microbatches, then step
            expected = source
            continue
        with ctx.tracer.span("optimizer", step=report.steps):
            segment_for(source).step()
        if after_step is not None:
            after_step(source)
        expected = next(senders, ANY_SOURCE)
        report.steps += 1
        loss_value = float(loss.detach())
        ctx.metrics.write({"step": report.steps, "loss": loss_value,
                           "client": client_index.get(source), **_traffic(transport)})
        progress.update(report.steps, loss_value)
        if report.steps % round_size == 0:
            met = checkpoints.reached(report.steps // round_size, lambda: pack(owned), until)
            if met and silence is not None:
                silence.restart()  # the clients were writing checkpoints, not stalled
    return report


class SilenceWatch:
    """Parallel clients talk to the server all the time, so one that stays silent for
    ``limit_s`` while the others talk has stalled: a receive from any client would never
    time out while the others keep it busy."""

    CHECKS_PER_TIMEOUT = 4
    """The scan over all clients runs this often per limit, not per message."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.last: dict[int, float] = {}
        self.restart()

    def restart(self) -> None:
        self.last.clear()
        self.start = self.next_check = time.monotonic()

    def heard(self, source: int, feeders: Sequence[int]) -> list[int]:
        """Records a message from ``source``; returns the feeders silent for longer than
        the limit (empty between scans)."""
        now = time.monotonic()
        self.last[source] = now
        if now < self.next_check:
            return []
        self.next_check = now + self.limit_s / self.CHECKS_PER_TIMEOUT
        return [rank for rank in feeders
                if now - self.last.get(rank, self.start) > self.limit_s]


@dataclass
class Dropping:
    """A server that goes on without clients that fall silent (spatio-temporal sites).

    A client silent for ``after_s`` while others talk, or for ``transport.timeout_s`` when
    none talks, is handed to ``drop(rank)`` once and is no longer waited for; what it sends
    later is received and ignored (``dropped(rank)``). One that stops in the middle of what
    belongs together (a step's microbatches, a payload too large to travel eagerly) holds
    the server for ``transport.timeout_s`` before it is dropped and its step discarded; the
    other clients wait as long, so that can still end the job. Clients send so that the
    common cases cannot happen: labels before the activation, a hand-over's outputs in one
    message after its labels."""

    after_s: float
    drop: Callable[[int], None]
    dropped: Callable[[int], bool]


def serve_with(ctx: RankContext, segment: Segment, total_steps: int, **options: Any
               ) -> RankResult:
    """``serve_clients`` with one upper ``segment``, reported as this rank's result."""
    report = serve_clients(ctx, segment, total_steps, **options)
    return RankResult(steps=report.steps, final_evals=report.final_evals, segment=segment)


def _traffic(transport: Transport) -> dict[str, int]:
    return {"bytes_sent": transport.traffic.total_sent,
            "bytes_received": transport.traffic.total_received}


def record_client_step(ctx: RankContext, step: int, loss: float | None = None) -> None:
    record = {"step": step, **_traffic(ctx.transport)}
    if loss is not None:
        record["loss"] = loss
    ctx.metrics.write(record)


def make_progress(ctx: RankContext, total_steps: int, done: int = 0, *,
                  epochs: int | None = None) -> Progress:
    """``done``: the steps a resumed run starts from; ``epochs``: how many the steps span
    (default ``train.epochs``, unless ``max_steps`` cuts them short; 0 shows none)."""
    train = ctx.config.train
    if epochs is None:
        epochs = 0 if train.max_steps else train.epochs
    return Progress(total_steps, ctx.config.run.progress, ctx.config.run.log_every, log,
                    epochs=epochs, done=done)


def record_traffic_by_kind(ctx: RankContext) -> None:
    """Bytes received per message kind: evidence of what reached this rank (e.g. no labels)."""
    received = ctx.transport.traffic.recv_bytes.sum(axis=0)
    ctx.metrics.write({"event": "traffic_by_kind",
                       "bytes_received": {kind.name: int(received[kind]) for kind in Kind}})


def relay_activations(ctx: RankContext, segment: Segment, total_steps: int,
                      next_hop: int | None) -> int:
    """The loop of a rank in the middle of the model: receive a cut activation from any
    sender, run ``segment``, send the result on, and on the way back pass the gradient to
    the sender and step. Returns the training steps taken.

    ``next_hop=None`` sends the result back to its sender (the U-shaped server: the loss
    and labels stay with the client). Otherwise it goes to ``next_hop`` towards the loss
    holder (a multi-hop relay), with the labels and end markers; an evaluation pass is then
    relayed without interleaving, so the receiver tallies it as one client's.
    """
    transport, checkpoints = ctx.transport, ctx.checkpoints
    steps = checkpoints.resume_step
    progress = make_progress(ctx, total_steps, steps)
    if (saved := checkpoints.restore()) is not None:
        unpack(saved, [segment])
    remaining, source = len(ctx.topology.ranks(Role.CLIENT)), ANY_SOURCE
    while remaining:
        activation, message = recv_forward(transport, source, device=ctx.device)
        dest = message.source if next_hop is None else next_hop
        if message.flags & (Flag.LAST | Flag.DONE):
            if next_hop is not None:
                transport.send(activation, dest, Kind.ACTIVATION, step=message.step,
                               flags=message.flags)
            remaining -= bool(message.flags & Flag.DONE)
            source = ANY_SOURCE
            continue
        if message.flags & Flag.EVAL:
            with evaluating(segment.module):
                send_eval(segment.module(activation), transport, dest, message.step)
            if next_hop is not None:
                _pass_labels(transport, message, dest)
                source = message.source
            continue
        more = message.flags & Flag.MORE
        with ctx.tracer.span("forward", step=steps):
            anchor = send_forward(segment.module(activation), transport, dest, message.step,
                                  flags=more, aux=message.aux, microbatch=message.microbatch)
        if next_hop is not None:
            _pass_labels(transport, message, dest)
        with ctx.tracer.span("backward", step=steps):
            anchor.backward()
        if more:  # gradients accumulate until the step's last microbatch
            source = message.source
            continue
        source = ANY_SOURCE
        with ctx.tracer.span("optimizer", step=steps):
            segment.step()
        steps += 1
        ctx.metrics.write({"step": steps, **_traffic(transport)})
        progress.update(steps, None)
        checkpoints.reached(steps, lambda: pack([segment]), total_steps)
    return steps


def _pass_labels(transport: Transport, message: Message, dest: int) -> None:
    labels = transport.recv(Kind.LABELS, message.source)
    transport.send(labels.tensor, dest, Kind.LABELS, step=labels.step, flags=labels.flags)


@dataclass(frozen=True)
class TurnPlan:
    """Which turns this client trains, and how long its parts' schedule is."""

    turns: list[tuple[int, int]]
    me: int
    schedule_steps: int
    """Sequential: every client's steps (the parts travel); parallel: this client's."""
    until: int
    """The first step at which the ranks no longer all meet for checkpoints: the end of the
    schedule in sequential order, the fewest steps of any client in parallel."""
    evaluator: bool = True
    """Whether this client evaluates (parallel order with ``train.eval_clients``: only the
    sampled clients do)."""

    @property
    def my_steps(self) -> int:
        return sum(length for k, length in self.turns if k == self.me)

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """``(client, first, last)`` of each turn, in the model's steps: sequential turns
        continue the step count of the parts they receive."""
        position = 0
        for client, length in self.turns:
            yield client, position + 1, position + length
            position += length

    def my_steps_through(self, step: int) -> int:
        """How many batches this client has trained on by the model's ``step``."""
        return sum(max(0, min(last, step) - first + 1)
                   for client, first, last in self.spans() if client == self.me)

    @property
    def evaluates_final(self) -> bool:
        """Parallel clients each evaluate (or the sampled ones: ``evaluator``); in
        sequential order the last turn's client does."""
        return self.evaluator and (self.turns[-1][0] == self.me if self.turns else True)


def plan_turns(ctx: RankContext, reader: ShardReader) -> TurnPlan:
    """Exchanges step plans (collective) and derives this client's turns."""
    cfg, me = ctx.config, ctx.me
    plans = exchange_step_plans(ctx, planned_steps(len(reader), cfg.train), len(reader))
    clients = ctx.topology.ranks(Role.CLIENT)
    steps = [int(plans[rank, 0]) for rank in clients]
    if cfg.scheme.client_order == "sequential":
        lengths = [cfg.scheme.options.turn_steps or int(plans[rank, 1]) for rank in clients]
        return TurnPlan(turn_schedule(steps, lengths), me.index, sum(steps), sum(steps))
    return TurnPlan([(me.index, steps[me.index])], me.index, steps[me.index], min(steps),
                    evaluator=me.index in evaluating_clients(cfg.train, len(clients)))


def evaluating_clients(train: TrainConfig, clients: int) -> list[int]:
    """The clients that evaluate in parallel order: all of them, or ``train.eval_clients``
    drawn from ``train.seed`` (the same ones at every evaluation and on every rank)."""
    if not train.eval_clients or train.eval_clients >= clients:
        return list(range(clients))
    rng = np.random.default_rng(derive(train.seed, Stream.EVAL_SAMPLE))
    return sorted(rng.choice(clients, train.eval_clients, replace=False).tolist())


@dataclass
class ClientReport:
    steps: int = 0
    samples: int = 0
    final_evals: list[EvalResult] = field(default_factory=list)


def run_client_turns(
    ctx: RankContext,
    plan: TurnPlan,
    reader: ShardReader,
    segments: Sequence[Segment],
    sender: CutSender,
    train_step: Callable[[Batch, int], float | None],
    evaluate: Callable[[int, bool], EvalResult | None],
    first_hop: int | Sequence[int],
) -> ClientReport:
    """A client's turns: hand-over of ``segments`` in, ``train_step(batch, model_step)``
    per batch (returns the loss where the client has it), periodic ``evaluate(step,
    final=False)``, hand-over out. At the end the final turn's client calls
    ``evaluate(step, True)`` (which must tell ``first_hop`` it is done); the others just
    send ``first_hop`` (each, when several) a done marker. In sequential order the final
    turn's client then hands the final parts to every other client, so every client ends with
    (and saves) the same, final lower part, not the one of its own last turn.

    Checkpoints: after each step, and for the steps of other clients' turns while this one
    waits; a resumed run starts after the checkpoint's step, with the same data position.
    """
    cfg, transport, checkpoints = ctx.config, ctx.transport, ctx.checkpoints
    clients = ctx.topology.ranks(Role.CLIENT)
    report = ClientReport(steps=plan.my_steps)
    resumed = checkpoints.resume_step
    if (saved := checkpoints.restore()) is not None:
        report.samples = unpack(saved, segments, [sender.noise])["samples"]

    def state() -> dict:
        return pack(segments, [sender.noise], samples=report.samples)

    batches = training_batches(reader, cfg.train, skip=plan.my_steps_through(resumed))
    final_step = plan.schedule_steps if plan.evaluates_final else None

    def evaluation_due(step: int) -> bool:
        return bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 \
            and step != final_step and plan.evaluator

    spans = list(plan.spans())
    for turn, (client, first, last) in enumerate(spans):
        if client != plan.me:
            for point in checkpoints.points(first, last, plan.until):
                checkpoints.reached(point, state, plan.until, idle=True)
            continue
        if last < resumed:
            continue
        previous = spans[turn - 1][0] if turn > 0 else plan.me
        if first > resumed and previous != plan.me:
            _receive_parts(transport, clients[previous], segments)
        if first <= resumed and evaluation_due(resumed):  # it came after the checkpoint
            evaluate(resumed, False)
        for step in range(max(first, resumed + 1), last + 1):
            batch = next_batch(ctx, batches, step - 1)
            loss = train_step(batch, step - 1)
            report.samples += len(batch.labels)
            record_client_step(ctx, step, loss)
            checkpoints.reached(step, state, plan.until)
            if evaluation_due(step):
                evaluate(step, False)
        following = spans[turn + 1][0] if turn + 1 < len(spans) else plan.me
        if following != plan.me:
            for segment in segments:
                transport.send(segment.state_bytes(), clients[following], Kind.WEIGHTS,
                               step=last)
    if plan.evaluates_final:
        result = evaluate(plan.schedule_steps, True)
        report.final_evals = [] if result is None else [result]
    else:
        for hop in [first_hop] if isinstance(first_hop, int) else first_hop:
            send_marker(ctx, hop, plan.schedule_steps, Flag.DONE)
    if cfg.scheme.client_order == "sequential" and spans:
        _share_final_parts(transport, clients, spans[-1][0], plan, segments)
    return report


def _share_final_parts(transport: Transport, clients: Sequence[int], last: int,
                       plan: TurnPlan, segments: Sequence[Segment]) -> None:
    """The final turn's client sends its parts to every other client, which load them."""
    if plan.me != last:
        _receive_parts(transport, clients[last], segments)
        return
    for other, rank in enumerate(clients):
        if other != last:
            for segment in segments:
                transport.send(segment.state_bytes(), rank, Kind.WEIGHTS,
                               step=plan.schedule_steps)


def _receive_parts(transport: Transport, source: int, segments: Sequence[Segment]) -> None:
    """Loads the handed-over parts."""
    for segment in segments:
        segment.load_state_bytes(transport.recv(Kind.WEIGHTS, source, deadline=False).tensor)


def train_lower_client(ctx: RankContext, first_hop: int | Sequence[int],
                       after_step: Callable[[Segment, int], None] | None = None, *,
                       labels: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
                       ) -> RankResult:
    """A client that holds segment 0 and sends cut activations with labels to ``first_hop``
    (the server, or the first relay); ``after_step(segment, model_step)`` runs after each
    step.

    Several ``first_hop`` ranks (multitask heads) each get the same cut activation, with the
    labels mapped by ``labels[i]`` for hop i; each microbatch back-propagates the sum of their
    gradients in one pass, so the lower part steps once on the summed losses.
    """
    transport = ctx.transport
    hops = [first_hop] if isinstance(first_hop, int) else list(first_hop)
    label_maps = list(labels) if labels is not None else [_same] * len(hops)
    reader = client_reader(ctx)
    with reader, test_reader(ctx) as tests:
        plan = plan_turns(ctx, reader)
        segment = ctx.build_segment(0, plan.schedule_steps)
        sender = CutSender(ctx)

        def train_step(batch: Batch, step: int) -> None:
            parts = microbatches(batch, ctx.config.transport.microbatches)
            label_sends = []

            def forward(index: int) -> list[torch.Tensor]:
                part = parts[index]
                with compute_span(ctx, "forward", step=step, microbatch=index):
                    features = part.features.to(ctx.device)
                    activation = segment.module(features)
                # Labels go first: MPI libraries deliver one sender's eager messages in the
                # order posted, so a client stopped right after sending cannot leave the
                # server with an activation whose labels never come (spatio-temporal drops).
                label_sends.extend(transport.isend(label_map(part.labels), hop, Kind.LABELS,
                                                   step=step, microbatch=index)
                                   for hop, label_map in zip(hops, label_maps, strict=True))
                return sender.train_fanout(activation, features, hops, step, flags=part.flags,
                                           aux=len(batch.labels), microbatch=index)

            def backward(anchors: list[torch.Tensor]) -> None:
                with compute_span(ctx, "backward", step=step):
                    torch.autograd.backward(anchors)

            schedules.run(schedules.of(ctx.config.transport.schedule, len(parts)), forward,
                          backward)
            for pending in label_sends:
                pending.wait()
            with ctx.tracer.span("optimizer", step=step):
                segment.step()
            if after_step is not None:
                after_step(segment, step + 1)

        def evaluate(step: int, final: bool) -> None:
            for hop, label_map in zip(hops, label_maps, strict=True):
                send_eval_pass(ctx, sender, segment, tests, hop, step, final=final,
                               labels=label_map)

        report = run_client_turns(ctx, plan, reader, [segment], sender, train_step, evaluate,
                                  hops)
    return RankResult(steps=report.steps, samples=report.samples, segment=segment,
                      leakage=sender.leakage)


def _same(labels: torch.Tensor) -> torch.Tensor:
    return labels


def client_reader(ctx: RankContext) -> ShardReader:
    """This client's training shard, shuffled by its own stream."""
    return shard_reader(ctx, ctx.me.index)


def shard_reader(ctx: RankContext, client: int) -> ShardReader:
    """Client ``client``'s training shard, shuffled by that client's stream of
    ``train.seed`` (the centralized baseline visits every client's)."""
    cfg = ctx.config
    return ShardReader(ctx.shard("client", client), batch_size=cfg.data.batch_size,
                       shuffle=cfg.data.shuffle,
                       seed=derive(cfg.train.seed, Stream.DATA, client),
                       prefetch=cfg.data.prefetch)


def client_comm(ctx: RankContext) -> MPI.Comm | None:
    """A clients-only communicator (None on other ranks); collective over ``ctx.comm``."""
    is_client = ctx.me.role == Role.CLIENT
    comm = ctx.comm.Split(0 if is_client else MPI.UNDEFINED, ctx.me.rank)
    return comm if is_client else None


def sample_weight(ctx: RankContext, comm: MPI.Comm, samples: int) -> float:
    """This member's share of all samples on ``comm``: its FedAvg weight."""
    total = np.array([samples], np.float64)
    ctx.transport.complete(comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM), "sample count sum",
                           kind=Kind.WEIGHTS, sent=total.nbytes, received=total.nbytes)
    return samples / total[0]


def average_parameters(ctx: RankContext, comm: MPI.Comm, module: nn.Module, weight: float,
                       plan: AveragingPlan, step: int = 0) -> None:
    """Replaces the parameters (and, with ``scheme.average_buffers``, the floating-point
    buffers) by their ``weight``-ed sum over ``comm`` (one raw Allreduce in the parameters'
    own dtype: one model's bytes in and out per member). ``step`` (the index of the step it
    follows) labels the trace span."""
    tensors = averaged_tensors(module, ctx.config.scheme.options.average_buffers)
    with torch.no_grad():
        flat = (torch.cat([t.reshape(-1) for t in tensors]) * weight).to("cpu")
        buffer = flat.numpy()
        ctx.transport.complete(ctx.transport.iallreduce(comm, buffer),
                               "weight average", deadline=plan.lockstep, kind=Kind.WEIGHTS,
                               sent=buffer.nbytes, received=buffer.nbytes, step=step)
        averaged = torch.from_numpy(buffer)
        for tensor, part in zip(tensors, averaged.split([t.numel() for t in tensors]),
                                strict=True):
            tensor.copy_(part.view_as(tensor))


def averaged_tensors(module: nn.Module, buffers: bool) -> list[torch.Tensor]:
    """What a federated average replaces: the parameters, and with ``buffers`` the
    floating-point buffers (BatchNorm running statistics; FedBN keeps them local). Integer
    buffers (BatchNorm's batch count) always stay local."""
    tensors = list(module.parameters())
    if buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


@dataclass(frozen=True)
class AveragingPlan:
    """When FedAvg-style averages happen, agreed by every member from the same step plans:
    after every ``every``-th step that all members reach, then once more after each member's
    last step unless that point already was the last one for everybody."""

    every: int
    common: int
    at_end: bool
    lockstep: bool
    """Every member has the same steps, so members reach each average together (it is
    then waited for under the deadline; otherwise the ones that finish first wait for the
    others' remaining steps)."""

    @classmethod
    def of(cls, steps: Sequence[int], every: int) -> AveragingPlan:
        common = min(steps)
        return cls(every, common, max(steps) != common or common % every != 0,
                   max(steps) == common)

    def due(self, step: int, last: int) -> int:
        """How many averages follow ``step`` for a member whose last step is ``last``."""
        periodic = step <= self.common and step % self.every == 0
        return int(periodic) + int(self.at_end and step == last)


@contextlib.contextmanager
def compute_span(ctx: RankContext, name: str, **args: Any) -> Iterator[None]:
    """A client's compute phase as a trace span; with ``run.count_flops`` the phase runs
    under ``FlopCounterMode`` and the span records its FLOPs (what ``mpisplit resources``
    predicts: matrix products and convolutions)."""
    with ctx.tracer.span(name, **args) as recorded:
        if not ctx.config.run.count_flops:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            yield
        recorded["flops"] = counter.get_total_flops()


def next_batch(ctx: RankContext, batches: Iterator[Batch], step: int) -> Batch:
    """The next training batch; the time it takes (the reader's prefetch fell behind) is the
    step's "data" span."""
    with ctx.tracer.span("data", step=step):
        return next(batches)


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
    total = planned_steps(len(reader), cfg.train)
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

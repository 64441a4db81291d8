"""Who trains when: every client's step budget, the round-robin turns of sequential order,
this client's turns and the hand-over of the lower parts between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpisplit.checkpoint import pack, unpack
from mpisplit.config import TrainConfig
from mpisplit.data import Batch, ShardReader
from mpisplit.driver import next_batch, step_budget, training_batches
from mpisplit.engine import EvalResult, RankContext
from mpisplit.schemes.instrumentation import record_client_step
from mpisplit.schemes.sending import CutSender, send_marker
from mpisplit.seeds import Stream, derive
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import Flag, Kind, Transport


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
    plans = exchange_step_plans(ctx, step_budget(len(reader), cfg.train), len(reader))
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

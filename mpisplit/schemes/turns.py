"""Who trains when: every client's step budget, the round-robin turns of sequential order,
this client's turns (``ClientTurns``) and the hand-over of the lower parts between them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpisplit.config import TrainConfig
from mpisplit.data import ShardReader
from mpisplit.driver import EvalSchedule, StepDriver, StepRole, step_budget
from mpisplit.engine import EvalResult, RankContext
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.sending import send_marker
from mpisplit.seeds import Stream, derive
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import Transport


def clients_total_steps(ctx: RankContext) -> int:
    """A non-client rank's side of the step-budget exchange: every client's steps, summed."""
    return int(_exchange(ctx, [])[:, :, 0].sum())


def exchange_step_budgets(ctx: RankContext, steps: int, epoch_length: int) -> np.ndarray:
    """Every rank's (step budget, batches per epoch); raw-buffer Allgather, once per run."""
    return _exchange(ctx, [(steps, epoch_length)])[:, 0]


def client_budgets(ctx: RankContext, plans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Every logical client's (step budget, batches per epoch), in client order, from the
    ``plans`` of the clients each rank hosts (``exchange_step_budgets``' one Allgather)."""
    return _exchange(ctx, plans)[ctx.topology.ranks(Role.CLIENT)].reshape(-1, 2)


def _exchange(ctx: RankContext, plans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Every rank's ``plans``, one row per client it hosts (zeros where it has none)."""
    width = ctx.topology.clients_per_rank
    mine = np.zeros((width, 2), np.int64)
    if plans:
        mine[: len(plans)] = plans
    everyone = np.zeros((ctx.comm.Get_size(), width, 2), np.int64)
    ctx.transport.complete(ctx.comm.Iallgather(mine, everyone), "exchange of step plans")
    return everyone


def round_robin_turns(steps: Sequence[int], turn_lengths: Sequence[int]) -> list[tuple[int, int]]:
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
class ClientTurns:
    """Which turns this client trains, and how many steps its lower parts take."""

    turns: list[tuple[int, int]]
    me: int
    part_steps: int
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
        return sum(
            max(0, min(last, step) - first + 1)
            for client, first, last in self.spans()
            if client == self.me
        )

    @property
    def evaluates_final(self) -> bool:
        """Parallel clients each evaluate (or the sampled ones: ``evaluator``); in
        sequential order the last turn's client does."""
        return self.evaluator and (self.turns[-1][0] == self.me if self.turns else True)

    def evaluation(self, train: TrainConfig) -> EvalSchedule:
        """When this client evaluates between its steps."""
        return EvalSchedule.of(
            train, self.part_steps if self.evaluates_final else None, self.evaluator
        )


def agree_turns(ctx: RankContext, reader: ShardReader) -> ClientTurns:
    """Exchanges step budgets (collective) and derives this client's turns."""
    return hosted_turns(ctx, [reader])[0]


def hosted_turns(ctx: RankContext, readers: Sequence[ShardReader]) -> list[ClientTurns]:
    """Exchanges step budgets (collective) and derives the turns of each logical client
    this rank hosts (``ctx.me.clients``, one reader each)."""
    cfg = ctx.config
    budgets = client_budgets(ctx, [(step_budget(len(r), cfg.train), len(r)) for r in readers])
    steps = [int(n) for n in budgets[:, 0]]
    if cfg.scheme.client_order == "sequential":
        lengths = [cfg.scheme.options.turn_steps or int(n) for n in budgets[:, 1]]
        turns = round_robin_turns(steps, lengths)
        return [ClientTurns(turns, k, sum(steps), sum(steps)) for k in ctx.me.clients]
    evaluators = evaluating_clients(cfg.train, len(steps))
    return [
        ClientTurns([(k, steps[k])], k, steps[k], min(steps), evaluator=k in evaluators)
        for k in ctx.me.clients
    ]


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
    turns: ClientTurns,
    role: StepRole,
    reader: ShardReader,
    first_hop: int | Sequence[int],
) -> ClientReport:
    """A client's turns on the step driver: the hand-over of ``role.segments`` in, its steps
    and periodic evaluations, the hand-over out; the checkpoint meetings of other clients'
    turns while this one waits. At the end the final turn's client calls
    ``role.evaluate(step, True)`` (which must tell ``first_hop`` it is done); the others just
    send ``first_hop`` (each, when several) a done marker. In sequential order the final
    turn's client then hands the final parts to every other client, so every client ends with
    (and saves) the same, final lower part, not the one of its own last turn.

    A resumed run starts after the checkpoint's step, with the same data position.
    """
    driver = StepDriver(
        ctx,
        turns.part_steps,
        until=turns.until,
        evaluation=turns.evaluation(ctx.config.train),
        progress=False,
    )
    driver.restore(role)
    batches = driver.batches(reader, skip=turns.my_steps_through(driver.resumed))
    hand_over = PartsHandOver(ctx.transport, ctx.topology.ranks(Role.CLIENT), role.segments)
    spans = list(turns.spans())
    for turn, (client, first, last) in enumerate(spans):
        if client != turns.me:
            driver.sit_out(first, last)
            continue
        if last < driver.resumed:
            continue
        previous = spans[turn - 1][0] if turn > 0 else turns.me
        if first > driver.resumed and previous != turns.me:
            hand_over.receive(previous)
        driver.train(role, batches, first, last)
        following = spans[turn + 1][0] if turn + 1 < len(spans) else turns.me
        if following != turns.me:
            hand_over.send(following, last)
    report = ClientReport(steps=turns.my_steps, samples=driver.samples)
    if turns.evaluates_final:
        result = role.evaluate(turns.part_steps, True)
        report.final_evals = [] if result is None else [result]
    else:
        for hop in [first_hop] if isinstance(first_hop, int) else first_hop:
            send_marker(ctx, hop, turns.part_steps, Flag.DONE)
    if ctx.config.scheme.client_order == "sequential" and spans:
        hand_over.share_final(spans[-1][0], turns)
    return report


@dataclass
class PartsHandOver:
    """Sequential order's hand-over of the lower parts (weights, optimizer and schedule
    state) from one client to the next, peer to peer."""

    transport: Transport
    clients: Sequence[int]
    segments: Sequence[Segment]

    def send(self, client: int, step: int) -> None:
        for segment in self.segments:
            self.transport.send(
                segment.state_bytes(), self.clients[client], Kind.WEIGHTS, step=step
            )

    def receive(self, client: int) -> None:
        for segment in self.segments:
            segment.load_state_bytes(
                self.transport.recv(Kind.WEIGHTS, self.clients[client], deadline=False).tensor
            )

    def share_final(self, last: int, turns: ClientTurns) -> None:
        """The final turn's client sends its parts to every other client, which load them."""
        if turns.me != last:
            self.receive(last)
            return
        for other in range(len(self.clients)):
            if other != last:
                self.send(other, turns.part_steps)

"""Many logical clients on one rank (``scheme.clients_per_rank``): the process and the torch
runtime are shared, nothing else. The scheme supplies each client's step role (vanilla's and
SplitFed's ``LowerClient``, U-shaped's client) over that client's segments.

Each hosted client has its own context (``RankContext`` as that client: its shard, its
random streams, its end markers), its own reader position, ``CutSender`` and step driver (its
metrics records carry ``client``), and in parallel order its own lower part and optimizer.
The rank runs them one at a time and tells the transport whose turn it is, so every header
names the logical client and the server tells them apart. Federated averages over the
clients (``HostedAverages``) sum the rank's clients first and join the collective once.

Parallel order runs rounds: in each, every hosted client that still has steps takes one, in
client order (or the steps follow a given service order: SplitFed v2's server order).
Sequential order follows the round-robin turns of all clients; the lower part travels, so the
clients of one rank share it (the hand-over inside a rank is no message) and it goes from
rank to rank as with one client per rank.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from mpisplit.data import Batch, ShardReader
from mpisplit.driver import StepDriver, StepRole
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.protocol import Flag
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.sending import CutSender, send_marker
from mpisplit.schemes.turns import ClientTurns, PartsHandOver, hosted_turns
from mpisplit.segment import Segment
from mpisplit.topology import Role


class HostedRole(StepRole[Batch | None], Protocol):
    """A client's step role with the ``CutSender`` its traffic leaves through."""

    sender: CutSender


MakeRole = Callable[[RankContext, list[Segment], ShardReader], HostedRole]
"""A client's role from its context, its segments (the model parts it trains) and the
test reader."""


@dataclass
class Hosted:
    """One logical client on this rank: its turns, step role, batches and driver."""

    turns: ClientTurns
    role: HostedRole
    batches: Iterator[Batch]
    driver: StepDriver

    @property
    def index(self) -> int:
        return self.turns.me


def train_hosted_clients(
    ctx: RankContext,
    server: int,
    parts: Sequence[int],
    make_role: MakeRole,
    saved: Callable[[HostedRole], Segment],
    *,
    order: Sequence[int] | None = None,
) -> RankResult:
    """The clients this rank hosts, in parallel rounds or sequential turns: each trains model
    ``parts`` through ``make_role``'s role with ``server`` as its first hop; ``saved`` is
    what its ``model-rank<R>-client<k>.pt`` holds. ``order``: in parallel order, the client
    of each step the server takes (every client's), which this rank's steps follow."""
    contexts = [dataclasses.replace(ctx, me=ctx.me.as_client(k)) for k in ctx.me.clients]
    sequential = ctx.config.scheme.client_order == "sequential"
    evals: list[EvalResult] = []
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        turns = hosted_turns(ctx, readers)
        shared = [ctx.build_segment(i, turns[0].part_steps) for i in parts] if sequential else None
        hosted = [
            _host(
                c,
                t,
                make_role(c, shared or [c.build_segment(i, t.part_steps) for i in parts], tests),
                r,
            )
            for c, t, r in zip(contexts, turns, readers, strict=True)
        ]
        hand_over = PartsHandOver(
            ctx.transport, ctx.topology.client_ranks(), hosted[0].role.segments
        )
        for client, first, last in _schedule(ctx, hosted, hand_over, order):
            mine = hosted[client - ctx.me.clients[0]]
            ctx.transport.client = client
            mine.driver.train(mine.role, mine.batches, first, last, client=client)
        for mine in hosted:
            ctx.transport.client = mine.index
            if mine.turns.evaluates_final:
                result = mine.role.evaluate(mine.turns.part_steps, True)
                evals += [] if result is None else [result]
            else:
                send_marker(mine.driver.ctx, server, mine.turns.part_steps, Flag.DONE)
        if sequential:
            _share_final(ctx, hand_over, hosted[0].turns)
    leakages = [m.role.sender.leakage for m in hosted if m.role.sender.leakage is not None]
    return RankResult(
        steps=sum(m.turns.my_steps for m in hosted),
        samples=sum(m.driver.samples for m in hosted),
        final_evals=evals,
        client_parts={m.index: saved(m.role) for m in hosted},
        leakage=statistics.fmean(leakages) if leakages else None,
    )


def _host(ctx: RankContext, turns: ClientTurns, role: HostedRole, reader: ShardReader) -> Hosted:
    """Logical client ``turns.me`` as ``ctx`` (that client's context) sees it."""
    driver = StepDriver(
        ctx,
        turns.part_steps,
        until=0,
        evaluation=turns.evaluation(ctx.config.train),
        progress=False,
    )
    return Hosted(turns, role, driver.batches(reader, skip=0), driver)


def _schedule(
    ctx: RankContext, hosted: list[Hosted], hand_over: PartsHandOver, order: Sequence[int] | None
) -> Iterator[tuple[int, int, int]]:
    """``(client, first, last)`` of the steps this rank runs, in order: sequential turns
    (receiving the travelling part from the previous turn's rank, sending it to the next
    one's, around them), or parallel steps in ``order`` (default: rounds of one step per
    client, in client order)."""
    if ctx.config.scheme.client_order == "parallel":
        if order is None:
            rounds = max(m.turns.my_steps for m in hosted)
            order = [m.index for step in range(rounds) for m in hosted if step < m.turns.my_steps]
        taken = {m.index: 0 for m in hosted}
        for client in (k for k in order if k in taken):
            taken[client] += 1
            yield client, taken[client], taken[client]
        return
    ranks = ctx.topology.client_ranks()
    spans = list(hosted[0].turns.spans())
    for turn, (client, first, last) in enumerate(spans):
        if ranks[client] != ctx.me.rank:
            continue
        if turn > 0 and ranks[spans[turn - 1][0]] != ctx.me.rank:
            hand_over.receive(spans[turn - 1][0])
        yield client, first, last
        if turn + 1 < len(spans) and ranks[spans[turn + 1][0]] != ctx.me.rank:
            hand_over.send(spans[turn + 1][0], last)


def _share_final(ctx: RankContext, hand_over: PartsHandOver, turns: ClientTurns) -> None:
    """Sequential order's end: the rank of the final turn sends the final part to each other
    client rank once (to its first client), which loads it for all the clients it hosts."""
    if not turns.turns:
        return
    ranks = ctx.topology.client_ranks()
    final_rank = ranks[turns.turns[-1][0]]
    if ctx.me.rank != final_rank:
        hand_over.receive(turns.turns[-1][0])
        return
    for placement in ctx.topology.placements:
        if placement.role == Role.CLIENT and placement.rank != final_rank:
            hand_over.send(placement.clients[0], turns.part_steps)


Member = tuple[nn.Module, float]
"""A module in a federated average and its weight (its client's share of the samples)."""


class HostedAverages:
    """The federated averages of the logical clients one rank hosts (one or several).

    Each client reaches its j-th average after one of its own steps (``join``); the rank
    takes part in the j-th collective (``average(members, step)``) once every client it
    hosts has joined it, with all of them as members. A client that joined takes no step
    before that average runs (the periodic averages fall on the same step of every client,
    which the hosted schedule reaches in one round; the last one follows a client's last
    step), so its module is read only then, and already holds any earlier average.
    """

    def __init__(
        self, clients: Sequence[int], average: Callable[[list[Member], int], None]
    ) -> None:
        self.average = average
        self.waiting: dict[int, list[Member]] = {k: [] for k in clients}

    def join(self, client: int, module: nn.Module, weight: float, step: int) -> None:
        """Client ``client``'s next average, after its ``step``."""
        self.waiting[client].append((module, weight))
        while all(self.waiting.values()):
            self.average([queue.pop(0) for queue in self.waiting.values()], step)

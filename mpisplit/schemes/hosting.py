"""Many logical clients on one rank (``scheme.clients_per_rank``): the process and the torch
runtime are shared, nothing else. The scheme supplies each client's step role (vanilla's and
SplitFed's ``LowerClient``, U-shaped's client) over that client's segments.

Each hosted client has its own context (``RankContext`` as that client: its shard, its
random streams, its end markers), its own reader position, ``CutSender`` and step driver (its
metrics records carry ``client``), and in parallel order its own lower part and optimizer.
The rank runs them one at a time and tells the transport whose turn it is, so every header
names the logical client and the server tells them apart. Federated averages over the
clients (``HostedCollective``) sum the rank's clients first and join the collective once.

Parallel order runs rounds: in each, every hosted client that still has steps takes one, in
client order (or the steps follow a given service order: SplitFed v2's server order).
Sequential order follows the round-robin turns of all clients; the lower part travels, so the
clients of one rank share it (the hand-over inside a rank is no message) and it goes from
rank to rank as with one client per rank.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from mpisplit.checkpoint import pack, unpack
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
    first_hop: int | Sequence[int],
    parts: Sequence[int],
    make_role: MakeRole,
    saved: Callable[[HostedRole], Segment],
    *,
    order: Sequence[int] | None = None,
) -> RankResult:
    """The clients this rank hosts, in parallel rounds or sequential turns: each trains model
    ``parts`` through ``make_role``'s role with ``first_hop`` as its first hop (each, when
    several: multi-task's task servers); ``saved`` is
    what its ``model-rank<R>-client<k>.pt`` holds. ``order``: in parallel order, the client
    of each step the server takes (every client's), which this rank's steps follow."""
    contexts = hosted_contexts(ctx)
    sequential = ctx.config.scheme.client_order == "sequential"
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        turns = hosted_turns(ctx, readers)
        shared = [ctx.build_segment(i, turns[0].part_steps) for i in parts] if sequential else None
        state = HostedState()
        state.hosted += [
            _host(
                c,
                t,
                make_role(c, shared or [c.build_segment(i, t.part_steps) for i in parts], tests),
                r,
                state,
                meets=sequential or t.me == ctx.me.clients[-1],
            )
            for c, t, r in zip(contexts, turns, readers, strict=True)
        ]
        hosted = state.hosted
        state.restore(ctx)
        hand_over = PartsHandOver(
            ctx.transport, ctx.topology.client_ranks(), hosted[0].role.segments
        )
        for client, first, last in _schedule(ctx, hosted, hand_over, order):
            mine = hosted[client - ctx.me.clients[0]]
            ctx.transport.client = client
            mine.driver.train(mine.role, mine.batches, first, last, client=client)
        evals = _finish(ctx, hosted, first_hop)
        if sequential:
            _share_final(ctx, hand_over, hosted[0].turns)
    leakages = [m.role.sender.leakage for m in hosted if m.role.sender.leakage is not None]
    return RankResult(
        steps=sum(m.turns.my_steps for m in hosted),
        samples=sum(m.driver.samples for m in hosted),
        final_evals=evals,
        client_parts={m.index: saved(m.role).module.state_dict for m in hosted},
        leakage=statistics.fmean(leakages) if leakages else None,
    )


def _finish(
    ctx: RankContext, hosted: list[Hosted], first_hop: int | Sequence[int]
) -> list[EvalResult]:
    """Each client's end: its final evaluation if it makes one (which tells the hops it is
    done), else a done marker to each hop. Returns the evaluations made here."""
    evals: list[EvalResult] = []
    for mine in hosted:
        ctx.transport.client = mine.index
        if mine.turns.evaluates_final:
            result = mine.role.evaluate(mine.turns.part_steps, True)
            evals += [] if result is None else [result]
        else:
            for hop in [first_hop] if isinstance(first_hop, int) else first_hop:
                send_marker(mine.driver.ctx, hop, mine.turns.part_steps, Flag.DONE)
    return evals


def _host(
    ctx: RankContext,
    turns: ClientTurns,
    role: HostedRole,
    reader: ShardReader,
    state: HostedState,
    *,
    meets: bool,
) -> Hosted:
    """Logical client ``turns.me`` as ``ctx`` (that client's context) sees it. Its driver
    ``meets`` for the rank's checkpoints (with the rank's ``state``) after its steps: each
    client in sequential order, and in parallel order only the rank's last client, whose
    step ends the round in which every hosted client took that step. A resumed run skips
    the batches it trained on."""
    driver = StepDriver(
        ctx,
        turns.part_steps,
        until=turns.until,
        meets=meets,
        evaluation=turns.evaluation(ctx.config.train),
        progress=False,
        state=state.pack,
    )
    skip = turns.my_steps_through(driver.resumed)
    return Hosted(turns, role, driver.batches(reader, skip=skip), driver)


@dataclass
class HostedState:
    """What a hosting rank's checkpoints hold: every hosted client's segments (sequential
    order's travelling ones once), random generators and samples count."""

    hosted: list[Hosted] = dataclasses.field(default_factory=list)

    def _segments(self) -> list[Segment]:
        return list({id(s): s for m in self.hosted for s in m.role.segments}.values())

    def _generators(self) -> list[torch.Generator]:
        return [g for m in self.hosted for g in m.role.generators]

    def pack(self) -> dict[str, Any]:
        counters = {f"samples{m.index}": m.driver.samples for m in self.hosted}
        return pack(self._segments(), self._generators(), **counters)

    def restore(self, ctx: RankContext) -> None:
        """Loads the checkpoint a resumed run starts from (and torch's random state)."""
        saved = ctx.checkpoints.restore()
        if saved is not None:
            counters = unpack(saved, self._segments(), self._generators())
            for m in self.hosted:
                m.driver.samples = counters[f"samples{m.index}"]


def _schedule(
    ctx: RankContext, hosted: list[Hosted], hand_over: PartsHandOver, order: Sequence[int] | None
) -> Iterator[tuple[int, int, int]]:
    """``(client, first, last)`` of the steps this rank runs, in order: sequential turns
    (receiving the travelling part from the previous turn's rank, sending it to the next
    one's, around them), or parallel steps in ``order`` (default: rounds of one step per
    client, in client order)."""
    if ctx.config.scheme.client_order == "parallel":
        yield from parallel_steps({m.index: m.turns.my_steps for m in hosted}, order)
        return
    ranks, resumed = ctx.topology.client_ranks(), ctx.checkpoints.resume_step
    spans = list(hosted[0].turns.spans())
    for turn, (client, first, last) in enumerate(spans):
        if ranks[client] != ctx.me.rank:
            hosted[0].driver.sit_out(first, last)
            continue
        if last < resumed:
            continue
        if turn > 0 and first > resumed and ranks[spans[turn - 1][0]] != ctx.me.rank:
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


T = TypeVar("T")


class HostedCollective(Generic[T]):
    """A collective over all logical clients (a federated average, a synchronous gradient
    average) that the clients one rank hosts (one or several) reach one at a time.

    Each client joins its j-th collective after one of its own steps (``join``, with what it
    brings: its module and weight, say); the rank takes part in the j-th collective
    (``collective(items)``, the hosted clients' items in client order) once every client it
    hosts has joined it. A client that joined takes no step before the collective runs (in
    the hosted rounds the collectives fall on the same step of every client, or after a
    client's last step), so its module is read only then and holds every earlier result.
    """

    def __init__(self, clients: Sequence[int], collective: Callable[[list[T]], None]) -> None:
        self.collective = collective
        self.waiting: dict[int, list[T]] = {k: [] for k in clients}

    def join(self, client: int, item: T) -> None:
        """Client ``client``'s next collective."""
        self.waiting[client].append(item)
        while all(self.waiting.values()):
            self.collective([queue.pop(0) for queue in self.waiting.values()])


def hosted_contexts(ctx: RankContext) -> list[RankContext]:
    """This rank as each logical client it hosts (its shard, streams and markers)."""
    return [dataclasses.replace(ctx, me=ctx.me.as_client(k)) for k in ctx.me.clients]


def parallel_steps(
    steps: Mapping[int, int], order: Sequence[int] | None = None
) -> Iterator[tuple[int, int, int]]:
    """``(client, step, step)`` for each step of the hosted clients (``steps``: each one's
    budget) in parallel order: in ``order`` (the client of each step of every client, of
    which this rank takes its own), by default rounds of one step per client in client
    order."""
    if order is None:
        order = [k for step in range(max(steps.values())) for k in steps if step < steps[k]]
    taken = dict.fromkeys(steps, 0)
    for client in (k for k in order if k in taken):
        taken[client] += 1
        yield client, taken[client], taken[client]

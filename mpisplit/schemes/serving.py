"""The server's loop: cut activations from any client, served in arrival order.

Training activations get a forward, loss and backward (the gradient goes back to the sender
through the cut hook) and, after a step's last microbatch, one optimizer step; evaluation
passes are tallied per client; the loop ends when every client has said it is done. Which
segment serves whom is the ``Upper``; a fixed order of senders and its checkpoint pacing is
a ``ServeOrder``; clients that fall silent are the ``Liveness``' business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mpisplit.cut import recv_forward
from mpisplit.driver import Parts, StepDriver
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.evaluation import EvalTally, evaluating, record_eval
from mpisplit.schemes.liveness import Dropping, Liveness
from mpisplit.schemes.microbatches import microbatch_share
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import ANY_SOURCE, Message, PeerTimeout

AfterDone = Callable[[torch.Tensor, Message], None]


@dataclass(frozen=True)
class Upper:
    """What the server trains: the segment that serves each logical client, the segments
    its checkpoints keep, and ``after_step(client)`` after each optimizer step."""

    segment_for: Callable[[int], Segment]
    owned: Sequence[Segment]
    after_step: Callable[[int], None] | None = None

    @classmethod
    def shared(cls, segment: Segment) -> Upper:
        """One upper segment for every client."""
        return cls(lambda _source: segment, [segment])

    @classmethod
    def per_client(cls, copies: Sequence[Segment], after_step: Callable[[int], None]) -> Upper:
        """One copy per logical client (splitfed v1; not checkpointable)."""
        return cls(copies.__getitem__, [], after_step)


@dataclass(frozen=True)
class ServeOrder:
    """A fixed order of senders (splitfed v2): the client rank of each training step (arrival
    order after it runs out); checkpoints once per ``round_size`` steps, before ``until``."""

    senders: Sequence[int]
    round_size: int
    until: int


@dataclass
class ServeReport:
    steps: int = 0
    final_evals: list[EvalResult] = field(default_factory=list)


def serve_clients(
    ctx: RankContext,
    upper: Upper,
    total_steps: int,
    *,
    task: int = 0,
    order: ServeOrder | None = None,
    after_done: AfterDone | None = None,
    dropping: Dropping | None = None,
) -> ServeReport:
    """Serves every client until each is done; ``task`` labels the evaluations (a multitask
    server's task index). ``after_done(activation, message)`` takes the one message a
    client sends after its DONE marker (a spatio-temporal site's hand-over; it receives the
    rest from that source), and the loop also waits for those. With ``dropping``, a client
    that falls silent is dropped from the rest of the loop instead of ending the job."""
    return Server(ctx, upper, total_steps, task, order, after_done, dropping).run()


def serve_with(
    ctx: RankContext, segment: Segment, total_steps: int, *, task: int = 0
) -> RankResult:
    """``serve_clients`` with one upper ``segment``, reported as this rank's result."""
    report = serve_clients(ctx, Upper.shared(segment), total_steps, task=task)
    return RankResult(steps=report.steps, final_evals=report.final_evals, segment=segment)


class Server:
    """``serve_clients``' state: who is still active, the open evaluation tallies, whose
    microbatch is expected next, and the step driver."""

    def __init__(
        self,
        ctx: RankContext,
        upper: Upper,
        total_steps: int,
        task: int,
        order: ServeOrder | None,
        after_done: AfterDone | None,
        dropping: Dropping | None,
    ) -> None:
        self.ctx, self.upper, self.task, self.after_done = ctx, upper, task, after_done
        self.transport = ctx.transport
        self.client_rank = ctx.topology.client_ranks()
        """The rank of each logical client (a rank may host several)."""
        self.hosted = {p.rank: p.clients for p in ctx.topology.placements if p.role == Role.CLIENT}
        self.last_relay = ctx.topology.ranks(Role.RELAY)[-1:]
        self.round_size = order.round_size if order else 1
        self.report = ServeReport(steps=ctx.checkpoints.resume_step * self.round_size)
        self.driver = StepDriver(
            ctx, total_steps, until=order.until if order else None, done=self.report.steps
        )
        self.driver.restore(Parts(upper.owned))
        self.senders = iter((order.senders if order else ())[self.report.steps :])
        self.expected = next(self.senders, ANY_SOURCE)
        self.active = set(range(len(self.client_rank)))
        self.finished: set[int] = set()  # past their DONE marker, their last message to come
        self.feeders = self._feeders()
        self.tallies: dict[int, EvalTally] = {}
        watched = ctx.config.scheme.client_order == "parallel" and not self.last_relay
        self.liveness = Liveness.of(self.transport, dropping, watched=watched)

    def run(self) -> ServeReport:
        while self.active:
            received = self._receive()
            if received is not None:
                self._handle(*received)
        return self.report

    def _receive(self) -> tuple[torch.Tensor, Message] | None:
        """The next message from a client still served (None: nothing to handle)."""
        feeders = self.last_relay or self.feeders
        try:
            activation, message = recv_forward(
                self.transport, self.expected, device=self.ctx.device, senders=feeders
            )
        except PeerTimeout as err:  # nobody, or the client mid-step or mid-message, spoke
            self._stalled(err, err.peers, in_step=self.expected != ANY_SOURCE)
            return None
        if self.liveness.dropped(message.source):
            return None  # a dropped client that came back: it is no longer served
        if silent := self.liveness.silent(message.source, feeders):
            self.liveness.lose(silent)
            self._forget(silent)
        return activation, message

    def _handle(self, activation: torch.Tensor, message: Message) -> None:
        source = message.source
        self.transport.client = message.client  # the gradient's header names its client
        if self._client_of(message) in self.finished:
            self._take_last(activation, message)
            return
        if message.flags & (Flag.LAST | Flag.DONE):
            self._end_marker(activation, message)
            return
        try:
            labels = self.transport.recv(Kind.LABELS, source).tensor.to(self.ctx.device)
        except PeerTimeout as err:
            self._stalled(err, [source], in_step=True)
            return
        if message.flags & Flag.EVAL:
            module = self.upper.segment_for(message.client).module
            with evaluating(module):
                self.tallies.setdefault(source, EvalTally()).add(module(activation), labels)
            return
        self._train(activation, labels, message)

    def _train(self, activation: torch.Tensor, labels: torch.Tensor, message: Message) -> None:
        """One microbatch; after a step's last, the update, the record and the meeting."""
        source, step, tracer = message.source, self.report.steps, self.ctx.tracer
        segment = self.upper.segment_for(message.client)
        with tracer.span("forward", step=step):
            loss = check_loss(
                nn.functional.cross_entropy(segment.module(activation), labels), step + 1
            ) * microbatch_share(labels, message)
        with tracer.span("backward", step=step):
            loss.backward()
        if message.flags & Flag.MORE:  # accumulate the step's microbatches, then step
            self.expected = source
            return
        with tracer.span("optimizer", step=step):
            segment.step()
        if self.upper.after_step is not None:
            self.upper.after_step(message.client)
        self.expected = next(self.senders, ANY_SOURCE)
        self.report.steps += 1
        self.driver.record(self.report.steps, float(loss.detach()), client=self._client_of(message))
        if self.report.steps % self.round_size == 0 and self.driver.meet(
            self.report.steps // self.round_size
        ):
            self.liveness.restart()  # the clients were writing checkpoints, not stalled

    def _end_marker(self, activation: torch.Tensor, message: Message) -> None:
        """The end of an evaluation pass (its tally recorded), or of a client's steps."""
        client = int(activation[0])  # behind a relay the source is not the client
        if message.flags & Flag.LAST:
            tally = self.tallies.pop(message.source, EvalTally())
            result = record_eval(self.ctx, tally.result(message.step, client, self.task))
            if message.flags & Flag.DONE:
                self.report.final_evals.append(result)
        if message.flags & Flag.DONE:
            if self.after_done is None:
                self._retire([client])
            else:
                self.finished.add(client)

    def _take_last(self, activation: torch.Tensor, message: Message) -> None:
        """The message a client sends after its DONE marker, then it is through."""
        assert self.after_done is not None
        try:
            self.after_done(activation, message)
        except PeerTimeout as err:
            self._stalled(err, [message.source], in_step=False)
            return
        self._retire([self._client_of(message)])

    def _stalled(self, err: PeerTimeout, ranks: Sequence[int], *, in_step: bool) -> None:
        """A wait on ``ranks`` timed out: they leave the run if clients may be dropped
        (``in_step``: the one whose step was under way, which is discarded); otherwise the
        job ends."""
        self.liveness.lose(ranks, err)
        self._forget(ranks)
        if in_step:
            # the client whose message came last: the one mid-step
            self.upper.segment_for(self.transport.client).module.zero_grad(set_to_none=True)
        self.expected = ANY_SOURCE

    def _forget(self, ranks: Sequence[int]) -> None:
        for rank in ranks:
            self._retire(self.hosted[rank])
            self.tallies.pop(rank, None)

    def _retire(self, clients: Sequence[int | None]) -> None:
        """``clients`` are through: the feeders are those of the clients still active,
        worked out here and not on every message (hundreds of logical clients)."""
        self.active.difference_update(clients)
        self.finished.difference_update(clients)
        self.feeders = self._feeders()

    def _feeders(self) -> list[int]:
        return sorted({self.client_rank[k] for k in self.active})

    def _client_of(self, message: Message) -> int | None:
        """The logical client a message is from (None behind a relay: the source is not
        a client)."""
        return message.client if message.source in self.hosted else None

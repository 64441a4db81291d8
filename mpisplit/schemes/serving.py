"""The server's loop: cut activations from any client, served in arrival order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpisplit.checkpoint import pack, unpack
from mpisplit.cut import recv_forward
from mpisplit.driver import make_progress, traffic_fields
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.schemes.evaluation import EvalTally, evaluating, record_eval
from mpisplit.schemes.liveness import Dropping, SilenceWatch
from mpisplit.schemes.microbatches import microbatch_share
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import ANY_SOURCE, Flag, Kind, Message, PeerTimeout, Transport


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
                           "client": client_index.get(source), **traffic_fields(ctx)})
        progress.update(report.steps, loss_value)
        if report.steps % round_size == 0:
            met = checkpoints.reached(report.steps // round_size, lambda: pack(owned), until)
            if met and silence is not None:
                silence.restart()  # the clients were writing checkpoints, not stalled
    return report


def serve_with(ctx: RankContext, segment: Segment, total_steps: int, **options: Any
               ) -> RankResult:
    """``serve_clients`` with one upper ``segment``, reported as this rank's result."""
    report = serve_clients(ctx, segment, total_steps, **options)
    return RankResult(steps=report.steps, final_evals=report.final_evals, segment=segment)

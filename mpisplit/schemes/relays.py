"""A rank in the middle of the model: cut activations in, on, gradients back."""

from __future__ import annotations

from mpisplit.checkpoint import pack, unpack
from mpisplit.cut import recv_forward, send_eval, send_forward
from mpisplit.driver import make_progress, traffic_fields
from mpisplit.engine import RankContext
from mpisplit.schemes.evaluation import evaluating
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import ANY_SOURCE, Flag, Kind, Message, Transport


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
        ctx.metrics.write({"step": steps, **traffic_fields(ctx)})
        progress.update(steps, None)
        checkpoints.reached(steps, lambda: pack([segment]), total_steps)
    return steps


def _pass_labels(transport: Transport, message: Message, dest: int) -> None:
    labels = transport.recv(Kind.LABELS, message.source)
    transport.send(labels.tensor, dest, Kind.LABELS, step=labels.step, flags=labels.flags)

"""A rank in the middle of the model: cut activations in, on, gradients back."""

from __future__ import annotations

import torch

from mpisplit.cut import recv_forward, send_eval, send_forward
from mpisplit.driver import Parts, StepDriver
from mpisplit.engine import RankContext
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.evaluation import evaluating
from mpisplit.segment import Segment
from mpisplit.transport import ANY_SOURCE, Message, Transport


def relay_activations(
    ctx: RankContext, segment: Segment, total_steps: int, next_hop: int | None
) -> int:
    """The loop of a rank in the middle of the model: receive a cut activation from any
    sender, run ``segment``, send the result on, and on the way back pass the gradient to
    the sender and step. Returns the training steps taken.

    ``next_hop=None`` sends the result back to its sender (the U-shaped server: the loss
    and labels stay with the client). Otherwise it goes to ``next_hop`` towards the loss
    holder (a multi-hop relay), with the labels and end markers; an evaluation pass is then
    relayed without interleaving, so the receiver tallies it as one client's.
    """
    return Relay(ctx, segment, total_steps, next_hop).run()


class Relay:
    """``relay_activations``' state: its segment, where results go, the step driver."""

    def __init__(
        self, ctx: RankContext, segment: Segment, total_steps: int, next_hop: int | None
    ) -> None:
        self.ctx, self.segment, self.next_hop = ctx, segment, next_hop
        self.transport: Transport = ctx.transport
        self.driver = StepDriver(ctx, total_steps)
        self.steps = self.driver.resumed

    def run(self) -> int:
        self.driver.restore(Parts([self.segment]))
        remaining, source = len(self.ctx.topology.client_ranks()), ANY_SOURCE
        while remaining:
            activation, message = recv_forward(self.transport, source, device=self.ctx.device)
            self.transport.client = message.client  # what goes back names its client
            dest = message.source if self.next_hop is None else self.next_hop
            if message.flags & (Flag.LAST | Flag.DONE):
                if self.next_hop is not None:
                    self.transport.send(
                        activation, dest, Kind.ACTIVATION, step=message.step, flags=message.flags
                    )
                remaining -= bool(message.flags & Flag.DONE)
                source = ANY_SOURCE
            elif message.flags & Flag.EVAL:
                self._evaluate(activation, message, dest)
                source = ANY_SOURCE if self.next_hop is None else message.source
            else:  # a step's microbatches come from one source until the last
                more = self._train(activation, message, dest)
                source = message.source if more else ANY_SOURCE
        return self.steps

    def _evaluate(self, activation: torch.Tensor, message: Message, dest: int) -> None:
        with evaluating(self.segment.module):
            send_eval(self.segment.module(activation), self.transport, dest, message.step)
        if self.next_hop is not None:
            self._pass_labels(message, dest)

    def _train(self, activation: torch.Tensor, message: Message, dest: int) -> bool:
        """Forward on, labels on, gradient back; steps after a step's last microbatch (the
        gradients accumulate until then). Returns whether more microbatches follow."""
        tracer, more = self.ctx.tracer, message.flags & Flag.MORE
        with tracer.span("forward", step=self.steps):
            anchor = send_forward(
                self.segment.module(activation),
                self.transport,
                dest,
                message.step,
                flags=more,
                aux=message.aux,
                microbatch=message.microbatch,
            )
        if self.next_hop is not None:
            self._pass_labels(message, dest)
        with tracer.span("backward", step=self.steps):
            anchor.backward()
        if more:
            return True
        with tracer.span("optimizer", step=self.steps):
            self.segment.step()
        self.steps += 1
        # the U-shaped server hears from the clients themselves: its records name them
        mine = {"client": message.client} if self.next_hop is None else {}
        self.driver.record(self.steps, **mine)
        self.driver.meet(self.steps)
        return False

    def _pass_labels(self, message: Message, dest: int) -> None:
        labels = self.transport.recv(Kind.LABELS, message.source)
        self.transport.send(labels.tensor, dest, Kind.LABELS, step=labels.step, flags=labels.flags)

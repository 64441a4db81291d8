"""What leaves a client for the cut: defended activations (``CutSender``), evaluation passes
and end markers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mpisplit.cut import CutValue, send_eval, send_forward
from mpisplit.data import ShardReader
from mpisplit.engine import RankContext
from mpisplit.privacy import CutDefence
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.evaluation import evaluating
from mpisplit.segment import Segment


class CutSender(CutDefence):
    """A client's point-to-point cut: its activation, defended (``CutDefence``: clipping,
    noise, NoPeek, the leakage sample), sent through ``mpisplit.cut``."""

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx.config.privacy, ctx.me.index)
        self.ctx = ctx

    def train(
        self,
        activation: CutValue,
        inputs: torch.Tensor,
        dest: int,
        step: int,
        *,
        flags: Flag = Flag.NONE,
        aux: int = 0,
        microbatch: int = 0,
    ) -> torch.Tensor:
        """Sends the defended activation; ``.backward()`` on the result completes this
        client's back-propagation (cut gradient plus the NoPeek penalty)."""
        return self.train_fanout(
            activation, inputs, [dest], step, flags=flags, aux=aux, microbatch=microbatch
        )[0]

    def train_fanout(
        self,
        activation: CutValue,
        inputs: torch.Tensor,
        dests: Sequence[int],
        step: int,
        *,
        flags: Flag = Flag.NONE,
        aux: int = 0,
        microbatch: int = 0,
    ) -> list[torch.Tensor]:
        """Sends one defended activation to every rank in ``dests`` (multi-task heads);
        ``torch.autograd.backward`` on the anchors sums their cut gradients. All receivers
        get the same noise draw, and the NoPeek penalty is counted once, not per receiver."""
        sent, penalty = self.defend(activation, inputs)
        anchors = [
            send_forward(
                sent, self.ctx.transport, dest, step, flags=flags, aux=aux, microbatch=microbatch
            )
            for dest in dests
        ]
        if penalty is not None:
            anchors[0] = anchors[0] + penalty
        return anchors

    def evaluate(
        self, activation: CutValue, inputs: torch.Tensor, dest: int, step: int, *, final: bool
    ) -> None:
        """Sends a forward-only activation (defended like training traffic; the final
        evaluation keeps the leakage sample)."""
        send_eval(
            self.defend_eval(activation, inputs, step, final=final), self.ctx.transport, dest, step
        )


def send_eval_pass(
    ctx: RankContext,
    sender: CutSender,
    segment: Segment,
    reader: ShardReader,
    dest: int,
    step: int,
    *,
    final: bool,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
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
            labels_sent = transport.isend(targets, dest, Kind.LABELS, step=step, flags=Flag.EVAL)
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

"""The lower client: holds segment 0, sends cut activations and labels onward."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mpisplit import schedules
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import RankContext, RankResult
from mpisplit.protocol import Kind
from mpisplit.schemes.hosting import train_hosted_clients
from mpisplit.schemes.instrumentation import compute_span
from mpisplit.schemes.microbatches import Microbatch, microbatches
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.sending import CutSender, send_eval_pass
from mpisplit.schemes.turns import agree_turns, run_client_turns
from mpisplit.segment import Segment
from mpisplit.transport import PendingSend

LabelMap = Callable[[torch.Tensor], torch.Tensor]
AfterStep = Callable[[int, Segment, int], None]
"""What runs after each of a client's steps: ``(logical client, its segment, model step)``."""


def train_lower_clients(
    ctx: RankContext,
    first_hop: int | Sequence[int],
    after_step: AfterStep | None = None,
    *,
    labels: Sequence[LabelMap] | None = None,
    order: Sequence[int] | None = None,
) -> RankResult:
    """The lower clients this rank is (one, or several with ``scheme.clients_per_rank``,
    hosted in ``order``: see ``train_hosted_clients``); see ``train_lower_client``."""
    if ctx.me.hosted == 1:
        return train_lower_client(ctx, first_hop, after_step, labels=labels)
    hops = [first_hop] if isinstance(first_hop, int) else list(first_hop)
    maps = list(labels) if labels is not None else [unchanged] * len(hops)
    return train_hosted_clients(
        ctx,
        hops,
        [0],
        lambda c, parts, tests: LowerClient(c, parts[0], hops, tests, maps, after_step),
        lambda client: client.segment,
        order=order,
    )


def train_lower_client(
    ctx: RankContext,
    first_hop: int | Sequence[int],
    after_step: AfterStep | None = None,
    *,
    labels: Sequence[LabelMap] | None = None,
) -> RankResult:
    """A client that holds segment 0 and sends cut activations with labels to ``first_hop``
    (the server, or the first relay); ``after_step`` runs after each step.

    Several ``first_hop`` ranks (multitask heads) each get the same cut activation, with the
    labels mapped by ``labels[i]`` for hop i; each microbatch back-propagates the sum of their
    gradients in one pass, so the lower part steps once on the summed losses.
    """
    hops = [first_hop] if isinstance(first_hop, int) else list(first_hop)
    reader = client_reader(ctx)
    with reader, test_reader(ctx) as tests:
        turns = agree_turns(ctx, reader)
        client = LowerClient(
            ctx,
            ctx.build_segment(0, turns.part_steps),
            hops,
            tests,
            list(labels) if labels is not None else [unchanged] * len(hops),
            after_step,
        )
        report = run_client_turns(ctx, turns, client, reader, hops)
    return RankResult(
        steps=report.steps,
        samples=report.samples,
        segment=client.segment,
        leakage=client.sender.leakage,
    )


class LowerClient:
    """The lower client's step (microbatches forward to every hop, their gradients back,
    one update) and evaluation (a forward-only pass over the test set to every hop)."""

    def __init__(
        self,
        ctx: RankContext,
        segment: Segment,
        hops: list[int],
        tests: ShardReader,
        label_maps: list[LabelMap],
        after_step: AfterStep | None,
    ) -> None:
        self.ctx, self.segment, self.hops, self.tests = ctx, segment, hops, tests
        self.label_maps, self.after_step = label_maps, after_step
        self.sender = CutSender(ctx)
        self.segments = [segment]
        self.generators = [self.sender.noise]

    def train_step(self, batch: Batch | None, index: int) -> None:
        assert batch is not None
        parts = microbatches(batch, self.ctx.config.transport.microbatches)
        label_sends: list[PendingSend] = []

        def forward(microbatch: int) -> list[torch.Tensor]:
            return self._forward(
                parts[microbatch], microbatch, index, len(batch.labels), label_sends
            )

        def backward(anchors: list[torch.Tensor]) -> None:
            with compute_span(self.ctx, "backward", step=index):
                torch.autograd.backward(anchors)

        schedules.run(
            schedules.of(self.ctx.config.transport.schedule, len(parts)), forward, backward
        )
        for pending in label_sends:
            pending.wait()
        with self.ctx.tracer.span("optimizer", step=index):
            self.segment.step()
        if self.after_step is not None:
            self.after_step(self.ctx.me.index, self.segment, index + 1)

    def _forward(
        self,
        part: Microbatch,
        microbatch: int,
        index: int,
        batch_size: int,
        label_sends: list[PendingSend],
    ) -> list[torch.Tensor]:
        with compute_span(self.ctx, "forward", step=index, microbatch=microbatch):
            features = part.features.to(self.ctx.device)
            activation = self.segment.module(features)
        # Labels go first: MPI libraries deliver one sender's eager messages in the order
        # posted, so a client stopped right after sending cannot leave the server with an
        # activation whose labels never come (spatio-temporal drops).
        label_sends.extend(
            self.ctx.transport.isend(
                label_map(part.labels), hop, Kind.LABELS, step=index, microbatch=microbatch
            )
            for hop, label_map in zip(self.hops, self.label_maps, strict=True)
        )
        return self.sender.train_fanout(
            activation,
            features,
            self.hops,
            index,
            flags=part.flags,
            aux=batch_size,
            microbatch=microbatch,
        )

    def evaluate(self, step: int, final: bool) -> None:
        for hop, label_map in zip(self.hops, self.label_maps, strict=True):
            send_eval_pass(
                self.ctx,
                self.sender,
                self.segment,
                self.tests,
                hop,
                step,
                final=final,
                labels=label_map,
            )


def unchanged(labels: torch.Tensor) -> torch.Tensor:
    """The labels a server scores as they are (not a multitask head's mapping)."""
    return labels

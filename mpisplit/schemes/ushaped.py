"""U-shaped split learning: the client holds the head (segment 0) and the tail with the loss
(segment 2), the server only the middle (segment 1), so labels never leave the client.

Forward goes client → server → client, gradients client → server → client. The server reads
no data and its transport policy has no LABELS route at all. Clients evaluate themselves
(they hold the labels): test activations go through the middle without autograd and come
back flagged EVAL. ``client_order`` and ``clients_per_rank`` work as in vanilla; in
sequential order both client segments are handed over.
"""

from __future__ import annotations

import torch
from torch import nn

from mpisplit import schedules
from mpisplit.cut import recv_forward
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.protocol import Flag
from mpisplit.schemes.evaluation import EvalTally, evaluating, record_eval
from mpisplit.schemes.hosting import train_hosted_clients
from mpisplit.schemes.instrumentation import record_traffic_by_kind
from mpisplit.schemes.microbatches import Microbatch, microbatches
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.relays import relay_activations
from mpisplit.schemes.sending import CutSender, send_marker
from mpisplit.schemes.turns import agree_turns, clients_total_steps, run_client_turns
from mpisplit.segment import Segment
from mpisplit.split import join_parts
from mpisplit.topology import Role


def serve(ctx: RankContext) -> RankResult:
    total = clients_total_steps(ctx)
    segment = ctx.build_segment(1, total)
    steps = relay_activations(ctx, segment, total, next_hop=None)
    record_traffic_by_kind(ctx)
    return RankResult(steps=steps, segment=segment)


def train_client(ctx: RankContext) -> RankResult:
    if ctx.me.hosted > 1:
        return train_hosted_clients(
            ctx,
            ctx.topology.ranks(Role.SERVER)[0],
            [0, 2],
            lambda c, parts, tests: UShapedClient(c, *parts, tests),
            lambda client: _joined(client.head, client.tail),
        )
    reader = client_reader(ctx)
    with reader, test_reader(ctx) as tests:
        turns = agree_turns(ctx, reader)
        client = UShapedClient(
            ctx,
            ctx.build_segment(0, turns.part_steps),
            ctx.build_segment(2, turns.part_steps),
            tests,
        )
        report = run_client_turns(ctx, turns, client, reader, client.server)
    parts = _joined(client.head, client.tail)
    return RankResult(
        steps=report.steps,
        samples=report.samples,
        final_evals=report.final_evals,
        segment=parts,
        leakage=client.sender.leakage,
    )


class UShapedClient:
    """The client's step: head forward, the server's middle, tail and loss here, and back
    through all three; evaluation through the same path, scored here."""

    def __init__(self, ctx: RankContext, head: Segment, tail: Segment, tests: ShardReader) -> None:
        self.ctx, self.head, self.tail, self.tests = ctx, head, tail, tests
        self.server = ctx.topology.ranks(Role.SERVER)[0]
        self.sender = CutSender(ctx)
        self.segments = [head, tail]
        self.generators = [self.sender.noise]

    def train_step(self, batch: Batch | None, index: int) -> float:
        assert batch is not None
        ctx, parts = self.ctx, microbatches(batch, self.ctx.config.transport.microbatches)
        losses: list[float] = []

        def forward(microbatch: int) -> tuple[Microbatch, torch.Tensor]:
            part = parts[microbatch]
            with ctx.tracer.span("forward", step=index):
                features = part.features.to(ctx.device)
                return part, self.sender.train(
                    self.head.module(features),
                    features,
                    self.server,
                    index,
                    flags=part.flags,
                    aux=len(batch.labels),
                    microbatch=microbatch,
                )

        def backward(sent: tuple[Microbatch, torch.Tensor]) -> None:
            losses.append(self._backward(*sent, index, len(batch.labels)))

        schedules.run(schedules.of(ctx.config.transport.schedule, len(parts)), forward, backward)
        with ctx.tracer.span("optimizer", step=index):
            self.head.step()
            self.tail.step()
        return sum(losses)

    def _backward(
        self, part: Microbatch, anchor: torch.Tensor, index: int, batch_size: int
    ) -> float:
        """The middle's output through the tail to the loss, and back to the head."""
        ctx = self.ctx
        with ctx.tracer.span("forward", step=index):
            middle, _ = recv_forward(ctx.transport, self.server, device=ctx.device)
            loss = check_loss(
                nn.functional.cross_entropy(self.tail.module(middle), part.labels.to(ctx.device)),
                index + 1,
            )
            loss = loss * (len(part.labels) / batch_size)
        with ctx.tracer.span("backward", step=index):
            loss.backward()
            anchor.backward()
        return float(loss.detach())

    def evaluate(self, step: int, final: bool) -> EvalResult:
        result = _evaluate_split(
            self.ctx, self.sender, self.head, self.tail, self.tests, self.server, step, final
        )
        if final:
            send_marker(self.ctx, self.server, step, Flag.DONE)
        return result


def _evaluate_split(
    ctx: RankContext,
    sender: CutSender,
    head: Segment,
    tail: Segment,
    tests: ShardReader,
    server: int,
    step: int,
    final: bool,
) -> EvalResult:
    """Test metrics through head → server middle → tail; labels stay here. The final
    evaluation also measures leakage."""
    tally = EvalTally()
    with evaluating(head.module), evaluating(tail.module), ctx.tracer.span("eval"):
        for batch in tests.epoch(0):
            features = batch.features.to(ctx.device)
            sender.evaluate(head.module(features), features, server, step, final=final)
            middle, _ = recv_forward(ctx.transport, server, device=ctx.device, train=False)
            tally.add(tail.module(middle), batch.labels.to(ctx.device))
    if final:
        sender.measure_leakage()
    return record_eval(ctx, tally.result(step, ctx.me.index))


def _joined(head: Segment, tail: Segment) -> Segment:
    """Both client parts as one module, so ``model-rank<R>.pt`` holds all of them."""
    return Segment(join_parts([head.module, tail.module]), head.optimizer, head.scheduler)

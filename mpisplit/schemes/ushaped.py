"""U-shaped split learning: the client holds the head (segment 0) and the tail with the loss
(segment 2), the server only the middle (segment 1), so labels never leave the client.

Forward goes client → server → client, gradients client → server → client. The server reads
no data and its transport policy has no LABELS route at all. Clients evaluate themselves
(they hold the labels): test activations go through the middle without autograd and come
back flagged EVAL. ``client_order`` works as in vanilla; in sequential order both client
segments are handed over.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from mpisplit import schedules
from mpisplit.cut import recv_forward
from mpisplit.data import Batch, ShardReader
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.protocol import Flag
from mpisplit.schemes.common import (
    CutSender,
    EvalTally,
    Microbatch,
    client_reader,
    clients_total_steps,
    evaluating,
    microbatches,
    plan_turns,
    record_eval,
    record_traffic_by_kind,
    relay_activations,
    run_client_turns,
    send_marker,
    test_reader,
)
from mpisplit.segment import Segment
from mpisplit.topology import Role


def serve(ctx: RankContext) -> RankResult:
    total = clients_total_steps(ctx)
    segment = ctx.build_segment(1, total)
    steps = relay_activations(ctx, segment, total, next_hop=None)
    record_traffic_by_kind(ctx)
    return RankResult(steps=steps, segment=segment)


def train_client(ctx: RankContext) -> RankResult:
    transport = ctx.transport
    server = ctx.topology.ranks(Role.SERVER)[0]
    reader = client_reader(ctx)
    with reader, test_reader(ctx) as tests:
        plan = plan_turns(ctx, reader)
        head = ctx.build_segment(0, plan.schedule_steps)
        tail = ctx.build_segment(2, plan.schedule_steps)
        sender = CutSender(ctx)

        def train_step(batch: Batch, step: int) -> float:
            parts = microbatches(batch, ctx.config.transport.microbatches)
            losses = []

            def forward(index: int) -> tuple[Microbatch, torch.Tensor]:
                part = parts[index]
                with ctx.tracer.span("forward", step=step):
                    features = part.features.to(ctx.device)
                    return part, sender.train(head.module(features), features, server, step,
                                              flags=part.flags, aux=len(batch.labels),
                                              microbatch=index)

            def backward(sent: tuple[Microbatch, torch.Tensor]) -> None:
                part, anchor = sent
                with ctx.tracer.span("forward", step=step):
                    middle, _ = recv_forward(transport, server, device=ctx.device)
                    loss = check_loss(nn.functional.cross_entropy(
                        tail.module(middle), part.labels.to(ctx.device)), step + 1)
                    loss = loss * (len(part.labels) / len(batch.labels))
                with ctx.tracer.span("backward", step=step):
                    loss.backward()
                    anchor.backward()
                losses.append(float(loss.detach()))

            schedules.run(schedules.of(ctx.config.transport.schedule, len(parts)), forward,
                          backward)
            total = sum(losses)
            with ctx.tracer.span("optimizer", step=step):
                head.step()
                tail.step()
            return total

        def evaluate(step: int, final: bool) -> EvalResult:
            result = _evaluate_split(ctx, sender, head, tail, tests, server, step, final)
            if final:
                send_marker(ctx, server, step, Flag.DONE)
            return result

        report = run_client_turns(ctx, plan, reader, [head, tail], sender, train_step,
                                  evaluate, server)
    parts = _joined(head, tail)
    return RankResult(steps=report.steps, samples=report.samples,
                      final_evals=report.final_evals, segment=parts, leakage=sender.leakage)


def _evaluate_split(ctx: RankContext, sender: CutSender, head: Segment, tail: Segment,
                    tests: ShardReader, server: int, step: int, final: bool) -> EvalResult:
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
    module = nn.Sequential(OrderedDict([*head.module.named_children(),
                                        *tail.module.named_children()]))
    return Segment(module, head.optimizer, head.scheduler)

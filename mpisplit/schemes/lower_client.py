"""The lower client: holds segment 0, sends cut activations and labels onward."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mpisplit import schedules
from mpisplit.data import Batch
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.instrumentation import compute_span
from mpisplit.schemes.microbatches import microbatches
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.sending import CutSender, send_eval_pass
from mpisplit.schemes.turns import plan_turns, run_client_turns
from mpisplit.segment import Segment
from mpisplit.transport import Kind


def train_lower_client(ctx: RankContext, first_hop: int | Sequence[int],
                       after_step: Callable[[Segment, int], None] | None = None, *,
                       labels: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
                       ) -> RankResult:
    """A client that holds segment 0 and sends cut activations with labels to ``first_hop``
    (the server, or the first relay); ``after_step(segment, model_step)`` runs after each
    step.

    Several ``first_hop`` ranks (multitask heads) each get the same cut activation, with the
    labels mapped by ``labels[i]`` for hop i; each microbatch back-propagates the sum of their
    gradients in one pass, so the lower part steps once on the summed losses.
    """
    transport = ctx.transport
    hops = [first_hop] if isinstance(first_hop, int) else list(first_hop)
    label_maps = list(labels) if labels is not None else [_same] * len(hops)
    reader = client_reader(ctx)
    with reader, test_reader(ctx) as tests:
        plan = plan_turns(ctx, reader)
        segment = ctx.build_segment(0, plan.schedule_steps)
        sender = CutSender(ctx)

        def train_step(batch: Batch, step: int) -> None:
            parts = microbatches(batch, ctx.config.transport.microbatches)
            label_sends = []

            def forward(index: int) -> list[torch.Tensor]:
                part = parts[index]
                with compute_span(ctx, "forward", step=step, microbatch=index):
                    features = part.features.to(ctx.device)
                    activation = segment.module(features)
                # Labels go first: MPI libraries deliver one sender's eager messages in the
                # order posted, so a client stopped right after sending cannot leave the
                # server with an activation whose labels never come (spatio-temporal drops).
                label_sends.extend(transport.isend(label_map(part.labels), hop, Kind.LABELS,
                                                   step=step, microbatch=index)
                                   for hop, label_map in zip(hops, label_maps, strict=True))
                return sender.train_fanout(activation, features, hops, step, flags=part.flags,
                                           aux=len(batch.labels), microbatch=index)

            def backward(anchors: list[torch.Tensor]) -> None:
                with compute_span(ctx, "backward", step=step):
                    torch.autograd.backward(anchors)

            schedules.run(schedules.of(ctx.config.transport.schedule, len(parts)), forward,
                          backward)
            for pending in label_sends:
                pending.wait()
            with ctx.tracer.span("optimizer", step=step):
                segment.step()
            if after_step is not None:
                after_step(segment, step + 1)

        def evaluate(step: int, final: bool) -> None:
            for hop, label_map in zip(hops, label_maps, strict=True):
                send_eval_pass(ctx, sender, segment, tests, hop, step, final=final,
                               labels=label_map)

        report = run_client_turns(ctx, plan, reader, [segment], sender, train_step, evaluate,
                                  hops)
    return RankResult(steps=report.steps, samples=report.samples, segment=segment,
                      leakage=sender.leakage)


def _same(labels: torch.Tensor) -> torch.Tensor:
    return labels

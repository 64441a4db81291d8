"""Vanilla split learning: clients hold the layers below the cut and send labels with the
cut activation; the server holds the rest and the loss.

``client_order: sequential`` is the original round-robin: one client trains at a time and
hands its lower layers (weights, optimizer and schedule state) peer-to-peer to the next.
``client_order: parallel`` runs every client at once, each with its own lower layers; the
server serves cut activations in arrival order, so a slow client never blocks the others.
"""

from __future__ import annotations

import torch

from mpisplit.cut import send_forward
from mpisplit.data import ShardReader
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.common import (
    exchange_step_plans,
    planned_steps,
    record_client_step,
    send_eval_pass,
    serve_clients,
    test_reader,
    training_batches,
    turn_schedule,
)
from mpisplit.topology import Role
from mpisplit.transport import Flag, Kind

CUTS = 1
ALLOWED = frozenset({
    ("client", "server", Kind.ACTIVATION),
    ("client", "server", Kind.LABELS),
    ("server", "client", Kind.GRADIENT),
    ("client", "client", Kind.WEIGHTS),
})


def run(ctx: RankContext) -> RankResult:
    if ctx.me.role == Role.SERVER:
        return _serve(ctx)
    return _train_client(ctx)


def _serve(ctx: RankContext) -> RankResult:
    plans = exchange_step_plans(ctx, 0, 0)
    total = int(plans[:, 0].sum())
    segment = ctx.build_segment(1, total)
    report = serve_clients(ctx, segment, total)
    return RankResult(steps=report.steps, final_evals=report.final_evals, segment=segment)


def _train_client(ctx: RankContext) -> RankResult:
    cfg, me, transport = ctx.config, ctx.me, ctx.transport
    server = ctx.topology.ranks(Role.SERVER)[0]
    clients = ctx.topology.ranks(Role.CLIENT)
    reader = ShardReader(ctx.shard("client", me.index), batch_size=cfg.data.batch_size,
                         shuffle=cfg.data.shuffle, seed=cfg.train.seed + me.index,
                         prefetch=cfg.data.prefetch)
    with reader, test_reader(ctx) as tests:
        plans = exchange_step_plans(ctx, planned_steps(len(reader), cfg.train), len(reader))
        steps = [int(plans[rank, 0]) for rank in clients]
        sequential = cfg.scheme.client_order == "sequential"
        if sequential:
            lengths = [cfg.scheme.turn_steps or int(plans[rank, 1]) for rank in clients]
            turns = turn_schedule(steps, lengths)
        else:
            turns = [(me.index, steps[me.index])]
        segment = ctx.build_segment(0, sum(steps) if sequential else steps[me.index])
        batches = training_batches(reader, cfg.train)
        evaluates_final = not sequential or turns[-1][0] == me.index
        my_steps = sum(length for k, length in turns if k == me.index)
        model_steps = samples = 0
        for turn, (client, length) in enumerate(turns):
            if client != me.index:
                continue
            previous = turns[turn - 1][0] if turn > 0 else me.index
            if previous != me.index:
                handed = transport.recv(Kind.WEIGHTS, clients[previous], deadline=False)
                segment.load_state_bytes(handed.tensor)
                model_steps = handed.step
            for _ in range(length):
                batch = next(batches)
                with ctx.tracer.span("forward", step=model_steps):
                    activation = segment.module(batch.features.to(ctx.device))
                anchor = send_forward(activation, transport, server, model_steps)
                transport.send(batch.labels, server, Kind.LABELS, step=model_steps)
                with ctx.tracer.span("backward", step=model_steps):
                    anchor.backward()
                with ctx.tracer.span("optimizer", step=model_steps):
                    segment.step()
                model_steps += 1
                samples += len(batch.labels)
                record_client_step(ctx, model_steps)
                my_steps -= 1
                final_step = evaluates_final and my_steps == 0
                if cfg.train.eval_every and model_steps % cfg.train.eval_every == 0 \
                        and not final_step:
                    send_eval_pass(ctx, segment, tests, server, model_steps, final=False)
            following = turns[turn + 1][0] if turn + 1 < len(turns) else me.index
            if following != me.index:
                transport.send(segment.state_bytes(), clients[following], Kind.WEIGHTS,
                               step=model_steps)
        if evaluates_final:
            send_eval_pass(ctx, segment, tests, server, model_steps, final=True)
        else:
            transport.send(torch.empty(0), server, Kind.ACTIVATION, flags=Flag.DONE)
    return RankResult(steps=sum(length for k, length in turns if k == me.index),
                      samples=samples, segment=segment)

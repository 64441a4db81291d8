"""SplitFed: clients train in parallel, each with its own lower model, against a server that
holds the upper part and the loss (labels go to the server, as in vanilla). Every
``scheme.fedavg_every`` steps (and once after the end) the clients' lower weights are
averaged, weighted by sample counts, with one raw Allreduce on a clients-only communicator.

``splitfed_variant: v1``: the server keeps one upper copy per client and averages the copies
at the same points. ``v2``: one shared upper model, updated client by client; with
``server_order: fixed`` the server takes the clients in index order every round, which makes
the run deterministic.
"""

from __future__ import annotations

import math

import numpy as np

from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.common import (
    LABELS_AT_SERVER,
    AveragingPlan,
    average_parameters,
    client_comm,
    exchange_step_plans,
    planned_steps,
    serve_clients,
    train_lower_client,
)
from mpisplit.segment import Segment
from mpisplit.topology import Role

CUTS = 1
ALLOWED = LABELS_AT_SERVER


def run(ctx: RankContext) -> RankResult:
    comm = client_comm(ctx)
    steps = _client_steps(ctx)
    samples = ctx.run.meta["train_samples"]
    weights = [n / sum(samples) for n in samples]
    averaging = AveragingPlan.of(steps, ctx.config.scheme.fedavg_every)
    if ctx.me.role == Role.SERVER:
        return _serve(ctx, steps, weights, averaging)

    def after_step(segment: Segment, step: int) -> None:
        for _ in range(averaging.due(step, steps[ctx.me.index])):
            average_parameters(ctx, comm, segment.module, weights[ctx.me.index], averaging)

    result = train_lower_client(ctx, ctx.topology.ranks(Role.SERVER)[0], after_step)
    comm.Free()
    return result


def _client_steps(ctx: RankContext) -> list[int]:
    """Every client's planned steps, from the dataset metadata (no traffic)."""
    batch = ctx.config.data.batch_size
    return [planned_steps(math.ceil(n / batch), ctx.config.train)
            for n in ctx.run.meta["train_samples"]]


def _serve(ctx: RankContext, steps: list[int], weights: list[float],
           averaging: AveragingPlan) -> RankResult:
    exchange_step_plans(ctx, 0, 0)
    cfg, clients, total = ctx.config, ctx.topology.ranks(Role.CLIENT), sum(steps)
    if cfg.scheme.splitfed_variant == "v2":
        shared = ctx.build_segment(1, total)
        report = serve_clients(ctx, shared, total, order=_rounds(ctx, clients, steps),
                               round_size=len(clients), until=min(steps))
        return RankResult(steps=report.steps, final_evals=report.final_evals, segment=shared)
    copies = {rank: ctx.build_segment(1, steps[k]) for k, rank in enumerate(clients)}
    done = {rank: 0 for rank in clients}

    def after_step(source: int) -> None:
        done[source] += 1
        for _ in range(_copies_due(averaging, done, clients, steps)):
            _average_copies(list(copies.values()), weights)

    report = serve_clients(ctx, copies.__getitem__, total, after_step=after_step)
    return RankResult(steps=report.steps, final_evals=report.final_evals,
                      segment=copies[clients[0]])


def _copies_due(averaging: AveragingPlan, done: dict[int, int], clients: list[int],
                steps: list[int]) -> int:
    """Averages due now that the server has served ``done``: the periodic one when every
    client reached the same step, the final one when every client is through."""
    step = done[clients[0]]
    periodic = all(done[r] == step for r in clients) and step <= averaging.common \
        and step % averaging.every == 0
    finished = all(done[r] == steps[k] for k, r in enumerate(clients))
    return int(periodic) + int(averaging.at_end and finished)


def _average_copies(copies: list[Segment], weights: list[float]) -> None:
    """v1: the sample-weighted average of the server's per-client copies, loaded in place
    (each copy keeps its own optimizer state, as each client's lower part does)."""
    modules = [c.module for c in copies]
    states = [m.state_dict() for m in modules]
    average = {key: sum(w * s[key] for w, s in zip(weights, states, strict=True))
               for key, value in states[0].items() if value.is_floating_point()}
    for module in modules:
        module.load_state_dict(average, strict=False)


def _rounds(ctx: RankContext, clients: list[int], steps: list[int]) -> list[int]:
    """v2: the sender of each training step, round by round (clients with steps left)."""
    order: list[int] = []
    for r in range(max(steps)):
        ready = [k for k in range(len(clients)) if steps[k] > r]
        if ctx.config.scheme.server_order == "random":
            ready = list(np.random.default_rng([ctx.config.train.seed, r]).permutation(ready))
        order += [clients[k] for k in ready]
    return order

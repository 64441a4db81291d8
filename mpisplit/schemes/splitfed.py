"""SplitFed: clients train in parallel, each with its own lower model, against a server that
holds the upper part and the loss (labels go to the server, as in vanilla). Every
``scheme.fedavg_every`` steps, or every ``scheme.fedavg_every_epochs`` epochs (and once
after the end), the clients' lower weights are averaged, weighted by sample counts, with one
raw Allreduce on a clients-only communicator.

``splitfed_variant: v1``: the server keeps one upper copy per client and averages the copies
at the same points. ``v2``: one shared upper model, updated client by client; with
``server_order: fixed`` the server takes the clients in index order every round, which makes
the run deterministic; with ``random`` it draws the client of each batch at random (seeded
by ``train.seed``) among the batches due before the next average, so a client may be served
several times in a row, and the clients still reach every average together.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from mpisplit.driver import step_budget
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.averaging import (
    AveragingPoints,
    Member,
    average_parameters,
    averaged_tensors,
    client_comm,
)
from mpisplit.schemes.hosting import HostedCollective
from mpisplit.schemes.lower_client import train_lower_clients
from mpisplit.schemes.serving import ServeOrder, Upper, serve_clients
from mpisplit.schemes.turns import exchange_step_budgets
from mpisplit.segment import Segment
from mpisplit.topology import Role


def run(ctx: RankContext) -> RankResult:
    comm = client_comm(ctx)
    epochs = _epoch_lengths(ctx)
    steps = [step_budget(length, ctx.config.train) for length in epochs]
    samples = ctx.run.meta["train_samples"]
    weights = [n / sum(samples) for n in samples]
    scheme = ctx.config.scheme.options
    every = (
        scheme.fedavg_every_epochs * max(epochs)
        if scheme.fedavg_every_epochs
        else scheme.fedavg_every
    )
    averaging = AveragingPoints.of(steps, every)
    if scheme.server_order == "random":  # one client's batches may all come first: the
        averaging = dataclasses.replace(averaging, lockstep=False)  # others wait a period
    if ctx.me.role == Role.SERVER:
        return _serve(ctx, steps, weights, averaging)
    averages = HostedCollective[Member](
        ctx.me.clients, lambda members: average_parameters(ctx, comm, members, averaging)
    )

    def after_step(client: int, segment: Segment, step: int) -> None:
        for _ in range(averaging.due(step, steps[client])):
            averages.join(client, (segment.module, weights[client]))

    v2 = scheme.splitfed_variant == "v2"
    result = train_lower_clients(
        ctx,
        ctx.topology.ranks(Role.SERVER)[0],
        after_step,
        order=server_order(steps, every, scheme.server_order, ctx.config.train.seed)
        if v2
        else None,
    )
    comm.Free()
    return result


def _epoch_lengths(ctx: RankContext) -> list[int]:
    """Every client's batches per epoch, from the dataset metadata (no traffic)."""
    batch = ctx.config.data.batch_size
    return [math.ceil(n / batch) for n in ctx.run.meta["train_samples"]]


def _serve(
    ctx: RankContext, steps: list[int], weights: list[float], averaging: AveragingPoints
) -> RankResult:
    exchange_step_budgets(ctx, 0, 0)
    cfg, clients, total = ctx.config, ctx.topology.client_ranks(), sum(steps)
    options = cfg.scheme.options
    if options.splitfed_variant == "v2":
        shared = ctx.build_segment(1, total)
        order = server_order(steps, averaging.every, options.server_order, cfg.train.seed)
        served = ServeOrder([clients[k] for k in order], len(clients), min(steps))
        report = serve_clients(ctx, Upper.shared(shared), total, order=served)
        return RankResult(steps=report.steps, final_evals=report.final_evals, segment=shared)
    copies = [ctx.build_segment(1, n) for n in steps]
    done = [0] * len(steps)

    def after_step(client: int) -> None:
        done[client] += 1
        for _ in range(_copies_due(averaging, done, steps)):
            _average_copies(copies, weights, cfg.scheme.options.average_buffers)

    report = serve_clients(ctx, Upper.per_client(copies, after_step), total)
    return RankResult(steps=report.steps, final_evals=report.final_evals, segment=copies[0])


def _copies_due(averaging: AveragingPoints, done: list[int], steps: list[int]) -> int:
    """Averages due now that the server has served ``done`` steps of each client: the
    periodic one when every client reached the same step, the final one when every client is
    through."""
    step = done[0]
    periodic = (
        all(n == step for n in done) and step <= averaging.common and step % averaging.every == 0
    )
    finished = done == steps
    return int(periodic) + int(averaging.at_end and finished)


def _average_copies(copies: list[Segment], weights: list[float], buffers: bool) -> None:
    """v1: the sample-weighted average of the server's per-client copies, in place (each
    copy keeps its own optimizer state, as each client's lower part does); the same tensors
    as the clients' average (``averaged_tensors``)."""
    members = [averaged_tensors(c.module, buffers) for c in copies]
    with torch.no_grad():
        for tensors in zip(*members, strict=True):
            average = sum(w * t for w, t in zip(weights, tensors, strict=True))
            for tensor in tensors:
                tensor.copy_(average)


def server_order(steps: list[int], every: int, how: str, seed: int) -> list[int]:
    """v2: the client index of each training step the server takes, averaging period by
    averaging period (each client's batches between two averages). fixed: rounds in index
    order (every client with batches left, once per round); random: the period's batches in
    an order drawn from ``seed``, batch by batch, not round by round."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for start in range(0, max(steps), every):
        due = [min(every, max(0, n - start)) for n in steps]
        if how == "random":
            order += rng.permutation(np.repeat(np.arange(len(steps)), due)).tolist()
        else:
            order += [k for r in range(max(due)) for k in range(len(steps)) if due[k] > r]
    return order

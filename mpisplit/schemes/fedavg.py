"""Federated averaging baseline: every client trains the whole model on its own shard,
and every ``scheme.fedavg_every`` local steps the weights are averaged, weighted by the
clients' sample counts (one raw-buffer Allreduce). There is no server: the client ranks are
the clients (or host several each: ``scheme.clients_per_rank``), and client 0 (on rank 0)
reports the test metrics of the averaged model.
"""

from __future__ import annotations

from contextlib import ExitStack

from mpisplit.driver import step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.averaging import (
    AveragingPoints,
    Member,
    average_parameters,
    client_comm,
    sample_weights,
)
from mpisplit.schemes.hosting import HostedCollective, hosted_contexts
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import client_budgets
from mpisplit.schemes.wholemodel import WholeModel, train_whole_models


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    contexts = hosted_contexts(ctx)
    with ExitStack() as stack:
        readers = [stack.enter_context(client_reader(c)) for c in contexts]
        tests = stack.enter_context(test_reader(ctx))
        steps = [step_budget(len(r), cfg.train) for r in readers]
        budgets = client_budgets(ctx, [(n, len(r)) for n, r in zip(steps, readers, strict=True)])
        comm = client_comm(ctx)
        weights = sample_weights(ctx, comm, [r.num_samples for r in readers])
        averaging = AveragingPoints.of(budgets[:, 0].tolist(), cfg.scheme.options.fedavg_every)
        averages = HostedCollective[tuple[Member, int]](
            ctx.me.clients,
            lambda joined: average_parameters(
                ctx, comm, [m for m, _ in joined], averaging, joined[-1][1]
            ),
        )

        def model(client: RankContext, steps: int, weight: float) -> WholeModel:
            segment = client.build_segment(0, steps, through=ctx.run.parts - 1)

            def after_step(step: int) -> None:
                for _ in range(averaging.due(step, steps)):
                    averages.join(client.me.index, ((segment.module, weight), step - 1))

            return WholeModel(client, segment, tests, after_step=after_step)

        models = [model(*c) for c in zip(contexts, steps, weights, strict=True)]
        batches = [training_batches(r, cfg.train) for r in readers]
        result = train_whole_models(ctx, models, batches, steps)
        comm.Free()
    return result

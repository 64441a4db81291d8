"""Federated averaging baseline: every client rank trains the whole model on its own shard,
and every ``scheme.fedavg_every`` local steps the weights are averaged, weighted by the
clients' sample counts (one raw-buffer Allreduce). There is no server: the K ranks are the
K clients, and client 0 (rank 0) reports the test metrics of the averaged model.
"""

from __future__ import annotations

from mpisplit.driver import step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.averaging import (
    AveragingPoints,
    average_parameters,
    client_comm,
    sample_weight,
)
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import exchange_step_budgets
from mpisplit.schemes.wholemodel import WholeModel, train_whole_model


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with client_reader(ctx) as reader, test_reader(ctx) as tests:
        steps = step_budget(len(reader), cfg.train)
        budgets = exchange_step_budgets(ctx, steps, len(reader))
        segment = ctx.build_segment(0, steps, through=ctx.run.parts - 1)
        comm = client_comm(ctx)
        weight = sample_weight(ctx, comm, reader.num_samples)
        averaging = AveragingPoints.of(budgets[:, 0].tolist(), cfg.scheme.options.fedavg_every)

        def after_step(step: int) -> None:
            for _ in range(averaging.due(step, steps)):
                average_parameters(ctx, comm, [(segment.module, weight)], averaging, step - 1)

        model = WholeModel(ctx, segment, tests, after_step=after_step)
        samples, finals = train_whole_model(ctx, model, training_batches(reader, cfg.train), steps)
        comm.Free()
    return RankResult(steps=steps, samples=samples, final_evals=finals, segment=segment)

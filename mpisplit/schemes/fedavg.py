"""Federated averaging baseline: every client rank trains the whole model on its own shard,
and every ``scheme.fedavg_every`` local steps the weights are averaged, weighted by the
clients' sample counts (one raw-buffer Allreduce). There is no server: the K ranks are the
K clients, and client 0 (rank 0) reports the test metrics of the averaged model.
"""

from __future__ import annotations

from mpisplit.driver import step_budget
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.averaging import AveragingPlan, average_parameters, client_comm, sample_weight
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.readers import client_reader, test_reader
from mpisplit.schemes.turns import exchange_step_plans
from mpisplit.schemes.wholemodel import train_whole_model


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with client_reader(ctx) as reader, test_reader(ctx) as tests:
        steps = step_budget(len(reader), cfg.train)
        plans = exchange_step_plans(ctx, steps, len(reader))
        segment = ctx.build_segment(0, steps, through=ctx.run.parts - 1)
        comm = client_comm(ctx)
        weight = sample_weight(ctx, comm, reader.num_samples)
        averaging = AveragingPlan.of(plans[:, 0].tolist(), cfg.scheme.options.fedavg_every)

        def after_step(step: int) -> None:
            for _ in range(averaging.due(step, steps)):
                average_parameters(ctx, comm, segment.module, weight, averaging, step - 1)

        samples = train_whole_model(ctx, segment, reader, tests, after_step)
        finals = [evaluate_locally(ctx, segment.module, tests, steps, 0)] if ctx.me.index == 0 \
            else []
        comm.Free()
    return RankResult(steps=steps, samples=samples, final_evals=finals, segment=segment)

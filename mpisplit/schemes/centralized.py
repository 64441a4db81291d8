"""Centralized baseline: one rank trains the whole model on every client's shard.

Shards are visited in the same round-robin turns as sequential split learning, so this is
also the single-process oracle that split schemes are compared with on accuracy. With
``data.pool`` the shards form one pool instead, shuffled row by row every epoch (the pooled,
shuffled baseline); with ``data.clients`` only the chosen shards are used (one site alone).
"""

from __future__ import annotations

import contextlib

from mpisplit.data import PooledReader
from mpisplit.driver import EvalSchedule, StepDriver, step_budget
from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.readers import shard_reader, test_reader
from mpisplit.schemes.turns import round_robin_turns
from mpisplit.schemes.wholemodel import WholeModel
from mpisplit.seeds import Stream, derive


def _pool(ctx: RankContext) -> PooledReader:
    cfg = ctx.config
    return PooledReader(
        [ctx.shard("client", k) for k in range(cfg.scheme.clients)],
        batch_size=cfg.data.batch_size,
        seed=derive(cfg.train.seed, Stream.POOL),
        prefetch=cfg.data.prefetch,
    )


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with contextlib.ExitStack() as stack:
        readers = (
            [stack.enter_context(_pool(ctx))]
            if cfg.data.pool
            else [stack.enter_context(shard_reader(ctx, k)) for k in range(cfg.scheme.clients)]
        )
        tests = stack.enter_context(test_reader(ctx))
        steps = [step_budget(len(reader), cfg.train) for reader in readers]
        lengths = [cfg.scheme.options.turn_steps or len(reader) for reader in readers]
        total = sum(steps)
        segment = ctx.build_segment(0, total, through=ctx.run.parts - 1)
        model = WholeModel(ctx, segment, tests)
        driver = StepDriver(ctx, total, evaluation=EvalSchedule.of(cfg.train, total), traffic=False)
        batches = [driver.batches(reader) for reader in readers]
        step = 0
        for client, length in round_robin_turns(steps, lengths):
            driver.train(model, batches[client], step + 1, step + length, client=client)
            step += length
        final = model.evaluate(step, True)
    return RankResult(steps=step, samples=driver.samples, final_evals=[final], segment=segment)

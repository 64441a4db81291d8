"""Centralized baseline: one rank trains the whole model on every client's shard.

Shards are visited in the same round-robin turns as sequential split learning, so this is
also the single-process oracle that split schemes are compared with on accuracy. With
``data.pool`` the shards form one pool instead, shuffled row by row every epoch (the pooled,
shuffled baseline); with ``data.clients`` only the chosen shards are used (one site alone).
"""

from __future__ import annotations

import contextlib

from mpisplit.data import PooledReader
from mpisplit.driver import log, next_batch, step_budget, training_batches
from mpisplit.engine import RankContext, RankResult
from mpisplit.runlog import Progress
from mpisplit.schemes.evaluation import evaluate_locally
from mpisplit.schemes.readers import shard_reader, test_reader
from mpisplit.schemes.turns import turn_schedule
from mpisplit.schemes.wholemodel import whole_model_gradients
from mpisplit.seeds import Stream, derive


def _pool(ctx: RankContext) -> PooledReader:
    cfg = ctx.config
    return PooledReader([ctx.shard("client", k) for k in range(cfg.scheme.clients)],
                        batch_size=cfg.data.batch_size,
                        seed=derive(cfg.train.seed, Stream.POOL), prefetch=cfg.data.prefetch)


def run(ctx: RankContext) -> RankResult:
    cfg = ctx.config
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(_pool(ctx))] if cfg.data.pool else [
            stack.enter_context(shard_reader(ctx, k)) for k in range(cfg.scheme.clients)
        ]
        tests = stack.enter_context(test_reader(ctx))
        steps = [step_budget(len(reader), cfg.train) for reader in readers]
        lengths = [cfg.scheme.options.turn_steps or len(reader) for reader in readers]
        total = sum(steps)
        segment = ctx.build_segment(0, total, through=ctx.run.parts - 1)
        batches = [training_batches(reader, cfg.train) for reader in readers]
        progress = Progress(total, cfg.run.progress, cfg.run.log_every, log,
                            epochs=0 if cfg.train.max_steps else cfg.train.epochs)
        step = samples = 0
        for client, length in turn_schedule(steps, lengths):
            for _ in range(length):
                batch = next_batch(ctx, batches[client], step)
                loss = whole_model_gradients(ctx, segment, batch, step)
                with ctx.tracer.span("optimizer", step=step):
                    segment.step()
                step += 1
                samples += len(batch.labels)
                ctx.metrics.write({"step": step, "loss": loss, "client": client})
                progress.update(step, loss)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                    evaluate_locally(ctx, segment.module, tests, step, client=0)
        final = evaluate_locally(ctx, segment.module, tests, step, client=0)
    return RankResult(steps=step, samples=samples, final_evals=[final], segment=segment)

"""The shard readers a role trains and evaluates on."""

from __future__ import annotations

from mpisplit.data import ShardReader
from mpisplit.engine import RankContext
from mpisplit.seeds import Stream, derive


def test_reader(ctx: RankContext, kind: str = "client") -> ShardReader:
    return ShardReader(
        ctx.shard(kind, test=True), batch_size=ctx.config.data.batch_size, shuffle=False, prefetch=0
    )


def client_reader(ctx: RankContext) -> ShardReader:
    """This client's training shard, shuffled by its own stream."""
    return shard_reader(ctx, ctx.me.index)


def shard_reader(ctx: RankContext, client: int) -> ShardReader:
    """Client ``client``'s training shard, shuffled by that client's stream of
    ``train.seed`` (the centralized baseline visits every client's)."""
    cfg = ctx.config
    return ShardReader(
        ctx.shard("client", client),
        batch_size=cfg.data.batch_size,
        shuffle=cfg.data.shuffle,
        seed=derive(cfg.train.seed, Stream.DATA, client),
        prefetch=cfg.data.prefetch,
    )

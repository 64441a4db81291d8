"""Trace spans of compute phases and records of traffic."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from mpisplit.engine import RankContext
from mpisplit.protocol import Kind


def record_traffic_by_kind(ctx: RankContext) -> None:
    """Bytes received per message kind: evidence of what reached this rank (e.g. no labels)."""
    received = ctx.transport.traffic.recv_bytes.sum(axis=0)
    ctx.metrics.write(
        {
            "event": "traffic_by_kind",
            "bytes_received": {kind.name: int(received[kind]) for kind in Kind},
        }
    )


@contextlib.contextmanager
def compute_span(ctx: RankContext, name: str, **args: Any) -> Iterator[None]:
    """A client's compute phase as a trace span; with ``run.count_flops`` the phase runs
    under ``FlopCounterMode`` and the span records its FLOPs (what ``mpisplit resources``
    predicts: matrix products and convolutions)."""
    with ctx.tracer.span(name, **args) as recorded:
        if not ctx.config.run.count_flops:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            yield
        recorded["flops"] = counter.get_total_flops()

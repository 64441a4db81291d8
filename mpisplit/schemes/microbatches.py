"""A step's batch as microbatches for the pipelined cut exchange, and each one's loss weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpisplit import schedules
from mpisplit.data import Batch
from mpisplit.protocol import Flag
from mpisplit.transport import Message


@dataclass(frozen=True)
class Microbatch:
    features: torch.Tensor
    labels: torch.Tensor
    flags: Flag
    """``Flag.MORE`` on all but the last microbatch of a step."""


def microbatches(batch: Batch, count: int) -> list[Microbatch]:
    """Splits a batch into up to ``count`` microbatches for the pipelined cut exchange.

    From three on, the first and the last are half the size of the others: the server waits
    for the first one's forward before it can start, the client for the last one's gradient
    before it can step, and halving them halves that fill and drain."""
    bounds = schedules.taper_bounds(len(batch.labels), count)
    pairs = list(
        zip(batch.features.tensor_split(bounds), batch.labels.tensor_split(bounds), strict=True)
    )
    pairs = [(x, y) for x, y in pairs if len(y)]
    return [
        Microbatch(x, y, Flag.MORE if i < len(pairs) - 1 else Flag.NONE)
        for i, (x, y) in enumerate(pairs)
    ]


def microbatch_share(labels: torch.Tensor, message: Message) -> float:
    """Weight of a microbatch's mean loss, so that the accumulated gradient equals the
    gradient of the whole batch's mean loss (``message.aux`` = whole batch size)."""
    return len(labels) / message.aux if message.aux else 1.0

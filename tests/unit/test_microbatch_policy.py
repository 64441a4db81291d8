"""One microbatch-splitting policy: the sizes vertical's server derives without any data
(``split_sizes``) are the microbatches every other scheme cuts from its batch."""

from __future__ import annotations

import torch

from mpisplit.data import Batch
from mpisplit.schedules import split_sizes
from mpisplit.schemes.microbatches import microbatches


def test_vertical_sizes_are_the_other_schemes_microbatches() -> None:
    for rows in range(1, 41):
        batch = Batch(torch.zeros(rows, 3), torch.zeros(rows, dtype=torch.long), torch.arange(rows))
        for count in range(1, 9):
            cut = [len(part.labels) for part in microbatches(batch, count)]
            assert split_sizes(rows, count) == cut, (rows, count)

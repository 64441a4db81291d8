"""Random streams derived from the configured seeds, one per (purpose, client).

Each stream is seeded from the whole key (seed, stream, client, ...) through numpy's
``SeedSequence``, which hashes it: clients of one run get unrelated streams, and client
k + 1 under seed s is not client k under seed s + 1 (as it was when client k used seed + k).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a derived seed drives; part of the key, so streams of one client differ."""

    DATA = 0
    """A client's shuffle order (``train.seed``)."""
    NOISE = 1
    """A client's cut-output noise in training (``privacy.seed``)."""
    EVAL_NOISE = 2
    """Cut-output noise of an evaluation pass, per (client, step) (``privacy.seed``)."""
    HANDOVER_NOISE = 3
    """A spatio-temporal site's noise on its hand-over (``privacy.seed``)."""
    POOL = 4
    """The order of a pooled centralized run over all shards (``train.seed``)."""
    EVAL_SAMPLE = 5
    """Which clients evaluate when ``train.eval_clients`` samples them (``train.seed``)."""


def derive(seed: int, stream: Stream, *key: int) -> int:
    """A 63-bit seed for ``stream`` of ``key`` (a client index, a step) under ``seed``."""
    entropy = np.random.SeedSequence([seed, int(stream), *key])
    return int(entropy.generate_state(1, np.uint64)[0] >> 1)

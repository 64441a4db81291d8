"""One module per split-learning configuration (and baseline).

A scheme module declares ``CUTS`` (how many cut layers its model needs), ``ALLOWED`` (the
(sender role, receiver role, kind) routes its transport may use) and ``run(ctx)``, which plays
this rank's role and returns a ``RankResult``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mpisplit.config import ConfigError

AVAILABLE = (
    "vanilla", "ushaped", "multihop", "multitask", "splitfed", "vertical", "spatiotemporal",
    "centralized", "fedavg", "syncsgd",
)


def get(name: str) -> ModuleType:
    if name not in AVAILABLE:
        raise ConfigError(
            f"scheme.name: '{name}' is not available yet (available: {', '.join(AVAILABLE)})"
        )
    return importlib.import_module(f"mpisplit.schemes.{name}")

"""Centralized baseline (``mpisplit.schemes.centralized``): the whole model on one rank,
visiting the shards in the turns of sequential split learning."""

from __future__ import annotations

from mpisplit.specs import SchemeSpec, TurnOptions
from mpisplit.topology import Role

SPEC = SchemeSpec(
    name="centralized",
    layout=lambda cfg: [(Role.SERVER, 1)],
    runners={Role.SERVER: "mpisplit.schemes.centralized:run"},
    options=TurnOptions,
    ignores_other_options=True,
    pools_shards=True,
)

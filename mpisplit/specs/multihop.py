"""Multi-hop split learning (``mpisplit.schemes.multihop``): a chain client -> relays ->
server, one segment per hop, so ``len(model.cuts) - 1`` relays."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpisplit.config import ConfigError
from mpisplit.protocol import Kind
from mpisplit.specs import RoleCounts, SchemeSpec, TurnOptions, in_turns
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config


def chain(cfg: Config) -> RoleCounts:
    """One relay per inner segment, so len(model.cuts) - 1 relays."""
    if len(cfg.model.cuts) < 2:
        raise ConfigError(
            f"model.cuts: multihop needs at least 2 cuts (client → relay → server), "
            f"got {len(cfg.model.cuts)}"
        )
    return [
        (Role.SERVER, 1),
        (Role.RELAY, len(cfg.model.cuts) - 1),
        (Role.CLIENT, cfg.scheme.clients),
    ]


SPEC = SchemeSpec(
    name="multihop",
    layout=chain,
    runners={
        Role.SERVER: "mpisplit.schemes.multihop:serve",
        Role.RELAY: "mpisplit.schemes.multihop:relay",
        Role.CLIENT: "mpisplit.schemes.multihop:train_client",
    },
    routes=frozenset(
        {
            ("client", "relay", Kind.ACTIVATION),
            ("client", "relay", Kind.LABELS),
            ("relay", "relay", Kind.ACTIVATION),
            ("relay", "relay", Kind.LABELS),
            ("relay", "server", Kind.ACTIVATION),
            ("relay", "server", Kind.LABELS),
            ("server", "relay", Kind.GRADIENT),
            ("relay", "relay", Kind.GRADIENT),
            ("relay", "client", Kind.GRADIENT),
            ("client", "client", Kind.WEIGHTS),
        }
    ),
    options=TurnOptions,
    checkpointable=in_turns,
    checkpoint_rule="scheme.client_order: sequential",
    samples_evaluation=True,
)

"""U-shaped split learning (``mpisplit.schemes.ushaped``): the client holds the head and the
tail with the loss, the server only the middle, so labels never leave the client."""

from __future__ import annotations

from mpisplit.protocol import Kind
from mpisplit.specs import SchemeSpec, TurnOptions, in_turns, server_and_clients
from mpisplit.topology import Role

SPEC = SchemeSpec(
    name="ushaped",
    layout=server_and_clients,
    runners={
        Role.SERVER: "mpisplit.schemes.ushaped:serve",
        Role.CLIENT: "mpisplit.schemes.ushaped:train_client",
    },
    routes=frozenset(
        {
            ("client", "server", Kind.ACTIVATION),
            ("server", "client", Kind.ACTIVATION),
            ("client", "server", Kind.GRADIENT),
            ("server", "client", Kind.GRADIENT),
            ("client", "client", Kind.WEIGHTS),
        }
    ),
    cuts=2,
    colocated=((0, 2),),
    options=TurnOptions,
    checkpointable=in_turns,
    checkpoint_rule="scheme.client_order: sequential",
    samples_evaluation=True,
    hosts_clients=True,
)

"""Vanilla split learning (``mpisplit.schemes.vanilla``): one server, clients in turns or in
parallel, labels with the cut activation, the lower layers handed from client to client."""

from __future__ import annotations

from mpisplit.protocol import Kind
from mpisplit.specs import LABELS_AT_SERVER, SchemeSpec, TurnOptions, in_turns, server_and_clients
from mpisplit.topology import Role

SPEC = SchemeSpec(
    name="vanilla",
    layout=server_and_clients,
    runners={
        Role.SERVER: "mpisplit.schemes.vanilla:serve",
        Role.CLIENT: "mpisplit.schemes.vanilla:train_client",
    },
    routes=LABELS_AT_SERVER | {("client", "client", Kind.WEIGHTS)},
    cuts=1,
    options=TurnOptions,
    checkpointable=in_turns,
    checkpoint_rule="scheme.client_order: sequential",
    samples_evaluation=True,
    tuple_cuts=True,
    hosts_clients=True,
)

"""Federated averaging baseline (``mpisplit.schemes.fedavg``): every client trains the whole
model; sample-weighted averages of the weights every ``scheme.fedavg_every`` steps."""

from __future__ import annotations

from mpisplit.specs import AveragingOptions, SchemeSpec, clients_only
from mpisplit.topology import Role

SPEC = SchemeSpec(
    name="fedavg",
    layout=clients_only,
    runners={Role.CLIENT: "mpisplit.schemes.fedavg:run"},
    options=AveragingOptions,
    hosts_clients=True,
)

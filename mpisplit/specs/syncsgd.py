"""Large-batch synchronous SGD baseline (``mpisplit.schemes.syncsgd``): every client holds the
whole model; gradients averaged by batch size every step."""

from __future__ import annotations

from mpisplit.specs import SchemeSpec, clients_only
from mpisplit.topology import Role

SPEC = SchemeSpec(
    name="syncsgd",
    layout=clients_only,
    runners={Role.CLIENT: "mpisplit.schemes.syncsgd:run"},
    hosts_clients=True,
)

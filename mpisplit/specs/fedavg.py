"""Federated averaging baseline (``mpisplit.schemes.fedavg``): every client trains the whole
model; sample-weighted averages of the weights every ``scheme.fedavg_every`` steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpisplit.specs import AveragingOptions, SchemeSpec, clients_only
from mpisplit.topology import Role


@dataclass(frozen=True, kw_only=True, slots=True)
class FedavgOptions(AveragingOptions):
    local_optimizer: Literal["keep", "reset"] = "keep"
    """keep = each client's optimizer state (momentum, Adam's moments) carries over from one
    average to the next; reset = each client starts every period between averages with a
    fresh optimizer, as federated averaging's client update does: a rank hosting R clients
    then holds one optimizer state, not R (500 VGG-16 clients with momentum fit a small
    machine)."""


SPEC = SchemeSpec(
    name="fedavg",
    layout=clients_only,
    runners={Role.CLIENT: "mpisplit.schemes.fedavg:run"},
    options=FedavgOptions,
    hosts_clients=True,
)

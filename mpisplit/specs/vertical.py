"""Vertical split learning (``mpisplit.schemes.vertical``): parties hold feature groups of the
same patients; the server joins their cut outputs (one Gatherv) and returns the gradient
slices (one Scatterv)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mpisplit.protocol import Kind
from mpisplit.specs import SchemeOptions, SchemeSpec, require, server_and_clients
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config, SchemeConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class VerticalOptions(SchemeOptions):
    join: Literal["concat", "sum", "mean"] = "concat"
    """How the server joins the parties' cut outputs: concat (along the feature or channel
    axis; the server's first weighted layer is widened to the joined width), sum, or mean
    (these two need equal cut-output shapes)."""
    label_holder: str = "server"
    """Who opens labels.h5 and computes the loss: server, or party<k> (e.g. party1), which
    keeps the labels at party k (the server sends it the logits and gets their gradient
    back)."""
    party_options: tuple[dict[str, Any], ...] = ()
    """One mapping per party that overrides model.options for that party's lower network
    (e.g. mlp [{hidden: [64, 32]}, {hidden: [16, 32]}]: widths 64 and 16 below the cut), so
    parties may differ in shape and size; only the layers below the cut are built from it.
    Empty = every party uses model.options."""
    party_models: tuple[str, ...] = ()
    """One model name per party (a factory, as model.name takes it; from Python,
    mpisplit.train(party_factories=[...])): party k's lower network is that factory's whole
    module, built for party k's features with scheme.party_options[k] alone as its options,
    and model.name gives only the server's part. Empty = every party takes part 0 of
    model.name's model, split at model.cuts."""

    def label_party(self, clients: int) -> int | None:
        """The party that holds the labels (``label_holder: party<k>``), or None."""
        match = re.fullmatch(r"party(\d+)", self.label_holder)
        party = int(match[1]) if match else None
        return party if party is not None and party < clients else None

    def check(self, cfg: Config) -> None:
        clients = cfg.scheme.clients
        require(
            self.label_holder == "server" or self.label_party(clients) is not None,
            "scheme.label_holder",
            f"must be server or party<k> with k < scheme.clients "
            f"({clients}), got {self.label_holder!r}",
        )
        require(
            len(self.party_options) in (0, clients),
            "scheme.party_options",
            f"one mapping per party: {clients} for scheme.clients={clients}, "
            f"got {len(self.party_options)}",
        )
        require(
            len(self.party_models) in (0, clients),
            "scheme.party_models",
            f"one model name per party: {clients} for scheme.clients={clients}, "
            f"got {len(self.party_models)}",
        )


def always(scheme: SchemeConfig) -> bool:
    """Every step is a lockstep of all ranks."""
    return True


SPEC = SchemeSpec(
    name="vertical",
    layout=server_and_clients,
    runners={
        Role.SERVER: "mpisplit.schemes.vertical:run",
        Role.CLIENT: "mpisplit.schemes.vertical:run",
    },
    check="mpisplit.schemes.vertical_parts:check_plan",
    routes=frozenset(
        {
            # The cut traffic itself is collective (Gatherv/Scatterv), accounted under these routes.
            ("client", "server", Kind.ACTIVATION),
            ("server", "client", Kind.GRADIENT),
            # label_holder: party<k> — logits to party k, their gradient back.
            ("server", "client", Kind.ACTIVATION),
            ("client", "server", Kind.GRADIENT),
        }
    ),
    cuts=1,
    options=VerticalOptions,
    checkpointable=always,
    vertical=True,
)

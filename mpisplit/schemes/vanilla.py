"""Vanilla split learning: clients hold the layers below the cut and send labels with the
cut activation; the server holds the rest and the loss.

``client_order: sequential`` is the original round-robin: one client trains at a time and
hands its lower layers (weights, optimizer and schedule state) peer-to-peer to the next.
``client_order: parallel`` runs every client at once, each with its own lower layers; the
server serves cut activations in arrival order, so a slow client never blocks the others.
A client rank may host several logical clients (``scheme.clients_per_rank``,
``mpisplit.schemes.hosting``).
"""

from __future__ import annotations

from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.lower_client import train_lower_clients
from mpisplit.schemes.serving import serve_with
from mpisplit.schemes.turns import clients_total_steps
from mpisplit.topology import Role


def serve(ctx: RankContext) -> RankResult:
    total = clients_total_steps(ctx)
    return serve_with(ctx, ctx.build_segment(1, total), total)


def train_client(ctx: RankContext) -> RankResult:
    return train_lower_clients(ctx, ctx.topology.ranks(Role.SERVER)[0])

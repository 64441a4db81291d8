"""Multi-hop split learning: the model is a chain client → relay(s) → server.

With ``len(model.cuts)`` cuts there are ``len(model.cuts) - 1`` relays; relay i holds segment
i + 1, the server the last segment and the loss. Every rank builds only its own segment. Each
hop serves activations in arrival order and returns the gradient to the rank the activation
came from. Labels travel hop by hop with the activations (relays never read them); a relay
passes an evaluation pass on without interleaving other traffic, so the server tallies it
as the client named in its end marker. ``client_order`` works as in vanilla.
"""

from __future__ import annotations

from mpisplit.engine import RankContext, RankResult
from mpisplit.schemes.lower_client import train_lower_client
from mpisplit.schemes.relays import relay_activations
from mpisplit.schemes.serving import serve_with
from mpisplit.schemes.turns import clients_total_steps
from mpisplit.topology import Role


def train_client(ctx: RankContext) -> RankResult:
    return train_lower_client(ctx, ctx.topology.ranks(Role.RELAY)[0])


def serve(ctx: RankContext) -> RankResult:
    total = clients_total_steps(ctx)
    return serve_with(ctx, ctx.build_segment(ctx.run.parts - 1, total), total)


def relay(ctx: RankContext) -> RankResult:
    """Relay i holds segment i + 1 and passes on to relay i + 1, the last to the server."""
    relays, index = ctx.topology.ranks(Role.RELAY), ctx.me.index
    total = clients_total_steps(ctx)
    segment = ctx.build_segment(index + 1, total)
    next_hop = relays[index + 1] if index + 1 < len(relays) else ctx.topology.ranks(Role.SERVER)[0]
    steps = relay_activations(ctx, segment, total, next_hop)
    return RankResult(steps=steps, segment=segment)

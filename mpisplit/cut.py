"""The cut-layer exchange wired into autograd, so training code holds no hand-written comm.

Below the cut, ``send_forward(h, ...)`` ships the activation and returns an *anchor*: calling
``anchor.backward()`` receives the gradient at the cut and continues back-propagation through
the local layers. Above the cut, ``recv_forward(...)`` returns the activation as a leaf that
requires grad; when back-propagation reaches it, its gradient is sent back to the sender.
Chaining the two gives U-shaped and multi-hop schemes with the same two calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mpisplit.transport import ANY_SOURCE, Flag, Kind, Message, PendingSend, Transport


def post_cut(transport: Transport, tensor: torch.Tensor, dest: int, kind: Kind,
             **meta: Any) -> list[PendingSend]:
    """Starts sending a cut tensor, compressed into the transport's wire parts."""
    return [transport.isend(part, dest, kind, **meta)
            for part in transport.compressor.encode(tensor.detach())]


def receive_cut(transport: Transport, kind: Kind, source: int = ANY_SOURCE,
                senders: Sequence[int] = ()) -> Message:
    """Receives one cut tensor (all its wire parts) and decodes it. End and done markers
    travel as one uncompressed message."""
    first = transport.recv(kind, source, senders=senders)
    if first.flags & (Flag.LAST | Flag.DONE):
        return first
    rest = [transport.recv(kind, first.source).tensor
            for _ in range(transport.compressor.parts - 1)]
    return first._replace(tensor=transport.compressor.decode([first.tensor, *rest]))


class _SendActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, activation: torch.Tensor, transport: Transport, dest: int,
                step: int, flags: Flag, aux: int, microbatch: int) -> torch.Tensor:
        ctx.pending = post_cut(transport, activation, dest, Kind.ACTIVATION, step=step,
                               flags=flags, aux=aux, microbatch=microbatch)
        ctx.transport, ctx.dest, ctx.device = transport, dest, activation.device
        return activation.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        for pending in ctx.pending:
            pending.wait()
        gradient = receive_cut(ctx.transport, Kind.GRADIENT, ctx.dest).tensor
        return gradient.to(ctx.device, non_blocking=True), None, None, None, None, None, None


def send_forward(activation: torch.Tensor, transport: Transport, dest: int, step: int = 0, *,
                 flags: Flag = Flag.NONE, aux: int = 0, microbatch: int = 0) -> torch.Tensor:
    """Starts sending the cut activation and returns at once, so the sender can compute the
    next microbatch while it travels; ``.backward()`` on the result completes the send and
    pulls the cut gradient."""
    if not activation.requires_grad:  # nothing below the cut trains (frozen layers): the
        activation = activation.detach().requires_grad_()  # cut gradient is still taken
    return _SendActivation.apply(activation, transport, dest, step, flags, aux, microbatch)


def recv_forward(transport: Transport, source: int = ANY_SOURCE, *,
                 device: torch.device | None = None, train: bool = True,
                 kind: Kind = Kind.ACTIVATION,
                 senders: Sequence[int] = ()) -> tuple[torch.Tensor, Message]:
    """Receives a cut activation; in training its gradient goes back to its sender.

    ``senders``: the ranks an any-source receive waits on (named if they fall silent).
    """
    message = receive_cut(transport, kind, source, senders)
    activation = message.tensor.to(device) if device is not None else message.tensor
    if train and not message.flags & Flag.EVAL:
        activation.requires_grad_(True)
        sender, step, microbatch = message.source, message.step, message.microbatch

        def send_gradient(grad: torch.Tensor) -> None:
            # Not waited for here: the server computes its next microbatch while the
            # client is still busy with its forwards (``Transport.detach``).
            transport.detach(post_cut(transport, grad, sender, Kind.GRADIENT, step=step,
                                      microbatch=microbatch))

        activation.register_hook(send_gradient)
    return activation, message


def send_eval(activation: torch.Tensor, transport: Transport, dest: int, step: int = 0) -> None:
    """Forward-only traffic (evaluation): no gradient comes back."""
    for pending in post_cut(transport, activation, dest, Kind.ACTIVATION, step=step,
                            flags=Flag.EVAL):
        pending.wait()

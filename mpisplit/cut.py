"""The cut-layer exchange wired into autograd, so training code holds no hand-written comm.

Below the cut, ``send_forward(h, ...)`` ships the activation and returns an *anchor*: calling
``anchor.backward()`` receives the gradient at the cut and continues back-propagation through
the local layers. Above the cut, ``recv_forward(...)`` returns the activation as a leaf that
requires grad; when back-propagation reaches it, its gradient is sent back to the sender.
Chaining the two gives U-shaped and multi-hop schemes with the same two calls.

A cut value is one tensor or a tuple of them (hidden states and an attention mask): a tuple
travels as consecutive messages, each but the last flagged ``TUPLE``. Float tensors go through
the compressor and get their gradients back (together, once back-propagation has reached all
of them); other tensors (int masks, bools) travel as they are (``RAW``), forward only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpisplit.protocol import Flag, Kind
from mpisplit.transport import ANY_SOURCE, Message, PendingSend, Transport

CutValue = torch.Tensor | tuple[torch.Tensor, ...]
"""What crosses a cut: the output of the part below it, the input of the part above."""


def tensors(value: CutValue) -> tuple[torch.Tensor, ...]:
    """The tensors of a cut value (one for a tensor); anything else is a clear error."""
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if not isinstance(item, torch.Tensor):
            raise TypeError(
                f"a cut carries tensors only, got {type(item).__name__}: cut where "
                f"every value that crosses is a tensor"
            )
    return values


def differentiable(tensor: torch.Tensor) -> bool:
    """Whether a cut tensor carries a gradient back (floating point) or travels forward only."""
    return tensor.is_floating_point()


def map_floats(function: Callable[[torch.Tensor], torch.Tensor], value: CutValue) -> CutValue:
    """``value`` with ``function`` applied to its float tensors (defences: clipping, noise)."""
    if not isinstance(value, tuple):
        return function(value) if differentiable(value) else value
    return tuple(function(t) if differentiable(t) else t for t in value)


def cut_features(value: CutValue) -> torch.Tensor:
    """One row per sample of the cut's float tensors, flattened side by side: what the
    leakage measure and NoPeek compare with the inputs."""
    items = tensors(value)
    floats = [t.reshape(len(t), -1) for t in items if differentiable(t)] or [
        t.reshape(len(t), -1).float() for t in items
    ]
    return floats[0] if len(floats) == 1 else torch.cat(floats, dim=1)


def post_cut(
    transport: Transport,
    value: CutValue,
    dest: int,
    kind: Kind,
    *,
    flags: Flag = Flag.NONE,
    **meta: Any,
) -> list[PendingSend]:
    """Starts sending a cut value: each float tensor compressed into the transport's wire
    parts, each other tensor as it is."""
    items = tensors(value)
    pending = []
    for i, tensor in enumerate(items):
        more = Flag.TUPLE if i < len(items) - 1 else Flag.NONE
        if differentiable(tensor):
            parts = transport.compressor.encode(tensor.detach())
            pending += [
                transport.isend(part, dest, kind, flags=flags | more, **meta) for part in parts
            ]
        else:
            pending.append(
                transport.isend(tensor, dest, kind, flags=flags | more | Flag.RAW, **meta)
            )
    return pending


def receive_cut(
    transport: Transport, kind: Kind, source: int = ANY_SOURCE, senders: Sequence[int] = ()
) -> Message:
    """Receives one cut value (every wire part of every tensor) and decodes it; its message
    is the first tensor's, with the whole value (a tuple where several came). End and done
    markers travel as one uncompressed message."""
    first = transport.recv(kind, source, senders=senders)
    if first.flags & (Flag.LAST | Flag.DONE):
        return first
    values, message = [], first
    while True:
        values.append(_decode(transport, message, kind))
        if not message.flags & Flag.TUPLE:
            break
        message = transport.recv(kind, first.source)
    value = values[0] if len(values) == 1 else tuple(values)
    return first._replace(tensor=value, flags=first.flags & ~(Flag.TUPLE | Flag.RAW))


def _decode(transport: Transport, first: Message, kind: Kind) -> torch.Tensor:
    if first.flags & Flag.RAW:
        return first.tensor
    rest = [
        transport.recv(kind, first.source).tensor for _ in range(transport.compressor.parts - 1)
    ]
    return transport.compressor.decode([first.tensor, *rest])


class _SendActivation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        transport: Transport,
        dest: int,
        step: int,
        flags: Flag,
        aux: int,
        microbatch: int,
        *values: torch.Tensor,
    ) -> torch.Tensor:
        value = values[0] if len(values) == 1 else values
        ctx.pending = post_cut(
            transport,
            value,
            dest,
            Kind.ACTIVATION,
            step=step,
            flags=flags,
            aux=aux,
            microbatch=microbatch,
        )
        ctx.transport, ctx.dest = transport, dest
        ctx.devices = [v.device if differentiable(v) else None for v in values]
        floats = [v for v in values if differentiable(v)]
        return (floats or values)[0].new_zeros((), dtype=floats[0].dtype if floats else None)

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        for pending in ctx.pending:
            pending.wait()
        if not any(ctx.devices):  # nothing differentiable crossed: no gradient comes back
            return (None,) * (6 + len(ctx.devices))
        gradient = tensors(receive_cut(ctx.transport, Kind.GRADIENT, ctx.dest).tensor)
        received = iter(gradient)
        grads = [
            next(received).to(device, non_blocking=True) if device is not None else None
            for device in ctx.devices
        ]
        return (None,) * 6 + tuple(grads)


def send_forward(
    activation: CutValue,
    transport: Transport,
    dest: int,
    step: int = 0,
    *,
    flags: Flag = Flag.NONE,
    aux: int = 0,
    microbatch: int = 0,
) -> torch.Tensor:
    """Starts sending the cut activation and returns at once, so the sender can compute the
    next microbatch while it travels; ``.backward()`` on the result completes the send and
    pulls the cut gradient (of its float tensors)."""
    # A float tensor that needs no gradient (nothing below the cut trains: frozen layers)
    # still takes one: the receiver sends it, so this side must receive it.
    sent = [
        t.detach().requires_grad_() if t.is_floating_point() and not t.requires_grad else t
        for t in tensors(activation)
    ]
    return _SendActivation.apply(transport, dest, step, flags, aux, microbatch, *sent)


def recv_forward(
    transport: Transport,
    source: int = ANY_SOURCE,
    *,
    device: torch.device | None = None,
    train: bool = True,
    kind: Kind = Kind.ACTIVATION,
    senders: Sequence[int] = (),
) -> tuple[CutValue, Message]:
    """Receives a cut activation; in training its gradient goes back to its sender.

    ``senders``: the ranks an any-source receive waits on (named if they fall silent).
    """
    message = receive_cut(transport, kind, source, senders)
    values = tuple(t.to(device) if device is not None else t for t in tensors(message.tensor))
    activation = values[0] if len(values) == 1 else values
    if train and not message.flags & Flag.EVAL:
        floats = [t.requires_grad_(True) for t in values if differentiable(t)]
        sender, step, microbatch = message.source, message.step, message.microbatch

        def send_gradient(grads: Sequence[torch.Tensor | None]) -> None:
            # Not waited for here: the server computes its next microbatch while the
            # client is still busy with its forwards (``Transport.detach``).
            sent = tuple(
                torch.zeros_like(t) if g is None else g for t, g in zip(floats, grads, strict=True)
            )
            transport.detach(
                post_cut(
                    transport,
                    sent[0] if len(sent) == 1 else sent,
                    sender,
                    Kind.GRADIENT,
                    step=step,
                    microbatch=microbatch,
                )
            )

        if len(floats) == 1:
            floats[0].register_hook(lambda grad: send_gradient([grad]))
        elif floats:
            torch.autograd.graph.register_multi_grad_hook(floats, send_gradient)
    return activation, message


def send_eval(activation: CutValue, transport: Transport, dest: int, step: int = 0) -> None:
    """Forward-only traffic (evaluation): no gradient comes back."""
    for pending in post_cut(
        transport, activation, dest, Kind.ACTIVATION, step=step, flags=Flag.EVAL
    ):
        pending.wait()

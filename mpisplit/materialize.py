"""Building only the parts of a model that this rank keeps, equal bit for bit to the same
tensors of ``factory(**options)`` built whole under the seed.

The factory runs twice. First on the meta device, under a dispatch mode that records every
tensor it allocates: this gives the structure, and which allocations end up as the kept
parts' parameters and buffers. Then on the CPU, where the allocations that end up in other
ranks' parts are made on the meta device instead; a random initialisation of such a tensor
still draws from the CPU generator, on a scratch tensor of its shape that is dropped at once,
so every tensor this rank keeps sees the generator exactly where the whole build would. Draws
after the last one that a kept tensor (or a value computed on the way) needs are skipped: the
first part's rank draws nothing for the others. The peak memory is the kept parts plus the
largest single tensor, not the model.

If the two runs allocate differently (a factory that branches on the device), the whole
model is built instead: slower and larger, but still exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
_RANDOM_NEW = {
    aten.rand,
    aten.randn,
    aten.randint,
    aten.randperm,
    aten.rand_like,
    aten.randn_like,
    aten.randint_like,
    aten.normal,
    aten.bernoulli,
    aten.multinomial,
    aten.poisson,
}
_ALLOCATIONS = _RANDOM_NEW | {
    aten.empty,
    aten.empty_strided,
    aten.zeros,
    aten.ones,
    aten.full,
    aten.arange,
    aten.eye,
    aten.linspace,
    aten.empty_like,
    aten.zeros_like,
    aten.ones_like,
    aten.full_like,
    aten.scalar_tensor,
}
_RANDOM_IN_PLACE = {
    aten.uniform_,
    aten.normal_,
    aten.bernoulli_,
    aten.random_,
    aten.exponential_,
    aten.geometric_,
    aten.log_normal_,
    aten.cauchy_,
}


class _EagerMode(TorchDispatchMode):
    """A dispatch mode that never runs under ``torch.compile``: torch would otherwise wrap
    ``__torch_dispatch__`` to disable dynamo, whose first call imports ``torch._dynamo`` and
    sympy (about 70 MiB and a second) in the middle of the model build."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class _Record(_EagerMode):
    """Keeps every tensor the factory allocates, in order, and the storage each random
    draw fills."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[torch.Tensor] = []
        self.draws: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in _ALLOCATIONS:
            self.allocations.append(out)
        if packet in _RANDOM_NEW or packet in _RANDOM_IN_PLACE:
            self.draws.append(out.untyped_storage()._cdata)
        return out


class _Materialize(_EagerMode):
    """Allocations numbered in ``elsewhere`` go to the meta device. Among the first
    ``needed`` random draws (the last of them one that a kept tensor needs) theirs are made
    on a throwaway CPU tensor, so the generator moves as in the whole build; later ones are
    skipped."""

    def __init__(self, elsewhere: set[int], needed: int) -> None:
        super().__init__()
        self.elsewhere = elsewhere
        self.needed = needed
        self.count = 0
        self.draws = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        draw = packet in _RANDOM_NEW or packet in _RANDOM_IN_PLACE
        if draw:
            self.draws += 1
        if packet in _ALLOCATIONS:
            number, self.count = self.count, self.count + 1
            if number in self.elsewhere:
                if draw and self.draws <= self.needed:
                    return func(*args, **kwargs).to("meta")
                return func(*_meta(args), **{**_meta(kwargs), "device": torch.device("meta")})
            return func(*args, **kwargs)
        if not any(t.device.type == "meta" for t in _tensors((args, kwargs))):
            return func(*args, **kwargs)
        if draw and self.draws <= self.needed:
            target = args[0]
            scratch = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype)
            func(scratch, *args[1:], **kwargs)
            return target
        if draw:
            return args[0]
        return func(*_meta(args), **_meta(kwargs))


def _meta(tree: Any) -> Any:
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, tree)


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) else None, tree)
    return found


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors}


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [
        t
        for _, t in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    ]


def build_kept(
    build: Callable[[], nn.Module], seed: int, kept: Callable[[nn.Module], Iterable[nn.Module]]
) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` with only the tensors of ``kept(model)``
    (the parts this rank holds) on the CPU; the others stay on the meta device."""
    record = _Record()
    with torch.random.fork_rng(devices=[]), torch.device("meta"), record:
        torch.manual_seed(seed)
        shape = build()
    keep = _storages(t for part in kept(shape) for t in _state(part))
    final = _storages(_state(shape))
    elsewhere = {
        number
        for number, t in enumerate(record.allocations)
        if t.untyped_storage()._cdata in final - keep
    }
    needed = max(
        (number + 1 for number, storage in enumerate(record.draws) if storage not in final - keep),
        default=0,
    )
    materialize = _Materialize(elsewhere, needed)
    with torch.random.fork_rng(devices=[]), materialize:
        torch.manual_seed(seed)
        model = build()
    owned = [t for part in kept(model) for t in _state(part)]
    if (
        materialize.count != len(record.allocations)
        or materialize.draws != len(record.draws)
        or any(t.is_meta for t in owned)
    ):
        logging.getLogger("mpisplit").warning(
            "the model factory allocated differently on the meta device; building the whole "
            "model on every rank"
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
    return model

"""Vertical split learning's model parts: each party's lower network, the server's upper
network over the joined cut outputs, and the shapes every rank derives from the config
alone (``Layout``), on the meta device, so no rank builds another's weights.

A zoo model (``model.name: mlp``...) is rebuilt per party from its layer plan for that
party's feature shape, with ``model.options`` overridden by ``scheme.party_options[p]``;
under ``concat`` the server's first weighted layer is widened to the joined width. A user's
factory (``model.name: path/to/file.py:function``) is called per party with its options
and feature shape, and once for the server with ``model.options`` and the dataset's whole
feature shape; the parties keep part 0 of the split at ``model.cuts``, the server part 1,
which must take the joined cut outputs as the factory builds it (nothing is widened).
With ``scheme.party_models`` each party has a factory of its own, whose whole module is its
lower network (options: its ``party_options`` entry alone), and ``model.name`` gives only the
server's part. Party p is seeded with ``model.seed + p``, the server with ``model.seed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from math import prod

import torch
from torch import nn

from mpisplit.config import Config, ConfigError, ModelConfig
from mpisplit.engine import RunPlan
from mpisplit.models import (
    ZOO,
    LayerPlan,
    build_layers,
    build_model,
    build_parts,
    cut_indices,
    layer_plan,
)
from mpisplit.split import split_model


def party_model(cfg: Config, party: int) -> ModelConfig:
    """Party p's model: ``model.options`` overridden by its ``scheme.party_options`` entry,
    or its own ``scheme.party_models`` factory with that entry alone; seeded with
    ``model.seed + p`` (so parties differ)."""
    overrides = cfg.scheme.options.party_options
    own = cfg.scheme.options.party_models
    if own:
        options = overrides[party] if overrides else {}
        return replace(cfg.model, name=own[party], options=options, seed=cfg.model.seed + party)
    options = {**cfg.model.options, **overrides[party]} if overrides else cfg.model.options
    return replace(cfg.model, options=options, seed=cfg.model.seed + party)


@contextlib.contextmanager
def _as_party(cfg: Config, party: int) -> Iterator[None]:
    """A problem with a party's part is reported against its ``scheme.party_models`` or
    ``scheme.party_options`` entry."""
    try:
        yield
    except ConfigError as err:
        options = cfg.scheme.options
        key = "party_models" if options.party_models else "party_options"
        if not getattr(options, key):
            raise
        raise ConfigError(f"scheme.{key}[{party}]: {err}") from None


def party_plan(cfg: Config, meta: dict, party: int) -> tuple[LayerPlan, int]:
    """The zoo plan built for one party's feature shape and options, and its cut index."""
    model = party_model(cfg, party)
    with _as_party(cfg, party):
        plan = layer_plan(model, meta["party_feature_shapes"][party], meta["num_classes"])
        (cut,) = cut_indices(plan, model.cuts)
    return plan, cut


def _factory_part(
    model: ModelConfig, meta: dict, shape: Sequence[int], part: int, *, keep: bool
) -> nn.Module:
    """Part ``part`` of a user's factory model at ``model.cuts``: materialised alone, bit for
    bit as in ``factory(**options)`` under the model's seed (``keep``), or on the meta
    device."""
    if keep:
        whole = build_parts(model, shape, meta["num_classes"], [part])
    else:
        whole = build_model(model, shape, meta["num_classes"], device="meta")
    return split_model(whole, model.cuts)[part]


def party_part(cfg: Config, meta: dict, party: int, *, keep: bool = True) -> nn.Module:
    """Party p's lower network: the zoo plan's layers below its cut, part 0 of the user's
    factory built with its options for its feature shape, or the whole module of its own
    factory (``scheme.party_models``)."""
    own = bool(cfg.scheme.options.party_models)
    if cfg.model.name in ZOO and not own:
        plan, cut = party_plan(cfg, meta, party)
        seed = party_model(cfg, party).seed
        with torch.device("cpu" if keep else "meta"):
            return build_layers(plan, 0, cut, seed)
    model, shape = party_model(cfg, party), meta["party_feature_shapes"][party]
    with _as_party(cfg, party):
        if own:
            return build_model(model, shape, meta["num_classes"], device=None if keep else "meta")
        return _factory_part(model, meta, shape, 0, keep=keep)


def server_part(run: RunPlan, layout: Layout, *, keep: bool = True) -> nn.Module:
    """The server's upper network: the zoo plan above the cut (its first weighted layer
    widened under concat), or part 1 of the user's factory built with ``model.options``
    (which must take the joined cut outputs)."""
    cfg = run.config
    if layout.server_plan:
        with torch.device("cpu" if keep else "meta"):
            return build_layers(
                layout.server_plan, layout.cut, len(layout.server_plan), cfg.model.seed
            )
    return _factory_part(cfg.model, run.meta, run.meta["feature_shape"], 1, keep=keep)


def cut_shape(lower: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample shape of a (meta-device) lower network's output."""
    return tuple(_meta_output(lower, input_shape).shape[1:])


def _meta_output(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """``module`` (a throwaway on the meta device) applied to one sample, in evaluation
    mode (BatchNorm cannot take one sample in training)."""
    with torch.device("meta"):
        return module.eval()(torch.zeros(1, *input_shape))


def joined_shape(join: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Per-sample shape after the join; concat joins along the first (feature) axis."""
    rest = {shape[1:] for shape in shapes}
    if join == "concat":
        if len(rest) > 1:
            raise ConfigError(
                f"scheme.join: concat needs the parties' cut outputs to agree "
                f"beyond the first axis, got {list(shapes)}"
            )
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if len(set(shapes)) > 1:
        raise ConfigError(
            f"scheme.join: {join} needs equal cut-output shapes from every "
            f"party, got {list(shapes)}; use join: concat"
        )
    return shapes[0]


def server_plan(run: RunPlan, cut: int, joined: tuple[int, ...]) -> LayerPlan:
    """The zoo plan whose first weighted layer above the cut takes the joined width."""
    plan = list(run.layers)
    with torch.device("meta"):
        lower = nn.Sequential(*(factory() for _, factory in plan[:cut]))
    single = cut_shape(lower, run.meta["feature_shape"])
    if joined[0] != single[0]:
        first = next((i for i in range(cut, len(plan)) if _has_weights(plan[i][1])), None)
        if first is None:
            raise ConfigError(
                "model.cuts: the server's part has no weighted layer to take the joined cut outputs"
            )
        name, factory = plan[first]
        plan[first] = (name, _widened(factory, joined[0], single[0], name))
    return plan


def _has_weights(factory: Callable[[], nn.Module]) -> bool:
    with torch.device("meta"):
        return any(True for _ in factory().parameters())


def _widened(
    factory: Callable[[], nn.Module], joined: int, single: int, name: str
) -> Callable[[], nn.Module]:
    """A factory of the same layer with its input width scaled by ``joined / single``."""
    with torch.device("meta"):
        layer = factory()
    if isinstance(layer, nn.Linear):
        width = _scaled(layer.in_features, joined, single, name)
        return lambda: nn.Linear(width, layer.out_features, bias=layer.bias is not None)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        width = _scaled(layer.in_channels, joined, single, name)
        return lambda: nn.Conv2d(
            width,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=layer.bias is not None,
        )
    raise ConfigError(
        f"model.cuts: join concat widens the server's first weighted layer "
        f"'{name}', which must be Linear or Conv2d, not {type(layer).__name__}"
    )


def _scaled(width: int, joined: int, single: int, name: str) -> int:
    if width * joined % single:
        raise ConfigError(
            f"model.cuts: cannot widen '{name}' ({width} inputs) from a cut "
            f"width of {single} to the joined width {joined}"
        )
    return width * joined // single


def _check_server_part(upper: nn.Module, joined: tuple[int, ...], classes: int, zoo: bool) -> None:
    fix = (
        ""
        if zoo
        else (
            " (the server's part is built from model.options; the parties' "
            "from theirs, with scheme.party_options)"
        )
    )
    try:
        out = _meta_output(upper, joined)
    except (RuntimeError, ValueError) as err:  # torch's shape errors
        raise ConfigError(
            f"model.cuts: the server's layers cannot take the joined cut "
            f"outputs of shape {joined}{fix}: {err}"
        ) from None
    if tuple(out.shape[1:]) != (classes,):
        raise ConfigError(
            f"model.cuts: the server's part ends in {tuple(out.shape[1:])}, not {classes} logits"
        )


def join(how: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The server's join of the parties' cut outputs (part p from party p)."""
    if how == "concat":
        return torch.cat(list(parts), dim=1)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total / len(parts) if how == "mean" else total


@dataclass(frozen=True)
class Layout:
    """What every rank derives from the config alone (no traffic): cut, shapes, plans."""

    cut: int
    """Where the server's part starts in the zoo plan (each party's own plan is cut where
    ``party_plan`` says: parties' plans may differ)."""
    cut_shapes: list[tuple[int, ...]]
    server_plan: LayerPlan
    """The zoo plan the server's part is built from (empty for a user's factory)."""

    @classmethod
    def of(cls, run: RunPlan) -> Layout:
        cfg, meta = run.config, run.meta
        shapes = [
            cut_shape(party_part(cfg, meta, party, keep=False), features)
            for party, features in enumerate(meta["party_feature_shapes"])
        ]
        joined = joined_shape(cfg.scheme.options.join, shapes)
        zoo = cfg.model.name in ZOO
        cut = run.bounds[0][1] if zoo else 0
        layout = cls(cut, shapes, server_plan(run, cut, joined) if zoo else [])
        _check_server_part(server_part(run, layout, keep=False), joined, meta["num_classes"], zoo)
        return layout

    @property
    def widths(self) -> list[int]:
        """Floats per sample each party sends."""
        return [prod(shape) for shape in self.cut_shapes]


def check_plan(run: RunPlan) -> None:
    """The spec's structural check, on every rank before any traffic: every party's part
    builds for its feature shape and cuts where ``model.cuts`` says, and the server's part
    takes the joined cut outputs and ends in the class logits (``data.check_partition``
    has already said whether the dataset is a vertical partition)."""
    Layout.of(run)

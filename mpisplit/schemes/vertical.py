"""Vertical split learning: K parties hold different feature groups of the same patients.

Each party runs its own lower network (the zoo model's layers below the cut, built for that
party's feature shape with ``model.options`` overridden by its ``scheme.party_options`` entry,
so parties may differ in shape and size, and seeded with ``model.seed + party``) on its own
columns. The server joins the parties' cut outputs (``scheme.join``: concatenation along the
feature/channel axis, sum, or mean) and runs the layers above the cut. Under ``concat`` the
server's first weighted layer (Linear or Conv2d) is widened to take the joined width (the
sum of the parties' widths); the rest of the zoo plan, built from ``model.options``, is
unchanged. Shapes are worked out on the meta device, so no rank builds another's weights.

Traffic is collective, on a communicator of the server and the parties split from
``ctx.comm``: one ``Gatherv`` brings every party's cut output to the server, one ``Scatterv``
returns each party its slice of the gradient. The bytes are counted in the transport's
traffic as ACTIVATION / GRADIENT routes, so the summary and ``mpisplit audit`` see them.

Alignment: parties' files list the patients in different orders and each may miss some.
At setup the members (every party, and the label holder) intersect the ids of the files they
read by private set intersection (:mod:`mpisplit.psi`: each learns the intersection and the
others' set sizes, nothing about the ids it does not share), the server logs how many rows
each party drops, and everybody reads only the intersection, through ``align_rows`` and
``ShardReader(rows=...)`` with the same seed, so every batch holds the same patients in the
same order on every party.

Labels (``scheme.label_holder``): ``server`` opens ``labels.h5`` and computes the loss;
``party<k>`` keeps them at party k: the server sends it the logits and gets their gradient
back (transport routes server → client ACTIVATION, client → server GRADIENT), and party k
evaluates. The server then never opens a labels file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisplit import schedules
from mpisplit.checkpoint import pack, unpack
from mpisplit.collective_cut import ROOT, CollectiveCut, Gathered
from mpisplit.config import Config, ConfigError
from mpisplit.cut import recv_forward, send_eval, send_forward
from mpisplit.data import Batch, DataError, ShardReader, align_rows, intersect_ids, read_ids
from mpisplit.engine import EvalResult, RankContext, RankResult, RunPlan
from mpisplit.failure import check_loss
from mpisplit.models import LayerPlan, build_layers, cut_indices, layer_plan
from mpisplit.privacy import CutDefence
from mpisplit.psi import private_intersection
from mpisplit.schedules import Action, split_sizes
from mpisplit.schemes.common import (
    EvalTally,
    evaluating,
    log,
    make_progress,
    planned_steps,
    record_client_step,
    record_eval,
    training_batches,
)
from mpisplit.segment import Segment
from mpisplit.topology import Role

SERVER = ROOT
"""The server's rank in the vertical communicator (the root of every collective)."""


# --- model: per-party lower networks, the server's joined upper part --------------------

def party_plan(cfg: Config, meta: dict, party: int) -> tuple[LayerPlan, int]:
    """The zoo plan built for one party's feature shape and options, and its cut index;
    a problem is reported against the party's ``scheme.party_options`` entry."""
    model, overrides = cfg.model, cfg.scheme.options.party_options
    if overrides:
        model = replace(model, options={**model.options, **overrides[party]})
    try:
        plan = layer_plan(model, meta["party_feature_shapes"][party], meta["num_classes"])
        (cut,) = cut_indices(plan, model.cuts)
    except ConfigError as err:
        if not overrides:
            raise
        raise ConfigError(f"scheme.party_options[{party}]: {err}") from None
    return plan, cut


def party_seed(cfg: Config, party: int) -> int:
    """Party p's lower layers are seeded with ``model.seed + p`` (so parties differ)."""
    return cfg.model.seed + party


def cut_shape(plan: LayerPlan, cut: int, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample shape of the output of layers ``0..cut-1``, computed on the meta device."""
    with torch.device("meta"):
        lower = nn.Sequential(*(factory() for _, factory in plan[:cut]))
        return tuple(lower(torch.zeros(1, *input_shape)).shape[1:])


def joined_shape(join: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Per-sample shape after the join; concat joins along the first (feature) axis."""
    rest = {shape[1:] for shape in shapes}
    if join == "concat":
        if len(rest) > 1:
            raise ConfigError(f"scheme.join: concat needs the parties' cut outputs to agree "
                              f"beyond the first axis, got {list(shapes)}")
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if len(set(shapes)) > 1:
        raise ConfigError(f"scheme.join: {join} needs equal cut-output shapes from every "
                          f"party, got {list(shapes)}; use join: concat")
    return shapes[0]


def server_plan(run: RunPlan, cut: int, joined: tuple[int, ...]) -> LayerPlan:
    """The zoo plan whose first weighted layer above the cut takes the joined width."""
    plan = list(run.layers)
    single = cut_shape(plan, cut, run.meta["feature_shape"])
    if joined[0] != single[0]:
        first = next((i for i in range(cut, len(plan)) if _has_weights(plan[i][1])), None)
        if first is None:
            raise ConfigError("model.cuts: the server's part has no weighted layer to take "
                              "the joined cut outputs")
        name, factory = plan[first]
        plan[first] = (name, _widened(factory, joined[0], single[0], name))
    _check_server_part(plan, cut, joined, run.meta["num_classes"])
    return plan


def _has_weights(factory: Callable[[], nn.Module]) -> bool:
    with torch.device("meta"):
        return any(True for _ in factory().parameters())


def _widened(factory: Callable[[], nn.Module], joined: int, single: int,
             name: str) -> Callable[[], nn.Module]:
    """A factory of the same layer with its input width scaled by ``joined / single``."""
    with torch.device("meta"):
        layer = factory()
    if isinstance(layer, nn.Linear):
        width = _scaled(layer.in_features, joined, single, name)
        return lambda: nn.Linear(width, layer.out_features, bias=layer.bias is not None)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        width = _scaled(layer.in_channels, joined, single, name)
        return lambda: nn.Conv2d(width, layer.out_channels, layer.kernel_size, layer.stride,
                                 layer.padding, layer.dilation, bias=layer.bias is not None)
    raise ConfigError(f"model.cuts: join concat widens the server's first weighted layer "
                      f"'{name}', which must be Linear or Conv2d, not {type(layer).__name__}")


def _scaled(width: int, joined: int, single: int, name: str) -> int:
    if width * joined % single:
        raise ConfigError(f"model.cuts: cannot widen '{name}' ({width} inputs) from a cut "
                          f"width of {single} to the joined width {joined}")
    return width * joined // single


def _check_server_part(plan: LayerPlan, cut: int, joined: tuple[int, ...],
                       classes: int) -> None:
    with torch.device("meta"):
        upper = nn.Sequential(*(factory() for _, factory in plan[cut:]))
        try:
            out = upper(torch.zeros(1, *joined))
        except RuntimeError as err:
            raise ConfigError(f"model.cuts: the server's layers cannot take the joined cut "
                              f"outputs of shape {joined}: {err}") from None
    if tuple(out.shape[1:]) != (classes,):
        raise ConfigError(f"model.cuts: the server's part ends in {tuple(out.shape[1:])}, "
                          f"not {classes} logits")


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
    """Where the server's part starts in its plan (each party's own plan is cut where
    ``party_plan`` says: parties' plans may differ)."""
    cut_shapes: list[tuple[int, ...]]
    server_plan: LayerPlan

    @classmethod
    def of(cls, run: RunPlan) -> Layout:
        cfg, meta = run.config, run.meta
        shapes, cut = [], run.bounds[0][1]
        for party, features in enumerate(meta["party_feature_shapes"]):
            plan, party_cut = party_plan(cfg, meta, party)
            shapes.append(cut_shape(plan, party_cut, features))
        joined = joined_shape(cfg.scheme.options.join, shapes)
        return cls(cut, shapes, server_plan(run, cut, joined))

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


# --- alignment -----------------------------------------------------------------------

def common_ids(comm: MPI.Comm, mine: np.ndarray | None) -> tuple[np.ndarray | None, int,
                                                                 np.ndarray]:
    """(the ids every contributing member holds, or None on a server that reads no file;
    their number; each member's set size, -1: none), by private set intersection
    (:mod:`mpisplit.psi`, the server compares): no member learns another's other ids."""
    return private_intersection(comm, mine, comparator=SERVER)


def batch_sizes(rows: int, batch_size: int) -> list[int]:
    """One epoch's batch sizes as ``ShardReader`` yields them (partial block last), so the
    server knows each Gatherv's size without reading any data."""
    full, partial = divmod(rows, batch_size)
    return [batch_size] * full + ([partial] if partial else [])


@dataclass
class Split:
    """One split (train or test) as this rank sees it."""

    common: np.ndarray | None
    sizes: list[int]
    features: ShardReader | None
    labels: ShardReader | None

    def batches(self, stream: Callable[[ShardReader], Iterator[Batch]]) -> Iterator[
            tuple[Batch | None, Batch | None]]:
        """Aligned (features, labels) batches; None for what this rank does not read."""
        features = stream(self.features) if self.features else None
        labels = stream(self.labels) if self.labels else None
        while True:
            pair = (next(features, None) if features else None,
                    next(labels, None) if labels else None)
            if all(part is None for part in pair) and (features or labels):
                return
            yield pair

    def close(self) -> None:
        for reader in (self.features, self.labels):
            if reader is not None:
                reader.close()


def open_split(ctx: RankContext, comm: MPI.Comm, *, test: bool) -> Split:
    """Intersects the ids (collective), logs what is dropped, opens aligned readers."""
    cfg, me = ctx.config, ctx.me
    holder = _holds_labels(ctx)
    feature_path = ctx.shard("party", me.index, test=test) if me.role == Role.CLIENT else None
    label_path = ctx.shard("labels", test=test) if holder else None
    owned = [read_ids(path) for path in (feature_path, label_path) if path is not None]
    common, size, counts = common_ids(comm, intersect_ids(owned) if owned else None)
    _report_alignment(ctx, size, counts, test)
    if not size:
        raise DataError(f"{cfg.data.path}: the parties have no patient id in common")

    def reader(path: Path, field: str, ids: np.ndarray) -> ShardReader:
        return ShardReader(path, batch_size=cfg.data.batch_size, fields=(field,),
                           shuffle=cfg.data.shuffle and not test, seed=cfg.train.seed,
                           prefetch=0 if test else cfg.data.prefetch,
                           rows=align_rows(ids, common, source=path))

    features = reader(feature_path, "features", owned[0]) if feature_path else None
    labels = reader(label_path, "labels", owned[-1]) if label_path else None
    return Split(common, batch_sizes(size, cfg.data.batch_size), features, labels)


def _report_alignment(ctx: RankContext, common: int, counts: np.ndarray, test: bool) -> None:
    if ctx.me.role != Role.SERVER:
        return
    labels = ctx.topology.placements
    dropped = {labels[r].label: int(n - common) for r, n in enumerate(counts) if n >= 0}
    split = "test" if test else "train"
    log.info("vertical %s: %d ids common to all parties; rows dropped: %s", split,
             common, ", ".join(f"{who} {n}" for who, n in dropped.items()))
    ctx.metrics.write({"event": "alignment", "split": split, "common": common,
                       "dropped": dropped})


def label_party(ctx: RankContext) -> int | None:
    """The party that holds the labels (``label_holder: party<k>``), or None (the server)."""
    return ctx.config.scheme.options.label_party(ctx.config.scheme.clients)


def _holds_labels(ctx: RankContext) -> bool:
    party = label_party(ctx)
    if party is None:
        return ctx.me.role == Role.SERVER
    return ctx.me.role == Role.CLIENT and ctx.me.index == party


# --- roles ---------------------------------------------------------------------------

def run(ctx: RankContext) -> RankResult:
    layout = Layout.of(ctx.run)
    is_member = ctx.me.role in (Role.SERVER, Role.CLIENT)
    comm = ctx.comm.Split(0 if is_member else MPI.UNDEFINED, ctx.me.rank)
    if comm.Get_rank() == SERVER and ctx.me.role != Role.SERVER:
        raise RuntimeError("vertical: the server must be rank 0 of the vertical communicator")
    cut = CollectiveCut(ctx.transport, comm, layout.cut_shapes,
                        ctx.topology.ranks(Role.SERVER)[0], ctx.topology.ranks(Role.CLIENT),
                        device=ctx.device)
    with contextlib.ExitStack() as stack:
        train = open_split(ctx, comm, test=False)
        stack.callback(train.close)
        test = open_split(ctx, comm, test=True)
        stack.callback(test.close)
        steps = planned_steps(len(train.sizes), ctx.config.train)
        role = _Server(ctx, layout, cut, steps) if ctx.me.role == Role.SERVER \
            else _Party(ctx, layout, cut, steps)
        result = _drive(ctx, role, train, test, steps)
    comm.Free()
    return result


class _Role(Protocol):
    """One side of a vertical step; ``_drive`` runs the same loop on every rank."""

    segment: Segment
    generators: list[torch.Generator]
    """Random state that checkpoints keep (a party's privacy noise)."""
    leakage: float | None
    """The leakage figure of this rank's cut output (a party's, after the final evaluation)."""

    def train_step(self, step: int, size: int, features: Batch | None,
                   labels: Batch | None) -> float | None:
        """One training step; returns the loss where this rank computes it."""

    def eval_batch(self, step: int, size: int, features: Batch | None, labels: Batch | None,
                   tally: EvalTally, *, final: bool) -> None:
        """One test batch; the label holder adds it to ``tally``."""

    def evaluated(self, final: bool) -> None:
        """After an evaluation pass (a party measures its leakage after the final one)."""


def microbatch_actions(ctx: RankContext, size: int) -> tuple[list[int], list[Action]]:
    """The sizes a batch of ``size`` splits into (the one policy, ``split_sizes``) and the
    ``transport.schedule`` action list every vertical rank runs them in: the server and the
    parties post their cut collectives in this one order, as collectives require."""
    sizes = split_sizes(size, ctx.config.transport.microbatches)
    return sizes, schedules.of(ctx.config.transport.schedule, len(sizes))


def _drive(ctx: RankContext, role: _Role, train: Split, test: Split, steps: int) -> RankResult:
    """Training steps with periodic and final evaluation, in lockstep on every rank (which
    makes every step a possible checkpoint)."""
    cfg, holder, checkpoints = ctx.config, _holds_labels(ctx), ctx.checkpoints
    resumed, samples, final = checkpoints.resume_step, 0, None
    progress = make_progress(ctx, steps, resumed) if ctx.me.role == Role.SERVER else None
    if (saved := checkpoints.restore()) is not None:
        samples = unpack(saved, [role.segment], role.generators)["samples"]
    pairs = train.batches(lambda reader: training_batches(reader, cfg.train, skip=resumed))
    if resumed and cfg.train.eval_every and resumed % cfg.train.eval_every == 0:
        _evaluate(ctx, role, test, resumed, holder, resumed == steps)  # after the checkpoint
    for step in range(resumed + 1, steps + 1):
        size = train.sizes[(step - 1) % len(train.sizes)]
        loss = role.train_step(step, size, *next(pairs, (None, None)))
        samples += size
        record_client_step(ctx, step, loss)
        if progress is not None:
            progress.update(step, loss)
        checkpoints.reached(step, lambda done=samples: pack([role.segment], role.generators,
                                                            samples=done), steps)
        last = step == steps
        if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            final = _evaluate(ctx, role, test, step, holder, last)
    finals = [final] if holder and final is not None else []
    counted = samples if ctx.me.role == Role.SERVER else 0
    return RankResult(steps=steps, samples=counted, final_evals=finals, segment=role.segment,
                      leakage=role.leakage)


def _evaluate(ctx: RankContext, role: _Role, test: Split, step: int, holder: bool,
              final: bool) -> EvalResult | None:
    tally = EvalTally()
    with evaluating(role.segment.module), ctx.tracer.span("eval"):
        for size, pair in zip(test.sizes, test.batches(lambda reader: reader.epoch(0)),
                              strict=False):
            role.eval_batch(step, size, *pair, tally, final=final)
    role.evaluated(final)
    return record_eval(ctx, tally.result(step, 0)) if holder else None


class _Server:
    def __init__(self, ctx: RankContext, layout: Layout, cut: CollectiveCut, steps: int):
        self.ctx, self.layout, self.cut = ctx, layout, cut
        module = build_layers(layout.server_plan, layout.cut, len(layout.server_plan),
                              ctx.config.model.seed)
        self.segment = Segment.create(module.to(ctx.device), ctx.config.train, steps)
        self.generators: list[torch.Generator] = []
        self.leakage = None
        # where the logits go when a party holds the labels
        self.label_party = ctx.topology.ranks(Role.CLIENT)[label_party(ctx) or 0]

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return join(self.ctx.config.scheme.options.join, parts)

    def train_step(self, step: int, size: int, features: Batch | None,
                   labels: Batch | None) -> float | None:
        """A forward action posts the microbatch's gather; its backward action waits for
        it, runs the server's layers and the loss (or sends the logits to the label party),
        and back-propagates, which posts the gradient scatter; one update after the last."""
        ctx = self.ctx
        sizes, actions = microbatch_actions(ctx, size)
        targets = labels.labels.to(ctx.device).split(sizes) if labels is not None else None
        losses = []

        def backward(posted: tuple[int, Gathered]) -> None:
            index, gathered = posted
            n = gathered.batch
            with ctx.tracer.span("forward", step=step, microbatch=index):
                logits = self.segment.module(self._joined(gathered.wait()))
                if targets is not None:
                    loss = check_loss(nn.functional.cross_entropy(logits, targets[index]),
                                      step) * (n / size)
                    losses.append(float(loss.detach()))
                else:
                    loss = send_forward(logits, ctx.transport, self.label_party, step, aux=size,
                                        microbatch=index)
            with ctx.tracer.span("backward", step=step, microbatch=index):
                loss.backward()

        schedules.run(actions, lambda index: (index, self.cut.receive(sizes[index])), backward)
        self.cut.flush()
        with ctx.tracer.span("optimizer", step=step):
            self.segment.step()
        return sum(losses) if labels is not None else None

    def eval_batch(self, step: int, size: int, features: Batch | None, labels: Batch | None,
                   tally: EvalTally, *, final: bool) -> None:
        logits = self.segment.module(self._joined(self.cut.receive(size).wait(train=False)))
        if labels is not None:
            tally.add(logits, labels.labels.to(self.ctx.device))
        else:
            send_eval(logits, self.ctx.transport, self.label_party, step)

    def evaluated(self, final: bool) -> None:
        """The server sends no cut output of its own."""


class _Party:
    def __init__(self, ctx: RankContext, layout: Layout, cut: CollectiveCut, steps: int):
        self.ctx, self.layout, self.cut = ctx, layout, cut
        party = ctx.me.index
        plan, cut_index = party_plan(ctx.config, ctx.run.meta, party)
        module = build_layers(plan, 0, cut_index, party_seed(ctx.config, party))
        self.segment = Segment.create(module.to(ctx.device), ctx.config.train, steps)
        self.server = ctx.topology.ranks(Role.SERVER)[0]
        self.defence = CutDefence(ctx.config.privacy, party)
        self.generators = [self.defence.noise]

    @property
    def leakage(self) -> float | None:
        return self.defence.leakage

    def train_step(self, step: int, size: int, features: Batch | None,
                   labels: Batch | None) -> float | None:
        """A forward action runs the party's layers and posts the defended cut output; its
        backward action (the label party first computes the loss on the server's logits)
        brings the gradient slice back through them; one update after the last."""
        ctx = self.ctx
        sizes, actions = microbatch_actions(ctx, size)
        inputs = features.features.to(ctx.device).split(sizes)
        targets = labels.labels.split(sizes) if labels is not None else None
        losses = []

        def forward(index: int) -> tuple[int, torch.Tensor]:
            with ctx.tracer.span("forward", step=step, microbatch=index):
                activation = self.segment.module(inputs[index])
                sent, penalty = self.defence.defend(activation, inputs[index])
                anchor = self.cut.send_forward(sent)
                return index, anchor if penalty is None else anchor + penalty

        def backward(held: tuple[int, torch.Tensor]) -> None:
            index, anchor = held
            if targets is not None:
                losses.append(self._loss(targets[index], step, sizes[index] / size))
            with ctx.tracer.span("backward", step=step, microbatch=index):
                anchor.backward()

        schedules.run(actions, forward, backward)
        with ctx.tracer.span("optimizer", step=step):
            self.segment.step()
        return sum(losses) if targets is not None else None

    def _loss(self, labels: torch.Tensor, step: int, share: float) -> float:
        """The label-holding party: the loss on the server's logits (weighted by the
        microbatch's share of the batch); its gradient goes back through the cut hook."""
        logits, _ = recv_forward(self.ctx.transport, self.server, device=self.ctx.device)
        loss = check_loss(nn.functional.cross_entropy(logits, labels.to(self.ctx.device)),
                          step) * share
        loss.backward()
        return float(loss.detach())

    def eval_batch(self, step: int, size: int, features: Batch | None, labels: Batch | None,
                   tally: EvalTally, *, final: bool) -> None:
        inputs = features.features.to(self.ctx.device)
        self.cut.send_eval(self.defence.defend_eval(self.segment.module(inputs), inputs, step,
                                                    final=final))
        if labels is not None:
            logits, _ = recv_forward(self.ctx.transport, self.server, device=self.ctx.device,
                                     train=False)
            tally.add(logits, labels.labels.to(self.ctx.device))

    def evaluated(self, final: bool) -> None:
        if final:
            self.defence.measure_leakage()

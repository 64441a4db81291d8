"""Vertical split learning: K parties hold different feature groups of the same patients.

Each party runs its own lower network on its own columns; the server joins the parties' cut
outputs (``scheme.join``: concatenation along the feature/channel axis, sum, or mean) and runs
the layers above the cut. How the parts are built, from a zoo model or from the user's own
factory (``model.name: file.py:function``), per party with ``scheme.party_options``, or from
a factory per party (``scheme.party_models``), is :mod:`mpisplit.schemes.vertical_parts`.

The cut is collective (:mod:`mpisplit.collective_cut`): on a communicator of the server and
the parties split from ``ctx.comm``, one gather brings every party's defended cut output
(``privacy.CutDefence``, as on the point-to-point cut) to the server, one scatter returns each
party its slice of the gradient, both inside autograd. A step's microbatches run in the
order of ``transport.schedule`` (GPipe or 1F1B), the same action list on every rank, so the
collectives are posted in one order everywhere.

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
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisplit import schedules
from mpisplit.collective_cut import ROOT, CollectiveCut, Gathered
from mpisplit.cut import recv_forward, send_eval, send_forward
from mpisplit.data import Batch, DataError, ShardReader, align_rows, intersect_ids, read_ids
from mpisplit.driver import EvalSchedule, StepDriver, log, step_budget, training_batches
from mpisplit.engine import EvalResult, RankContext, RankResult
from mpisplit.failure import check_loss
from mpisplit.privacy import CutDefence
from mpisplit.psi import private_intersection
from mpisplit.schedules import Action, split_sizes
from mpisplit.schemes.evaluation import EvalTally, evaluating, record_eval
from mpisplit.schemes.vertical_parts import Layout, join, party_part, server_part
from mpisplit.segment import Segment
from mpisplit.topology import Role

SERVER = ROOT
"""The server's rank in the vertical communicator (the root of every collective)."""


# --- alignment -----------------------------------------------------------------------


def common_ids(
    comm: MPI.Comm, mine: np.ndarray | None
) -> tuple[np.ndarray | None, int, np.ndarray]:
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

    def batches(
        self, stream: Callable[[ShardReader], Iterator[Batch]]
    ) -> Iterator[tuple[Batch | None, Batch | None]]:
        """Aligned (features, labels) batches; None for what this rank does not read."""
        features = stream(self.features) if self.features else None
        labels = stream(self.labels) if self.labels else None
        while True:
            pair = (
                next(features, None) if features else None,
                next(labels, None) if labels else None,
            )
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
        return ShardReader(
            path,
            batch_size=cfg.data.batch_size,
            fields=(field,),
            shuffle=cfg.data.shuffle and not test,
            seed=cfg.train.seed,
            prefetch=0 if test else cfg.data.prefetch,
            rows=align_rows(ids, common, source=path),
        )

    features = reader(feature_path, "features", owned[0]) if feature_path else None
    labels = reader(label_path, "labels", owned[-1]) if label_path else None
    return Split(common, batch_sizes(size, cfg.data.batch_size), features, labels)


def _report_alignment(ctx: RankContext, common: int, counts: np.ndarray, test: bool) -> None:
    if ctx.me.role != Role.SERVER:
        return
    labels = ctx.topology.placements
    dropped = {labels[r].label: int(n - common) for r, n in enumerate(counts) if n >= 0}
    split = "test" if test else "train"
    log.info(
        "vertical %s: %d ids common to all parties; rows dropped: %s",
        split,
        common,
        ", ".join(f"{who} {n}" for who, n in dropped.items()),
    )
    ctx.metrics.write({"event": "alignment", "split": split, "common": common, "dropped": dropped})


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
    cut = CollectiveCut(
        ctx.transport,
        comm,
        layout.cut_shapes,
        ctx.topology.ranks(Role.SERVER)[0],
        ctx.topology.ranks(Role.CLIENT),
        device=ctx.device,
    )
    with contextlib.ExitStack() as stack:
        train = open_split(ctx, comm, test=False)
        stack.callback(train.close)
        test = open_split(ctx, comm, test=True)
        stack.callback(test.close)
        steps = step_budget(len(train.sizes), ctx.config.train)
        role = (
            _Server(ctx, layout, cut, steps)
            if ctx.me.role == Role.SERVER
            else _Party(ctx, layout, cut, steps)
        )
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

    def train_step(
        self, step: int, size: int, features: Batch | None, labels: Batch | None
    ) -> float | None:
        """One training step; returns the loss where this rank computes it."""

    def eval_batch(
        self,
        step: int,
        size: int,
        features: Batch | None,
        labels: Batch | None,
        tally: EvalTally,
        *,
        final: bool,
    ) -> None:
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
    """Training steps with periodic and final evaluation on the step driver, in lockstep on
    every rank (which makes every step a possible checkpoint)."""
    holder, server = _holds_labels(ctx), ctx.me.role == Role.SERVER
    driver = StepDriver(
        ctx, steps, evaluation=EvalSchedule.of(ctx.config.train, steps), progress=server
    )
    steps_role = _Steps(ctx, role, test, holder)
    driver.restore(steps_role)
    pairs = train.batches(
        lambda reader: training_batches(reader, ctx.config.train, skip=driver.resumed)
    )
    sized = zip(
        itertools.islice(itertools.cycle(train.sizes), driver.resumed, None),
        itertools.chain(pairs, itertools.repeat((None, None))),
        strict=False,
    )
    driver.train(steps_role, sized, 1, steps, rows=lambda item: item[0])
    final = steps_role.evaluate(steps, True)
    finals = [final] if holder and final is not None else []
    return RankResult(
        steps=steps,
        samples=driver.samples if server else 0,
        final_evals=finals,
        segment=role.segment,
        leakage=role.leakage,
    )


@dataclass
class _Steps:
    """A vertical role as the driver's ``StepRole``: batches are (size, (features,
    labels)), each part None where this rank does not read it."""

    ctx: RankContext
    role: _Role
    test: Split
    holder: bool

    @property
    def segments(self) -> list[Segment]:
        return [self.role.segment]

    @property
    def generators(self) -> list[torch.Generator]:
        return self.role.generators

    def train_step(
        self, batch: tuple[int, tuple[Batch | None, Batch | None]], index: int
    ) -> float | None:
        size, pair = batch
        return self.role.train_step(index + 1, size, *pair)

    def evaluate(self, step: int, final: bool) -> EvalResult | None:
        return _evaluate(self.ctx, self.role, self.test, step, self.holder, final)


def _evaluate(
    ctx: RankContext, role: _Role, test: Split, step: int, holder: bool, final: bool
) -> EvalResult | None:
    tally = EvalTally()
    with evaluating(role.segment.module), ctx.tracer.span("eval"):
        for size, pair in zip(
            test.sizes, test.batches(lambda reader: reader.epoch(0)), strict=False
        ):
            role.eval_batch(step, size, *pair, tally, final=final)
    role.evaluated(final)
    return record_eval(ctx, tally.result(step, 0)) if holder else None


class _Server:
    def __init__(self, ctx: RankContext, layout: Layout, cut: CollectiveCut, steps: int):
        self.ctx, self.layout, self.cut = ctx, layout, cut
        with ctx.building_model():
            module = server_part(ctx.run, layout)
        self.segment = Segment.create(module.to(ctx.device), ctx.config.train, steps)
        self.generators: list[torch.Generator] = []
        self.leakage = None
        # where the logits go when a party holds the labels
        self.label_party = ctx.topology.ranks(Role.CLIENT)[label_party(ctx) or 0]

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return join(self.ctx.config.scheme.options.join, parts)

    def train_step(
        self, step: int, size: int, features: Batch | None, labels: Batch | None
    ) -> float | None:
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
                    loss = check_loss(nn.functional.cross_entropy(logits, targets[index]), step) * (
                        n / size
                    )
                    losses.append(float(loss.detach()))
                else:
                    loss = send_forward(
                        logits, ctx.transport, self.label_party, step, aux=size, microbatch=index
                    )
            with ctx.tracer.span("backward", step=step, microbatch=index):
                loss.backward()

        schedules.run(actions, lambda index: (index, self.cut.receive(sizes[index])), backward)
        self.cut.flush()
        with ctx.tracer.span("optimizer", step=step):
            self.segment.step()
        return sum(losses) if labels is not None else None

    def eval_batch(
        self,
        step: int,
        size: int,
        features: Batch | None,
        labels: Batch | None,
        tally: EvalTally,
        *,
        final: bool,
    ) -> None:
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
        with ctx.building_model():
            module = party_part(ctx.config, ctx.run.meta, party)
        self.segment = Segment.create(module.to(ctx.device), ctx.config.train, steps)
        self.server = ctx.topology.ranks(Role.SERVER)[0]
        self.defence = CutDefence(ctx.config.privacy, party)
        self.generators = [self.defence.noise]

    @property
    def leakage(self) -> float | None:
        return self.defence.leakage

    def train_step(
        self, step: int, size: int, features: Batch | None, labels: Batch | None
    ) -> float | None:
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
        loss = (
            check_loss(nn.functional.cross_entropy(logits, labels.to(self.ctx.device)), step)
            * share
        )
        loss.backward()
        return float(loss.detach())

    def eval_batch(
        self,
        step: int,
        size: int,
        features: Batch | None,
        labels: Batch | None,
        tally: EvalTally,
        *,
        final: bool,
    ) -> None:
        inputs = features.features.to(self.ctx.device)
        self.cut.send_eval(
            self.defence.defend_eval(self.segment.module(inputs), inputs, step, final=final)
        )
        if labels is not None:
            logits, _ = recv_forward(
                self.ctx.transport, self.server, device=self.ctx.device, train=False
            )
            tally.add(logits, labels.labels.to(self.ctx.device))

    def evaluated(self, final: bool) -> None:
        if final:
            self.defence.measure_leakage()

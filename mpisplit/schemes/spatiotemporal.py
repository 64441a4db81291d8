"""Spatio-temporal split learning: many sites, each holding only its input layer and one
hidden layer (the privacy-preserving layer); the server holds every other layer and the loss.

Spatial split: in the **joint phase** (``scheme.joint_epochs`` passes over each site's
shard) the sites train in parallel exactly as vanilla parallel split learning. The server
takes whatever arrives first from any site still in the run (one any-source queue), so a
slow site never holds up the others.

Temporal split: as soon as a site has finished its joint phase it freezes its layer, hands
its data over once and leaves the data path; nobody waits for anybody at that point. In the
**detached phase** the server trains its layers alone for ``scheme.detached_epochs`` passes
over the cached cut outputs, contacting no site.

An **absent** site is one that sends nothing for ``scheme.site_timeout_s`` while other
sites talk (or for ``transport.timeout_s`` when none talks). The server drops it: one
warning line names it, it gets a notice (``CONTROL``: the dropped ranks), and it is no
longer waited for in the joint phase, the hand-over or the summary; what it sends later is
ignored. A dropped site that comes back finds the notice when its own wait for the server
times out, and leaves without training further or joining the summary. MPI still needs
every process to end before the job ends: one that never comes back must be killed, and the
launcher reports that; under MPICH's ``mpiexec`` a site killed mid-run ends the whole job.

What a site sends, in order (all to the server; the server sends GRADIENT in the joint
phase and one CONTROL message at the very end):

1. joint phase: per training step the labels and the cut activation (the gradient comes
   back); every ``train.eval_every`` steps and once at the end an evaluation pass over the
   test set (forward-only activations and labels, then an end marker, the last one ``DONE``);
2. hand-over, right after that ``DONE``, computed with the frozen layer and no autograd: the
   labels of its whole training shard (file order) and of the test set (one ``LABELS``
   message), then the cut outputs of both (one ``ACTIVATION`` message, ``EVAL`` flag,
   ``aux`` = training rows, defended like any cut activation). Nothing more: the site
   waits, without a deadline, for the server's roster.

The server then trains on the handed-over training outputs concatenated in site order,
shuffled per detached epoch with ``train.seed + epoch`` into ``data.batch_size`` batches, and
reports test accuracy per site on that site's test outputs through the detached model. After
its training it sends each site still in the run the roster (the dropped ranks), so that the
members agree on who takes part in the summary.

Evidence in the metrics: each site writes a ``handover`` record (its byte counters and the
SHA-256 of its frozen layer); the server writes one per hand-over (bytes to and from that
site) and, after the detached phase, a ``site_traffic`` record per site with the same
counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from mpi4py import MPI
from torch import nn

from mpisplit.config import ConfigError
from mpisplit.cut import post_cut
from mpisplit.data import Batch, ShardReader
from mpisplit.driver import StepDriver, log
from mpisplit.engine import EvalResult, RankContext, RankResult, RunPlan
from mpisplit.failure import check_loss
from mpisplit.privacy import protect
from mpisplit.protocol import Flag, Kind
from mpisplit.schemes.evaluation import EvalTally, evaluating, record_eval
from mpisplit.schemes.liveness import Dropping
from mpisplit.schemes.lower_client import train_lower_client
from mpisplit.schemes.readers import test_reader
from mpisplit.schemes.serving import Upper, serve_clients
from mpisplit.schemes.turns import clients_total_steps
from mpisplit.seeds import Stream, derive
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import Message, PeerTimeout, Transport


def run(ctx: RankContext) -> RankResult:
    if ctx.me.role == Role.SERVER:
        return _serve(ctx)
    return _site(ctx)


# --- validation ------------------------------------------------------------------------


def check_site_part(run: RunPlan) -> None:
    """The site part must be one weighted layer and its activation (after any parameterless
    reshaping such as flatten): the privacy-preserving layer the issue describes, and the
    only thing a site keeps. Checked by ``engine.prepare`` on every rank, before any traffic;
    the part's steps are its leaf modules and the functions the model's forward calls."""
    site = run.model_parts[0]
    steps = [node for node in site.graph.nodes if node.op not in ("placeholder", "output")]
    weighted = [
        node.op == "get_attr"
        or (
            node.op == "call_module"
            and any(True for _ in site.get_submodule(node.target).parameters())
        )
        for node in steps
    ]
    ok = sum(weighted) == 1 and len(weighted) >= 2 and weighted[-2] and not weighted[-1]
    if not ok:
        names = [
            str(node.target) if node.op in ("call_module", "get_attr") else node.name
            for node in steps
        ]
        raise ConfigError(
            f"model.cuts: spatiotemporal sites hold exactly one weighted layer plus its "
            f"activation, but the part before the cut is {names}; move the cut (e.g. mlp: "
            f"cuts: [fc2])"
        )


# --- membership ----------------------------------------------------------------------------


def _send_roster(transport: Transport, dropped: list[int], rank: int) -> None:
    """The server's word on who left the run (a notice to a dropped site, the final roster
    to the others): the dropped ranks."""
    transport.send(torch.tensor(dropped, dtype=torch.int64), rank, Kind.CONTROL)


def _receive_roster(ctx: RankContext, server: int, *, deadline: bool) -> list[int]:
    return ctx.transport.recv(Kind.CONTROL, server, deadline=deadline).tensor.tolist()


def survivors(ctx: RankContext, dropped: list[int]) -> MPI.Comm | None:
    """The communicator of the ranks still in the run (None when nobody was dropped);
    collective over those ranks only, so a dropped site cannot hold it up."""
    if not dropped:
        return None
    return ctx.comm.Create_group(ctx.comm.Get_group().Excl(sorted(dropped)))


# --- site --------------------------------------------------------------------------------


def _site(ctx: RankContext) -> RankResult:
    """Joint phase (vanilla parallel client, ``joint_epochs`` passes), then the hand-over,
    then the roster."""
    server = ctx.topology.ranks(Role.SERVER)[0]
    try:
        result = train_lower_client(_joint_context(ctx), server)
    except PeerTimeout as stalled:
        return _leave_if_dropped(ctx, server, stalled)
    segment = result.segment
    assert segment is not None
    segment.module.requires_grad_(False)  # frozen: nothing may change the layer from here
    try:
        with _train_shard(ctx) as train, test_reader(ctx) as tests:
            _hand_over(ctx, segment, train, tests, server, result.steps)
    except PeerTimeout as stalled:  # e.g. stopped mid-hand-over, and dropped meanwhile
        return _leave_if_dropped(ctx, server, stalled)
    ctx.metrics.write(
        {
            "event": "handover",
            "layer_sha256": layer_digest(segment.module),
            "bytes_sent": ctx.transport.traffic.total_sent,
            "bytes_received": ctx.transport.traffic.total_received,
        }
    )
    # The server sends it after its detached phase, however long; like the summary gather,
    # this wait needs no deadline of its own.
    dropped = _receive_roster(ctx, server, deadline=False)
    if ctx.me.rank in dropped:  # silent too long while handing over
        return _left(ctx, result)
    return dataclasses.replace(result, members=survivors(ctx, dropped))


def _leave_if_dropped(ctx: RankContext, server: int, stalled: PeerTimeout) -> RankResult:
    """The server stopped answering: if it dropped this site its notice is waiting, and the
    site leaves; otherwise the timeout stands."""
    try:
        dropped = _receive_roster(ctx, server, deadline=True)
    except PeerTimeout:
        raise stalled from None
    if ctx.me.rank not in dropped:
        raise stalled
    return _left(ctx, RankResult(steps=ctx.metrics.last_step))


def _left(ctx: RankContext, result: RankResult) -> RankResult:
    log.warning(
        "the server dropped this site after it fell silent (scheme.site_timeout_s); "
        "it leaves the run without joining the summary"
    )
    return dataclasses.replace(result, members=MPI.COMM_NULL)


def layer_digest(module: nn.Module) -> str:
    """SHA-256 of the layer's tensors' bytes in state-dict order: evidence, kept in the
    metrics, that the frozen layer did not change after the hand-over."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _joint_context(ctx: RankContext) -> RankContext:
    """The site's view with ``train.epochs = joint_epochs``, so the shared client loop runs
    exactly the joint phase."""
    cfg = ctx.config
    train = dataclasses.replace(cfg.train, epochs=cfg.scheme.options.joint_epochs)
    run = dataclasses.replace(ctx.run, config=dataclasses.replace(cfg, train=train))
    return dataclasses.replace(ctx, run=run)


def _train_shard(ctx: RankContext) -> ShardReader:
    """The site's training shard in file order (the detached phase shuffles on the server)."""
    return ShardReader(
        ctx.shard("client", ctx.me.index),
        batch_size=ctx.config.data.batch_size,
        shuffle=False,
        prefetch=0,
    )


def _hand_over(
    ctx: RankContext,
    segment: Segment,
    train: ShardReader,
    tests: ShardReader,
    server: int,
    step: int,
) -> None:
    """Forwards the training shard, then the test set, once through the frozen layer, and
    sends the labels of both (one message), then the cut outputs of both (one message,
    defended like training traffic, ``aux`` = the training rows). Labels first, outputs in
    one message: the server takes the hand-over when the outputs arrive, and then has all
    of it, even from a site stopped right after sending."""
    outputs, labels = [], []
    with evaluating(segment.module), ctx.tracer.span("handover"):
        for reader in (train, tests):
            for batch in reader.epoch(0):
                outputs.append(segment.module(batch.features.to(ctx.device)))
                labels.append(batch.labels)
    labels_sent = ctx.transport.isend(torch.cat(labels), server, Kind.LABELS, step=step)
    noise = torch.Generator().manual_seed(
        derive(ctx.config.privacy.seed, Stream.HANDOVER_NOISE, ctx.me.index)
    )
    sent = protect(torch.cat(outputs), ctx.config.privacy, noise)
    # The labels' send completes only once the server, which takes the outputs first, has
    # them: it is waited for after the outputs are posted.
    for pending in [
        *post_cut(
            ctx.transport,
            sent,
            server,
            Kind.ACTIVATION,
            step=step,
            flags=Flag.EVAL,
            aux=train.num_samples,
        ),
        labels_sent,
    ]:
        pending.wait()


# --- server ------------------------------------------------------------------------------


@dataclass
class SiteData:
    """What one site handed over: cut outputs and labels of its training and test sets."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class Sites:
    """The server's side of the sites' membership: their hand-overs, in whatever order they
    arrive, and the ones dropped for silence."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.ranks = ctx.topology.ranks(Role.CLIENT)
        self.data: dict[int, SiteData] = {}
        self.dropped: list[int] = []

    def take(self, outputs: torch.Tensor, message: Message) -> None:
        """A site's hand-over, from its cut outputs (its labels came just before)."""
        source, rows = message.source, message.aux
        labels = self.ctx.transport.recv(Kind.LABELS, source).tensor.to(self.ctx.device)
        site = self.ranks.index(source)
        self.data[site] = SiteData(outputs[:rows], labels[:rows], outputs[rows:], labels[rows:])
        self.ctx.metrics.write({"event": "handover", "client": site, **self._traffic(source)})

    def drop(self, rank: int) -> None:
        """One warning line, a notice to the site, and it is out of the run."""
        site = self.ranks.index(rank)
        log.warning(
            "site %d (rank %d) sent nothing for over scheme.site_timeout_s = %g s: "
            "dropped, the run goes on without it",
            site,
            rank,
            self.ctx.config.scheme.options.site_timeout_s,
        )
        self.dropped.append(rank)
        self.ctx.metrics.write({"event": "dropped", "client": site})
        _send_roster(self.ctx.transport, self.dropped, rank)

    def is_dropped(self, rank: int) -> bool:
        return rank in self.dropped

    def handed_over(self) -> list[tuple[int, SiteData]]:
        """(site, data) of every site that handed over, in site order (arrival order must
        not change the detached phase)."""
        if not self.data:
            raise PeerTimeout(
                "rank 0 (server): every site was dropped; there is nothing to "
                "train on (scheme.site_timeout_s)"
            )
        return sorted(self.data.items())

    def finish(self) -> MPI.Comm | None:
        """After the server's training: each site's counters for the record, then the roster
        to every site still in the run; returns the survivors' communicator."""
        for site, rank in enumerate(self.ranks):
            self.ctx.metrics.write({"event": "site_traffic", "client": site, **self._traffic(rank)})
        for rank in self.ranks:
            if rank not in self.dropped:
                _send_roster(self.ctx.transport, self.dropped, rank)
        return survivors(self.ctx, self.dropped)

    def _traffic(self, rank: int) -> dict[str, int]:
        traffic = self.ctx.transport.traffic
        return {
            "sent_to_site": int(traffic.sent_bytes[rank].sum()),
            "received_from_site": int(traffic.recv_bytes[rank].sum()),
        }


def _serve(ctx: RankContext) -> RankResult:
    joint_steps = clients_total_steps(ctx)
    segment = ctx.build_segment(1, joint_steps + detached_steps(ctx))
    sites = Sites(ctx)
    dropping = Dropping(ctx.config.scheme.options.site_timeout_s, sites.drop, sites.is_dropped)
    report = serve_clients(
        ctx, Upper.shared(segment), joint_steps, after_done=sites.take, dropping=dropping
    )
    handed = sites.handed_over()
    steps = train_detached(ctx, segment, [data for _, data in handed], report.steps)
    evals = [_evaluate_site(ctx, segment.module, data, steps, site) for site, data in handed]
    return RankResult(steps=steps, final_evals=evals, segment=segment, members=sites.finish())


def detached_steps(ctx: RankContext) -> int:
    """Optimizer steps of the detached phase (the schedule length must include them)."""
    samples = sum(ctx.run.meta["train_samples"])
    epochs = ctx.config.scheme.options.detached_epochs
    return epochs * math.ceil(samples / ctx.config.data.batch_size)


def detached_order(samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one detached epoch over the concatenated cache (public so a
    reference can replay the exact order)."""
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch))
    return list(order.split(batch_size))


def train_detached(
    ctx: RankContext, segment: Segment, sites: list[SiteData], start_step: int
) -> int:
    """The server alone on the cached cut outputs, on the step driver (no checkpoint
    meetings: the sites have left); sends nothing. Returns its last step."""
    cfg = ctx.config
    rows = sum(len(site.train_y) for site in sites)  # fewer than planned if sites dropped
    steps = cfg.scheme.options.detached_epochs * math.ceil(rows / cfg.data.batch_size)
    driver = StepDriver(
        ctx, start_step + detached_steps(ctx), until=0, done=0, epochs=0
    )  # the phases' epochs differ
    driver.train(
        _Detached(ctx, segment),
        _detached_batches(ctx, sites),
        start_step + 1,
        start_step + steps,
        phase="detached",
    )
    return start_step + steps


def _detached_batches(ctx: RankContext, sites: list[SiteData]) -> Iterator[Batch]:
    """The handed-over training outputs, concatenated in site order, in the batches of
    every detached epoch (``detached_order``)."""
    cfg = ctx.config
    features = torch.cat([site.train_x for site in sites])
    labels = torch.cat([site.train_y for site in sites])
    for epoch in range(cfg.scheme.options.detached_epochs):
        for index in detached_order(len(labels), cfg.data.batch_size, cfg.train.seed, epoch):
            index = index.to(features.device)
            yield Batch(features[index], labels[index], index)


@dataclass
class _Detached:
    """The server's detached step: its layers on a batch of cached cut outputs."""

    ctx: RankContext
    segment: Segment

    @property
    def segments(self) -> list[Segment]:
        return [self.segment]

    generators = ()

    def train_step(self, batch: Batch | None, index: int) -> float:
        assert batch is not None and batch.labels is not None
        with self.ctx.tracer.span("detached", step=index):
            loss = check_loss(
                nn.functional.cross_entropy(self.segment.module(batch.features), batch.labels),
                index + 1,
            )
            loss.backward()
            self.segment.step()
        return float(loss.detach())

    def evaluate(self, step: int, final: bool) -> None:
        """Per site, after the phase (``_evaluate_site``)."""


def _evaluate_site(
    ctx: RankContext, module: nn.Module, site: SiteData, step: int, client: int
) -> EvalResult:
    """Test metrics of site ``client``'s frozen layer under the detached server model."""
    tally = EvalTally()
    with evaluating(module):
        tally.add(module(site.test_x), site.test_y)
    return record_eval(ctx, tally.result(step, client))

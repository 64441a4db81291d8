"""Spatio-temporal split learning: many sites, each holding only its input layer and one
hidden layer (the privacy-preserving layer); the server holds every other layer and the loss.

Spatial split: in the **joint phase** (``scheme.joint_epochs`` passes over each site's
shard) the sites train in parallel exactly as vanilla parallel split learning, and the server
serves their cut outputs in arrival order, so a slow or absent site never stops it.

Temporal split: after the joint phase each site freezes its layer and hands its data over
once, then leaves the data path. In the **detached phase** the server trains its layers alone
for ``scheme.detached_epochs`` passes over the cached cut outputs, contacting no site.

What a site sends, in order (all to the server; the server sends only GRADIENT, and only
in the joint phase):

1. joint phase: per training step the cut activation and its labels (the gradient comes
   back); every ``train.eval_every`` steps and once at the end an evaluation pass over the
   test set (forward-only activations and labels, then an end marker, the last one ``DONE``);
2. hand-over, after one barrier with the server (``phase_boundary``), computed with the
   frozen layer and no autograd: the cut outputs of its whole training shard in file order
   (one ``ACTIVATION`` message, ``EVAL`` flag, defended like any cut activation) and their
   labels (one ``LABELS`` message), then the same for the test set. Nothing more; the site
   only joins the engine's end-of-run collectives.

The server then trains on the sites' training outputs concatenated in site order, shuffled
per detached epoch with ``train.seed + epoch`` into ``data.batch_size`` batches, and reports
test accuracy per site on that site's test outputs through the detached model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from mpisplit.config import ConfigError
from mpisplit.cut import recv_forward, send_eval
from mpisplit.data import ShardReader
from mpisplit.engine import EvalResult, RankContext, RankResult, RunPlan
from mpisplit.failure import check_loss
from mpisplit.privacy import protect
from mpisplit.schemes.common import (
    LABELS_AT_SERVER,
    EvalTally,
    clients_total_steps,
    evaluating,
    make_progress,
    record_eval,
    serve_clients,
    test_reader,
    train_lower_client,
)
from mpisplit.segment import Segment
from mpisplit.topology import Role
from mpisplit.transport import Kind

CUTS = 1
ALLOWED = LABELS_AT_SERVER


def run(ctx: RankContext) -> RankResult:
    check_site_segment(ctx.run)
    if ctx.me.role == Role.SERVER:
        return _serve(ctx)
    return _site(ctx)


# --- validation ------------------------------------------------------------------------

def check_site_segment(run: RunPlan) -> None:
    """The site part must be one weighted layer and its activation (after any parameterless
    reshaping such as flatten): the privacy-preserving layer the issue describes, and the
    only thing a site keeps. Checked on every rank before any traffic."""
    start, stop = run.bounds[0]
    names = [name for name, _ in run.layers[start:stop]]
    with torch.device("meta"):
        weighted = [any(True for _ in factory().parameters())
                    for _, factory in run.layers[start:stop]]
    ok = sum(weighted) == 1 and len(weighted) >= 2 and weighted[-2] and not weighted[-1]
    if not ok:
        raise ConfigError(
            f"model.cuts: spatiotemporal sites hold exactly one weighted layer plus its "
            f"activation, but the part before the cut is {names}; move the cut (e.g. mlp: "
            f"cuts: [fc2])"
        )


# --- site --------------------------------------------------------------------------------

def _site(ctx: RankContext) -> RankResult:
    """Joint phase (vanilla parallel client, ``joint_epochs`` passes), then the hand-over."""
    server = ctx.topology.ranks(Role.SERVER)[0]
    result = train_lower_client(_joint_context(ctx), server)
    segment = result.segment
    assert segment is not None
    segment.module.requires_grad_(False)  # frozen: nothing may change the layer from here
    phase_boundary(ctx)
    noise = torch.Generator().manual_seed(ctx.config.privacy.seed + ctx.me.index + 1)
    for reader in (_train_shard(ctx), test_reader(ctx)):
        with reader:
            _hand_over(ctx, segment, reader, server, result.steps, noise)
    return result


def _joint_context(ctx: RankContext) -> RankContext:
    """The site's view with ``train.epochs = joint_epochs``, so the shared client loop runs
    exactly the joint phase."""
    cfg = ctx.config
    train = dataclasses.replace(cfg.train, epochs=cfg.scheme.joint_epochs)
    run = dataclasses.replace(ctx.run, config=dataclasses.replace(cfg, train=train))
    return dataclasses.replace(ctx, run=run)


def _train_shard(ctx: RankContext) -> ShardReader:
    """The site's training shard in file order (the detached phase shuffles on the server)."""
    return ShardReader(ctx.shard("client", ctx.me.index), batch_size=ctx.config.data.batch_size,
                       shuffle=False, prefetch=0)


def _hand_over(ctx: RankContext, segment: Segment, reader: ShardReader, server: int,
               step: int, noise: torch.Generator) -> None:
    """Forwards a whole shard once through the frozen layer and sends the cut outputs (one
    message, defended like training traffic) and the labels (one message)."""
    outputs, labels = [], []
    with evaluating(segment.module), ctx.tracer.span("handover"):
        for batch in reader.epoch(0):
            outputs.append(segment.module(batch.features.to(ctx.device)))
            labels.append(batch.labels)
    sent = protect(torch.cat(outputs), ctx.config.privacy, noise)
    send_eval(sent, ctx.transport, server, step)
    ctx.transport.send(torch.cat(labels), server, Kind.LABELS, step=step)


# --- server ------------------------------------------------------------------------------

@dataclass
class SiteData:
    """What one site handed over: cut outputs and labels of its training and test sets."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _serve(ctx: RankContext) -> RankResult:
    joint_steps = clients_total_steps(ctx)
    segment = ctx.build_segment(1, joint_steps + detached_steps(ctx))
    report = serve_clients(ctx, segment, joint_steps)
    phase_boundary(ctx)
    sites = [_receive_site(ctx, rank) for rank in ctx.topology.ranks(Role.CLIENT)]
    steps = train_detached(ctx, segment, sites, report.steps)
    evals = [_evaluate_site(ctx, segment.module, site, steps, k)
             for k, site in enumerate(sites)]
    return RankResult(steps=steps, final_evals=evals, segment=segment)


def phase_boundary(ctx: RankContext) -> None:
    """One barrier, entered by each site after its ``DONE`` and by the server once every
    site is done. Without it the server's any-source joint loop could take a finished site's
    hand-over for an evaluation batch; it carries no data and comes before the hand-over.
    It runs under the transport deadline, so a site that finishes long before the others
    needs ``transport.timeout_s`` above that gap."""
    ctx.transport.barrier()


def detached_steps(ctx: RankContext) -> int:
    """Optimizer steps of the detached phase (the schedule length must include them)."""
    samples = sum(ctx.run.meta["train_samples"])
    return ctx.config.scheme.detached_epochs * math.ceil(samples / ctx.config.data.batch_size)


def _receive_site(ctx: RankContext, rank: int) -> SiteData:
    """The hand-over of one site, in the order it sends it (training, then test)."""
    parts = []
    for _ in range(2):
        outputs, _ = recv_forward(ctx.transport, rank, device=ctx.device, train=False)
        labels = ctx.transport.recv(Kind.LABELS, rank).tensor.to(ctx.device)
        parts += [outputs, labels]
    return SiteData(*parts)


def detached_order(samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one detached epoch over the concatenated cache (public so a
    reference can replay the exact order)."""
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch))
    return list(order.split(batch_size))


def train_detached(ctx: RankContext, segment: Segment, sites: list[SiteData],
                   start_step: int) -> int:
    """The server alone on the cached cut outputs; sends nothing. Returns its last step."""
    cfg = ctx.config
    features = torch.cat([site.train_x for site in sites])
    labels = torch.cat([site.train_y for site in sites])
    progress = make_progress(ctx, start_step + detached_steps(ctx))
    step = start_step
    for epoch in range(cfg.scheme.detached_epochs):
        for index in detached_order(len(labels), cfg.data.batch_size, cfg.train.seed, epoch):
            index = index.to(features.device)
            with ctx.tracer.span("detached", step=step):
                loss = check_loss(nn.functional.cross_entropy(segment.module(features[index]),
                                                              labels[index]), step + 1)
                loss.backward()
                segment.step()
            step += 1
            ctx.metrics.write({"step": step, "loss": float(loss.detach()), "phase": "detached",
                               "bytes_sent": ctx.transport.traffic.total_sent,
                               "bytes_received": ctx.transport.traffic.total_received})
            progress.update(step, float(loss.detach()))
    return step


def _evaluate_site(ctx: RankContext, module: nn.Module, site: SiteData, step: int,
                   client: int) -> EvalResult:
    """Test metrics of site ``client``'s frozen layer under the detached server model."""
    tally = EvalTally()
    with evaluating(module):
        tally.add(module(site.test_x), site.test_y)
    return record_eval(ctx, tally.result(step, client))

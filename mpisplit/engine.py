"""Builds a run from a validated config and runs this rank's part of the scheme.

``prepare`` does every check that can fail (topology vs world size, dataset, model, cuts, run
directory) without any MPI traffic, so bad input ends every rank with one clear error.
``train`` then sets up the transport, tracing and metrics in the run directory (claimed by
rank 0 in between: ``mpisplit.rundir``), hands a ``RankContext`` to the scheme, and assembles
``summary.json`` on rank 0 from what every rank reports.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpisplit import rundir, specs
from mpisplit.checkpoint import (
    Checkpointer,
    Manifest,
    checkpoint_dir,
    find_resume_point,
    metrics_position,
)
from mpisplit.compression import make_compressor
from mpisplit.config import Config, ConfigError
from mpisplit.data import check_dataset, check_partition, read_meta, shard_path
from mpisplit.failure import Preempted, preemptible, say
from mpisplit.models import (
    ZOO,
    LayerPlan,
    build_model,
    build_parts,
    cut_indices,
    layer_plan,
    segment_bounds,
)
from mpisplit.runlog import (
    MetricsLog,
    peak_resident_mb,
    resident_mb,
    setup_logging,
    write_resolved_config,
    write_summary,
)
from mpisplit.segment import Segment
from mpisplit.split import check_cut_values, check_shared, split_model
from mpisplit.topology import Placement, Role, Topology, check_world_size, plan
from mpisplit.tracing import Tracer
from mpisplit.transport import Transport


@dataclass(frozen=True)
class RunPlan:
    """Everything derived from the config before any rank talks to another."""

    config: Config
    topology: Topology
    meta: dict[str, Any]
    """``meta.json`` of the dataset as this run sees it: with ``data.clients`` only the
    selected shards count (``clients``, ``train_samples``); ``shards`` maps client k of the
    run to its shard file."""
    layers: LayerPlan
    """The zoo model's layer plan (empty for other models), for the schemes that build
    per-party or per-task variants of its layers (``SchemeSpec.zoo_layers``)."""
    bounds: list[tuple[int, int]]
    """The parts' layer ranges in ``layers`` (empty with it)."""
    resume: Manifest | None = None
    """The committed checkpoint this run continues from."""
    model_parts: Sequence[nn.Module] = ()
    """The model's parts on the meta device (``torch.fx.GraphModule`` s), for the scheme's
    structural checks (``SchemeSpec.check``)."""
    fresh_models: dict[tuple[int, ...], torch.nn.Module | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """Per set of materialised parts this process has built: None after the first build,
    then a pristine model kept from the second on, so that later requests (hosted clients'
    own copies, splitfed's server copies) are copies, not the whole model's initialisation
    drawn again (250 ResNet-50 clients on a rank took minutes), while a rank that builds its
    parts once holds them once."""

    def fresh_model(self, keep: set[int]) -> torch.nn.Module:
        """A new model built with parts ``keep`` materialised (a copy from the third time;
        built every time where the model cannot be deep-copied: a user's module holding a
        lock or an open file, say)."""
        key = tuple(sorted(keep))
        if self.fresh_models.get(key) is not None:
            return copy.deepcopy(self.fresh_models[key])
        meta = self.meta
        model = build_parts(self.config.model, meta["feature_shape"], meta["num_classes"], keep)
        if key not in self.fresh_models:
            self.fresh_models[key] = None
            return model
        try:
            copied = copy.deepcopy(model)
        except (TypeError, RuntimeError, copy.Error):
            return model
        self.fresh_models[key] = model
        return copied

    @property
    def parts(self) -> int:
        """How many parts the cuts make of the model."""
        return len(self.config.model.cuts) + 1


def select_clients(meta: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The dataset's metadata for the shards ``cfg`` uses (``data.clients``, or all)."""
    prepared = meta["clients"]
    shards = list(cfg.data.clients) or list(range(prepared))
    if any(k >= prepared for k in shards):
        raise ConfigError(
            f"data.clients: {cfg.data.path} has client shards 0..{prepared - 1}, "
            f"got {list(cfg.data.clients)}"
        )
    if len(shards) != cfg.scheme.clients:
        raise ConfigError(
            f"scheme.clients: {cfg.scheme.clients} clients, but {cfg.data.path} was prepared "
            f"for {prepared} (re-run mpisplit data prepare --clients "
            f"{cfg.scheme.clients}, set scheme.clients={prepared}, or choose shards with "
            f"data.clients)"
        )
    if meta["partition"] == "vertical":
        return {**meta, "shards": shards}
    return {
        **meta,
        "clients": len(shards),
        "shards": shards,
        "train_samples": [meta["train_samples"][k] for k in shards],
    }


def prepare(
    cfg: Config,
    world_size: int,
    *,
    resume: bool = False,
    overwrite: bool = False,
    rank: int | None = None,
) -> RunPlan:
    """Checks everything this rank can check alone; with its ``rank``, that includes the
    shards it will read, against ``meta.json``."""
    spec = specs.get(cfg.scheme.name)
    topology = plan(cfg)
    check_world_size(topology, world_size)
    if cfg.transport.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"transport.device: cuda, but torch sees no CUDA device on "
            f"{socket.gethostname()} (use cpu or auto)"
        )
    meta = read_meta(Path(cfg.data.path))
    check_partition(meta, Path(cfg.data.path), cfg.scheme.name, wants_vertical=spec.vertical)
    meta = select_clients(meta, cfg)
    model = build_model(cfg.model, meta["feature_shape"], meta["num_classes"], device="meta")
    parts = split_model(model, cfg.model.cuts)
    check_cut_values(parts, cfg.model.cuts, spec.name, spec.tuple_cuts)
    check_shared(parts, spec.colocated)
    if spec.cuts is not None and len(cfg.model.cuts) != spec.cuts:
        raise ConfigError(
            f"model.cuts: scheme {cfg.scheme.name} needs exactly {spec.cuts} cut(s), "
            f"got {len(cfg.model.cuts)}"
        )
    layers, bounds = [], []
    if (cfg.model.name in ZOO and spec.vertical) or spec.zoo_layers:
        # Only these rebuild the plan's top-level layers per party or task; every other
        # scheme cuts at any module the split finds (the zoo VGG at block1.3 too).
        layers = layer_plan(cfg.model, meta["feature_shape"], meta["num_classes"])
        bounds = segment_bounds(len(layers), cut_indices(layers, cfg.model.cuts))
    if rank is not None:
        check_dataset(Path(cfg.data.path), meta, **_own_shards(cfg, topology, rank))
    rundir.check_run_dir(Path(cfg.run.dir), checkpoint_dir(cfg), resume=resume, overwrite=overwrite)
    run = RunPlan(
        cfg,
        topology,
        meta,
        layers,
        bounds,
        find_resume_point(cfg, topology, resume, overwrite=overwrite),
        parts,
    )
    spec.check_planned(run)
    return run


def _own_shards(cfg: Config, topology: Topology, rank: int) -> dict[str, Any]:
    """What ``rank`` reads (``check_dataset``'s keywords): a client its own shard and the
    test set, the label holder of a vertical run the label files, a run without clients
    (centralized) everything; servers and relays otherwise hold no data."""
    me = topology.of(rank)
    clients = topology.ranks(Role.CLIENT)
    vertical = specs.get(cfg.scheme.name).vertical
    if not clients:
        return {"shards": range(cfg.scheme.clients), "test": True, "labels": vertical}
    holder = cfg.scheme.options.label_party(cfg.scheme.clients) if vertical else None
    if me.role == Role.CLIENT:
        return {"shards": [me.index], "test": True, "labels": vertical and holder == me.index}
    return {"labels": vertical and holder is None and me.role == Role.SERVER}


@dataclass
class EvalResult:
    step: int
    client: int
    loss: float
    accuracy: float
    count: int
    task: int = 0
    """Which task's head was evaluated (multitask; 0 elsewhere)."""


@dataclass
class RankResult:
    """What a scheme reports for this rank; rank 0 merges them into the summary."""

    steps: int = 0
    samples: int = 0
    final_evals: list[EvalResult] = field(default_factory=list)
    segment: Segment | None = None
    """The part this rank trained, saved as ``model-rank<R>.pt`` when ``run.save_model``."""
    client_parts: dict[int, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)
    """The state of the part of each logical client a rank hosts (``scheme.clients_per_rank``
    > 1), saved as ``model-rank<R>-client<k>.pt``: made when saved, one client after another
    (clients that share one model swap their own state in for it)."""
    leakage: float | None = None
    """Distance correlation between this client's test inputs and the cut activations that
    left for them (clients that send cut activations only)."""
    members: MPI.Comm | None = None
    """The ranks still in the run at its end, where the scheme dropped some (silent
    spatio-temporal sites): the summary is gathered over them alone, and a dropped rank
    (``MPI.COMM_NULL``) takes no part. None: every rank."""


@dataclass
class RankContext:
    """This rank's view of the run, handed to the scheme."""

    run: RunPlan
    me: Placement
    comm: MPI.Comm
    transport: Transport
    tracer: Tracer
    metrics: MetricsLog
    run_dir: Path
    device: torch.device
    checkpoints: Checkpointer
    _model: torch.nn.Module | None = field(default=None, init=False, repr=False)
    """The model this rank's parts come from, so parts built one after the other share
    their tied weights (the U-shaped client's embedding and head)."""
    _kept: set[int] = field(default_factory=set, init=False, repr=False)
    """The parts of ``_model`` that were materialised (the others are on the meta device)."""
    _handed_out: set[int] = field(default_factory=set, init=False, repr=False)
    """The parts of ``_model`` already built into segments."""
    _optimised: set[int] = field(default_factory=set, init=False, repr=False)
    """The ids of the parameters those segments' optimizers update."""
    memory: dict[str, float] = field(default_factory=dict, init=False)
    """Resident MiB before the first model build (``before_model``) and the peak right after
    the last one (``model_built_peak``), before any optimizer state or gradient."""

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def topology(self) -> Topology:
        return self.run.topology

    @property
    def _colocated(self) -> tuple[tuple[int, ...], ...]:
        return specs.get(self.config.scheme.name).colocated

    @contextlib.contextmanager
    def building_model(self) -> Iterator[None]:
        """Wraps every build of a model (or of a part of one) on this rank, for ``memory``."""
        self.memory.setdefault("before_model", resident_mb())
        yield
        self.memory["model_built_peak"] = peak_resident_mb()

    def build_segment(self, index: int, total_steps: int, *, through: int | None = None) -> Segment:
        """Part ``index`` (or parts ``index..through`` joined) with its optimizer.

        Parts come from one model built under the seed, as ``factory(**options)`` in one
        process would make it, with only this part (and the parts the scheme keeps with it,
        ``COLOCATED``) materialised; asking again for a part already built (splitfed's
        server copies) builds a fresh model, so the copies share nothing."""
        last = index if through is None else through
        wanted = set(range(index, last + 1))
        if self._model is None or wanted & self._handed_out or not wanted <= self._kept:
            keep = wanted.union(*(group for group in self._colocated if wanted & set(group)))
            with self.building_model():
                self._model = self.run.fresh_model(keep)
            self._kept, self._handed_out, self._optimised = set(keep), set(), set()
        self._handed_out |= wanted
        cuts = self.config.model.cuts
        cuts = (*cuts[:index], *cuts[last:])
        module = split_model(self._model, cuts)[index] if cuts else self._model
        params = [p for p in module.parameters() if id(p) not in self._optimised]
        self._optimised |= {id(p) for p in params}
        return Segment.create(module.to(self.device), self.config.train, total_steps, params)

    def shard(self, kind: str, index: int | None = None, *, test: bool = False) -> Path:
        """A shard file; client ``index`` of the run reads the shard ``data.clients`` picks."""
        if kind == "client" and not test and index is not None:
            index = self.run.meta["shards"][index]
        return shard_path(Path(self.config.data.path), kind, index, test=test)


def train(run: RunPlan, comm: MPI.Comm) -> dict[str, Any] | None:
    """Runs this rank's role; returns the summary on rank 0 (None elsewhere)."""
    me = run.topology.of(comm.Get_rank())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logger = setup_logging(me.rank, me.label)
    if me.rank == 0:
        write_resolved_config(Path(run.config.run.dir), run.config.to_dict())
    ctx = _rank_context(run, comm, me, logger)
    start = time.perf_counter()
    try:
        try:
            with preemptible(ctx.checkpoints.request_stop if ctx.checkpoints.enabled else None):
                result = specs.get(run.config.scheme.name).runner(me.role)(ctx)
                ctx.transport.flush()
        except Preempted as stop:
            _record_preemption(ctx, stop, time.perf_counter() - start)
            raise
        return _finish(ctx, result, time.perf_counter() - start, logger)
    finally:
        ctx.metrics.close()
        ctx.tracer.write(ctx.run_dir)
        ctx.transport.close()
        ctx.checkpoints.close()


def _rank_context(
    run: RunPlan, comm: MPI.Comm, me: Placement, logger: logging.Logger
) -> RankContext:
    """This rank's transport, tracer, metrics log (cut back to the checkpoint on resume)
    and checkpointer."""
    cfg, run_dir = run.config, Path(run.config.run.dir)
    tracer = Tracer(me.rank, me.label, enabled=cfg.run.trace)
    device = _device(cfg, comm)
    transport = Transport(
        comm,
        roles=[p.role.value for p in run.topology.placements],
        timeout_s=cfg.transport.timeout_s,
        tracer=tracer,
        allowed=specs.get(cfg.scheme.name).routes,
        device=device,
        compressor=make_compressor(cfg.transport.compression, cfg.transport.topk_ratio),
    )
    transport.client = me.index if me.role == Role.CLIENT else 0
    header = {
        "rank": me.rank,
        "role": me.label,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node": _node(),
        "threads": torch.get_num_threads(),
    }
    resumed_at = metrics_position(run.resume, me.rank) if run.resume is not None else None
    metrics = MetricsLog(
        run_dir,
        me.rank,
        header,
        flush_every=cfg.run.log_every,
        append=run.resume is not None,
        truncate_to=resumed_at,
    )
    if run.resume is not None:
        metrics.write({"event": "resumed", "step": run.resume.step})
        logger.info("resumed from step %d (checkpoint %s)", run.resume.step, run.resume.path)
    checkpoints = Checkpointer(comm, transport, cfg, run.topology, run.resume, metrics)
    return RankContext(run, me, comm, transport, tracer, metrics, run_dir, device, checkpoints)


def _node() -> str:
    """The node this rank runs on, as the job scripts name it (else the host name)."""
    return os.environ.get("MPISPLIT_NODE", socket.gethostname())


def _finish(
    ctx: RankContext, result: RankResult, wall: float, logger: logging.Logger
) -> dict[str, Any] | None:
    """The rank's end record and saved part; the summary, written by rank 0."""
    traffic = ctx.transport.traffic
    ctx.metrics.write(
        {
            "event": "end",
            "steps": result.steps,
            "wall_s": wall,
            "bytes_sent": traffic.total_sent,
            "bytes_received": traffic.total_received,
            "sent_routes": traffic.sent_routes(),
            "max_rss_mb": peak_resident_mb(),
        }
    )
    if ctx.config.run.save_model and result.segment is not None:
        torch.save(result.segment.module.state_dict(), ctx.run_dir / f"model-rank{ctx.me.rank}.pt")
    for client, part in result.client_parts.items() if ctx.config.run.save_model else ():
        torch.save(part(), ctx.run_dir / f"model-rank{ctx.me.rank}-client{client}.pt")
    summary = _summarize(ctx, result, wall, _node())
    if summary is not None:
        write_summary(ctx.run_dir, summary)
        rundir.mark(ctx.run_dir, "finished")
        _log_final(logger, summary)
    return summary


_EXIT_GRACE_S = 5.0


def _record_preemption(ctx: RankContext, stop: Preempted, wall: float) -> None:
    """Leaves the metrics (and, on rank 0, a summary marked preempted), says so, and waits
    briefly for the other ranks, so that no rank's exit cuts short another's writes.

    Without checkpoints every rank stops wherever the signal found it; with them, all stop
    together after committing the checkpoint ``stop.checkpoint``. A pre-emption reaches
    every rank, a crash does not: under Open MPI a failing rank's abort reaches the others
    as SIGTERM. So the ranks first meet; if one never comes, the stop is a failure
    (``stop.clean`` false): metrics end with ``interrupted`` and no summary is written."""
    stop.clean = ctx.checkpoints.meet_before_exit(_EXIT_GRACE_S, quiet=True)
    ctx.metrics.write(
        {
            "event": "preempted" if stop.clean else "interrupted",
            "signal": stop.signal_name,
            "wall_s": wall,
            "last_step": ctx.metrics.last_step,
            "checkpoint": stop.checkpoint,
            "bytes_sent": ctx.transport.traffic.total_sent,
            "bytes_received": ctx.transport.traffic.total_received,
        }
    )
    ctx.metrics.close()
    if not stop.clean:
        say(
            f"rank {ctx.me.rank} ({ctx.me.label}) stopped by {stop.signal_name}, but not "
            f"every rank stopped with it: the job failed elsewhere (no summary written)"
        )
        return
    if ctx.me.rank == 0:
        write_summary(
            ctx.run_dir,
            {
                "scheme": ctx.config.scheme.name,
                "world_size": ctx.topology.world_size,
                "preempted": True,
                "signal": stop.signal_name,
                "checkpoint": stop.checkpoint,
                "wall_time_s": round(ctx.checkpoints.prior.wall_s + wall, 4),
                "steps": ctx.metrics.last_step,
            },
        )
        rundir.mark(ctx.run_dir, "preempted", signal=stop.signal_name, checkpoint=stop.checkpoint)
    saved = (
        f"checkpoint at step {stop.checkpoint} committed" if stop.checkpoint else "metrics written"
    )
    say(
        f"rank {ctx.me.rank} ({ctx.me.label}) stopped by {stop.signal_name}; {saved} in "
        f"{ctx.run_dir}"
    )
    ctx.checkpoints.meet_before_exit(_EXIT_GRACE_S)


def _device(cfg: Config, comm: MPI.Comm) -> torch.device:
    """The rank's device: on a node with several GPUs its ranks are spread over them in
    turn (by rank within the node); ranks beyond the GPU count share them."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # every rank: it is a collective
    local_rank = node.Get_rank()
    node.Free()
    wanted = cfg.transport.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


_NODE_BYTES = 64
_EVAL_COLUMNS = 6
"""step, client, loss, accuracy, count, task: one row per final evaluation."""


def _summarize(
    ctx: RankContext, result: RankResult, wall: float, node: str
) -> dict[str, Any] | None:
    """Gathers every member's counters and final evaluations (raw buffers) onto rank 0.
    (Long on purpose: the gathers are collectives every member must post in the same order,
    so they stay in one body.)"""
    comm = ctx.comm if result.members is None else result.members
    if comm == MPI.COMM_NULL:
        return None
    traffic, size, root = ctx.transport.traffic, comm.Get_size(), 0
    is_root = comm.Get_rank() == root
    world_ranks = comm.Get_group().Translate_ranks(list(range(size)), ctx.comm.Get_group())

    def gather(request: MPI.Request) -> None:
        """Rank 0 arrives last (it serves until every client is done), so only it waits
        under the deadline; a rank that never arrives ends the job from there."""
        ctx.transport.complete(request, "summary gather", deadline=is_root)

    leakage = np.nan if result.leakage is None else result.leakage
    prior = ctx.checkpoints.prior
    counters = np.array(
        [
            result.steps,
            result.samples,
            traffic.total_sent,
            traffic.total_received,
            wall,
            leakage,
            prior.samples,
            prior.bytes_sent,
            prior.bytes_received,
            ctx.memory.get("before_model", np.nan),
            ctx.memory.get("model_built_peak", np.nan),
            peak_resident_mb(),
        ],
        np.float64,
    )
    all_counters = np.zeros((size, counters.size), np.float64) if is_root else None
    gather(comm.Igather(counters, all_counters, root))
    name = np.zeros(_NODE_BYTES, np.uint8)
    encoded = node.encode()[:_NODE_BYTES]
    name[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    all_names = np.zeros((size, _NODE_BYTES), np.uint8) if is_root else None
    gather(comm.Igather(name, all_names, root))
    rows = np.array(
        [[e.step, e.client, e.loss, e.accuracy, e.count, e.task] for e in result.final_evals],
        np.float64,
    ).reshape(-1, _EVAL_COLUMNS)
    counts = np.zeros(size, np.int64) if is_root else None
    gather(comm.Igather(np.array([rows.size], np.int64), counts, root))
    gathered = np.zeros(int(counts.sum()) if counts is not None else 0, np.float64)
    gather(comm.Igatherv(rows.reshape(-1), [gathered, counts] if is_root else None, root))
    if not is_root:
        return None
    evals = gathered.reshape(-1, _EVAL_COLUMNS)
    total = evals[:, 4].sum()
    cfg = ctx.config
    samples = int(all_counters[:, 1].sum())
    return {
        "scheme": cfg.scheme.name,
        "client_order": cfg.scheme.client_order,
        "world_size": ctx.comm.Get_size(),
        "roles": [ctx.topology.of(rank).label for rank in world_ranks],
        "dropped": [p.label for p in ctx.topology.placements if p.rank not in world_ranks],
        "nodes": [bytes(n).rstrip(b"\0").decode() for n in all_names],
        "steps": int(all_counters[:, 0].max()),
        "steps_per_rank": [int(s) for s in all_counters[:, 0]],
        "train_samples": samples,
        **_throughput(samples, prior.wall_s + wall, all_counters[:, 2:4] + all_counters[:, 7:9]),
        "launches": prior.launches + 1,
        "last_launch": {
            "resumed_from_step": ctx.checkpoints.resume_step,
            **_throughput(samples - int(all_counters[:, 6].sum()), wall, all_counters[:, 2:4]),
        },
        "test_accuracy": float((evals[:, 3] * evals[:, 4]).sum() / total) if total else None,
        "test_loss": float((evals[:, 2] * evals[:, 4]).sum() / total) if total else None,
        "test_by_client": [
            {
                "client": int(c),
                "step": int(s),
                "loss": float(loss),
                "accuracy": float(a),
                "samples": int(n),
                "task": int(t),
            }
            for s, c, loss, a, n, t in evals
        ],
        "test_by_task": _by_task(evals, specs.get(cfg.scheme.name).tasks(cfg.scheme)),
        "leakage_distance_correlation": _mean_or_none(all_counters[:, 5]),
        "rss_mb_per_rank": [_rss(row) for row in all_counters[:, 9:12]],
    }


def _throughput(samples: int, wall: float, traffic: np.ndarray) -> dict[str, Any]:
    """Time, rate and bytes per rank (``traffic``: sent, received columns) of the whole run
    (over every launch of it: the first, and each that resumed it), or of one launch."""
    return {
        "wall_time_s": round(wall, 4),
        "samples_per_s": round(samples / max(wall, 1e-9), 2),
        "bytes_sent_per_rank": [int(b) for b in traffic[:, 0]],
        "bytes_received_per_rank": [int(b) for b in traffic[:, 1]],
    }


def _by_task(evals: np.ndarray, tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Sample-weighted test metrics per task: the figure to read for multitask, where
    ``test_accuracy`` mixes the tasks' heads."""
    by_task = []
    for index, name in enumerate(tasks):
        rows = evals[evals[:, 5] == index]
        total = rows[:, 4].sum()
        if total:
            by_task.append(
                {
                    "task": name,
                    "accuracy": float((rows[:, 3] * rows[:, 4]).sum() / total),
                    "loss": float((rows[:, 2] * rows[:, 4]).sum() / total),
                    "samples": int(total),
                }
            )
    return by_task


def _rss(row: np.ndarray) -> dict[str, float | None]:
    """A rank's resident memory in MiB: before and right after building its part of the
    model (None where the rank built none: ``RankContext.building_model`` records them),
    and the run's peak."""
    names = ("before_model", "model_built_peak", "run_peak")
    return {k: None if np.isnan(v) else round(float(v), 1) for k, v in zip(names, row, strict=True)}


def _mean_or_none(values: np.ndarray) -> float | None:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else None


def _log_final(logger: Any, summary: dict[str, Any]) -> None:
    acc = summary["test_accuracy"]
    launches = f" over {summary['launches']} launches" if summary["launches"] > 1 else ""
    logger.info(
        "done: %d steps in %.2f s%s (%.1f samples/s); test accuracy %s, test loss %s",
        summary["steps"],
        summary["wall_time_s"],
        launches,
        summary["samples_per_s"],
        "n/a" if acc is None else f"{acc:.4f}",
        "n/a" if summary["test_loss"] is None else f"{summary['test_loss']:.4f}",
    )

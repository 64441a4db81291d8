"""Coordinated checkpoints: each rank saves only its own state; a checkpoint counts once every
rank has confirmed it.

Layout under ``checkpoint.dir``: ``step-<N>/rank-<R>.pt`` per rank, each written atomically
(temporary file, fsync, rename), then ``step-<N>/COMMITTED``, a JSON manifest that rank 0
writes the same way only after every rank has confirmed its file. Resume reads the newest
directory with a manifest, so a crash in the middle of a checkpoint leaves the previous one
in use; a damaged newest checkpoint (a manifest that does not parse, a rank's file that does
not load) makes every rank fall back to the newest one that is whole, with one warning.
Each rank's file also records how far its metrics file had got, so that a resumed run cuts
the metrics back to that point and they read as one run.

The step driver (``mpisplit.driver``) calls ``reached(step, ...)`` after each training step,
in the same order on every rank (a rank with nothing to do at that step, such as a client
waiting for its turn, calls it for the steps it sits out). Every ``every_steps``-th step the
ranks meet on a communicator of their own, under the transport deadline, and decide together
whether to write (the schedule, or rank 0's clock) and whether to stop (a pre-emption signal
on any rank): the stop happens right after that checkpoint is committed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpisplit.config import Config, ConfigError, SchemeConfig
from mpisplit.deadlines import poll
from mpisplit.failure import Preempted, say
from mpisplit.runlog import MetricsLog
from mpisplit.segment import Segment
from mpisplit.specs import check_checkpointable
from mpisplit.topology import Topology
from mpisplit.transport import Transport

log = logging.getLogger("mpisplit")

MANIFEST = "COMMITTED"
_STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class RunTotals:
    """One rank's figures for the run up to a checkpoint, over every launch of it (the first,
    and each that resumed it: a requeued job, ``--resume``): saved with its state, so that a
    resumed run's summary covers the whole run. The time a stopped launch spent after its
    last checkpoint (redone after resuming) is not in them."""

    launches: int = 0
    wall_s: float = 0.0
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")


@dataclass(frozen=True)
class Manifest:
    """A committed checkpoint: which step, and the run shape that wrote it."""

    path: Path
    step: int
    scheme: str
    roles: list[str]
    settings: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Raises ``ValueError`` naming the problem when the manifest is damaged."""
        try:
            data = json.loads((path / MANIFEST).read_text())
            manifest = cls(path, data["step"], data["scheme"], data["roles"], data["settings"])
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(
                f"{path.name}: its {MANIFEST} manifest is unreadable ({type(err).__name__}: {err})"
            ) from None
        if not (
            isinstance(manifest.step, int)
            and isinstance(manifest.roles, list)
            and isinstance(manifest.settings, dict)
        ):
            raise ValueError(f"{path.name}: its {MANIFEST} manifest is malformed")
        return manifest

    def rank_file(self, rank: int) -> Path:
        return self.path / f"rank-{rank:05d}.pt"


def _committed_dirs(directory: Path) -> list[Path]:
    """Checkpoint directories with a manifest, newest first (uncommitted ones are ignored)."""
    committed = sorted(
        (
            (int(m.group(1)), d)
            for d in directory.glob("step-*")
            if (m := _STEP_DIR.search(d.name)) and (d / MANIFEST).is_file()
        ),
        reverse=True,
    )
    return [d for _, d in committed]


def committed(directory: Path) -> tuple[list[Manifest], list[str]]:
    """The committed checkpoints whose manifests read, newest first, and what is wrong
    with each of the others."""
    manifests, damaged = [], []
    for path in _committed_dirs(directory):
        try:
            manifests.append(Manifest.read(path))
        except ValueError as err:
            damaged.append(str(err))
    return manifests, damaged


def latest_committed(directory: Path) -> Manifest | None:
    """The newest checkpoint with a manifest that reads."""
    return next(iter(committed(directory)[0]), None)


def resume_settings(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint: they fix the step plan,
    the data order and every update (paths, logging and the transport may change)."""
    plain = cfg.to_dict()
    settings = {
        f"{section}.{key}": value
        for section in ("scheme", "model", "train", "privacy")
        for key, value in plain[section].items()
    }
    settings |= {f"data.{key}": plain["data"][key] for key in ("batch_size", "shuffle")}
    return json.loads(json.dumps(settings))


def default_settings(cfg: Config) -> dict[str, Any]:
    """Every resume setting at its default (the scheme's own options at theirs): what a
    checkpoint written before a setting existed was trained with."""
    sections = {name: type(getattr(cfg, name))() for name in ("model", "train", "privacy")}
    scheme = SchemeConfig(name=cfg.scheme.name)
    settings = resume_settings(dataclasses.replace(cfg, **sections))
    return settings | {
        f"scheme.{key}": value for key, value in json.loads(json.dumps(scheme.to_dict())).items()
    }


def find_resume_point(
    cfg: Config, topology: Topology, resume: bool, *, overwrite: bool = False
) -> Manifest | None:
    """The checkpoint to resume from, checked against this run's shape (no MPI traffic)."""
    directory = checkpoint_dir(cfg)
    found = latest_committed(directory) if directory.is_dir() else None
    if not resume:
        if found is not None and cfg.checkpoint.every_steps and not overwrite:
            raise ConfigError(
                f"checkpoint.dir: {directory} already holds a committed checkpoint (step "
                f"{found.step}); pass --resume to continue from it, --overwrite to start "
                f"over, or use another run.dir"
            )
        return None
    check_checkpointable(cfg.scheme)
    if found is None:
        raise ConfigError(f"--resume: no committed checkpoint in {directory}")
    roles = [p.label for p in topology.placements]
    if found.scheme != cfg.scheme.name or found.roles != roles:
        raise ConfigError(
            f"--resume: the checkpoint at step {found.step} in {directory} was written by a "
            f"{len(found.roles)}-rank {found.scheme} run ({', '.join(found.roles)}); this run "
            f"is a {len(roles)}-rank {cfg.scheme.name} run ({', '.join(roles)})"
        )
    recorded = {**default_settings(cfg), **found.settings}
    changed = sorted(
        key for key, value in resume_settings(cfg).items() if recorded.get(key) != value
    )
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} differ from the checkpoint at step {found.step} "
            f"(was {', '.join(repr(found.settings.get(key)) for key in changed)})"
        )
    return found


_CANDIDATES = 8
"""Committed checkpoints a resume considers, newest first (``checkpoint.keep`` of them
exist unless a run was killed while pruning)."""


def agree_on_resume_point(comm: MPI.Comm, newest: Manifest | None) -> Manifest | None:
    """The checkpoint every rank resumes from: the newest (no newer than ``newest``, the one
    checked against the config) whose manifest reads and whose file loads on every rank.
    Passing over a damaged one is one warning line on rank 0. Every rank must see the same
    checkpoints (a filesystem whose ranks see different directory contents would otherwise
    split the run). One raw Allgather; every rank reaches the same answer, so errors are
    raised on all of them alike."""
    candidates, damaged = committed(newest.path.parent) if newest else ([], [])
    candidates = [
        m
        for m in candidates
        if m.step <= newest.step
        and (m.scheme, m.roles, m.settings) == (newest.scheme, newest.roles, newest.settings)
    ][:_CANDIDATES]
    damaged = [d for d in damaged if newest and _step_of(d) > newest.step]
    mine = np.full((_CANDIDATES, 2), -1, np.int64)
    for row, manifest in enumerate(candidates):
        mine[row] = manifest.step, _loads(manifest.rank_file(comm.Get_rank()), manifest.step)
    everyone = np.zeros((comm.Get_size(), _CANDIDATES, 2), np.int64)
    comm.Allgather(mine, everyone)
    steps = everyone[:, :, 0]
    if (steps != steps[0]).any():
        seen = ", ".join(
            f"rank {r}: {'none' if s[0] < 0 else f'step {s[0]}'}"
            for r, s in enumerate(steps.tolist())
        )
        raise ConfigError(
            f"--resume: the ranks see different checkpoints ({seen}); is the "
            f"checkpoint directory on a filesystem every node sees alike?"
        )
    whole = everyone[:, :, 1].min(axis=0) == 1
    for row, manifest in enumerate(candidates):
        if whole[row]:
            if damaged and comm.Get_rank() == 0:
                say(f"warning: {'; '.join(damaged)}; resuming from step {manifest.step}")
            return manifest
        broken = np.flatnonzero(everyone[:, row, 1] != 1).tolist()
        damaged.append(
            f"{manifest.path.name}: the file of rank(s) "
            f"{', '.join(map(str, broken))} does not load (truncated?)"
        )
    if newest is None:
        return None
    raise ConfigError(
        f"--resume: no whole checkpoint in {newest.path.parent}: {'; '.join(damaged)}"
    )


def _step_of(problem: str) -> int:
    match = _STEP_DIR.search(problem.split(":")[0])
    return int(match.group(1)) if match else -1


def _loads(path: Path, step: int) -> bool:
    """Whether a rank's checkpoint file loads (memory-mapped: nothing is copied) and is the
    one of ``step``; a truncated file fails here."""
    try:
        state = torch.load(path, weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - whatever a damaged archive raises, it is damaged
        return False
    return isinstance(state, dict) and state.get("step") == step


def metrics_position(resume: Manifest, rank: int) -> int | None:
    """How many bytes of its metrics file ``rank`` had written at that checkpoint (None
    for a checkpoint written before this was recorded)."""
    state = torch.load(resume.rank_file(rank), weights_only=True, mmap=True)
    return state.get("metrics_bytes")


def pack(
    segments: Sequence[Segment], generators: Sequence[torch.Generator] = (), **counters: int
) -> dict[str, Any]:
    """A rank's state: its segments (weights, optimizer, schedule), its random generators
    (e.g. the privacy noise) and the counters its loop keeps."""
    return {
        "segments": [segment.state_dict() for segment in segments],
        "generators": [generator.get_state() for generator in generators],
        "counters": counters,
    }


def unpack(
    state: dict[str, Any], segments: Sequence[Segment], generators: Sequence[torch.Generator] = ()
) -> dict[str, int]:
    """Loads what ``pack`` saved into ``segments`` and ``generators``; returns the counters."""
    for segment, saved in zip(segments, state["segments"], strict=True):
        segment.load_state_dict(saved)
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)
    return state["counters"]


class Checkpointer:
    """This rank's side of the coordinated checkpoints (a no-op when they are off)."""

    def __init__(
        self,
        comm: MPI.Comm,
        transport: Transport,
        cfg: Config,
        topology: Topology,
        resume: Manifest | None,
        metrics: MetricsLog,
    ) -> None:
        self._comm = comm.Dup()
        self._transport = transport
        self._metrics = metrics
        self._rank = comm.Get_rank()
        self._every = cfg.checkpoint.every_steps
        self._every_s = cfg.checkpoint.every_s
        self._keep = cfg.checkpoint.keep
        self._dir = checkpoint_dir(cfg)
        self._manifest = {
            "scheme": cfg.scheme.name,
            "roles": [p.label for p in topology.placements],
            "settings": resume_settings(cfg),
        }
        self._resume = resume
        self.prior = RunTotals()
        """The earlier launches' totals, read by ``restore``."""
        self._started = time.perf_counter()
        self._last_write = time.monotonic()
        self._stop_signal = 0
        self._step, self._until = 0, None

    @property
    def enabled(self) -> bool:
        return self._every > 0

    @property
    def resume_step(self) -> int:
        return self._resume.step if self._resume else 0

    def request_stop(self, signum: int) -> None:
        """Signal handler side: stop after the next checkpoint, or at once (like a run
        without checkpoints) when no meeting is left."""
        self._stop_signal = signum
        if self._until is not None and self._step + self._every >= self._until:
            raise Preempted(signum)

    def restore(self) -> dict[str, Any] | None:
        """This rank's saved state (None on a fresh run); also restores torch's RNG and the
        run's totals so far (``prior``)."""
        if self._resume is None:
            return None
        path = self._resume.rank_file(self._rank)
        try:
            state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise ConfigError(f"--resume: cannot read {path}: {err}") from None
        torch.set_rng_state(state.pop("torch_rng"))
        self.prior = RunTotals(**state.pop("totals", {}))  # none in older checkpoints
        state.pop("metrics_bytes", None)
        cuda_rng = state.pop("cuda_rng")
        if cuda_rng:
            torch.cuda.set_rng_state_all(cuda_rng)
        return state

    def points(self, first: int, last: int, until: int) -> list[int]:
        """The meeting steps in ``first..last`` (inclusive) before ``until``."""
        if not self._every:
            return []
        start = max(first, self.resume_step + 1)
        return list(
            range(-(-start // self._every) * self._every, min(last, until - 1) + 1, self._every)
        )

    def reached(
        self, step: int, state: Callable[[], dict[str, Any]], until: int, *, idle: bool = False
    ) -> bool:
        """Called after ``step`` on every rank; at meeting steps, agrees, writes and commits.

        ``until`` is the first step at which no rank meets any more (the run's end, or the
        last step every rank reaches); ``idle`` ranks wait for the others without a deadline.
        Raises ``Preempted`` after the commit when any rank got a pre-emption signal.
        Returns whether the ranks met.
        """
        self._step, self._until = step, until
        if not self._every or step % self._every or step >= until or step <= self.resume_step:
            return False
        skip = (
            self._rank == 0
            and self._every_s > 0
            and time.monotonic() - self._last_write < self._every_s
        )
        agreed = np.array([self._stop_signal, int(skip)], np.int64)
        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, agreed, MPI.MAX), step, idle)
        stop_signal, write = int(agreed[0]), not agreed[1]
        if write or stop_signal:
            self._write(step, state())
            self._wait(self._comm.Ibarrier(), step, idle)  # every rank's file is on disk
            if self._rank == 0:
                self._commit(step)
        if stop_signal:
            self._wait(self._comm.Ibarrier(), step, idle)  # the commit is on disk
            raise Preempted(stop_signal, checkpoint=step)
        return True

    def meet_before_exit(self, grace_s: float, *, quiet: bool = False) -> bool:
        """Waits (at most ``grace_s``) until every rank is about to exit, so that nobody's
        exit status cuts short another rank's last writes; False if some rank never came."""
        request = self._comm.Ibarrier()
        try:
            poll(request.Test, grace_s, lambda: TimeoutError())
        except TimeoutError:
            if not quiet:
                log.warning("not every rank reached the exit within %g s", grace_s)
            return False
        return True

    def close(self) -> None:
        self._comm.Free()

    def _wait(self, request: MPI.Request, step: int, idle: bool) -> None:
        self._transport.complete(request, f"checkpoint meeting of step {step}", deadline=not idle)

    def _write(self, step: int, state: dict[str, Any]) -> None:
        directory = self._dir / f"step-{step:08d}"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"rank-{self._rank:05d}.pt"
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as out:
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
            torch.save(
                {
                    **state,
                    "step": step,
                    "totals": self._totals(state),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng,
                    "metrics_bytes": self._metrics.flush(),
                },
                out,
            )
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(target)
        self._last_write = time.monotonic()

    def _totals(self, state: dict[str, Any]) -> dict[str, Any]:
        """The run's totals at this checkpoint: the earlier launches' plus this one's."""
        prior, traffic = self.prior, self._transport.traffic
        return dataclasses.asdict(
            RunTotals(
                launches=prior.launches + 1,
                wall_s=prior.wall_s + time.perf_counter() - self._started,
                samples=state.get("counters", {}).get("samples", 0),
                bytes_sent=prior.bytes_sent + traffic.total_sent,
                bytes_received=prior.bytes_received + traffic.total_received,
            )
        )

    def _commit(self, step: int) -> None:
        directory = self._dir / f"step-{step:08d}"
        tmp = directory / f".{MANIFEST}.tmp"
        with open(tmp, "w") as out:
            json.dump({"step": step, **self._manifest}, out)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(directory / MANIFEST)
        _fsync_dir(directory)
        log.info("checkpoint at step %d committed in %s", step, directory)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Drops committed checkpoints beyond ``keep`` and uncommitted older ones."""
        steps = sorted(
            (int(m.group(1)), d)
            for d in self._dir.glob("step-*")
            if (m := _STEP_DIR.search(d.name))
        )
        committed = [d for s, d in steps if (d / MANIFEST).is_file()]
        kept = set(committed[-self._keep :])
        for s, d in steps:
            if s < newest and d not in kept:
                shutil.rmtree(d, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

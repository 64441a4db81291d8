"""What a run leaves behind and shows: per-rank metrics, the summary, rank 0's progress."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml


def setup_logging(rank: int, label: str) -> logging.Logger:
    """One logger per process with a ``[rank R role]`` prefix; only rank 0 speaks at INFO."""
    logger = logging.getLogger("mpisplit")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank} {label}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_resolved_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_atomically(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


class MetricsLog:
    """``metrics-rank<R>.jsonl``: one JSON object per step or evaluation, buffered."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        header: dict[str, Any],
        flush_every: int,
        *,
        append: bool = False,
        truncate_to: int | None = None,
    ) -> None:
        """``append``: a resumed run continues the file of the run it resumes, cut back to
        ``truncate_to`` bytes (where it stood at the checkpoint), so that what the lost
        attempt recorded after its checkpoint is neither duplicated nor left as a gap."""
        path = run_dir / f"metrics-rank{rank}.jsonl"
        if (
            append
            and truncate_to is not None
            and path.is_file()
            and path.stat().st_size > truncate_to
        ):
            os.truncate(path, truncate_to)
        self._file: TextIO = open(path, "a" if append else "w")  # noqa: SIM115
        self._flush_every = flush_every
        self._pending = 0
        self._start = time.perf_counter()
        self.last_step = 0
        self.write({"event": "start", **header})

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def write(self, record: dict[str, Any]) -> None:
        """Appends a record; every ``flush_every`` records also carry the resident memory
        (so long runs show whether memory grows) and go to disk."""
        self.last_step = record.get("step", self.last_step)
        self._pending += 1
        flush = self._pending >= self._flush_every
        if flush:
            record = {**record, "rss_mb": round(resident_mb(), 1)}
        self._file.write(json.dumps({"time": round(self.elapsed(), 6), **record}) + "\n")
        if flush:
            self._file.flush()
            self._pending = 0

    def flush(self) -> int:
        """Writes out what is buffered; returns the file's length in bytes."""
        self._file.flush()
        self._pending = 0
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def resident_mb() -> float:
    """Current resident set size (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_resident_mb() -> float:
    """The largest resident set size of this process so far (``ru_maxrss`` is in KiB on
    Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Rank 0's display: a bar on a terminal, a plain line every ``every`` steps otherwise;
    both show the epoch, the time elapsed and the estimated time left."""

    def __init__(
        self,
        total: int,
        mode: str,
        every: int,
        logger: logging.Logger,
        stream: TextIO = sys.stderr,
        *,
        epochs: int = 0,
        done: int = 0,
    ) -> None:
        """``epochs``: how many epochs the ``total`` steps span (0: the epoch is not shown);
        ``done``: the steps already taken when this process starts (a resumed run's
        checkpoint): the rate and the time left count only the steps taken since."""
        self.total = max(total, 1)
        self.done = done
        self.every = every
        self.epochs = epochs
        self.logger = logger
        self.stream = stream
        self.mode = ("bar" if stream.isatty() else "lines") if mode == "auto" else mode
        self._start = time.perf_counter()

    def update(self, step: int, loss: float | None) -> None:
        if self.mode == "none" or (step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self._start
        rate = (step - self.done) / max(elapsed, 1e-9)
        loss_text = "" if loss is None else f" loss {loss:.4f}"
        epoch = min(self.epochs, 1 + max(step - 1, 0) * self.epochs // self.total)
        epoch_text = f" epoch {epoch}/{self.epochs}" if self.epochs else ""
        eta = _clock((self.total - step) / rate) if step > self.done else "?"
        times = f"{_clock(elapsed)} elapsed, ETA {eta}"
        if self.mode == "bar":
            filled = int(30 * step / self.total)
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total}"
                f"{epoch_text}{loss_text} {rate:.1f} steps/s {times}"
            )
            if step >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            self.logger.info(
                "step %d/%d%s%s (%.1f steps/s, %s)",
                step,
                self.total,
                epoch_text,
                loss_text,
                rate,
                times,
            )


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

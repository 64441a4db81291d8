"""A run directory's state: whose files it holds and how that run stands.

``status.json`` says ``state``: ``running`` (written by rank 0 before any rank writes
anything else), then ``finished`` (after ``summary.json``), ``preempted`` (stopped by a
signal; resumable when a checkpoint was committed) or ``failed`` (written by the first rank
that failed, naming it). Each write replaces the file atomically. A directory holding another
run's files is refused unless the user says what to do with them: ``--overwrite`` removes
them (only the files a run writes: nothing else in the directory is touched), ``--resume``
continues that run. So a directory never mixes two runs' files, and a reader can tell a
finished run from one that failed or is still going.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from mpisplit.config import ConfigError

STATUS = "status.json"
_FAILED_CLAIM = ".failed"
"""Created exclusively by the first rank that fails: the others stay silent."""
RUN_FILES = (
    "config.yaml",
    "summary.json",
    "metrics-rank*.jsonl",
    "model-rank*.pt",
    "trace-rank*.json",
    "pmpi-rank*.json",
    STATUS,
    _FAILED_CLAIM,
)
"""What a run writes into its directory (checkpoints aside)."""


def read_status(run_dir: Path) -> dict[str, Any]:
    """The recorded state ({} when there is none or it is unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def run_files(run_dir: Path, checkpoints: Path) -> list[Path]:
    """The files (and checkpoint step directories) of a run found in ``run_dir``."""
    found = [path for pattern in RUN_FILES for path in sorted(Path(run_dir).glob(pattern))]
    return found + sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else found


def check_run_dir(run_dir: Path, checkpoints: Path, *, resume: bool, overwrite: bool) -> None:
    """This rank can create and write ``run_dir``, and it holds no other run unless the user
    said to overwrite or resume it. No traffic: every rank checks what it sees."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run.dir: cannot write {run_dir}: {err.strerror or err}") from None
    found = run_files(run_dir, checkpoints)
    if not found or resume or overwrite or _same_requeued_job(run_dir):
        return
    state = read_status(run_dir).get("state", "of an earlier mpisplit")
    names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
    resumable = any(path.name.startswith("step-") for path in found)
    raise ConfigError(
        f"run.dir: {run_dir} holds another run ({state}; {names}); pass --overwrite to "
        f"replace it{', --resume to continue it from its checkpoint' if resumable else ''}, "
        f"or choose another run.dir"
    )


def _same_requeued_job(run_dir: Path) -> bool:
    """A requeued Slurm job without a checkpoint starts over in its own directory."""
    job = os.environ.get("SLURM_JOB_ID")
    restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    return restarted and job is not None and read_status(run_dir).get("slurm_job_id") == job


def claim(run_dir: Path, checkpoints: Path, *, resume_step: int | None, **details: Any) -> None:
    """Rank 0, after every rank's checks and before any rank writes: removes an earlier
    run's files unless resuming it, and marks the directory ``running``."""
    run_dir = Path(run_dir)
    if resume_step is None:
        for path in run_files(run_dir, checkpoints):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    else:
        (run_dir / _FAILED_CLAIM).unlink(missing_ok=True)
    mark(
        run_dir,
        "running",
        resumed_from=resume_step,
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        started=_now(),
        **details,
    )


def mark(run_dir: Path, state: str, **details: Any) -> None:
    """Records ``state`` (keeping what the earlier records said), atomically."""
    status = {**read_status(run_dir), **details, "state": state, "updated": _now()}
    path = Path(run_dir) / STATUS
    tmp = path.with_name(f".{STATUS}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.replace(path)


def mark_failed(run_dir: Path, **failure: Any) -> bool:
    """Marks the run failed if this is the first rank to fail; returns whether it was (the
    first failure is the one to report: later ones are mostly its consequences). True as
    well when the directory cannot be written: then nobody could have claimed it."""
    try:
        fd = os.open(Path(run_dir) / _FAILED_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    except OSError:
        return True
    os.close(fd)
    try:
        mark(run_dir, "failed", failure=failure)
    except OSError:
        pass
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

"""Shared fixtures: prepared datasets (real HDF5) and a launcher for real ``mpiexec`` jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mpisplit import launch as launcher
from mpisplit.prepare import PrepareSpec, prepare_dataset

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC_TIMEOUT_S = 180


def mpi_launcher() -> launcher.Launcher:
    """The project's launcher for this interpreter's MPI (never srun: tests start local jobs)."""
    try:
        return launcher.find("mpiexec")
    except launcher.LaunchError as err:
        pytest.fail(str(err))


def mpiexec() -> str:
    """The launcher's ``mpiexec``, for commands built by hand (MPMD, scripts); add
    ``mpi_launcher().environment(...)`` for Open MPI's settings."""
    return mpi_launcher().program


def mpi_command(ranks: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment of ``python -m mpisplit args`` on ``ranks`` local ranks, one
    thread per rank."""
    found = mpi_launcher()
    env = found.environment({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return found.command(ranks, [sys.executable, "-m", "mpisplit", *args]), env


def start_mpi(ranks: int, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m mpisplit args`` on ``ranks`` ranks in the background (pipes for both
    outputs; ``env`` adds variables); the caller owns its timeout and its end."""
    command, environment = mpi_command(ranks, *args)
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environment, **(env or {})},
        cwd=ROOT,
    )


def run_mpi(
    ranks: int, *args: str, timeout: float = MPIEXEC_TIMEOUT_S, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m mpisplit args`` on ``ranks`` ranks with a hard timeout."""
    command, env = mpi_command(ranks, *args)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or ROOT
    )


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``dataset("breast_cancer", clients=3)`` → a prepared directory, built once per session."""
    cache: dict[tuple, Path] = {}

    def make(name: str, clients: int = 1, **options: object) -> Path:
        key = (name, clients, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("data") / f"{name}-{clients}c"
            cache[key] = prepare_dataset(
                PrepareSpec(dataset=name, out=out, clients=clients, **options)
            )
        return cache[key]

    return make


@pytest.fixture
def launch() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_mpi


def overrides(**sections: dict[str, object]) -> Sequence[str]:
    return [
        f"{section}.{key}={value}"
        for section, values in sections.items()
        for key, value in values.items()
    ]


def run_readme_block(heading: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs the one bash block of README's section ``heading`` exactly as written, in ``cwd``
    (which gets the checkout's configs), with the venv's commands first on PATH; fails the
    test unless it exits 0."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    (block,) = re.findall(r"```bash\n(.*?)```", text[start : end if end > 0 else None], re.DOTALL)
    (cwd / "configs").symlink_to(ROOT / "configs")
    return run_bash_block(block, cwd)


def run_bash_block(
    block: str, cwd: Path, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Runs a doc's bash ``block`` as written in ``cwd``, with the venv's commands first on
    PATH and one torch thread; fails the test unless it exits 0."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done

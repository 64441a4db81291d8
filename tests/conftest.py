"""Shared fixtures: prepared datasets (real HDF5) and a launcher for real ``mpiexec`` jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mpisplit.prepare import PrepareSpec, prepare_dataset

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC_TIMEOUT_S = 180


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpiexec: run tools/install.sh (it installs MPICH from PyPI)")
    return found


def run_mpi(ranks: int, *args: str, timeout: float = MPIEXEC_TIMEOUT_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n ranks python -m mpisplit args`` with a hard timeout, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpisplit", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd or ROOT)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``dataset("breast_cancer", clients=3)`` → a prepared directory, built once per session."""
    cache: dict[tuple, Path] = {}

    def make(name: str, clients: int = 1, **options: object) -> Path:
        key = (name, clients, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("data") / f"{name}-{clients}c"
            cache[key] = prepare_dataset(
                PrepareSpec(dataset=name, out=out, clients=clients, **options))
        return cache[key]

    return make


@pytest.fixture
def launch() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_mpi


def overrides(**sections: dict[str, object]) -> Sequence[str]:
    return [f"{section}.{key}={value}" for section, values in sections.items()
            for key, value in values.items()]

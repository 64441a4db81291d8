"""Starting a job on the MPI that mpi4py loads: one home for the launch command.

Inside a Slurm allocation ranks start with ``srun`` and the ``--mpi`` plugin their library
speaks (PMIx for Open MPI, PMI-2 for MPICH); elsewhere with that library's ``mpiexec``: the
environment's own (an MPI wheel puts it beside the interpreter), else the one on ``PATH``
(a site's module, which a source build of mpi4py was compiled against).

Open MPI needs settings MPICH does not, given here as environment variables (ones already
set win): permission to run as root (containers, CI) and oversubscription, i.e. more ranks
than cores (Open MPI 5 reads it only from ``PRTE_MCA_rmaps_default_mapping_policy``;
``OMPI_MCA_rmaps_base_oversubscribe`` is Open MPI 4's and does nothing on 5).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LAUNCHERS = ("auto", "mpiexec", "srun")
_SRUN_MPI = {"openmpi": "pmix", "mpich": "pmi2"}


class LaunchError(RuntimeError):
    """No launcher fits (no mpiexec, srun asked for outside Slurm)."""


@dataclass(frozen=True)
class Launcher:
    """How to start ``ranks`` copies of a command, and the environment they need."""

    kind: str
    """``mpiexec`` or ``srun``."""
    program: str
    flavor: str
    """``openmpi``, ``mpich`` (MPICH and its derivatives: hydra) or ``unknown``."""
    version: tuple[int, ...]
    srun_mpi: str = ""
    """srun's ``--mpi`` plugin (empty: the site's default)."""

    def command(self, ranks: int, argv: Sequence[str]) -> list[str]:
        """Under ``mpiexec`` each rank starts through ``mpisplit.supervise``, which names
        the rank a signal killed (srun does that itself)."""
        if self.kind == "srun":
            plugin = [f"--mpi={self.srun_mpi}"] if self.srun_mpi else []
            return [self.program, "-n", str(ranks), *plugin, *argv]
        return [self.program, "-n", str(ranks), sys.executable, "-m", "mpisplit.supervise", *argv]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) plus what the MPI needs to start
        a local job: for Open MPI, oversubscription and, as root, permission to run."""
        env = dict(os.environ if base is None else base)
        if self.flavor != "openmpi":
            return env
        settings = (
            {"OMPI_MCA_rmaps_base_oversubscribe": "1"}
            if self.version[:1] == (4,)
            else {"PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
        )
        if os.geteuid() == 0:
            settings |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        return {**settings, **env}

    def describe(self) -> str:
        version = ".".join(map(str, self.version)) or "?"
        return f"{self.kind} {self.program} ({self.flavor} {version})"


def find(choice: str = "auto") -> Launcher:
    """The launcher for this process's MPI: ``srun`` inside a Slurm allocation (``auto``),
    else ``mpiexec`` (``$MPISPLIT_MPIEXEC``, the environment's, then ``PATH``'s)."""
    if choice not in LAUNCHERS:
        raise LaunchError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {choice!r}")
    mpiexec = mpiexec_path()
    flavor, version = identify(mpiexec) if mpiexec else ("unknown", ())
    srun = shutil.which("srun")
    if choice == "srun" or (choice == "auto" and srun and "SLURM_JOB_ID" in os.environ):
        if srun is None:
            raise LaunchError("launcher srun: no srun on PATH")
        return Launcher("srun", srun, flavor, version, _srun_mpi(srun, flavor))
    if mpiexec is None:
        raise LaunchError(
            "no mpiexec beside this Python or on PATH: run tools/install.sh "
            "(it installs an MPI from PyPI), load your site's MPI module, or set "
            "MPISPLIT_MPIEXEC"
        )
    return Launcher("mpiexec", mpiexec, flavor, version)


def mpiexec_path() -> str | None:
    """``$MPISPLIT_MPIEXEC``, else the ``mpiexec`` of this environment, else ``PATH``'s."""
    chosen = os.environ.get("MPISPLIT_MPIEXEC")
    if chosen:
        return shutil.which(chosen)
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


@cache
def identify(mpiexec: str) -> tuple[str, tuple[int, ...]]:
    """(flavor, version) of the MPI behind ``mpiexec``, from its ``--version``."""
    try:
        text = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", ()
    match = re.search(r"\((?:Open MPI|OpenRTE)\) (\d+(?:\.\d+)*)", text)
    if match:
        return "openmpi", _version(match.group(1))
    if "HYDRA" in text or "MPICH" in text or "Intel(R) MPI" in text:
        match = re.search(r"Version:\s*(\d+(?:\.\d+)*)", text)
        return "mpich", _version(match.group(1)) if match else ()
    return "unknown", ()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _srun_mpi(srun: str, flavor: str) -> str:
    """``$MPISPLIT_SRUN_MPI``, else the plugin the library speaks if this srun offers it."""
    if "MPISPLIT_SRUN_MPI" in os.environ:
        return os.environ["MPISPLIT_SRUN_MPI"]
    wanted = _SRUN_MPI.get(flavor, "")
    try:
        offered = subprocess.run([srun, "--mpi=list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return wanted if wanted and wanted in offered.stdout + offered.stderr else ""


def run_command(
    ranks: int, argv: Sequence[str], choice: str = "auto"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start ``argv`` on ``ranks`` ranks."""
    launcher = find(choice)
    return launcher.command(ranks, argv), launcher.environment()

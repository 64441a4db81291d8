"""Starting a job on the MPI that mpi4py loads: one home for the launch command.

Inside a Slurm allocation ranks start with ``srun`` and the ``--mpi`` plugin their library
speaks (PMIx for Open MPI, PMI-2 for MPICH); elsewhere with that library's ``mpiexec``: the
environment's own (an MPI wheel puts it beside the interpreter), else the one on ``PATH``
(a site's module, which a source build of mpi4py was compiled against). The job scripts
(``jobscripts/common.sh``) launch through here too: a heterogeneous job's components
(``--het-group``), and ``mpiexec`` placed on the allocation's nodes as ``srun`` would.

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
GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES")
"""What the batch shell of a heterogeneous job holds for component 0's GPUs."""


class LaunchError(RuntimeError):
    """No launcher fits (no mpiexec, srun asked for outside Slurm, an option it lacks)."""


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
    srun_mpi_why: str = ""
    """Why that plugin: what srun offers and what the library speaks."""
    slurm: Mapping[str, str] | None = None
    """The Slurm allocation's variables when launching inside one (None: outside)."""
    hosts: tuple[tuple[str, int], ...] = ()
    """mpiexec in an allocation: its nodes and ranks per node, as srun would place them."""

    def command(
        self,
        ranks: int | None,
        argv: Sequence[str],
        *,
        het_group: str = "",
        hostfile: str = "",
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The launch line: launcher, its options, ``extra`` (passed on as given), ``argv``.

        ``ranks`` None: srun's allocation decides (every task of the job or of
        ``het_group``'s components). Outside Slurm each mpiexec rank starts through
        ``mpisplit.supervise``, which names the rank a signal killed; inside, Slurm signals
        every process of a job step itself (the rank would get each signal twice) and names
        a killed task."""
        if self.kind == "srun":
            if hostfile:
                raise LaunchError("--hostfile is mpiexec's: srun places ranks on its allocation")
            return [self.program, *self._srun_options(ranks, het_group), *extra, *argv]
        if het_group:
            raise LaunchError("--het-group is srun's: a heterogeneous job launches with srun")
        if ranks is None:
            raise LaunchError("mpiexec needs the number of ranks (-n)")
        supervise = [] if self.slurm else [sys.executable, "-m", "mpisplit.supervise"]
        hosts = self._mpiexec_hosts(hostfile)
        return [self.program, *hosts, "-n", str(ranks), *extra, *supervise, *argv]

    def _srun_options(self, ranks: int | None, het_group: str) -> list[str]:
        """A failed task ends the step; ``--cpus-per-task`` passed on (srun 22.05+ no
        longer inherits it), except in a heterogeneous job, whose components keep their own
        (one value here would be component 0's for all)."""
        options = ["-n", str(ranks)] if ranks is not None else []
        options += [f"--mpi={self.srun_mpi}"] if self.srun_mpi else []
        options.append("--kill-on-bad-exit=1")
        slurm = self.slurm or {}
        if het_group:
            options.append(f"--het-group={het_group}")
        elif "SLURM_HET_SIZE" not in slurm and slurm.get("SLURM_CPUS_PER_TASK"):
            options.append(f"--cpus-per-task={slurm['SLURM_CPUS_PER_TASK']}")
        return options

    def _mpiexec_hosts(self, hostfile: str) -> list[str]:
        """Where mpiexec places ranks: the given hostfile, else the allocation's nodes."""
        openmpi = self.flavor == "openmpi"
        if hostfile:
            return ["--hostfile" if openmpi else "-f", hostfile]
        if not self.hosts:
            return []
        listed = ",".join(f"{host}:{slots}" for host, slots in self.hosts)
        if openmpi:
            cyclic = _cyclic(self.slurm or {})
            return ["--host", listed, *(["--map-by", "node"] if cyclic else [])]
        return ["-hosts", listed]

    def environment(
        self, base: Mapping[str, str] | None = None, *, het_group: str = ""
    ) -> dict[str, str]:
        """``base`` (default: this process's environment) plus what the MPI needs to start
        a local job: for Open MPI, oversubscription and, as root, permission to run. For
        the components of a heterogeneous job, less component 0's GPUs, which the batch
        shell holds: Slurm sets them for the ranks of components that request GPUs, the
        others must not inherit them."""
        env = dict(os.environ if base is None else base)
        if het_group:
            env = {key: value for key, value in env.items() if key not in GPU_VARIABLES}
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


def find(choice: str = "auto", srun_mpi: str | None = None) -> Launcher:
    """The launcher for this process's MPI: ``srun`` inside a Slurm allocation (``auto``),
    else ``mpiexec`` (``$MPISPLIT_MPIEXEC``, the environment's, then ``PATH``'s).

    ``srun_mpi``: srun's ``--mpi`` plugin ('' for the site's default); None:
    ``$MPISPLIT_SRUN_MPI``, else chosen by :func:`choose_srun_mpi`."""
    if choice not in LAUNCHERS:
        raise LaunchError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {choice!r}")
    mpiexec = mpiexec_path()
    flavor, version = identify(mpiexec) if mpiexec else ("unknown", ())
    slurm = _allocation()
    srun = shutil.which("srun")
    if choice == "srun" or (choice == "auto" and srun and slurm):
        if srun is None:
            raise LaunchError("launcher srun: no srun on PATH")
        why = "set by --srun-mpi"
        if srun_mpi is None and "MPISPLIT_SRUN_MPI" in os.environ:
            srun_mpi, why = os.environ["MPISPLIT_SRUN_MPI"], "set by MPISPLIT_SRUN_MPI"
        if srun_mpi is None:
            srun_mpi, why = choose_srun_mpi(_srun_offers(srun), library_version())
        return Launcher("srun", srun, flavor, version, srun_mpi, why, slurm)
    if mpiexec is None:
        raise LaunchError(
            "no mpiexec beside this Python or on PATH: run tools/install.sh "
            "(it installs an MPI from PyPI), load your site's MPI module, or set "
            "MPISPLIT_MPIEXEC"
        )
    hosts = allocation_hosts(slurm) if slurm else ()
    return Launcher("mpiexec", mpiexec, flavor, version, slurm=slurm, hosts=hosts)


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


def _allocation() -> dict[str, str] | None:
    """This process's Slurm allocation variables; None outside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {key: value for key, value in os.environ.items() if key.startswith("SLURM_")}


def library_version() -> str:
    """``MPI.Get_library_version()`` of the MPI mpi4py loads, without ``MPI_Init`` (in a
    child process: the launcher must not hold the library); empty if unknown."""
    code = (
        "import mpi4py; mpi4py.rc.initialize = False\n"
        "from mpi4py import MPI; print(MPI.Get_library_version())"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _srun_offers(srun: str) -> list[str]:
    """The plugins ``srun --mpi=list`` names."""
    try:
        listed = subprocess.run([srun, "--mpi=list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^\s+([a-z0-9_]+)\s*$", listed.stdout + listed.stderr, re.MULTILINE)


def choose_srun_mpi(offered: Sequence[str], library: str) -> tuple[str, str]:
    """srun's ``--mpi`` plugin for ``library`` (its version string) and why: ``pmix`` when
    offered and the library speaks PMIx (Open MPI, or an MPICH configured with PMIx), else
    ``pmi2`` when offered (MPICH, Intel MPI speak PMI-1/2), else '' (srun's default). srun
    offering a plugin does not mean the library speaks it, or even that it loads."""
    name = " ".join(library.splitlines()[0].split()) if library.strip() else ""
    offers = f"srun offers: {' '.join(offered)}"
    pmix = "Open MPI" in library or re.search(r"with-pmix|with-pmi=pmix", library, re.I)
    if "pmix" in offered and pmix:
        return "pmix", f"{offers}; MPI library '{name}' speaks PMIx"
    if "pmi2" in offered:
        named = name or "(could not ask mpi4py)"
        return "pmi2", f"{offers}; MPI library '{named}' is not PMIx-based"
    return "", f"{offers}; no pmi2, and no pmix that the MPI library speaks"


def allocation_hosts(slurm: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """The allocation's nodes with their task counts (``SLURM_TASKS_PER_NODE``, "2(x2),1"),
    for mpiexec to place ranks as srun does; under a cyclic distribution one slot per node,
    so that mpiexec wraps round the nodes (rank r on node r mod #nodes)."""
    nodelist = slurm.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return ()
    try:
        names = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise LaunchError(f"cannot expand the allocation's nodes {nodelist!r}: {err}") from err
    return place(names, slurm.get("SLURM_TASKS_PER_NODE", ""), _cyclic(slurm))


def place(names: Sequence[str], tasks_per_node: str, cyclic: bool) -> tuple[tuple[str, int], ...]:
    """``names`` paired with their counts from ``tasks_per_node`` (1 where it says none)."""
    if cyclic:
        return tuple((name, 1) for name in names)
    counts: list[int] = []
    for spec in filter(None, tasks_per_node.split(",")):
        match = re.fullmatch(r"(\d+)\(x(\d+)\)", spec)
        counts += [int(match[1])] * int(match[2]) if match else [int(spec)]
    return tuple((name, counts[i] if i < len(counts) else 1) for i, name in enumerate(names))


def _cyclic(slurm: Mapping[str, str]) -> bool:
    return slurm.get("SLURM_DISTRIBUTION", "").startswith("cyclic")


def run_command(
    ranks: int, argv: Sequence[str], choice: str = "auto"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start ``argv`` on ``ranks`` ranks."""
    launcher = find(choice)
    return launcher.command(ranks, argv), launcher.environment()

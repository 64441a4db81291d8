"""A real Slurm cluster on this machine for the job-script tier (``pytest tests/slurm``).

The session fixture ``slurm`` installs Slurm (``tools/slurm/install.sh``: apt-get, as root),
starts munged + slurmctld + slurmd for CPU nodes n1..n4 (partition ``debug``) and the GPU
node g1 (partition ``gpu``, one GPU GRES backed by /dev/null: Slurm allocates it and sets
CUDA_VISIBLE_DEVICES, there is no real GPU) under a temporary directory
(``tools/slurm/cluster.sh``), hands the tests a :class:`Cluster`, and stops it all at the end.

Where Slurm cannot be installed (not root, no apt-get, no network) the tier is skipped with
the reason -- unless ``MPISPLIT_REQUIRE_SLURM=1`` (or ``CI``) is set: then it fails, so CI can
never skip it silently.

Time limits: installing (apt-get) and starting the cluster happen in the setup of the first
test that uses ``slurm``, and stopping it in the teardown of the last; pytest-timeout's
per-test limit covers setup and teardown, so those two tests get the install, start and
stop budgets added to it (a slow package mirror must not fail the tier).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools" / "slurm"
VENV_BIN = Path(sys.executable).parent

# States after which a job never changes again (a requeued job passes through REQUEUED
# and PENDING, which are not final).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 120
NODES = 4
"""CPU nodes n1..n4 in partition ``debug``; the GPU node g1 (partition ``gpu``) comes on top."""
PMI2_GARBLED = "mpi/pmi2: value not properly terminated in client request"
"""What slurmstepd says when a rank's PMI-2 request reaches it garbled. On this one-VM
cluster, PyPI MPICH's start-up exchange through srun's pmi2 plugin sometimes breaks this
way (slurmstepd then reads bytes of the rank's heap as the next request; the ranks get a
corrupt UCX address and abort in MPI_Init, before mpisplit starts): MPICH's or Slurm's, not
mpisplit's. Seen in the multi-node jobs only, in bursts, and only while other test runs
shared the machine with the tier (then the same job garbled up to four times in a row);
never when the tier ran alone, nor in 20 jobs started by hand with or without CPU load or
other MPI jobs beside them. Such a job runs again once the cluster has no other job (or
after ``QUIET_WAIT_S``), up to ``GARBLED_RERUNS`` times."""
GARBLED_RERUNS = 3
QUIET_WAIT_S = 60


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the local Slurm test cluster")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the items that will run, in order
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)
    users = [
        item
        for item in items
        if {"slurm", "slurm_installed"} & set(getattr(item, "fixturenames", ()))
    ]
    base = _timeout(config)
    if not users or not base:
        return
    first, last = users[0], users[-1]
    extra = {id(first): INSTALL_TIMEOUT_S + START_TIMEOUT_S}
    extra[id(last)] = extra.get(id(last), 0) + STOP_TIMEOUT_S
    for item in {id(first): first, id(last): last}.values():
        marker = item.get_closest_marker("timeout")
        own = base
        if marker is not None:
            own = float(marker.args[0] if marker.args else marker.kwargs.get("timeout", base))
        # Prepended: get_closest_marker (what pytest-timeout reads) finds it first.
        item.add_marker(pytest.mark.timeout(own + extra[id(item)]), append=False)


def _timeout(config: pytest.Config) -> float:
    """pytest-timeout's per-test limit in seconds, looked up as the plugin does (option,
    PYTEST_TIMEOUT, ini); 0 when there is none or the plugin is not installed."""
    try:
        value = config.getoption("timeout", None)
        if value is None:
            value = os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout") or 0
        return float(value)
    except (ValueError, TypeError):
        return 0.0


def _required() -> bool:
    return os.environ.get("MPISPLIT_REQUIRE_SLURM") == "1" or bool(os.environ.get("CI"))


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"Slurm test cluster required (MPISPLIT_REQUIRE_SLURM/CI) but {reason}")
    pytest.skip(reason)


def _free_port(start: int, count: int = 1) -> int:
    """First port of ``count`` consecutive free TCP ports, searched from a random offset."""
    for _ in range(200):
        base = random.randrange(start, start + 8000)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports for the Slurm test cluster")


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show job`` output → one dict per record (array task / het component)."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = dict(re.findall(r"(\w+(?::\w+)?)=(.*?)(?= \w+(?::\w+)?=|$)", line.strip()))
        records.append(fields)
    return records


class Cluster:
    """Handle on the running test cluster: submit, inspect and wait for jobs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "etc" / "slurm.conf"
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        # What a user's `sbatch` would not carry in from a test run.
        for name in ("SLURM_JOB_ID", "SLURM_JOBID", "PYTEST_CURRENT_TEST"):
            self.env.pop(name, None)

    # -- commands ---------------------------------------------------------------------
    def run(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def submit(
        self,
        script: str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        options: tuple[str, ...] | list[str] = (),
        output: Path | None = None,
    ) -> str:
        """``sbatch --parsable [options] script args`` from the checkout root → job id.

        ``env`` is added to the job's environment (sbatch exports the submitting one).
        ``output``: where the job's stdout goes (%j etc. allowed); default: the cluster dir.
        """
        out = Path(output or (self.dir / "jobs" / "%x-%j.out"))
        out.parent.mkdir(parents=True, exist_ok=True)
        command = ["sbatch", "--parsable", f"--output={out}", *options, str(script), *args]
        proc = self.run(*command, env=env)
        return proc.stdout.strip().split(";")[0]

    def records(self, job_id: str) -> list[dict[str, str]]:
        """Every record of the job (several for a job array or a heterogeneous job)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0:
            return []
        return parse_records(proc.stdout)

    def state(self, job_id: str) -> str:
        """Job state; for arrays and het jobs the distinct states joined by ','."""
        states = sorted({r.get("JobState", "?") for r in self.records(job_id)})
        return ",".join(states) or "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 120, states: set[str] | None = None) -> str:
        """Waits until every record of the job is in a final state (or in ``states``)."""
        wanted = states or FINAL_STATES
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(job_id)
            got = {r.get("JobState", "?") for r in records}
            if records and got <= wanted:
                return ",".join(sorted(got))
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {sorted(got)} after {timeout:.0f}s (wanted "
                    f"{sorted(wanted) if states else 'a final state'})\n{self.describe(job_id)}"
                )
            time.sleep(0.5)

    def wait_until_empty(self, timeout: float = QUIET_WAIT_S) -> None:
        """Waits (at most ``timeout``, then says so) until no job is queued or running."""
        deadline = time.monotonic() + timeout
        while jobs := self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
            if time.monotonic() > deadline:
                print(f"cluster not empty after {timeout:.0f}s: {jobs}", file=sys.stderr)
                return
            time.sleep(1)

    def output(self, job_id: str) -> str:
        """The job's stdout (each record's StdOut file, concatenated)."""
        texts = []
        for path in sorted({r.get("StdOut", "") for r in self.records(job_id)}):
            if path and Path(path).exists():
                texts.append(Path(path).read_text(errors="replace"))
        return "".join(texts)

    def describe(self, job_id: str) -> str:
        """scontrol record, the job's output and the daemons' log tails, for a failure."""
        parts = [
            self.run("scontrol", "show", "job", job_id, check=False).stdout,
            "--- job output ---",
            self.output(job_id)[-6000:],
        ]
        for log in sorted((self.dir / "log").glob("slurm*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts += [f"--- {log.name} ---", *lines]
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """Slurm's packages are installed (``tools/slurm/install.sh``), else the tier is skipped
    (or fails, where it is required)."""
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        _unavailable("Slurm is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        _unavailable("the Slurm test cluster needs root (slurmd runs jobs as their owner)")
    install = subprocess.run(
        ["bash", str(TOOLS / "install.sh")],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    if install.returncode != 0:
        _unavailable(
            "tools/slurm/install.sh could not install Slurm "
            f"(exit {install.returncode}): {install.stderr.strip()[-800:]}"
        )


@pytest.fixture(scope="session")
def slurm(slurm_installed: None, tmp_path_factory: pytest.TempPathFactory):
    """The running test cluster (session-scoped). Installs Slurm first if needed."""
    directory = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "MPISPLIT_SLURM_PORT": str(_free_port(20000)),
        "MPISPLIT_SLURM_NODE_PORT": str(_free_port(30000, NODES + 1)),
        "MPISPLIT_SLURM_TIMEOUT": str(START_TIMEOUT_S - 10),
        # n1, n2 as the multi-node scripts need; n3, n4 so that vertical.sbatch can put
        # each of the 4 ranks of configs/vertical-breast-cancer.yaml on a node of its own.
        "MPISPLIT_SLURM_NODES": str(NODES),
    }
    cluster_sh = ["bash", str(TOOLS / "cluster.sh")]
    start = subprocess.run(
        [*cluster_sh, "start", str(directory)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    try:
        if start.returncode != 0:
            pytest.fail(
                f"tools/slurm/cluster.sh start failed ({start.returncode}):\n"
                f"{start.stdout}{start.stderr}"
            )
        yield Cluster(directory)
    finally:
        stop = subprocess.run(
            [*cluster_sh, "stop", str(directory)],
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
            env=env,
        )
        if stop.returncode != 0:
            print(f"cluster.sh stop failed:\n{stop.stdout}{stop.stderr}", file=sys.stderr)

"""The shipped Slurm job scripts (jobscripts/*.sbatch) on the local test cluster.

Each script is submitted as a user would (from the checkout root, with its own #SBATCH
header), with a tiny run (1 epoch of the breast-cancer data prepared into tmp); the tests
check the job COMPLETED, wrote summary.json into the run dir the script names, and that the
ranks ran on the nodes the script asked for (summary.json ``nodes``, recorded per rank from
``MPISPLIT_NODE``, which jobscripts/common.sh sets to ``SLURMD_NODENAME`` -- every "node"
here shares one hostname).

Launch on this one-machine cluster: Debian's srun lists ``pmix`` but its plugin cannot load
without libpmix-dev (and two slurmd on one host would share PMIx's /tmp dirs), so the
srun tests set ``MPISPLIT_SRUN_MPI=pmi2`` (MPICH's PMI client talks to Slurm's pmi2
plugin); the mpiexec tests use hydra, which starts its proxies with srun.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

try:
    import mpisplit.cli  # noqa: F401

    ENGINE = True
except ImportError:
    ENGINE = False

pytestmark = pytest.mark.skipif(not ENGINE, reason="engine CLI not available")

JOBSCRIPTS = ROOT / "jobscripts"
CONFIGS = ROOT / "configs"
VANILLA = "configs/vanilla-breast-cancer.yaml"
SEQUENTIAL = "configs/vanilla-sequential-breast-cancer.yaml"
JOB_TIMEOUT_S = 240
TINY = ("train.epochs=1", "train.eval_every=0", "run.log_every=1000")


def config_clients(config: str) -> int:
    return int(yaml.safe_load((ROOT / config).read_text())["scheme"]["clients"])


class Submitted:
    """One submitted job script: its id, the base of its run dirs, its arguments."""

    def __init__(self, slurm, script: str, runs: Path, *args: str,
                 options: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.slurm, self.script, self.runs = slurm, script, runs
        runs.mkdir(parents=True, exist_ok=True)
        self.env = {"MPISPLIT_RUNS": str(runs), "MPISPLIT_SRUN_MPI": "pmi2", **(env or {})}
        self.id = slurm.submit(JOBSCRIPTS / script, *args, env=self.env, options=options,
                               output=runs / "%x-%j.out")
        self._state: str | None = None

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> str:
        if self._state is None:
            self._state = self.slurm.wait(self.id, timeout=timeout)
        return self._state

    def assert_completed(self) -> None:
        state = self.wait()
        assert state == "COMPLETED", f"{self.script}: {state}\n{self.slurm.describe(self.id)}"

    def hosts(self) -> list[str]:
        """The job's nodes, in order (first component's for a het job)."""
        (record, *_) = self.slurm.records(self.id)
        return self.slurm.run("scontrol", "show", "hostnames", record["NodeList"]).stdout.split()

    def run_dir(self, name: str | None = None) -> Path:
        if name is None:
            (record, *_) = self.slurm.records(self.id)
            name = f"{record['JobName']}-{self.id}"
        return self.runs / name

    def summary(self, name: str | None = None) -> dict:
        path = self.run_dir(name) / "summary.json"
        assert path.exists(), f"no {path}\n{self.slurm.describe(self.id)}"
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def data(dataset) -> dict[int, Path]:
    """Prepared breast-cancer data by number of clients (root conftest's ``dataset``)."""
    return {k: dataset("breast_cancer", clients=k) for k in (config_clients(VANILLA),)}


@pytest.fixture(scope="module")
def jobs(slurm, data: dict[int, Path], tmp_path_factory) -> dict[str, Submitted]:
    """All plain job-script runs, submitted at once so the cluster runs them side by side."""
    base = tmp_path_factory.mktemp("jobscripts")
    path3 = f"data.path={data[config_clients(VANILLA)]}"
    submitted = {
        "single": Submitted(slurm, "single-node.sbatch", base / "single", VANILLA, path3, *TINY),
        "multi-srun": Submitted(slurm, "multi-node.sbatch", base / "multi-srun",
                                VANILLA, path3, *TINY),
        "multi-mpiexec": Submitted(slurm, "multi-node.sbatch", base / "multi-mpiexec",
                                   VANILLA, path3, *TINY, env={"MPISPLIT_LAUNCHER": "mpiexec"}),
        "het": Submitted(slurm, "hetjob.sbatch", base / "het", VANILLA, path3, *TINY),
        # Tasks 1 and 2 of the 2 cuts x 2 configs grid: (head, parallel), (fc2, sequential).
        "sweep": Submitted(slurm, "sweep.sbatch", base / "sweep", path3, *TINY,
                           options=("--array=1-2",),
                           env={"MPISPLIT_SWEEP_CUTS": "fc2 head",
                                "MPISPLIT_SWEEP_CONFIGS": f"{VANILLA} {SEQUENTIAL}"}),
    }
    yield submitted
    for job in submitted.values():
        slurm.run("scancel", job.id, check=False)


def test_single_node(jobs: dict[str, Submitted]) -> None:
    job = jobs["single"]
    job.assert_completed()
    summary = job.summary()
    (record,) = job.slurm.records(job.id)
    assert summary["world_size"] == 4
    assert summary["nodes"] == [record["NodeList"]] * 4


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_multi_node_spreads_clients(jobs: dict[str, Submitted], launcher: str) -> None:
    job = jobs[f"multi-{launcher}"]
    job.assert_completed()
    summary = job.summary()
    # 2 nodes x 2 ranks, cyclic: server and client1 on the first, client0 and client2 on
    # the second.
    first, second = job.hosts()
    assert summary["nodes"] == [first, second, first, second], summary
    assert summary["roles"][0] == "server"
    out = job.slurm.output(job.id)
    assert f"launcher {launcher}" in out
    assert "ntasks check: config needs 4 ranks, job has 4" in out


def test_hetjob_server_on_gpu_partition(jobs: dict[str, Submitted]) -> None:
    job = jobs["het"]
    job.assert_completed()
    records = job.slurm.records(job.id)
    assert [r["Partition"] for r in records] == ["gpu", "debug"]
    summary = job.summary(f"mpisplit-het-{job.id}")
    # One MPI job over both components: rank 0 (server) on the gpu partition's node.
    assert summary["world_size"] == 4
    assert summary["roles"][0] == "server"
    assert summary["nodes"][0] == "n2"
    debug = set(job.slurm.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N").stdout.split())
    assert set(summary["nodes"][1:]) <= debug


def test_sweep_array_runs_each_task_in_its_own_dir(jobs: dict[str, Submitted]) -> None:
    job = jobs["sweep"]
    job.assert_completed()
    expected = {1: ("head", "parallel"), 2: ("fc2", "sequential")}
    for task, (cut, order) in expected.items():
        run = job.run_dir(f"sweep-{job.id}/{task}")
        summary = job.summary(f"sweep-{job.id}/{task}")
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["cuts"] == [cut]
        assert summary["client_order"] == order
        assert len(summary["nodes"]) == 4


def _optional_config(name: str) -> str:
    config = f"configs/{name}"
    if not (ROOT / config).exists():
        pytest.skip(f"{config} not in the checkout yet")
    return config


def test_ushaped(slurm, dataset, tmp_path: Path) -> None:
    config = _optional_config("ushaped-breast-cancer.yaml")
    path = dataset("breast_cancer", clients=config_clients(config))
    job = Submitted(slurm, "ushaped.sbatch", tmp_path, config, f"data.path={path}", *TINY)
    job.assert_completed()
    summary = job.summary()
    assert sorted(set(summary["nodes"])) == job.hosts()


def test_vertical_one_rank_per_node(slurm, dataset, tmp_path: Path) -> None:
    config = _optional_config("vertical-breast-cancer.yaml")
    path = dataset("breast_cancer", clients=config_clients(config), partition="vertical")
    args = (config, f"data.path={path}", *TINY)
    ntasks = int(slurm.run("mpisplit", "topology", *args, "--ntasks").stdout.split()[-1])
    nodes = int(slurm.run("sinfo", "-h", "-p", "debug", "-o", "%D").stdout.split()[0])
    if ntasks > nodes:
        pytest.skip(f"{config} needs {ntasks} nodes; the test cluster has {nodes}")
    job = Submitted(slurm, "vertical.sbatch", tmp_path, *args, options=(f"--nodes={ntasks}",))
    job.assert_completed()
    summary = job.summary()
    assert sorted(summary["nodes"]) == job.hosts() and len(job.hosts()) == ntasks


def _wait_for_training(job: Submitted, timeout: float = 120) -> None:
    """Until the run has started training (the engine wrote rank 0's metrics)."""
    deadline = time.monotonic() + timeout
    metrics = job.run_dir() / "metrics-rank0.jsonl"
    while not metrics.exists():
        assert time.monotonic() < deadline, f"no {metrics}\n{job.slurm.describe(job.id)}"
        assert job.slurm.state(job.id) in {"PENDING", "RUNNING", "CONFIGURING"}, \
            job.slurm.describe(job.id)
        time.sleep(0.5)


def test_preempted_job_is_requeued_and_finishes(slurm, data, tmp_path: Path) -> None:
    """`scontrol requeue` of a running training job: it runs again and records its result."""
    path = f"data.path={data[config_clients(VANILLA)]}"
    job = Submitted(slurm, "single-node.sbatch", tmp_path, VANILLA, path, "train.epochs=3",
                    "train.eval_every=0")
    _wait_for_training(job)
    assert slurm.state(job.id) == "RUNNING"
    slurm.run("scontrol", "requeue", job.id)
    job.assert_completed()
    (record,) = slurm.records(job.id)
    assert record["Restarts"] == "1"
    assert "(restart 1)" in slurm.output(job.id)
    assert job.summary()["world_size"] == 4


def test_usr1_checkpoints_requeues_and_the_job_resumes(slurm, data, tmp_path: Path) -> None:
    """The pre-emption warning (--signal=B:USR1@120, sent here by hand): common.sh forwards
    it to the job step (hydra's, via scancel); the ranks checkpoint and stop; the script
    requeues the job, whose second run resumes from that checkpoint and completes."""
    path = f"data.path={data[config_clients(SEQUENTIAL)]}"
    job = Submitted(slurm, "multi-node.sbatch", tmp_path, SEQUENTIAL, path, "train.epochs=20",
                    "train.eval_every=0", "checkpoint.every_steps=20",
                    env={"MPISPLIT_LAUNCHER": "mpiexec"})
    _wait_for_training(job)
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    job.assert_completed()
    (record,) = slurm.records(job.id)
    assert record["Restarts"] == "1", slurm.describe(job.id)
    out = slurm.output(job.id)  # --open-mode=append: both runs' logs
    assert "got SIGUSR1; forwarding it to the job step" in out
    assert f"requeueing job {job.id}" in out
    assert "(restart 1)" in out
    stopped = re.search(r"stopped by SIGUSR1; checkpoint at step (\d+) committed", out)
    assert stopped, out[-3000:]
    metrics = (job.run_dir() / "metrics-rank0.jsonl").read_text()
    assert f'"event": "resumed", "step": {stopped.group(1)}}}' in metrics
    first, second = job.hosts()
    assert job.summary()["nodes"] == [first, second, first, second]


def test_ntasks_mismatch_fails_with_clear_message(slurm, data, tmp_path: Path) -> None:
    path = f"data.path={data[config_clients(VANILLA)]}"
    job = Submitted(slurm, "single-node.sbatch", tmp_path, VANILLA, path, *TINY,
                    options=("--ntasks=3",))
    assert job.wait(timeout=120) == "FAILED", slurm.describe(job.id)
    out = slurm.output(job.id)
    assert "ntasks mismatch" in out and "needs 4 MPI ranks" in out and "has 3 Slurm tasks" in out
    assert "submit with --ntasks=4" in out
    assert not job.run_dir().exists()

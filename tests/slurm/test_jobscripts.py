"""The shipped Slurm job scripts (jobscripts/*.sbatch) on the local test cluster.

Each script is submitted as a user would (from the checkout root, with its own #SBATCH
header), with a tiny run (1 epoch of the breast-cancer data prepared into tmp); the tests
check the job COMPLETED, wrote summary.json into the run dir the script names, and that the
ranks ran on the nodes the script asked for (summary.json ``nodes``, recorded per rank from
``MPISPLIT_NODE``, which jobscripts/common.sh sets to ``SLURMD_NODENAME`` -- every "node"
here shares one hostname).

Launch: the srun jobs use common.sh's automatic ``srun --mpi`` choice, and the tests assert
which type it took from the job log. Here mpi4py runs on the MPICH wheel (PMI-1/2, not
PMIx), so that is pmi2 -- although Debian's srun also lists pmix (whose plugin cannot even
load here); the pmix branch (Open MPI) is not exercised by this tier. The mpiexec tests use
hydra, which starts its proxies with srun.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import GARBLED_RERUNS, PMI2_GARBLED

ROOT = Path(__file__).resolve().parents[2]

JOBSCRIPTS = ROOT / "jobscripts"
CONFIGS = ROOT / "configs"
VANILLA = "configs/vanilla-breast-cancer.yaml"
SEQUENTIAL = "configs/vanilla-sequential-breast-cancer.yaml"
JOB_TIMEOUT_S = 420
pytestmark = pytest.mark.timeout(900)  # a garbled start-up's reruns come on top of a job
TINY = ("train.epochs=1", "train.eval_every=0", "run.log_every=1000")
RANK_LINE = re.compile(
    r"mpisplit-job: rank (\d+) on (\S+) \(local (\S+)\): "
    r"OMP_NUM_THREADS=(\d+) CUDA_VISIBLE_DEVICES=(\S+)"
)
CONTINUE = re.compile(
    r"^mpisplit-job: to continue from the checkpoint at step (\d+): (.*)$", re.MULTILINE
)


def _expected_srun_mpi() -> str:
    """The --mpi type common.sh must pick here: pmix for a PMIx-based MPI (Open MPI), pmi2
    for MPICH (srun here offers both)."""
    library = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mpi4py; mpi4py.rc.initialize = False\n"
            "from mpi4py import MPI; print(MPI.Get_library_version())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return "pmix" if "Open MPI" in library else "pmi2"


def config_clients(config: str) -> int:
    return int(yaml.safe_load((ROOT / config).read_text())["scheme"]["clients"])


class Submitted:
    """One submitted job script: its id, the base of its run dirs, its arguments."""

    def __init__(
        self,
        slurm,
        script: str,
        runs: Path,
        *args: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.slurm, self.script, self.runs = slurm, script, runs
        runs.mkdir(parents=True, exist_ok=True)
        self.env = {"MPISPLIT_RUNS": str(runs), **(env or {})}
        self.args, self.options = args, options
        self.id = self._submit()
        self.garbled: str | None = None
        """The last garbled job's id, where a PMI-2 start-up was garbled and it ran again."""
        self._state: str | None = None

    def _submit(self) -> str:
        return self.slurm.submit(
            JOBSCRIPTS / self.script,
            *self.args,
            env=self.env,
            options=self.options,
            output=self.runs / "%x-%j.out",
        )

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> str:
        """The job's final state. A job whose ranks died in MPI start-up because srun's
        pmi2 plugin got a garbled request (``PMI2_GARBLED``) runs again, alone on the
        cluster: nothing of it had started."""
        if self._state is None:
            self._state = self.slurm.wait(self.id, timeout=timeout)
            for _ in range(GARBLED_RERUNS):
                if self._state != "FAILED" or PMI2_GARBLED not in self.slurm.output(self.id):
                    break
                self.slurm.wait_until_empty()
                self.garbled, self.id = self.id, self._submit()
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

    def metrics_headers(self, name: str | None = None) -> list[dict]:
        """The first record ("start") of each rank's metrics-rank<R>.jsonl, by rank."""
        files = sorted(
            self.run_dir(name).glob("metrics-rank*.jsonl"),
            key=lambda f: int(f.stem.removeprefix("metrics-rank")),
        )
        return [json.loads(f.read_text().splitlines()[0]) for f in files]

    def rank_lines(self) -> dict[int, tuple[str, int, str]]:
        """common.sh's per-rank line: rank -> (node, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES)."""
        return {
            int(m[1]): (m[2], int(m[4]), m[5])
            for m in RANK_LINE.finditer(self.slurm.output(self.id))
        }

    def local_ranks(self) -> dict[int, tuple[str, str]]:
        """rank -> (local rank, CUDA_VISIBLE_DEVICES) from common.sh's per-rank lines."""
        return {int(m[1]): (m[3], m[5]) for m in RANK_LINE.finditer(self.slurm.output(self.id))}

    def metrics(self, rank: int = 0) -> list[dict]:
        path = self.run_dir() / f"metrics-rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def assert_srun_mpi(self, expected: str) -> None:
        out = self.slurm.output(self.id)
        assert f"mpisplit launch: launching with srun --mpi={expected} (" in out, out[-3000:]


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
        "multi-srun": Submitted(
            slurm, "multi-node.sbatch", base / "multi-srun", VANILLA, path3, *TINY
        ),
        "multi-mpiexec": Submitted(
            slurm,
            "multi-node.sbatch",
            base / "multi-mpiexec",
            VANILLA,
            path3,
            *TINY,
            env={"MPISPLIT_LAUNCHER": "mpiexec"},
        ),
        "het": Submitted(slurm, "hetjob.sbatch", base / "het", VANILLA, path3, *TINY),
        # The script's own grid: its default cuts x configs over its default --array.
        "sweep": Submitted(
            slurm, "sweep.sbatch", base / "sweep", path3, *TINY, "train.max_steps=4"
        ),
        # The submitting shell's OMP_NUM_THREADS=1 (as tools/test.sh exports) must not win
        # over --cpus-per-task=2.
        "threads": Submitted(
            slurm,
            "multi-node.sbatch",
            base / "threads",
            VANILLA,
            path3,
            *TINY,
            "train.max_steps=4",
            options=("--cpus-per-task=2",),
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        ),
        # One node with two (declared) GPUs and four ranks, under either launcher.
        **{
            f"gpus-{launcher}": Submitted(
                slurm,
                "single-node.sbatch",
                base / f"gpus-{launcher}",
                VANILLA,
                path3,
                *TINY,
                "train.max_steps=4",
                options=("--partition=gpu", "--gres=gpu:2"),
                env={"MPISPLIT_LAUNCHER": launcher},
            )
            for launcher in ("srun", "mpiexec")
        },
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
    job.assert_srun_mpi(_expected_srun_mpi())


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
    if launcher == "srun":
        job.assert_srun_mpi(_expected_srun_mpi())
    else:
        assert "launching with srun" not in out
    assert {rank: node for rank, (node, _, _) in job.rank_lines().items()} == dict(
        enumerate(summary["nodes"])
    )


def test_cpus_per_task_sets_torch_threads(jobs: dict[str, Submitted]) -> None:
    job = jobs["threads"]
    job.assert_completed()
    (record,) = job.slurm.records(job.id)
    assert record["NumCPUs"] == "8", record
    headers = job.metrics_headers()
    assert [h["rank"] for h in headers] == [0, 1, 2, 3]
    assert [h["threads"] for h in headers] == [2, 2, 2, 2], headers
    assert [threads for _, threads, _ in job.rank_lines().values()] == [2, 2, 2, 2]


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_each_local_rank_binds_its_own_gpu(jobs: dict[str, Submitted], launcher: str) -> None:
    """Four ranks on a node with two GPUs: local ranks 0..3 keep GPUs 0, 1, 0, 1. Under
    mpiexec the ranks inherit SLURM_LOCALID=0 from hydra's proxy, which is not theirs."""
    job = jobs[f"gpus-{launcher}"]
    job.assert_completed()
    assert f"launcher {launcher}" in job.slurm.output(job.id)
    assert job.local_ranks() == {0: ("0", "0"), 1: ("1", "1"), 2: ("2", "0"), 3: ("3", "1")}


def _partition_nodes(slurm, partition: str) -> set[str]:
    return set(slurm.run("sinfo", "-h", "-N", "-p", partition, "-o", "%N").stdout.split())


def test_hetjob_server_on_gpu_partition(jobs: dict[str, Submitted]) -> None:
    job = jobs["het"]
    job.assert_completed()
    records = job.slurm.records(job.id)
    assert [r["Partition"] for r in records] == ["gpu", "debug"]
    assert "gpu:1" in records[0].get("TresPerNode", ""), records[0]
    summary = job.summary(f"mpisplit-het-{job.id}")
    # One MPI job over both components: rank 0 (server) on the gpu partition's node, the
    # clients on CPU nodes (the partitions do not overlap).
    gpu, debug = _partition_nodes(job.slurm, "gpu"), _partition_nodes(job.slurm, "debug")
    assert gpu and not gpu & debug
    assert summary["world_size"] == 4
    assert summary["roles"][0] == "server"
    assert summary["nodes"][0] in gpu
    assert set(summary["nodes"][1:]) <= debug
    # Slurm gave the server rank its GPU (index 0 of g1's one GPU; no real device here);
    # the clients did not inherit the batch shell's CUDA_VISIBLE_DEVICES.
    ranks = job.rank_lines()
    assert sorted(ranks) == [0, 1, 2, 3], job.slurm.output(job.id)[-3000:]
    assert ranks[0][2] == "0"
    assert [ranks[r][2] for r in (1, 2, 3)] == ["unset"] * 3
    job.assert_srun_mpi(_expected_srun_mpi())
    # The start line names both components' nodes.
    assert (
        f" on {records[0]['NodeList']} + {records[1]['NodeList']}: launcher srun"
        in job.slurm.output(job.id)
    )


def test_sweep_array_runs_each_task_in_its_own_dir(jobs: dict[str, Submitted]) -> None:
    """sweep.sbatch as shipped: --array=0-3 over cuts (fc2, head) x (vanilla, SplitFed)."""
    job = jobs["sweep"]
    job.assert_completed()
    records = job.slurm.records(job.id)
    assert sorted(int(r["ArrayTaskId"]) for r in records) == [0, 1, 2, 3], records
    expected = {
        0: ("fc2", "vanilla"),
        1: ("head", "vanilla"),
        2: ("fc2", "splitfed"),
        3: ("head", "splitfed"),
    }
    for task, (cut, scheme) in expected.items():
        run = job.run_dir(f"sweep-{job.id}/{task}")
        summary = job.summary(f"sweep-{job.id}/{task}")
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["cuts"] == [cut], task
        assert summary["scheme"] == scheme, task
        assert len(summary["nodes"]) == 4


def test_ushaped(slurm, dataset, tmp_path: Path) -> None:
    config = "configs/ushaped-breast-cancer.yaml"
    path = dataset("breast_cancer", clients=config_clients(config))
    job = Submitted(slurm, "ushaped.sbatch", tmp_path, config, f"data.path={path}", *TINY)
    job.assert_completed()
    summary = job.summary()
    # 2 nodes x 2 ranks, cyclic (as multi-node.sbatch): server and client1 on the first.
    first, second = job.hosts()
    assert summary["nodes"] == [first, second, first, second], summary
    assert summary["scheme"] == "ushaped" and summary["roles"][0] == "server"


def test_vertical_one_rank_per_node(slurm, dataset, tmp_path: Path) -> None:
    """vertical.sbatch with its own header (--nodes=4 --ntasks-per-node=1)."""
    config = "configs/vertical-breast-cancer.yaml"
    path = dataset("breast_cancer", clients=config_clients(config), partition="vertical")
    args = (config, f"data.path={path}", *TINY)
    ntasks = int(slurm.run("mpisplit", "topology", *args, "--ntasks").stdout.split()[-1])
    header = re.search(
        r"^#SBATCH --ntasks=(\d+)$", (JOBSCRIPTS / "vertical.sbatch").read_text(), re.MULTILINE
    )
    assert header and int(header[1]) == ntasks, "vertical.sbatch's --ntasks != the config's ranks"
    nodes = len(_partition_nodes(slurm, "debug"))
    assert ntasks <= nodes, f"{config} needs {ntasks} nodes; the test cluster has {nodes}"
    # More ranks than the partition has nodes: sbatch refuses at once (it does not pend).
    refused = slurm.run(
        "sbatch", f"--ntasks={nodes + 1}", str(JOBSCRIPTS / "vertical.sbatch"), check=False
    )
    assert refused.returncode != 0, refused.stdout
    assert "Requested node configuration is not available" in refused.stderr
    job = Submitted(slurm, "vertical.sbatch", tmp_path, *args)
    job.assert_completed()
    summary = job.summary()
    hosts = job.hosts()
    assert len(hosts) == ntasks
    assert summary["nodes"] == hosts, summary  # rank i on the job's i-th node


def _wait_for_training(job: Submitted, timeout: float = 120) -> None:
    """Until the run has started training (the engine wrote rank 0's metrics)."""
    deadline = time.monotonic() + timeout
    metrics = job.run_dir() / "metrics-rank0.jsonl"
    while not metrics.exists():
        assert time.monotonic() < deadline, f"no {metrics}\n{job.slurm.describe(job.id)}"
        assert job.slurm.state(job.id) in {"PENDING", "RUNNING", "CONFIGURING"}, job.slurm.describe(
            job.id
        )
        time.sleep(0.5)


def _fnv1a(text: str) -> str:
    """MPICH's hash of the PMI key space ("<job>.<step>" under srun) in its segment names."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:x}"


def test_preempted_job_is_requeued_and_finishes(slurm, data, tmp_path: Path) -> None:
    """`scontrol requeue` of a running training job: it runs again and records its result.
    The killed run leaves its MPICH shared-memory segment behind, which the restart would
    attach to: local rank 0 removes it first -- and only it, not another job's stale one."""
    path = f"data.path={data[config_clients(VANILLA)]}"
    job = Submitted(
        slurm, "single-node.sbatch", tmp_path, VANILLA, path, "train.epochs=3", "train.eval_every=0"
    )
    _wait_for_training(job)
    assert slurm.state(job.id) == "RUNNING"
    other = Path(f"/dev/shm/mpich_shm_{_fnv1a(f'{int(job.id) + 1}.0')}_0")
    other.write_bytes(b"")  # another job's, as stale (mapped by no process)
    try:
        slurm.run("scontrol", "requeue", job.id)
        job.assert_completed()
        assert other.exists(), "the restart removed another job's shared memory"
    finally:
        other.unlink(missing_ok=True)
    (record,) = slurm.records(job.id)
    assert record["Restarts"] == "1"
    out = slurm.output(job.id)
    assert "(restart 1)" in out
    assert f"removed stale /dev/shm/mpich_shm_{_fnv1a(f'{job.id}.0')}_0" in out, out[-3000:]
    assert job.summary()["world_size"] == 4


def test_usr1_checkpoints_requeues_and_the_job_resumes(slurm, data, tmp_path: Path) -> None:
    """The pre-emption warning (--signal=B:USR1@120, sent here by hand): common.sh forwards
    it to the job step (hydra's, via scancel); the ranks checkpoint and stop; the script
    requeues the job, whose second run resumes from that checkpoint and completes."""
    path = f"data.path={data[config_clients(SEQUENTIAL)]}"
    job = Submitted(
        slurm,
        "multi-node.sbatch",
        tmp_path,
        SEQUENTIAL,
        path,
        "train.epochs=20",
        "train.eval_every=0",
        "checkpoint.every_steps=20",
        env={"MPISPLIT_LAUNCHER": "mpiexec"},
    )
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
    step = int(stopped.group(1))
    assert [r["step"] for r in job.metrics() if r.get("event") == "resumed"] == [step]
    assert f"resumed from step {step} (checkpoint " in out
    assert f"it resumes from the checkpoint at step {step}" in out
    summary = job.summary()
    first, second = job.hosts()
    assert summary["nodes"] == [first, second, first, second]
    # The summary covers both runs of the job: each rank's bytes are what it sent up to the
    # checkpoint (kept in the checkpoint) plus after the resume; the time, both runs'. The
    # metrics read as one run: cut back to the checkpoint on resume, so the first launch's
    # "preempted" record is gone and each step is recorded once.
    assert summary["launches"] == 2 and summary["last_launch"]["resumed_from_step"] == step
    afters = []
    for rank, sent in enumerate(summary["bytes_sent_per_rank"]):
        records = job.metrics(rank)
        assert not [r for r in records if r.get("event") == "preempted"]
        (after,) = [r["bytes_sent"] for r in records if r.get("event") == "end"]
        assert sent >= after and summary["last_launch"]["bytes_sent_per_rank"][rank] == after
        afters.append(after)
        steps = [r["step"] for r in records if "event" not in r and "step" in r]
        assert len(steps) == len(set(steps)), f"rank {rank}: a step recorded twice"
    assert sum(summary["bytes_sent_per_rank"]) > sum(afters)  # the first launch's bytes count
    (end,) = [r for r in job.metrics() if r.get("event") == "end"]
    assert summary["wall_time_s"] > end["wall_s"] + 0.1
    assert summary["samples_per_s"] == pytest.approx(  # wall_time_s is rounded to 0.1 ms
        summary["train_samples"] / summary["wall_time_s"], rel=1e-4
    )


def test_ntasks_mismatch_fails_with_clear_message(slurm, data, tmp_path: Path) -> None:
    path = f"data.path={data[config_clients(VANILLA)]}"
    job = Submitted(
        slurm, "single-node.sbatch", tmp_path, VANILLA, path, *TINY, options=("--ntasks=3",)
    )
    assert job.wait(timeout=120) == "FAILED", slurm.describe(job.id)
    out = slurm.output(job.id)
    assert "ntasks mismatch" in out and "needs 4 MPI ranks" in out and "has 3 Slurm tasks" in out
    assert "submit with --ntasks=4" in out
    assert f"(see `mpisplit topology {VANILLA} {path} {' '.join(TINY)}`)" in out  # overrides kept
    assert not job.run_dir().exists()


# A hook the job's Python processes load (PYTHONPATH): in a job's first run, `mpisplit
# COMMAND` processes wait at their exit (after main has returned: a rank has written what it
# writes and only exits) until the test opens the gate -- so that a signal can be sent then.
EXIT_GATE = """import atexit, os, sys, time
command, gate = os.environ["MPISPLIT_TEST_EXIT_GATE"].split(":", 1)
if sys.argv[1:2] == [command] and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    def hold():
        open(os.path.join(gate, f"held-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
            time.sleep(0.05)
    atexit.register(hold)
"""


def _exit_gate(tmp_path: Path, command: str) -> tuple[Path, dict[str, str]]:
    """The gate directory and the job environment that holds `mpisplit COMMAND` there."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(EXIT_GATE)
    return gate, {"PYTHONPATH": str(gate), "MPISPLIT_TEST_EXIT_GATE": f"{command}:{gate}"}


def _wait_until(condition, job: Submitted, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}\n{job.slurm.describe(job.id)}"
        time.sleep(0.2)


def test_usr1_after_the_final_summary_neither_kills_nor_requeues(
    slurm, data, tmp_path: Path
) -> None:
    """The time-limit warning comes after training has finished, while the ranks exit: they
    ignore it (the engine no longer handles USR1 by dying), and the job is not requeued."""
    gate, env = _exit_gate(tmp_path, "train")
    job = Submitted(
        slurm,
        "single-node.sbatch",
        tmp_path,
        VANILLA,
        f"data.path={data[config_clients(VANILLA)]}",
        *TINY,
        env=env,
    )
    _wait_until(lambda: len(list(gate.glob("held-*"))) == 4, job, "the ranks never exited")
    assert "preempted" not in job.summary()
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    _wait_until(
        lambda: (
            slurm.output(job.id).count("SIGUSR1 after training had finished: ignored") == 4
            or slurm.state(job.id) != "RUNNING"
        ),
        job,
        "USR1 never reached the ranks",
    )
    (gate / "open").touch()
    job.assert_completed()
    (record,) = slurm.records(job.id)
    assert record["Restarts"] == "0"
    out = slurm.output(job.id)
    assert "pre-emption warning (USR1), but the run finished first; not requeued" in out
    assert [r["event"] for r in job.metrics() if r.get("event") in ("end", "start")] == [
        "start",
        "end",
    ]


def test_usr1_during_start_up_is_logged_and_requeues(slurm, data, tmp_path: Path) -> None:
    """The pre-emption warning while the script checks the task count, before the launch:
    the job says so and is requeued (its rerun completes), instead of dying unlogged."""
    gate, env = _exit_gate(tmp_path, "topology")
    job = Submitted(
        slurm,
        "single-node.sbatch",
        tmp_path,
        VANILLA,
        f"data.path={data[config_clients(VANILLA)]}",
        *TINY,
        env=env,
    )
    _wait_until(lambda: any(gate.glob("held-*")), job, "the task-count check never ran")
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    job.assert_completed()
    (record,) = slurm.records(job.id)
    assert record["Restarts"] == "1", slurm.describe(job.id)
    out = slurm.output(job.id)
    assert "got SIGUSR1 during start-up, before the launch" in out
    assert f"requeueing job {job.id} (nothing ran yet)" in out
    assert job.summary()["world_size"] == 4


def test_cancelled_run_continues_with_the_command_its_log_prints(
    slurm, data, tmp_path: Path
) -> None:
    """`scancel` sends TERM: the ranks commit a checkpoint and the job ends CANCELLED, its log
    ending with the exact command that continues the run; run as printed (from anywhere), it
    resumes there and finishes, its summary covering both jobs."""
    job = Submitted(
        slurm,
        "single-node.sbatch",
        tmp_path,
        SEQUENTIAL,
        f"data.path={data[config_clients(SEQUENTIAL)]}",
        "train.epochs=4",
        "train.eval_every=0",
        "checkpoint.every_steps=5",
    )
    checkpoints = job.run_dir() / "checkpoints"
    _wait_until(lambda: any(checkpoints.glob("step-*/COMMITTED")), job, "no checkpoint")
    slurm.run("scancel", job.id)
    assert job.wait() == "CANCELLED", slurm.describe(job.id)
    out = slurm.output(job.id)
    stopped = re.search(r"stopped by SIGTERM; checkpoint at step (\d+) committed", out)
    printed = CONTINUE.search(out)
    assert stopped and printed, out[-3000:]
    assert printed[1] == stopped[1]
    assert f" jobscripts/single-node.sbatch --resume {SEQUENTIAL} " in printed[2]
    submitted = slurm.run(
        "bash", "-c", printed[2], env={"SBATCH_OUTPUT": str(tmp_path / "%x-%j.out")}
    ).stdout  # not into the checkout
    resumed = submitted.split()[-1]
    assert slurm.wait(resumed, timeout=JOB_TIMEOUT_S) == "COMPLETED", slurm.describe(resumed)
    assert f"resumed from step {stopped[1]} (checkpoint " in slurm.output(resumed)
    summary = job.summary()
    assert summary["launches"] == 2 and summary["last_launch"]["resumed_from_step"] == int(
        stopped[1]
    )


STUDY = """\
config: configs/vanilla-breast-cancer.yaml
out: {out}
prepare: {{dataset: breast_cancer, clients: 2, out: "{data}/bc-2c"}}
overrides:
  scheme.clients: 2
  data.path: {data}/bc-2c
  train.max_steps: 4
  run.progress: none
  run.save_model: false
axes:
  arm:
    split: {{}}
    alone: {{scheme.name: centralized, scheme.clients: 1, data.clients: [0]}}
  train.seed: [0, 1]
"""
SUBMITTED = re.compile(r"^sweep: (\S+): Submitted batch job (\d+)$", re.MULTILINE)


def test_sweep_study_runs_as_slurm_arrays(slurm, tmp_path: Path) -> None:
    """README, Studies: `mpisplit sweep FILE --slurm --submit` on a real cluster: one array
    per rank count (3 ranks for split learning, 1 for a site alone), every point finishes in
    its own run directory, and the sweep then lists every point as finished."""
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(out=tmp_path / "out", data=tmp_path))
    mpisplit = (sys.executable, "-m", "mpisplit", "sweep", str(study))
    submitted = slurm.run(*mpisplit, "--slurm", "--submit", timeout=300)
    arrays = dict(SUBMITTED.findall(submitted.stdout))
    assert sorted(Path(s).name for s in arrays) == ["ntasks-1.sbatch", "ntasks-3.sbatch"], (
        submitted.stdout
    )
    for job_id in arrays.values():
        state = slurm.wait(job_id, timeout=JOB_TIMEOUT_S)
        assert state == "COMPLETED", slurm.describe(job_id)
    # "steps" counts client steps: 4 per client.
    for name, world_size, steps in [
        ("arm-split_seed-0", 3, 8),
        ("arm-split_seed-1", 3, 8),
        ("arm-alone_seed-0", 1, 4),
        ("arm-alone_seed-1", 1, 4),
    ]:
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert (summary["world_size"], summary["steps"]) == (world_size, steps), name
    listed = slurm.run(*mpisplit, "--list").stdout.splitlines()
    assert len(listed) == 4 and all(line.endswith("finished") for line in listed), listed

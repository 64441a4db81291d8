"""The Slurm test cluster itself: multi-node batch jobs and requeue work."""

from __future__ import annotations

import time
from pathlib import Path

TWO_NODE_SCRIPT = """#!/bin/bash
#SBATCH --job-name=hello
#SBATCH -N 2 --ntasks-per-node=1
echo "batch on $SLURMD_NODENAME"
srun bash -c 'echo "task $SLURM_PROCID on $SLURMD_NODENAME ($(hostname))"'
"""

# First run: waits (forever) to be requeued; the requeued run (restart 1) completes.
REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --job-name=requeue -N 1 -n 1 --requeue
echo "run ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  touch "$MARK"
  sleep 600
fi
echo done >"$DONE"
"""


def test_cluster_nodes_idle_and_gpu_partition_is_g1(slurm) -> None:
    nodes = slurm.run("sinfo", "-h", "-N", "-o", "%N %P %c %t %G").stdout.split("\n")
    rows = {tuple(line.split()) for line in nodes if line.strip()}
    cpu = {(f"n{i}", "debug*", "8", "idle", "(null)") for i in (1, 2, 3, 4)}
    assert rows == cpu | {("g1", "gpu", "8", "idle", "gpu:2")}, rows


def test_two_node_batch_job_runs_on_both_nodes(slurm, tmp_path: Path) -> None:
    script = tmp_path / "hello.sbatch"
    script.write_text(TWO_NODE_SCRIPT)
    job = slurm.submit(script)
    assert slurm.wait(job, timeout=60) == "COMPLETED", slurm.describe(job)
    out = slurm.output(job)
    assert "batch on n1" in out
    assert {line.split()[3] for line in out.splitlines() if line.startswith("task ")} == {
        "n1",
        "n2",
    }, out
    (record,) = slurm.records(job)
    assert record["NodeList"] == "n[1-2]"


def test_requeue_of_running_job_then_completes(slurm, tmp_path: Path) -> None:
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    mark, done = tmp_path / "running", tmp_path / "done"
    job = slurm.submit(script, env={"MARK": str(mark), "DONE": str(done)})
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert time.monotonic() < deadline, slurm.describe(job)
        time.sleep(0.2)
    slurm.run("scontrol", "requeue", job)
    # cluster.sh sets cred_expire=10: the requeued job is eligible again ~11 s later.
    assert slurm.wait(job, timeout=90) == "COMPLETED", slurm.describe(job)
    (record,) = slurm.records(job)
    assert record["Restarts"] == "1"
    assert done.read_text().strip() == "done"

"""jobscripts/common.sh's per-rank wrapper (``common.sh task CMD``) without Slurm.

What each rank's environment becomes: the GPU it keeps of CUDA_VISIBLE_DEVICES (by local
rank from srun or hydra), its thread count, its node name. The wrapper runs ``env`` here
instead of the engine, with only the launcher variables a test sets.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "jobscripts" / "common.sh"
# Variables the wrapper reads; none of the test process's own may leak in.
_LAUNCHER_PREFIXES = ("SLURM", "MPI_", "PMI", "OMPI_", "CUDA_", "MPISPLIT", "OMP_", "MKL_")


def task_env(**variables: str) -> dict[str, str]:
    """Environment that ``common.sh task env`` hands its command, given ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    proc = subprocess.run(["bash", str(COMMON), "task", "env"], capture_output=True, text=True,
                          timeout=30, env={**env, **variables})
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize(("local_rank", "gpu"), [("0", "0"), ("1", "1"), ("3", "3"), ("5", "1")])
def test_each_local_rank_keeps_one_of_the_visible_gpus(local_rank: str, gpu: str) -> None:
    env = task_env(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_LOCALID=local_rank)
    assert env["CUDA_VISIBLE_DEVICES"] == gpu


def test_binding_keeps_the_ids_slurm_gave() -> None:
    env = task_env(CUDA_VISIBLE_DEVICES="4,6", SLURM_LOCALID="1")
    assert env["CUDA_VISIBLE_DEVICES"] == "6"


@pytest.mark.parametrize("local_rank", ["0", "1", "2", "3"])
def test_one_shared_gpu_stays_shared(local_rank: str) -> None:
    assert task_env(CUDA_VISIBLE_DEVICES="0", SLURM_LOCALID=local_rank)["CUDA_VISIBLE_DEVICES"] \
        == "0"


def test_gpu_bind_none_leaves_the_list() -> None:
    env = task_env(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_LOCALID="2", MPISPLIT_GPU_BIND="none")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_hydra_local_rank() -> None:
    env = task_env(CUDA_VISIBLE_DEVICES="0,1,2,3", MPI_LOCALRANKID="2")
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_no_local_rank_no_binding() -> None:
    assert task_env(CUDA_VISIBLE_DEVICES="0,1")["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_no_gpus_none_invented() -> None:
    assert "CUDA_VISIBLE_DEVICES" not in task_env(SLURM_LOCALID="1")


@pytest.mark.parametrize(("variables", "threads"), [
    ({}, "1"),
    ({"OMP_NUM_THREADS": "3"}, "3"),
    # sbatch exports the submitter's OMP_NUM_THREADS: the job's request wins over it.
    ({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, "2"),
    ({"SLURM_CPUS_PER_TASK": "2", "MPISPLIT_THREADS": "4"}, "4"),
])
def test_threads(variables: dict[str, str], threads: str) -> None:
    env = task_env(**variables)
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (threads, threads)


def test_node_name_from_slurmd() -> None:
    assert task_env(SLURMD_NODENAME="n7")["MPISPLIT_NODE"] == "n7"

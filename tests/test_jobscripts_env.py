"""jobscripts/common.sh's per-rank wrapper (``common.sh task CMD``) without Slurm.

What each rank's environment becomes: the GPU it keeps of CUDA_VISIBLE_DEVICES (by local
rank from srun or hydra), its thread count, its node name. The wrapper runs ``env`` here
instead of the engine, with only the launcher variables a test sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "jobscripts" / "common.sh"
CONFIG = "configs/vanilla-breast-cancer.yaml"
# Variables the wrapper reads; none of the test process's own may leak in.
_LAUNCHER_PREFIXES = ("SLURM", "MPI_", "PMI", "OMPI_", "CUDA_", "MPISPLIT", "OMP_", "MKL_")


def task_env(**variables: str) -> dict[str, str]:
    """Environment that ``common.sh task env`` hands its command, given ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    proc = subprocess.run(
        ["bash", str(COMMON), "task", "env"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, **variables},
    )
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
    assert (
        task_env(CUDA_VISIBLE_DEVICES="0", SLURM_LOCALID=local_rank)["CUDA_VISIBLE_DEVICES"] == "0"
    )


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


@pytest.mark.parametrize(
    ("variables", "threads"),
    [
        ({}, "1"),
        ({"OMP_NUM_THREADS": "3"}, "3"),
        # sbatch exports the submitter's OMP_NUM_THREADS: the job's request wins over it.
        ({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, "2"),
        ({"SLURM_CPUS_PER_TASK": "2", "MPISPLIT_THREADS": "4"}, "4"),
    ],
)
def test_threads(variables: dict[str, str], threads: str) -> None:
    env = task_env(**variables)
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (threads, threads)


def test_node_name_from_slurmd() -> None:
    assert task_env(SLURMD_NODENAME="n7")["MPISPLIT_NODE"] == "n7"


def test_mpiexec_ranks_take_hydras_local_rank_not_the_proxys_slurm_localid() -> None:
    """Under MPISPLIT_LAUNCHER=mpiexec the ranks inherit SLURM_LOCALID=0 from the proxy srun
    started on their node: hydra's MPI_LOCALRANKID is theirs."""
    env = task_env(
        CUDA_VISIBLE_DEVICES="0,1",
        SLURM_LOCALID="0",
        MPI_LOCALRANKID="1",
        MPISPLIT_LAUNCHER="mpiexec",
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


def test_mpiexec_without_a_local_rank_leaves_the_gpus_to_the_engine() -> None:
    env = task_env(CUDA_VISIBLE_DEVICES="0,1", SLURM_LOCALID="0", MPISPLIT_LAUNCHER="mpiexec")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def _fnv1a(text: str) -> str:
    """MPICH's hash of a PMI key space name (32-bit FNV-1a), for its segment names."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:x}"


def test_restart_removes_this_job_steps_stale_segments_only(tmp_path: Path) -> None:
    """On a restart local rank 0 removes the unmapped MPICH segments named after this job
    step ("<job>.<step>"); another job's, stale as well, stay (a node may be shared)."""
    job = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    ours = [Path(f"/dev/shm/mpich_{kind}_{_fnv1a(f'{job}.0')}_0") for kind in ("shm", "vci")]
    theirs = Path(f"/dev/shm/mpich_shm_{_fnv1a(f'{job}1.0')}_0")
    try:
        for path in [*ours, theirs]:
            path.write_bytes(b"")
        task_env(SLURM_RESTART_COUNT="1", SLURM_LOCALID="0", SLURM_JOB_ID=job, SLURM_STEP_ID="0")
        assert [path.exists() for path in ours] == [False, False]
        assert theirs.exists()
    finally:
        for path in [*ours, theirs]:
            path.unlink(missing_ok=True)


def job_shell(script: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``script`` run in bash after sourcing common.sh (as a job script does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    return subprocess.run(
        ["bash", "-c", f'. "{COMMON}"; {script}'],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **variables},
        cwd=ROOT,
    )


def test_without_mpisplit_on_path_the_job_stops_with_one_line_saying_how_to_fix_it(
    tmp_path: Path,
) -> None:
    """A job submitted without the venv active: mpisplit is not on PATH and the python3
    there lacks its packages -- one line, exit 2, no traceback."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")],
        check=True,
        timeout=120,
    )
    proc = job_shell("mpisplit_setup", PATH=f"{tmp_path / 'bare' / 'bin'}:/usr/bin:/bin")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "mpisplit is not on PATH in this job" in line and ". .venv/bin/activate" in line


def test_script_arguments_take_resume_and_refuse_unknown_options() -> None:
    show = 'echo "${MPISPLIT_TRAIN_OPTS[*]}|$MPISPLIT_CONFIG|${MPISPLIT_ARGS[*]}"'
    proc = job_shell(f"mpisplit_args {CONFIG} a.b=1 --resume; {show}")
    assert proc.stdout.strip() == f"--resume|{CONFIG}|a.b=1", proc.stderr
    proc = job_shell(f"mpisplit_args other.yaml {CONFIG} a.b=1; {show}")
    assert proc.stdout.strip() == f"|{CONFIG}|a.b=1", proc.stderr
    proc = job_shell(f"mpisplit_args {CONFIG} --nodes=5")
    assert proc.returncode == 2 and "unknown option '--nodes=5'" in proc.stderr


def test_start_line_names_every_het_components_nodes() -> None:
    proc = job_shell(
        "mpisplit_setup",
        PATH=os.environ["PATH"],
        SLURM_HET_SIZE="2",
        SLURM_JOB_NODELIST="g1",
        SLURM_JOB_NODELIST_HET_GROUP_0="g1",
        SLURM_JOB_NODELIST_HET_GROUP_1="n[1-3]",
        MPISPLIT="mpisplit",
    )
    assert " on g1 + n[1-3]: launcher srun" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("variables", "options", "launch"),
    [
        ({"MPISPLIT_LAUNCHER": "srun"}, "", "--launcher srun --"),
        ({"MPISPLIT_LAUNCHER": "mpiexec", "SLURM_NTASKS": "4"}, "", "--launcher mpiexec -n 4 --"),
        # A heterogeneous job launches with srun over its components, whatever was asked.
        (
            {"MPISPLIT_LAUNCHER": "mpiexec", "SLURM_HET_SIZE": "2"},
            "--het-group=0,1",
            "--launcher srun --het-group=0,1 --",
        ),
    ],
)
def test_the_job_step_starts_through_mpisplit_launch(
    variables: dict[str, str], options: str, launch: str
) -> None:
    """mpisplit_launch hands the launch line to `mpisplit launch` (here `echo`, which prints
    what it was asked), each rank wrapped in `common.sh task`."""
    proc = job_shell(
        f"mpisplit_launch {options} -- true run",
        PATH=os.environ["PATH"],
        MPISPLIT="echo",
        **variables,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"launch --verbose {launch} {COMMON} task true run"

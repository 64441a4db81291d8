"""``mpisplit launch``: one way to start a job on whichever MPI mpi4py loads.

Runs real jobs with the environment's launcher (MPICH's or Open MPI's ``mpiexec``; as root
and on 2 cores with 4 ranks, which Open MPI refuses without the launcher's settings)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mpisplit.launch import Launcher, find
from tests.conftest import MPIEXEC_TIMEOUT_S, ROOT

BIN = Path(sys.executable).parent
README_LAUNCH = (
    "mpisplit launch -n 4 -- mpisplit train configs/vanilla-breast-cancer.yaml "
    "train.epochs=5 run.dir=runs/try"
)
README_PRINT = "mpisplit launch -n 4 --print -- mpisplit train configs/vanilla-breast-cancer.yaml"


def _mpisplit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "mpisplit", *args],
        capture_output=True,
        text=True,
        timeout=MPIEXEC_TIMEOUT_S,
        env=env,
        cwd=cwd,
    )


def test_launcher_matches_the_library_mpi4py_loads() -> None:
    """The environment's mpiexec is identified as the MPI library mpi4py loads."""
    library = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mpi4py; mpi4py.rc.initialize = False; "
            "from mpi4py import MPI; print(MPI.Get_library_version())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    launcher = find("mpiexec")
    assert launcher.kind == "mpiexec"
    assert launcher.flavor == ("openmpi" if "Open MPI" in library else "mpich")
    assert ".".join(map(str, launcher.version)) in library


def test_ranks_start_and_see_each_other() -> None:
    """Four ranks on a 2-core machine (Open MPI: oversubscription; as root: allowed)."""
    program = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "ranks = c.gather(c.Get_rank()); total = c.allreduce(1); "
        "c.Get_rank() or print(sorted(ranks), total, flush=True)"
    )
    result = _mpisplit("launch", "-n", "4", "--", sys.executable, "-c", program)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2:] == ["[0, 1, 2, 3] 4", ""], result.stdout


def test_print_shows_the_command_and_settings() -> None:
    """README's ``--print`` line, exactly as written."""
    assert README_PRINT in (ROOT / "README.md").read_text()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", README_PRINT], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    launcher = find("mpiexec")
    assert words[-9:] == [
        launcher.program,
        "-n",
        "4",
        sys.executable,
        "-m",
        "mpisplit.supervise",
        "mpisplit",
        "train",
        "configs/vanilla-breast-cancer.yaml",
    ]
    if launcher.flavor == "openmpi" and "PRTE_MCA_rmaps_default_mapping_policy" not in os.environ:
        assert "PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe" in words


def test_open_mpi_settings_without_overriding_the_users() -> None:
    open_mpi = Launcher("mpiexec", "mpiexec", "openmpi", (5, 0, 11))
    env = open_mpi.environment({"PRTE_MCA_rmaps_default_mapping_policy": "core"})
    assert env["PRTE_MCA_rmaps_default_mapping_policy"] == "core"
    assert "OMPI_MCA_rmaps_base_oversubscribe" not in env
    old = Launcher("mpiexec", "mpiexec", "openmpi", (4, 1, 6)).environment({})
    assert old["OMPI_MCA_rmaps_base_oversubscribe"] == "1"
    assert ("OMPI_ALLOW_RUN_AS_ROOT" in env) == (os.geteuid() == 0)
    assert Launcher("mpiexec", "mpiexec", "mpich", (4, 3)).environment({}) == {}
    srun = Launcher("srun", "/usr/bin/srun", "openmpi", (5, 0), srun_mpi="pmix")
    assert srun.command(8, ["mpisplit", "train"]) == [
        "/usr/bin/srun",
        "-n",
        "8",
        "--mpi=pmix",
        "mpisplit",
        "train",
    ]


def test_bad_launch_input_is_one_line() -> None:
    for args, message in [
        (["-n", "0", "--", "true"], "-n must be at least 1, got 0"),
        (["-n", "2"], "give the command to start"),
    ]:
        result = _mpisplit("launch", *args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_readme_launch_command(dataset, tmp_path: Path) -> None:
    """README's launch line, exactly as written, from a directory holding the data."""
    assert README_LAUNCH in (ROOT / "README.md").read_text()
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(dataset("breast_cancer", clients=3), tmp_path / "data" / "breast_cancer-3c")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", README_LAUNCH],
        capture_output=True,
        text=True,
        timeout=MPIEXEC_TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "try" / "summary.json").is_file()

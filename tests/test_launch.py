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

import pytest

from mpisplit import cli
from mpisplit.launch import Launcher, LaunchError, choose_srun_mpi, find, place
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
        "--kill-on-bad-exit=1",
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


# -- the launch lines of the job scripts (jobscripts/common.sh), built in-process ---------
TASK = ["jobscripts/common.sh", "task", "mpisplit", "train", "c.yaml"]
JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}


def _printed(monkeypatch, capsys, *args: str, **env: str) -> list[str]:
    """The line ``mpisplit launch --print ARGS`` prints, in this process, with ``env`` set
    (and no Slurm variables of the test process's own)."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["launch", "--print", *args]) == 0
    return shlex.split(capsys.readouterr().out)


def test_print_passes_a_hostfile_and_launcher_arguments(monkeypatch, capsys) -> None:
    launcher = find("mpiexec")
    words = _printed(
        monkeypatch,
        capsys,
        "-n",
        "4",
        "--hostfile",
        "hosts.txt",
        "--launcher-arg=-v",
        "--",
        *TASK,
    )
    flag = "--hostfile" if launcher.flavor == "openmpi" else "-f"
    supervise = [sys.executable, "-m", "mpisplit.supervise"]
    assert words[words.index(launcher.program) :] == [
        launcher.program,
        flag,
        "hosts.txt",
        "-n",
        "4",
        "-v",
        *supervise,
        *TASK,
    ]


def test_mpiexec_inside_an_allocation_places_ranks_as_srun_would() -> None:
    """common.sh's mpiexec jobs: the allocation's nodes and tasks per node (cyclic: one slot
    each, so that mpiexec wraps round the nodes); no supervisor, Slurm signals the step."""
    assert place(["n1", "n2", "n3"], "2(x2),1", cyclic=False) == (("n1", 2), ("n2", 2), ("n3", 1))
    assert place(["n1", "n2"], "2(x2)", cyclic=True) == (("n1", 1), ("n2", 1))
    hosts = (("n1", 2), ("n2", 2))
    hydra = Launcher("mpiexec", "mpiexec", "mpich", (5, 0), slurm=JOB, hosts=hosts)
    assert hydra.command(4, TASK) == ["mpiexec", "-hosts", "n1:2,n2:2", "-n", "4", *TASK]
    cyclic = {**JOB, "SLURM_DISTRIBUTION": "cyclic"}
    ompi = Launcher("mpiexec", "mpirun", "openmpi", (5, 0), slurm=cyclic, hosts=hosts)
    assert ompi.command(4, TASK)[:6] == ["mpirun", "--host", "n1:2,n2:2", "--map-by", "node", "-n"]
    assert hydra.command(4, TASK, hostfile="h")[:3] == ["mpiexec", "-f", "h"]


def test_srun_inside_an_allocation() -> None:
    """common.sh's srun jobs: the allocation's tasks (no -n), a failed task ends the step,
    --cpus-per-task passed on except to a heterogeneous job's components, which keep their
    own; those launch without the batch shell's GPUs (component 0's)."""
    job = {**JOB, "SLURM_CPUS_PER_TASK": "2"}
    srun = Launcher("srun", "srun", "mpich", (5, 0), srun_mpi="pmi2", slurm=job)
    assert srun.command(None, TASK, extra=["--exclusive"]) == [
        "srun",
        "--mpi=pmi2",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=2",
        "--exclusive",
        *TASK,
    ]
    het = Launcher("srun", "srun", "mpich", (5, 0), slurm={**job, "SLURM_HET_SIZE": "2"})
    assert het.command(None, TASK, het_group="0,1") == [
        "srun",
        "--kill-on-bad-exit=1",
        "--het-group=0,1",
        *TASK,
    ]
    env = het.environment({"CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin"}, het_group="0,1")
    assert env == {"PATH": "/bin"}


@pytest.mark.skipif(shutil.which("srun") is None, reason="no srun on PATH")
def test_print_srun_with_a_chosen_plugin(monkeypatch, capsys) -> None:
    words = _printed(
        monkeypatch,
        capsys,
        "--launcher",
        "srun",
        "--srun-mpi",
        "pmi2",
        "--het-group=0,1",
        "--",
        *TASK,
        CUDA_VISIBLE_DEVICES="0",
        SLURM_HET_SIZE="2",
    )
    # what the library needs to start (Open MPI: oversubscription, root), none for MPICH
    settings = {f"{k}={v}" for k, v in find("srun", "pmi2").environment({}).items()}
    words = [w for w in words if w not in settings]
    assert words == [
        "env",
        "-u",
        "CUDA_VISIBLE_DEVICES",
        shutil.which("srun"),
        "--mpi=pmi2",
        "--kill-on-bad-exit=1",
        "--het-group=0,1",
        *TASK,
    ]


@pytest.mark.parametrize(
    ("offered", "library", "plugin"),
    [
        (["pmi2", "pmix"], "Open MPI v5.0.11, package: Open MPI ...", "pmix"),
        (["pmi2", "pmix"], "MPICH Version: 5.0.2\nMPICH Release date: ...", "pmi2"),
        (["pmi2", "pmix"], "MPICH Version: 4.2\nConfigure: --with-pmix=/opt", "pmix"),
        (["pmix"], "MPICH Version: 5.0.2", ""),
        (["pmi2", "pmix"], "", "pmi2"),
        (["none"], "Open MPI v5.0.11", ""),
    ],
)
def test_srun_mpi_is_one_both_srun_and_the_library_speak(
    offered: list[str], library: str, plugin: str
) -> None:
    chosen, why = choose_srun_mpi(offered, library)
    assert chosen == plugin
    assert why.startswith(f"srun offers: {' '.join(offered)}; ")


def test_options_of_the_other_launcher_are_errors() -> None:
    mpiexec = Launcher("mpiexec", "mpiexec", "mpich", (5, 0))
    with pytest.raises(LaunchError, match="--het-group is srun's"):
        mpiexec.command(4, TASK, het_group="0,1")
    with pytest.raises(LaunchError, match="mpiexec needs the number of ranks"):
        mpiexec.command(None, TASK)
    with pytest.raises(LaunchError, match="--hostfile is mpiexec's"):
        Launcher("srun", "srun", "mpich", (5, 0)).command(None, TASK, hostfile="h")

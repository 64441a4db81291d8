"""jobscripts/README.md, followed literally: every command of its ``bash`` blocks runs as
written, in one shell, in a fresh copy of the checkout (its tracked and new files, and a
``.venv`` that is this one), on the Slurm cluster the README's own commands start (that block
runs first, the others in order); every job they submit must complete.

Two things are not what a user types: ``tail -F`` (which runs until Ctrl-C) gets SIGINT 3 s
after its file has something in it, and must have printed something; and the test waits for
the jobs to end before it runs the README's command that stops the cluster (the last block).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import GARBLED_RERUNS, PMI2_GARBLED

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "jobscripts" / "README.md"
TIMEOUT_S = 900
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
WATCH = re.compile(r"^tail -[fF] ")
WATCH_FUNCTION = """_readme_watch() {  # a user watching a file, then pressing Ctrl-C
  local file=${@: -1} i out
  for ((i = 0; i < 600; i++)); do [ -s "$file" ] && break; sleep 0.5; done
  out=$(timeout -s INT 3 "$@") || [ $? = 124 ] || return 1
  [ -n "$out" ] || { echo "$* printed nothing" >&2; return 1; }
}
"""
JOB = re.compile(r"JobId=(\d+) .*?JobState=(\S+) .*?StdOut=(\S*)")


def fresh_checkout(target: Path) -> Path:
    """The checkout's tracked and not-ignored files copied to ``target``, with ``.venv``
    linking to the environment running the tests (what tools/install.sh makes)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(Path(sys.prefix))
    return target


def readme_blocks() -> tuple[str, str]:
    """The README's bash blocks in order -- the one that starts the cluster first -- but the
    last, which stops it; and that one."""
    *commands, stop = BLOCK.findall(README.read_text())
    start = [block for block in commands if "cluster.sh start" in block]
    assert len(start) == 1 and "cluster.sh stop" in stop
    return "".join(start + [block for block in commands if block not in start]), stop


def bash(text: str, cwd: Path, env: dict[str, str], timeout: float) -> None:
    """Runs README lines with ``set -e`` (``tail -f`` lines as described above)."""
    lines = [f"_readme_watch {line}" if WATCH.match(line) else line for line in text.splitlines()]
    proc = subprocess.run(
        ["bash", "-c", "set -e\n" + WATCH_FUNCTION + "\n".join(lines)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"README commands failed ({proc.returncode}):\n{text}\n"
        f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )


def wait_for_jobs(env: dict[str, str]) -> list[tuple[str, str, str]]:
    """Waits until the cluster has no pending or running job; (id, state, log) of each."""
    deadline = time.monotonic() + TIMEOUT_S
    while subprocess.run(
        ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=60
    ).stdout.strip():
        assert time.monotonic() < deadline, "README jobs still running"
        time.sleep(1)
    out = subprocess.run(
        ["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    return JOB.findall(out)


def rerun_garbled_starts(
    env: dict[str, str], jobs: list[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """Jobs whose ranks died in MPI start-up on a garbled PMI-2 request (``PMI2_GARBLED``)
    run again (``scontrol requeue``: same id, same log); the jobs' final states."""
    for _ in range(GARBLED_RERUNS):
        garbled = [j for j, state, log in jobs if state == "FAILED" and PMI2_GARBLED in _text(log)]
        if not garbled:
            break
        for job in garbled:
            subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=60)
        jobs = wait_for_jobs(env)
    return jobs


def _text(log: str) -> str:
    return Path(log).read_text(errors="replace") if Path(log).is_file() else ""


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_every_command_of_the_jobscripts_readme(slurm_installed: None, tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MPISPLIT"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin
    )  # the README activates it
    commands, stop = readme_blocks()
    conf = re.search(r"export SLURM_CONF=(\S+)", commands)
    assert conf, "README: no `export SLURM_CONF=...` after starting the cluster"
    try:
        bash(commands, checkout, env, TIMEOUT_S)
        cluster = {**env, "SLURM_CONF": conf[1]}
        jobs = rerun_garbled_starts(cluster, wait_for_jobs(cluster))
        assert len(jobs) >= 5, jobs
        failed = [
            (job, state, _text(log)[-2000:]) for job, state, log in jobs if state != "COMPLETED"
        ]
        assert not failed, failed
    finally:
        bash(stop, checkout, env, 300)

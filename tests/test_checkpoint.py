"""Coordinated checkpoints: a run killed at a random point and resumed ends bit-identical to
an uninterrupted one; each party's files hold only its own part; bad resumes are refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mpisplit.checkpoint import MANIFEST, find_resume_point, latest_committed, resume_settings
from mpisplit.config import ConfigError, load_config
from mpisplit.topology import plan
from tests.conftest import ROOT, run_mpi, start_mpi

LIMIT_S = 120
RANKS = 4
"""Of the vanilla run (server + 3 clients), which the single-scheme tests use."""
QUICK = ("run.progress=none", "run.log_every=1", "train.epochs=4")
"""log_every=1: every record reaches disk at once, so the test sees each rank's pid."""

SCHEMES = {  # scheme: (config, ranks, overrides); every one has 3 clients
    "vanilla": (
        "configs/vanilla-sequential-breast-cancer.yaml",
        4,
        (
            "train.optimizer=adam",
            "train.lr=0.001",
            "train.schedule=cosine",
            "privacy.noise_std=0.1",
            "transport.microbatches=2",
            "train.eval_every=10",
        ),
    ),
    "ushaped": ("configs/ushaped-breast-cancer.yaml", 4, ("scheme.client_order=sequential",)),
    "vertical": ("configs/vertical-breast-cancer.yaml", 4, ()),
    "splitfed": (
        "configs/splitfed-breast-cancer.yaml",
        4,  # 10 rounds an epoch: 12 epochs
        ("scheme.splitfed_variant=v2", "scheme.fedavg_every=5", "train.epochs=12"),
    ),
    "multihop": ("configs/multihop-breast-cancer.yaml", 6, ("scheme.client_order=sequential",)),
}
EVERY = 10
NONE = SimpleNamespace(step=0)


def _data(dataset, scheme: str) -> Path:
    if scheme == "vertical":
        return dataset("breast_cancer", clients=3, partition="vertical")
    return dataset("breast_cancer", clients=3)


def _args(dataset, scheme: str, run_dir: Path) -> list[str]:
    config, _, extra = SCHEMES[scheme]
    return [
        config,
        f"data.path={_data(dataset, scheme)}",
        f"run.dir={run_dir}",
        f"checkpoint.every_steps={EVERY}",
        *QUICK,
        *extra,
    ]


def _start(args: list[str], ranks: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    return start_mpi(ranks, "train", *args, env=env)


def _wait_for_commits(run_dir: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + LIMIT_S
    while (latest_committed(run_dir / "checkpoints") or NONE).step < count * EVERY:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(
                f"{count} checkpoints never committed: {process.communicate()[1][-2000:]}"
            )
        time.sleep(0.02)


def _pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()[0])["pid"]


def _parameters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: torch.load(path) for path in run_dir.glob("model-rank*.pt")}


def _assert_identical(expected: Path, actual: Path) -> None:
    references, resumed = _parameters(expected), _parameters(actual)
    assert references.keys() == resumed.keys() and references
    for part, reference in references.items():
        assert reference.keys() == resumed[part].keys()
        for name, tensor in reference.items():
            assert torch.equal(tensor, resumed[part][name]), f"{part} {name} differs"


def _resumed_at(run_dir: Path, rank: int = 0) -> list[int]:
    lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if record.get("event") == "resumed"]


def _steps_evaluated_after_resume(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics-rank0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    start = max(i for i, r in enumerate(records) if r.get("event") == "resumed")
    return [r["step"] for r in records[start:] if r.get("event") == "eval"]


class _Uninterrupted(dict):
    """One uninterrupted run per scheme, the reference for the resumed ones, run when a test
    first asks for it (a selection of tests runs only the schemes it needs, and each run
    counts against the test that starts it, not against one setup of five runs)."""

    def __init__(self, dataset, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self._dataset, self._tmp = dataset, tmp_path_factory

    def __missing__(self, scheme: str) -> Path:
        run_dir = self._tmp.mktemp(f"full-{scheme}")
        result = run_mpi(
            SCHEMES[scheme][1], "train", *_args(self._dataset, scheme, run_dir), timeout=LIMIT_S
        )
        assert result.returncode == 0, result.stderr[-2000:]
        self[scheme] = run_dir
        return run_dir


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> dict[str, Path]:
    return _Uninterrupted(dataset, tmp_path_factory)


def _recorded(run_dir: Path, rank: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A rank's metrics as one run reads them: its step records, its evaluations (sorted: a
    server tallies parallel clients' evaluation passes in the order they arrive)."""
    lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return (
        [r["step"] for r in records if "step" in r and "event" not in r],
        sorted((r["step"], r["client"]) for r in records if r.get("event") == "eval"),
    )


DAMAGED = {"vanilla": "rank file", "ushaped": "manifest"}
"""Schemes whose newest checkpoint is also damaged after the kill: the resume falls back."""


def _damage_newest(committed, ranks: int, damage: str, chooser: random.Random) -> None:
    if damage == "manifest":
        (committed.path / MANIFEST).write_text('{"step": ')
    else:
        path = committed.rank_file(chooser.randrange(ranks))
        path.write_bytes(path.read_bytes()[: chooser.randrange(1, path.stat().st_size)])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_killed_run_resumes_bit_identical(
    scheme: str, dataset, uninterrupted, tmp_path: Path
) -> None:
    """SIGKILL a random rank after a random number of checkpoints; leave a half-written newer
    checkpoint behind (a crash mid-checkpoint); resume ends with every rank's parameters
    bit-identical to the uninterrupted run, and every rank's metrics reading as one run (the
    lost attempt's records after the checkpoint cut away: no gap, no step twice). Vertical
    resumes as a requeued Slurm job would (``SLURM_RESTART_COUNT``), the others with
    ``--resume``. In ``DAMAGED`` schemes the newest committed checkpoint is damaged too (a
    truncated rank file, a corrupted manifest): the resume falls back to the one before,
    with one warning line."""
    chooser, ranks = random.Random(), SCHEMES[scheme][1]
    commits, victim = chooser.randint(2 if scheme in DAMAGED else 1, 3), chooser.randrange(ranks)
    args = _args(dataset, scheme, tmp_path)
    process = _start(args, ranks)
    _wait_for_commits(tmp_path, commits, process)
    os.kill(_pid(tmp_path, victim), signal.SIGKILL)
    process.communicate(timeout=LIMIT_S)
    assert process.returncode != 0, f"the run ended before rank {victim} was killed"
    committed = latest_committed(tmp_path / "checkpoints")
    assert committed is not None
    partial = tmp_path / "checkpoints" / f"step-{committed.step + EVERY:08d}"
    partial.mkdir(exist_ok=True)
    (partial / "rank-00000.pt").write_bytes(b"half a checkpoint")
    if scheme in DAMAGED:
        _damage_newest(committed, ranks, DAMAGED[scheme], chooser)
        committed = SimpleNamespace(step=committed.step - EVERY)

    requeued = scheme == "vertical"
    resume = [] if requeued else ["--resume"]
    env = {"SLURM_RESTART_COUNT": "1"} if requeued else None
    resumed = _start([*resume, *args], ranks, env)
    _, stderr = resumed.communicate(timeout=LIMIT_S)
    assert resumed.returncode == 0, stderr[-2000:]
    assert _resumed_at(tmp_path) == [committed.step], (commits, victim)
    warnings = [line for line in stderr.splitlines() if line.startswith("mpisplit: warning:")]
    assert len(warnings) == (scheme in DAMAGED), stderr[-2000:]
    assert not warnings or warnings[0].endswith(f"resuming from step {committed.step}")
    _assert_identical(uninterrupted[scheme], tmp_path)
    for rank in range(ranks):
        assert _recorded(tmp_path, rank) == _recorded(uninterrupted[scheme], rank), rank
    if scheme == "vanilla":  # evaluates every 10 steps: the one at the checkpoint is redone
        assert committed.step in _steps_evaluated_after_resume(tmp_path)


def test_each_party_checkpoint_holds_only_its_own_part(uninterrupted) -> None:
    """A rank's checkpoint holds exactly the parameters of the part it trains (the same names
    as its model-rank<R>.pt), so the server's files never hold client weights."""
    run_dir = uninterrupted["vanilla"]
    committed = latest_committed(run_dir / "checkpoints")
    owned = {}
    for rank in range(RANKS):
        state = torch.load(committed.rank_file(rank), weights_only=True)
        names = {name for segment in state["segments"] for name in segment["module"]}
        assert names == set(torch.load(run_dir / f"model-rank{rank}.pt"))
        owned[rank] = names
    assert not owned[0] & owned[1]


def test_preemption_signal_checkpoints_then_resume_finishes_identically(
    dataset, uninterrupted, tmp_path: Path
) -> None:
    """SIGUSR1 (Slurm's pre-emption warning): every rank stops after committing the same
    checkpoint, exit status 4; the resumed run ends bit-identical."""
    args = _args(dataset, "vanilla", tmp_path)
    process = _start(args, RANKS)
    _wait_for_commits(tmp_path, 1, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=LIMIT_S)
    assert process.returncode == 4, stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preempted"] and summary["checkpoint"] > 0
    assert (
        stderr.count(f"stopped by SIGUSR1; checkpoint at step {summary['checkpoint']} committed in")
        == RANKS
    )
    assert latest_committed(tmp_path / "checkpoints").step == summary["checkpoint"]
    stops = [_record(tmp_path, rank, "preempted") for rank in range(RANKS)]

    resumed = run_mpi(RANKS, "train", "--resume", *args, timeout=LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_identical(uninterrupted["vanilla"], tmp_path)
    assert f"resumed from step {summary['checkpoint']} (checkpoint " in resumed.stderr
    _assert_whole_run_summary(tmp_path, summary["checkpoint"], stops)


def _record(run_dir: Path, rank: int, event: str) -> dict:
    """The one ``event`` record of ``rank``'s metrics."""
    records = [
        json.loads(line)
        for line in (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    ]
    (record,) = [r for r in records if r.get("event") == event]
    return record


def _assert_whole_run_summary(run_dir: Path, resumed_from: int, stops: list[dict]) -> None:
    """The summary of a run stopped once (at its checkpoint, with the ``preempted`` records
    ``stops`` per rank, which the resume cuts from the metrics) and resumed covers both
    launches: bytes per rank add up, time too; ``last_launch`` keeps the second's figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    last = summary["last_launch"]
    assert summary["launches"] == 2 and last["resumed_from_step"] == resumed_from
    for rank, (sent, received) in enumerate(
        zip(summary["bytes_sent_per_rank"], summary["bytes_received_per_rank"], strict=True)
    ):
        stopped, end = stops[rank], _record(run_dir, rank, "end")
        assert (last["bytes_sent_per_rank"][rank], last["bytes_received_per_rank"][rank]) == (
            end["bytes_sent"],
            end["bytes_received"],
        )
        assert (sent, received) == (
            stopped["bytes_sent"] + end["bytes_sent"],
            stopped["bytes_received"] + end["bytes_received"],
        )
        if rank == 0:  # the first launch's time up to its checkpoint, then the second's
            assert (
                stopped["wall_s"] * 0.5
                < summary["wall_time_s"] - end["wall_s"]
                <= stopped["wall_s"] + 1e-3
            )
    assert summary["samples_per_s"] == pytest.approx(  # wall_time_s is rounded to 0.1 ms
        summary["train_samples"] / summary["wall_time_s"], rel=1e-4
    )
    assert last["samples_per_s"] > summary["samples_per_s"]


def test_resume_with_another_topology_is_refused(dataset, uninterrupted) -> None:
    """The vanilla checkpoint (server + 3 clients) resumed as server + 2 clients."""
    run_dir = uninterrupted["vanilla"]
    result = run_mpi(
        3,
        "train",
        "--resume",
        "configs/vanilla-sequential-breast-cancer.yaml",
        f"data.path={dataset('breast_cancer', clients=2)}",
        "scheme.clients=2",
        f"run.dir={run_dir}",
        *QUICK,
        timeout=LIMIT_S,
    )
    assert result.returncode == 2
    assert (
        "was written by a 4-rank vanilla run (server, client0, client1, client2); this "
        "run is a 3-rank vanilla run" in result.stderr
    )


def _config(tmp_path: Path, *extra: str):
    return load_config(
        ROOT / "configs/vanilla-sequential-breast-cancer.yaml", [f"run.dir={tmp_path}", *extra]
    )


def test_resume_without_a_checkpoint_or_with_other_settings_is_refused(tmp_path: Path) -> None:
    """So is a fresh run over committed checkpoints."""
    cfg = _config(tmp_path, "checkpoint.every_steps=5")
    with pytest.raises(ConfigError, match="--resume: no committed checkpoint in"):
        find_resume_point(cfg, plan(cfg), resume=True)
    committed = tmp_path / "checkpoints" / "step-00000005"
    committed.mkdir(parents=True)
    (committed / MANIFEST).write_text(
        json.dumps(
            {
                "step": 5,
                "scheme": "vanilla",
                "roles": ["server", "client0", "client1", "client2"],
                "settings": resume_settings(cfg),
            }
        )
    )
    with pytest.raises(ConfigError, match="already holds a committed checkpoint .step 5."):
        find_resume_point(cfg, plan(cfg), resume=False)
    assert find_resume_point(cfg, plan(cfg), resume=True).step == 5
    changed = _config(tmp_path, "checkpoint.every_steps=5", "train.lr=0.5", "data.batch_size=8")
    with pytest.raises(
        ConfigError,
        match=r"--resume: data.batch_size, train.lr differ from the "
        r"checkpoint at step 5 \(was 16, 0.05\)",
    ):
        find_resume_point(changed, plan(changed), resume=True)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path: Path) -> None:
    """A manifest without a setting was written by a run that used its default; one written
    before the options moved to their schemes lists every scheme's options."""
    cfg = _config(tmp_path, "checkpoint.every_steps=5")
    settings = resume_settings(cfg) | {"scheme.tasks": ["class"], "scheme.join": "concat"}
    del settings["scheme.turn_steps"]
    committed = tmp_path / "checkpoints" / "step-00000005"
    committed.mkdir(parents=True)
    (committed / MANIFEST).write_text(
        json.dumps(
            {
                "step": 5,
                "scheme": "vanilla",
                "roles": ["server", "client0", "client1", "client2"],
                "settings": settings,
            }
        )
    )
    assert find_resume_point(cfg, plan(cfg), resume=True).step == 5
    changed = _config(tmp_path, "checkpoint.every_steps=5", "train.lr=0.5")
    with pytest.raises(ConfigError, match=r"--resume: train.lr differ"):
        find_resume_point(changed, plan(changed), resume=True)


def test_checkpoints_need_a_deterministic_step_order(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match="checkpoint.every_steps: coordinated checkpoints need a deterministic step order",
    ):
        _config(tmp_path, "checkpoint.every_steps=5", "scheme.client_order=parallel")


@pytest.mark.parametrize(("every_s", "written"), [(3600.0, False), (0.001, True)])
def test_every_s_decides_whether_a_meeting_writes(
    every_s: float, written: bool, dataset, tmp_path: Path
) -> None:
    """Ranks meet every 10 steps; with every_s an hour none of the meetings of a short run
    writes, with every_s a millisecond each does (the newest ``keep`` are kept)."""
    result = run_mpi(
        RANKS,
        "train",
        *_args(dataset, "vertical", tmp_path),
        f"checkpoint.every_s={every_s}",
        timeout=LIMIT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    committed = list((tmp_path / "checkpoints").glob(f"step-*/{MANIFEST}"))
    assert len(committed) == (2 if written else 0)


HOSTED = {  # four clients at two per rank (server + 2 client ranks): config, overrides
    "vanilla": (
        "configs/vanilla-sequential-breast-cancer.yaml",
        ("train.optimizer=adam", "privacy.noise_std=0.1", "train.eval_every=10"),
    ),
    "splitfed": (
        "configs/splitfed-breast-cancer.yaml",
        ("scheme.splitfed_variant=v2", "scheme.fedavg_every=5", "train.epochs=12"),
    ),
    "ushaped": (
        "configs/ushaped-breast-cancer.yaml",
        ("scheme.client_order=sequential", "train.optimizer=adam", "train.eval_every=10"),
    ),
}


@pytest.mark.parametrize("scheme", HOSTED)
def test_preempted_run_hosting_many_clients_resumes_identically(
    scheme: str, dataset, tmp_path: Path
) -> None:
    """``scheme.clients_per_rank: 2``: a hosting rank's checkpoint holds every client it
    hosts (parts, optimizers, noise streams, samples; the readers resume at each client's
    position), so a run stopped by SIGUSR1 after a checkpoint and resumed ends bit-identical
    to the uninterrupted run, every client's part and the server's. Vanilla and U-shaped in
    sequential turns (the part, U-shaped's head and tail, passes inside and between ranks),
    SplitFed v2 in rounds (the rank meets once the round's last hosted client stepped)."""
    config, extra = HOSTED[scheme]
    data = dataset("breast_cancer", clients=4)
    args = [config, f"data.path={data}", f"checkpoint.every_steps={EVERY}", *QUICK, *extra]
    args += ["scheme.clients=4", "scheme.clients_per_rank=2"]
    full = tmp_path / "full"
    result = run_mpi(3, "train", *args, f"run.dir={full}", timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "stopped"
    process = _start([*args, f"run.dir={run_dir}"], 3)
    _wait_for_commits(run_dir, 1, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=LIMIT_S)
    assert process.returncode == 4, stderr[-2000:]
    stopped = json.loads((run_dir / "summary.json").read_text())["checkpoint"]
    state = torch.load(latest_committed(run_dir / "checkpoints").rank_file(1), weights_only=True)
    assert set(state["counters"]) == {"samples0", "samples1"}
    resumed = run_mpi(3, "train", "--resume", *args, f"run.dir={run_dir}", timeout=LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _resumed_at(run_dir) == [stopped]
    _assert_identical(full, run_dir)
    assert len(list(run_dir.glob("model-rank*-client*.pt"))) == 4
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, run_dir)]
    assert summaries[0]["train_samples"] == summaries[1]["train_samples"]
